"""Shared fixtures: free loopback ports and real `distbelief` processes that always stop."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from xdist.scheduler import LoadGroupScheduling

from bench import common as bench_common
from bench.common import random_port_start, xdist_share
from distbelief import protocol
from distbelief.client import open_dealer
from distbelief.curve import Curve
from distbelief.launcher import free_port_run
from distbelief.supervise import ForkedChild, ask
from tests import zygote

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 90.0  # a cold `import torch` plus building GoogLeNet, on a loaded 2-core CI
STOP_TIMEOUT_S = 30.0


def port_is_free(port: int) -> bool:
    return free_port_run(1, port) == port


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports (shard i listens on base+i),
    searched from a random start in this pytest worker's share of the ports, so that
    concurrent tests do not collide (bench/common.py)."""
    return free_port_run(count, random_port_start())


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


class ForkServer:
    """The connection to tests/zygote.py, started at the first process a test asks for
    and stopped when the session ends."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.conn: socket.socket | None = None
        self.folder: str | None = None
        self.lock = threading.Lock()

    def _request(self, request: dict) -> dict:
        with self.lock:
            if self.conn is None:
                self._start()
            return ask(self.conn, request, "the tests' fork server (tests/zygote.py) ended")

    def _start(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="distbelief-zygote-")
        path = os.path.join(self.folder, "socket")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.zygote", path],
            cwd=Path(__file__).resolve().parent.parent,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not os.path.exists(path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the tests' fork server did not start ({self.proc.poll()})")
            time.sleep(0.05)
        self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.conn.connect(path)

    def spawn(
        self, args: list[str], env: dict, log_path: Path, stdout: str | None = None
    ) -> ForkedChild:
        request = {"op": "spawn", "argv": args, "env": env, "cwd": os.getcwd()}
        pid = self._request({**request, "log": str(log_path), "stdout": stdout})["pid"]
        return ForkedChild(self, pid, ["distbelief", *args])

    def exitcode(self, pid: int) -> int | None:
        return self._request({"op": "status", "pid": pid})["returncode"]

    def stop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.proc.wait(STOP_TIMEOUT_S)
            shutil.rmtree(self.folder, ignore_errors=True)


ZYGOTE = ForkServer()


def zygote_distbelief(args: list[str], stdout: str, stderr: str):
    """The benchmarks' ``START_DISTBELIEF`` in the tests: forked from the fork server."""
    env = dict(os.environ)
    if not zygote.forkable(env):
        return bench_common.fresh_distbelief(args, stdout, stderr)
    return ZYGOTE.spawn(args, env, Path(stderr), stdout=stdout)


bench_common.START_DISTBELIEF = zygote_distbelief


