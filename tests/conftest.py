"""Shared fixtures: free loopback ports and real `distbelief` processes that always stop."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from distbelief import protocol
from distbelief.client import open_dealer
from distbelief.curve import Curve
from distbelief.launcher import free_port_run

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 90.0  # a cold `import torch` plus building GoogLeNet, on a loaded 2-core CI
STOP_TIMEOUT_S = 30.0


def port_is_free(port: int) -> bool:
    return free_port_run(1, port) == port


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports (shard i listens on base+i),
    searched from a random start so that concurrent runs do not collide."""
    start = random.Random(os.getpid() ^ time.monotonic_ns()).randrange(20000, 60000)
    return free_port_run(count, start)


def free_port() -> int:
    return free_ports(1)


def raw_request(
    address: str, frames: list, timeout_s: float = 5.0, curve: str | None = None
) -> list[bytes] | None:
    """Send ``frames`` on a fresh DEALER (speaking CURVE with the client key in ``curve``)
    and return the reply, or None after the timeout."""
    keys = Curve.load(curve, server=False) if curve else None
    sock = open_dealer(zmq.Context.instance(), address, keys)
    try:
        sock.send_multipart(frames)
        if sock.poll(timeout_s * 1000):
            return sock.recv_multipart()
        return None
    finally:
        sock.close(linger=0)


def wait_until_serving(
    address: str, proc: subprocess.Popen, log_path: Path, curve: str | None = None
) -> None:
    """Poll ``stats`` until the server answers; fail the test if the process dies first."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        if raw_request(address, [protocol.request("stats", 1)], 1.0, curve) is not None:
            return
    pytest.fail(f"server at {address} did not answer in {START_TIMEOUT_S} s")


class Processes:
    """Starts `distbelief` subcommands; everything started is stopped at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[tuple[subprocess.Popen, Path]] = []

    def start(self, *args: str, name: str = "proc", env: dict | None = None) -> subprocess.Popen:
        log_path = self.tmp_path / f"{name}-{len(self.started)}.log"
        out = log_path.open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "distbelief", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        proc.log_path = log_path  # type: ignore[attr-defined]
        self.started.append((proc, log_path))
        return proc

    def serve(
        self, num_shards: int, *extra: str, name: str = "serve", curve: str | None = None
    ) -> list[str]:
        """Start ``distbelief serve --shards N`` on free ports; return the shard addresses."""
        base = free_ports(num_shards)
        proc = self.start(
            "serve",
            "--shards",
            str(num_shards),
            "--port",
            str(base),
            "--metrics-port",
            "0",
            *extra,
            *(["--curve", curve] if curve else []),
            name=name,
        )
        addresses = [f"tcp://{LOOPBACK}:{base + i}" for i in range(num_shards)]
        for address in addresses:
            wait_until_serving(address, proc, proc.log_path, curve)
        return addresses

    def average(
        self,
        servers: str,
        *extra: str,
        port: int | None = None,
        curve: str | None = None,
        name: str = "average",
    ) -> tuple[subprocess.Popen, str]:
        """Start ``distbelief average`` of a 10-class GoogLeNet on a free port (metrics
        off unless ``extra`` says otherwise); wait until it answers; return it and its
        address."""
        port = port or free_port()
        proc = self.start(
            "average",
            "--servers",
            servers,
            "--port",
            str(port),
            "--metrics-port",
            "0",
            "--num-classes",
            "10",
            *extra,
            *(["--curve", curve] if curve else []),
            name=name,
        )
        address = f"tcp://{LOOPBACK}:{port}"
        wait_until_serving(address, proc, proc.log_path, curve)
        return proc, address

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        return proc.returncode

    def stop_all(self) -> None:
        for proc, _ in reversed(self.started):
            self.stop(proc)
            # children of a supervisor that died hard share its process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    p = Processes(tmp_path)
    try:
        yield p
    finally:
        p.stop_all()


# momentum 0, lr 1, no weight decay, no schedule: the shard's weights are the initial ones
# minus the sum of the pushed gradients, which a test can compute exactly
PLAIN_SGD = ("--lr", "1", "--momentum", "0", "--weight-decay", "0", "--lr-decay", "1")


# -- `make test-fast`: the tests that start no process and train no network ------------

# modules whose every test starts `distbelief` processes, a real Prometheus, network
# namespaces, a wheel build or a training run of its own
INTEGRATION_MODULES = {
    "test_bench_smoke",
    "test_convergence",
    "test_load",
    "test_multihost",
    "test_packaging",
    "test_prometheus",
    "test_staleness_sim",
    "test_train",
}
# single tests elsewhere that start processes without the `procs` fixture, or train
INTEGRATION_TESTS = {
    "test_evaluate_command_scores_an_exported_model",
    "test_tiny_convnet_learns_demo",
    "test_load_dataset_augmentation_defaults_and_settings",
    "test_replicas_read_disjoint_shares_of_each_epoch",
    "test_bad_augmentation_flags_are_one_line_errors",
}


def pytest_collection_modifyitems(config, items) -> None:
    """Mark as ``integration`` every test that uses real processes; ``make test-fast``
    runs the rest (``-m "not integration"``), ``make test`` runs everything."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if (
            "procs" in getattr(item, "fixturenames", ())
            or module in INTEGRATION_MODULES
            or item.originalname in INTEGRATION_TESTS
        ):
            item.add_marker(pytest.mark.integration)


def pytest_configure(config) -> None:
    """Built demo sets are kept for the session in a folder of its own (every process the
    tests start inherits it), not in the user's cache, and removed at the end."""
    from distbelief.data import DEMO_CACHE_ENV

    if DEMO_CACHE_ENV not in os.environ:
        import tempfile

        config.demo_cache = tempfile.mkdtemp(prefix="distbelief-test-cache-")
        os.environ[DEMO_CACHE_ENV] = config.demo_cache


def pytest_unconfigure(config) -> None:
    import shutil

    folder = getattr(config, "demo_cache", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop("DISTBELIEF_CACHE_DIR", None)
