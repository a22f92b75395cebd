"""Three hosts for real: network namespaces joined by a bridge, one role in each.

Host A runs the shards, host B the averager, host C the replicas; they reach each
other only through the bridge, at their own addresses, on the default ports (every
namespace has its own). The test itself talks to them from the root namespace through
an address on the bridge. Needs root (CI runs as root) and `ip` (iproute2; `make test`
installs it). Namespaces, links and processes are removed at the end, also on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from distbelief.client import probe_stats

START_TIMEOUT_S = 120.0  # three cold `import torch`es on 2 cores
RUN_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 30.0
STEPS = 12
HOSTS = ("shards", "averager", "workers")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


@dataclass
class Network:
    """A bridge in the root namespace and one namespace per host, each with a veth on it."""

    tag: str
    subnet: str  # the first three octets
    namespaces: dict[str, str] = field(default_factory=dict)  # host -> namespace name
    addresses: dict[str, str] = field(default_factory=dict)  # host -> IPv4 address

    @property
    def bridge(self) -> str:
        return f"dbbr{self.tag}"

    def create(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.subnet}.254/24", "dev", self.bridge)  # the test's own address
        ip("link", "set", self.bridge, "up")
        for n, host in enumerate(HOSTS):
            ns, outer, inner = f"db{self.tag}-{host}", f"dbo{self.tag}{n}", f"dbi{self.tag}{n}"
            ip("netns", "add", ns)
            self.namespaces[host] = ns
            ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            ip("link", "set", outer, "master", self.bridge, "up")
            ip("link", "set", inner, "netns", ns)
            address = f"{self.subnet}.{n + 1}"
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", inner)
            ip("-n", ns, "link", "set", inner, "up")
            ip("-n", ns, "link", "set", "lo", "up")
            self.addresses[host] = address

    def destroy(self) -> None:
        """Kill what still runs in the namespaces, then remove them and the bridge."""
        for ns in self.namespaces.values():
            pids = ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            ip("netns", "del", ns, check=False)  # takes its end of the veth pair with it
        ip("link", "del", self.bridge, check=False)


@pytest.fixture
def network() -> Iterator[Network]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.fail("the multi-host test needs root and iproute2 (`make test` installs it)")
    tag = secrets.token_hex(3)  # interface names: at most 15 characters
    net = Network(tag=tag, subnet=f"10.{200 + int(tag[:2], 16) % 50}.{int(tag[2:4], 16)}")
    try:
        net.create()
        yield net
    finally:
        net.destroy()


class Hosts:
    """`distbelief` processes started inside the namespaces; all stopped at teardown."""

    def __init__(self, net: Network, tmp_path: Path) -> None:
        self.net = net
        self.tmp_path = tmp_path
        self.started: list[subprocess.Popen] = []

    def start(self, host: str, *args: str) -> subprocess.Popen:
        log = self.tmp_path / f"{host}.log"
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.net.namespaces[host], sys.executable, "-m", "distbelief"]
            + list(args),
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        proc.log_path = log  # type: ignore[attr-defined]
        self.started.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.log_path.name}\n{p.log_path.read_text(errors='replace')[-2500:]}"  # type: ignore[attr-defined]
            for p in self.started
        )

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(STOP_TIMEOUT_S)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture
def hosts(network: Network, tmp_path: Path) -> Iterator[Hosts]:
    h = Hosts(network, tmp_path)
    try:
        yield h
    finally:
        h.stop_all()


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    found = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert found, f"{name} not in {url}"
    return float(found.group(1))


def wait_until(what: str, check, timeout_s: float, hosts: Hosts):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in hosts.started:
            if proc.poll() not in (None, 0):
                pytest.fail(f"a process exited with {proc.returncode}:\n{hosts.logs()}")
        with contextlib.suppress(OSError, ValueError):
            value = check()
            if value:
                return value
        time.sleep(1.0)
    pytest.fail(f"{what} not seen in {timeout_s:g} s\n{hosts.logs()}")


def test_shards_averager_and_replicas_on_three_hosts(hosts, network, tmp_path):
    a, b = network.addresses["shards"], network.addresses["averager"]
    servers = f"tcp://{a}:5570,tcp://{a}:5571"
    tiny = ("--num-classes", "10")
    hosts.start("shards", "serve", "--shards", "2", "--bind", "0.0.0.0",
                "--metrics-bind", "0.0.0.0", *tiny)  # fmt: skip
    wait_until(
        "both shards answering across the bridge",
        lambda: all(s is not None for s in probe_stats(servers.split(","), 1.0)),
        START_TIMEOUT_S,
        hosts,
    )
    hosts.start("averager", "average", "--servers", servers, "--bind", "0.0.0.0",
                "--metrics-bind", "0.0.0.0", "--every-s", "1", "--eval-every-s", "0",
                *tiny)  # fmt: skip
    status_dir = tmp_path / "status"
    work = hosts.start("workers", "work", "--servers", servers, "--cpu", "2",
                       "--steps", str(STEPS), "--batch-size", "8", "--image-size", "32",
                       "--metrics-bind", "0.0.0.0", "--status-dir", str(status_dir),
                       *tiny)  # fmt: skip
    # mid-run: the shards' versions grow as the replicas on the third host push
    wait_until(
        "shard versions growing",
        lambda: min(s["version"] for s in probe_stats(servers.split(","), 2.0)) >= 4,
        START_TIMEOUT_S,
        hosts,
    )
    try:
        assert work.wait(RUN_TIMEOUT_S) == 0, hosts.logs()
    except subprocess.TimeoutExpired:
        pytest.fail(f"the replicas did not finish in {RUN_TIMEOUT_S:g} s\n{hosts.logs()}")
    for i in range(2):
        status = json.loads((status_dir / f"replica-{i}.json").read_text())
        assert status["step"] == STEPS and status["done"] and status["pushes"] == STEPS
    stats = probe_stats(servers.split(","), 5.0)
    assert [s["version"] for s in stats] == [2 * STEPS] * 2  # every push, on both shards
    assert [s["examples"] for s in stats] == [2 * STEPS * 8] * 2
    for i in range(2):  # the shards' metrics, scraped across the bridge
        url = f"http://{a}:{9100 + i}/metrics"
        assert metric(url, "distbelief_shard_version") == 2 * STEPS
        assert metric(url, "distbelief_shard_workers") == 2

    # the averager on the second host pulls snapshots from the shards on the first and
    # catches the final version at its next pull (its shard_version sums the shards')
    final = 2 * (2 * STEPS)

    def averaged() -> dict | None:
        (avg,) = probe_stats([f"tcp://{b}:5590"], 2.0)
        return avg if avg and avg["shard_version"] == final else None

    avg = wait_until("the averager folding in the final weights", averaged, 30, hosts)
    assert avg["snapshots"] >= 2 and avg["versions"][-1] == final, avg
    assert metric(f"http://{b}:9190/metrics", "distbelief_averager_updates_total") >= 2
