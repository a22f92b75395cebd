"""A network of hosts on this machine: namespaces on a bridge, each link rate-limited.

Each host is a network namespace with its own address on one bridge in the root
namespace (and its own ports, so every host can use the default ones). With ``rate_mbit``
each host's link is a token bucket (``tc qdisc ... tbf``) of that rate in both
directions: on the host's end of its veth pair (what the host sends, its upload) and on
the bridge's end (what it receives, its download). The link, not this machine's
cores, is then what limits an exchange, as between the GPU hosts of a real cluster.
Needs root and iproute2 (``ip``, ``tc``); ``netem`` (delay, loss) is not used.

    with NetBed(("ps0", "w0"), rate_mbit=1000) as bed:
        bed.popen("ps0", [sys.executable, "-m", "distbelief", "serve", "--bind", "0.0.0.0"])
        ...  # bed.addresses["ps0"] is where w0 reaches it

Everything (processes started in the namespaces, namespaces, links, the bridge) is
removed when the ``with`` block ends, also on failure. The test suite's multi-host test
and ``bench/wire.py`` use it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

# tbf's bucket: at least a few 64 KB segments (veth passes GSO packets of up to 64 KB
# whole; a smaller bucket drops them) and at least one timer tick of the rate
BURST_BYTES = 512 * 1024
QUEUE_LATENCY_MS = 5  # how long a packet may wait in the bucket's queue before a drop


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def tc(*args: str) -> None:
    subprocess.run(["tc", *args], capture_output=True, text=True, timeout=30, check=True)


def available() -> str | None:
    """None when a bed can be built here; else why not, for a person."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found (install iproute2)"
    return None


class NetBed:
    """Hosts as namespaces on one bridge; ``rate_mbit`` limits each host's link."""

    def __init__(self, hosts: Sequence[str], rate_mbit: float | None = None) -> None:
        if len(set(hosts)) != len(hosts) or not hosts or len(hosts) > 200:
            raise ValueError("hosts: 1 to 200 distinct names")
        self.hosts = tuple(hosts)
        self.rate_mbit = rate_mbit
        self.tag = secrets.token_hex(3)  # interface names: at most 15 characters
        self.subnet = f"10.{200 + int(self.tag[:2], 16) % 50}.{int(self.tag[2:4], 16)}"
        self.namespaces: dict[str, str] = {}  # host -> namespace name
        self.addresses: dict[str, str] = {}  # host -> IPv4 address
        self.devices: dict[str, tuple[str, str]] = {}  # host -> (bridge end, host end)
        self.started: list[subprocess.Popen] = []

    @property
    def bridge(self) -> str:
        return f"dbbr{self.tag}"

    @property
    def gateway(self) -> str:
        """The root namespace's address on the bridge (not rate-limited)."""
        return f"{self.subnet}.254"

    def __enter__(self) -> NetBed:
        reason = available()
        if reason:
            raise RuntimeError(f"cannot build the network test bed: {reason}")
        try:
            self.create()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def create(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for n, host in enumerate(self.hosts):
            ns, outer, inner = f"db{self.tag}-{n}", f"dbo{self.tag}{n}", f"dbi{self.tag}{n}"
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
            self.devices[host] = (outer, inner)
            if self.rate_mbit:
                self._limit(ns, outer, inner)

    def _limit(self, ns: str, outer: str, inner: str) -> None:
        rate = f"{self.rate_mbit:g}mbit"
        shape = ("root", "tbf", "rate", rate, "burst", str(BURST_BYTES))
        shape += ("latency", f"{QUEUE_LATENCY_MS}ms")
        tc("qdisc", "add", "dev", outer, *shape)  # into the host: its download
        tc("-n", ns, "qdisc", "add", "dev", inner, *shape)  # out of the host: its upload

    def prefix(self, host: str) -> list[str]:
        """The argv prefix that runs a command inside ``host``."""
        return ["ip", "netns", "exec", self.namespaces[host]]

    def popen(
        self, host: str, argv: Sequence[str], log: Path | None = None, **kw
    ) -> subprocess.Popen:
        """Start ``argv`` inside ``host`` (output to ``log``); stopped by ``destroy``."""
        out = log.open("wb") if log is not None else subprocess.DEVNULL
        proc = subprocess.Popen(
            [*self.prefix(host), *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kw,
        )
        proc.log_path = log  # type: ignore[attr-defined]
        self.started.append(proc)
        return proc

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM what this bed started (newest first), SIGKILL what does not stop."""
        for proc in reversed(self.started):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        self.started.clear()

    def destroy(self) -> None:
        """Kill what still runs in the namespaces, then remove them and the bridge."""
        self.stop(timeout_s=10.0)
        for ns in self.namespaces.values():
            for pid in ip("netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            ip("netns", "del", ns, check=False)  # takes its end of the veth pair with it
        self.namespaces.clear()
        ip("link", "del", self.bridge, check=False)
