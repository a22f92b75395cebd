"""Three hosts for real: network namespaces joined by a bridge, one role in each.

Host A runs the shards, host B the averager, host C the replicas; they reach each
other only through the bridge, at their own addresses, on the default ports (every
namespace has its own). The test itself talks to them from the root namespace through
an address on the bridge. The hosts are `bench/netbed.py`'s test bed. Needs root (CI
runs as root) and iproute2 (`make test` installs it). Namespaces, links and processes
are removed at the end, also on failure.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import netbed
from bench.netbed import NetBed
from distbelief import protocol
from distbelief.client import (
    LINK_SEND_BUFFER_BYTES,
    MAX_LEAVING,
    PART_BYTES,
    SEND_BUFFER_BYTES,
    SLOW_SLICE,
    ClientConfig,
    ParameterClient,
    beside_slow_slice,
    host_of,
    probe_stats,
    staggered_order,
)

START_TIMEOUT_S = 120.0  # three cold `import torch`es on 2 cores
RUN_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 30.0
STEPS = 12
HOSTS = ("shards", "averager", "workers")


@pytest.fixture
def network() -> Iterator[NetBed]:
    reason = netbed.available()
    if reason:
        pytest.fail(
            f"the multi-host test needs root and iproute2 (`make test` installs it): {reason}"
        )
    with NetBed(HOSTS) as bed:
        yield bed


class Hosts:
    """`distbelief` processes started inside the namespaces; all stopped at teardown."""

    def __init__(self, net: NetBed, tmp_path: Path) -> None:
        self.net = net
        self.tmp_path = tmp_path

    @property
    def started(self) -> list[subprocess.Popen]:
        return self.net.started

    def start(self, host: str, *args: str) -> subprocess.Popen:
        log = self.tmp_path / f"{host}.log"
        return self.net.popen(host, [sys.executable, "-m", "distbelief", *args], log)

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.log_path.name}\n{p.log_path.read_text(errors='replace')[-2500:]}"  # type: ignore[attr-defined]
            for p in self.started
        )


@pytest.fixture
def hosts(network: NetBed, tmp_path: Path) -> Iterator[Hosts]:
    h = Hosts(network, tmp_path)
    try:
        yield h
    finally:
        network.stop(STOP_TIMEOUT_S)


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


RATE_MBIT = 500.0  # well below what this machine's cores move through a veth
SLOW_STEPS = 6


def test_a_replica_on_a_slow_link_trains_at_the_links_speed(tmp_path):
    """A replica on a 500 Mbit/s link (both ways) to a host of two shards: it trains,
    retries nothing, and its exchanges take what the link's bound says plus a margin:
    at least the bytes over the rate (so the link, not the cores, was the limit), at
    most the bound of push-and-pull in parts (the upload of the later parts while the
    first ones come back: one way's time and a little) with 30% and a second to spare.
    The shards are on another host, so the replica's defaults `--wire-dtype auto` and
    `--wire-parts auto` move bf16 (half the bytes of f32) in parts."""
    reason = netbed.available()
    if reason:
        pytest.fail(f"the test bed needs root and iproute2 (`make test` installs it): {reason}")
    with NetBed(("shards", "workers"), rate_mbit=RATE_MBIT) as bed:
        hosts = Hosts(bed, tmp_path)
        a = bed.addresses["shards"]
        servers = [f"tcp://{a}:5570", f"tcp://{a}:5571"]
        hosts.start("shards", "serve", "--shards", "2", "--bind", "0.0.0.0",
                    "--num-classes", "10", "--metrics-port", "0")  # fmt: skip
        wait_until(
            "both shards answering across the bridge",
            lambda: all(s is not None for s in probe_stats(servers, 1.0)),
            START_TIMEOUT_S,
            hosts,
        )
        status_dir = tmp_path / "status"
        work = hosts.start("workers", "work", "--servers", ",".join(servers), "--cpu", "1",
                           "--steps", str(SLOW_STEPS), "--batch-size", "8", "--image-size", "32",
                           "--data", "synthetic", "--num-classes", "10", "--timeout-s", "5",
                           "--metrics-port", "0", "--status-dir", str(status_dir))  # fmt: skip
        try:
            assert work.wait(RUN_TIMEOUT_S) == 0, hosts.logs()
        except subprocess.TimeoutExpired:
            pytest.fail(f"the replica did not finish in {RUN_TIMEOUT_S:g} s\n{hosts.logs()}")
        status = json.loads((status_dir / "replica-0.json").read_text())
        stats = probe_stats(servers, 5.0)
        size = sum(s["stop"] - s["start"] for s in stats)
        fastest = _fastest_slice_rate(servers)
        bed.stop()
    # the client times its slices leaving by the link's rate (beside_slow_slice compares
    # with it): about 500 Mbit/s, neither instant nor stalled
    assert 0.6 * RATE_MBIT * 1e6 / 8 <= fastest <= 1.3 * RATE_MBIT * 1e6 / 8, fastest
    assert status["step"] == SLOW_STEPS and status["done"] and status["retries"] == 0
    assert status["loss"] == status["loss"]  # finite
    assert status["pushes"] == status["pulls"] == SLOW_STEPS
    assert [s["version"] for s in stats] == [SLOW_STEPS] * 2
    link_s = 2 * size * 8 / (RATE_MBIT * 1e6)  # the bf16 vector over the link, one way
    # the first pull and the last push each move the vector one way; the pushes between
    # bring the weights back, the second shard's slice uploading while the first answers
    floor = (2 + (SLOW_STEPS - 1)) * link_s
    bound = (2 + (SLOW_STEPS - 1) * 1.1) * link_s
    assert 0.9 * floor <= status["exchange_s"] <= 1.3 * bound + 1.0, (status, link_s)
    # every push-and-pull went in parts (of 256 KiB of bf16: 40 a shard), none left partial
    counts = [
        protocol.parts_for(n, protocol.wire_bytes("bf16", n), PART_BYTES)
        for n in (s["stop"] - s["start"] for s in stats)
    ]
    assert [s["parts"] for s in stats] == [(SLOW_STEPS - 1) * n for n in counts]
    assert [s["partial_pushes"] for s in stats] == [0, 0]


def test_a_slices_order_takes_hosts_in_turn_from_the_replicas_arrival():
    servers = tuple(f"tcp://10.0.0.{h}:{5570 + k}" for h in (1, 2) for k in range(2))
    assert staggered_order(servers, 0) == [0, 2, 1, 3]  # host 1, host 2, host 1, host 2
    assert staggered_order(servers, 1) == [2, 1, 3, 0]  # the next replica starts on host 2
    assert host_of(servers[2]) == "tcp://10.0.0.2" and host_of("ipc:///tmp/s.sock") == "local"


def test_pushes_in_parts_to_another_host_keep_a_small_send_buffer():
    """What a socket has in flight stands in the link's queue: parts to another host
    go through a 64 KiB send buffer; whole slices, and anything on this host, 256 KiB
    (until connect() the client goes by its setting; bench/RESULTS.md, wire)."""
    import zmq

    servers = ("tcp://10.0.0.1:5570", "tcp://127.0.0.1:5571", "ipc:///tmp/db-none.sock")
    for setting, first in (("auto", LINK_SEND_BUFFER_BYTES), ("off", SEND_BUFFER_BYTES)):
        with ParameterClient(ClientConfig(servers=servers, wire_parts=setting)) as client:
            buffers = [s.getsockopt(zmq.SNDBUF) for s in client.sockets[:2]]
            assert buffers == [first, SEND_BUFFER_BYTES], setting


def test_a_second_slice_leaves_only_beside_a_slow_one_to_another_host():
    """Two replicas' uploads meeting on one shard host each get half its link: then the
    next slice, to another host, may leave beside the slow one (bench/RESULTS.md, wire)."""
    rate = 125e6  # 1 Gbit/s: 8 MB in 64 ms
    slow = dict(elapsed_s=0.2, nbytes=8_000_000, fastest_bytes_per_s=rate)
    on_time = dict(elapsed_s=0.07, nbytes=8_000_000, fastest_bytes_per_s=rate)
    assert beside_slow_slice(in_flight=1, same_host=False, **slow)
    assert not beside_slow_slice(in_flight=1, same_host=False, **on_time)  # under 1.25×
    assert not beside_slow_slice(in_flight=1, same_host=True, **slow)  # the same link
    assert not beside_slow_slice(in_flight=MAX_LEAVING, same_host=False, **slow)
    # no slice timed yet: nothing to compare with, one at a time
    unknown = dict(slow, fastest_bytes_per_s=0.0)
    assert not beside_slow_slice(in_flight=1, same_host=False, **unknown)
    # the threshold is SLOW_SLICE times the time at the fastest rate
    edge = SLOW_SLICE * 8_000_000 / rate
    assert beside_slow_slice(in_flight=1, same_host=False, **dict(slow, elapsed_s=edge * 1.01))
    assert not beside_slow_slice(in_flight=1, same_host=False, **dict(slow, elapsed_s=edge * 0.99))


def _fastest_slice_rate(servers: list[str]) -> float:
    """Push-and-pull three times from this process (outside the shards' host, so through
    its rate-limited link, f32, whole slices one after the other: as to shards that
    take no parts); the client's fastest timed slice, bytes per second."""
    import torch

    from distbelief.client import ClientConfig, ParameterClient
    from distbelief.layout import Layout
    from distbelief.models import build_model

    layout = Layout.of(build_model("googlenet", 10), "googlenet")
    cfg = ClientConfig(
        servers=tuple(servers), wire_dtype="f32", wire_parts="off", worker="rate-probe"
    )
    weights, grads = torch.zeros(layout.total), torch.zeros(layout.total)
    with ParameterClient(cfg, layout) as client:
        client.connect()
        client.pull(weights)
        for _ in range(3):
            client.push(grads, examples=8, pull_into=weights)
        return client.fastest_bytes_per_s