class Processes:
    """Starts `distbelief` subcommands; everything started is stopped at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[tuple[subprocess.Popen, Path]] = []

    def start(
        self, *args: str, name: str = "proc", env: dict | None = None, fork: bool = True
    ) -> subprocess.Popen:
        """``distbelief args`` in a session of its own, output in the returned object's
        ``log_path``; forked from the tests' fork server (tests/zygote.py) unless
        ``env`` changes what torch reads at import, or ``fork`` is false (a fresh
        interpreter, for a test that measures the process itself, e.g. its memory)."""
        log_path = self.tmp_path / f"{name}-{len(self.started)}.log"
        full_env = {**os.environ, **(env or {})}
        if fork and zygote.forkable(full_env):
            log_path.write_bytes(b"")
            proc = ZYGOTE.spawn(list(args), full_env, log_path)
        else:
            proc = subprocess.Popen(
                [sys.executable, "-m", "distbelief", *args],
                stdout=log_path.open("wb"),
                stderr=subprocess.STDOUT,
                env=full_env,
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


# the longest tests (docs/benchmarks.md), started first so that with several pytest
# workers (`make test` runs two) none of them is left to run alone at the end
LONGEST_FIRST = (
    "test_convergence.py::",
    "test_load.py::",
    "test_elastic.py::test_replicas_join",
    "test_faults.py::test_a_slow_flaky_network",
    "test_bench_smoke.py::test_wire",
    "test_bench_gpu.py::test_gpu_bench_runs",
    "test_bench_smoke.py::test_convergence",
    "test_elastic.py::test_a_replica_twice_as_slow",
)


# Tests one pytest worker runs one after the other. "up": the tests that run
# `distbelief up`, which takes its ports from fixed defaults upward (5570, 9100, ...),
# so that two of them never pick the same free ports before either has bound them.
# "fuzz": its last tests check what the fuzzing before them left in the same servers.
SAME_WORKER = {
    "test_convergence.py::": "up",
    "test_prometheus.py::": "up",
    "test_work.py::test_up_with": "up",
    "test_fuzz.py::": "fuzz",
}


def longest_first(item) -> int:
    for rank, prefix in enumerate(LONGEST_FIRST):
        if prefix in item.nodeid:
            return rank
    return len(LONGEST_FIRST)


def same_worker_group(nodeid: str) -> str | None:
    return next((g for prefix, g in SAME_WORKER.items() if prefix in nodeid), None)


class SameWorkerScheduling(LoadGroupScheduling):
    """``--dist loadgroup`` with the groups of SAME_WORKER. pytest-xdist's own groups
    (``xdist_group`` marks) reach its scheduler as a suffix its workers add to each
    test's id, and under pytest 9.2 that suffix is lost (xdist 3.8 sets an attribute
    pytest no longer reads): until 2026-12-04 no group held, and both workers ran
    `up` at once. This scheduler groups by the ids themselves."""

    def _split_scope(self, nodeid: str) -> str:
        return same_worker_group(nodeid) or nodeid


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") == "loadgroup":
        return SameWorkerScheduling(config, log)
    return None


def pytest_collection_modifyitems(config, items) -> None:
    """Mark as ``integration`` every test that uses real processes; ``make test-fast``
    runs the rest (``-m "not integration"``), ``make test`` runs everything. The
    longest tests go first; the groups in SAME_WORKER each run in one pytest worker
    (SameWorkerScheduling)."""
    items.sort(key=longest_first)
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if (
            "procs" in getattr(item, "fixturenames", ())
            or module in INTEGRATION_MODULES
            or item.originalname in INTEGRATION_TESTS
        ):
            item.add_marker(pytest.mark.integration)


def pin_to_own_cores() -> None:
    """Under pytest-xdist, give each worker its own share of the cores (the processes
    its tests start inherit it, and size their torch threads from it): torch's threads
    spinning on cores that another worker's processes held made the exactness tests 6
    times slower (docs/benchmarks.md)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    share = xdist_share(len(cores))
    if share is None:
        return
    os.sched_setaffinity(0, cores[share[0] : share[1]])
    import torch  # its OpenMP counted the cores when it was loaded

    torch.set_num_threads(share[1] - share[0])


def pytest_configure(config) -> None:
    """Built demo sets are kept for the session in a folder of its own (every process the
    tests start inherits it), not in the user's cache, and removed at the end."""
    from distbelief.data import DEMO_CACHE_ENV

    pin_to_own_cores()
    if DEMO_CACHE_ENV not in os.environ:
        import tempfile

        config.demo_cache = tempfile.mkdtemp(prefix="distbelief-test-cache-")
        os.environ[DEMO_CACHE_ENV] = config.demo_cache


def pytest_unconfigure(config) -> None:
    ZYGOTE.stop()
    folder = getattr(config, "demo_cache", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop("DISTBELIEF_CACHE_DIR", None)


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With DISTBELIEF_TEST_CPU_LOG set, append each test's wall time and the machine's
    busy CPU seconds during it (setup and teardown included) to that file: where the
    suite's time goes on an otherwise idle machine (docs/benchmarks.md)."""
    log = os.environ.get("DISTBELIEF_TEST_CPU_LOG")
    if not log:
        yield
        return
    wall, busy = time.monotonic(), _machine_busy_s()
    yield
    wall, busy = time.monotonic() - wall, _machine_busy_s() - busy
    with open(log, "a") as f:
        f.write(f"{wall:.1f}\t{busy:.1f}\t{item.nodeid}\n")
