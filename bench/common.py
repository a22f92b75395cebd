"""Helpers shared by the benchmarks: medians, free ports, servers as subprocesses."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

from distbelief.client import probe_stats
from distbelief.launcher import free_port_run
from distbelief.layout import Layout

START_TIMEOUT_S = 120.0


# below Linux's ephemeral ports (32768–60999), which outgoing connections take
PORT_RANGE = (20000, 32768)


def xdist_share(total: int) -> tuple[int, int] | None:
    """Under one of several pytest-xdist workers (the variables are inherited by what a
    test starts), the [start, stop) of this worker's equal share of ``total`` things
    (cores, ports); None otherwise, or when there are fewer things than workers."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2 or total < count:
        return None
    size, index = total // count, int(worker[2:])
    return index * size, (index + 1) * size


def port_share() -> tuple[int, int]:
    """The ports this process picks from: all of PORT_RANGE, or under a pytest-xdist
    worker (the benchmarks' smoke tests) that worker's own slice of it, so that tests
    running at once never pick the same port."""
    low, high = PORT_RANGE
    share = xdist_share(high - low)
    return (low, high) if share is None else (low + share[0], low + share[1])


def random_port_start() -> int:
    """Where to start looking for free ports: random in this process's share of the
    range, so concurrent runs rarely collide."""
    low, high = port_share()
    return random.Random(os.getpid() ^ time.monotonic_ns()).randrange(low, high - 64)


def median_time(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``reps`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def fresh_distbelief(args: list[str], stdout: str, stderr: str) -> subprocess.Popen:
    """``python -m distbelief args`` in a session of its own, its output in the files
    ``stdout`` and ``stderr``."""
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        return subprocess.Popen(
            distbelief_cmd(*args), stdout=out, stderr=err, start_new_session=True
        )


# How the benchmarks start ``distbelief`` commands: (args, stdout file, stderr file) to
# what ``subprocess.Popen`` offers (poll, wait, send_signal, pid, returncode). The test
# suite puts its fork server here (tests/conftest.py), so that the benchmarks' smoke
# tests do not pay for an interpreter and torch at every server they start.
START_DISTBELIEF: Callable[[list[str], str, str], Any] = fresh_distbelief


@contextlib.contextmanager
def process(args: list[str]) -> Iterator[subprocess.Popen]:
    """Run ``args`` in its own process group, its output in a temporary folder (read
    it with :func:`stdout_text` and :func:`stderr_tail`); always stop it (SIGTERM, then
    SIGKILL). A ``distbelief_cmd(...)`` is started by ``START_DISTBELIEF``."""
    with tempfile.TemporaryDirectory(prefix="db-bench-") as folder:
        out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        if args[:3] == distbelief_cmd():
            proc = START_DISTBELIEF(args[3:], out, err)
        else:
            with open(out, "wb") as o, open(err, "wb") as e:
                proc = subprocess.Popen(args, stdout=o, stderr=e, start_new_session=True)
        proc.output_files = (out, err)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def stdout_text(proc: Any) -> str:
    with open(proc.output_files[0], errors="replace") as f:
        return f.read()


def stderr_tail(proc: Any, chars: int = 2000) -> str:
    with open(proc.output_files[1], errors="replace") as f:
        return f.read()[-chars:]


# shm: TCP for the headers, the payloads through shared memory (work --shared-memory)
TRANSPORTS = ("tcp", "ipc", "shm")


def client_options(transport: str) -> dict[str, Any]:
    """The ``ClientConfig`` settings a transport needs beyond the addresses."""
    return {"shared_memory": transport == "shm"}


def work_flags(transport: str) -> list[str]:
    """The ``distbelief work`` flags a transport needs beyond ``--servers``."""
    return ["--shared-memory" if transport == "shm" else "--no-shared-memory"]


@contextlib.contextmanager
def serve(
    num_shards: int, *extra: str, transport: str = "tcp"
) -> Iterator[tuple[list[str], subprocess.Popen]]:
    """``distbelief serve --shards N`` on free ports; yields the addresses once they answer,
    and the process (whose children are the shards). With ``transport="ipc"`` the shards
    also listen on Unix sockets (``--ipc-dir``) and those are the addresses yielded; with
    ``"shm"`` the addresses are TCP and clients pass :func:`client_options`."""
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}; known: {', '.join(TRANSPORTS)}")
    base = free_port_run(num_shards, random_port_start())
    addresses = [f"tcp://127.0.0.1:{base + i}" for i in range(num_shards)]
    with contextlib.ExitStack() as stack:
        if transport == "ipc":
            ipc_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="db-bench-"))
            extra = (*extra, "--ipc-dir", ipc_dir)
        args = [
            sys.executable,
            "-m",
            "distbelief",
            "serve",
            "--shards",
            str(num_shards),
            "--port",
            str(base),
            "--metrics-port",
            "0",
            "--log-level",
            "WARNING",
            *extra,
        ]
        proc = stack.enter_context(process(args))
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(s is not None for s in probe_stats(addresses, 1.0)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"shards did not start: {stderr_tail(proc)}")
            time.sleep(0.3)
        time.sleep(0.5)  # a server of someone else's on our port answers; ours then exits
        if proc.poll() is not None:
            raise RuntimeError(f"shards exited: {stderr_tail(proc)}")
        if transport == "ipc":
            addresses = [f"ipc://{ipc_dir}/shard-{i}.sock" for i in range(num_shards)]
        yield addresses, proc


@contextlib.contextmanager
def shards(num_shards: int, *extra: str, transport: str = "tcp") -> Iterator[list[str]]:
    """``distbelief serve --shards N`` on free ports; yields the addresses once they answer."""
    with serve(num_shards, *extra, transport=transport) as (addresses, _):
        yield addresses


def transports_argument(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--transports",
        default=default,
        help="comma-separated: tcp (loopback), ipc (Unix sockets, serve --ipc-dir), "
        "shm (headers over TCP, payloads through shared memory)",
    )


def split_transports(value: str) -> list[str]:
    found = [t.strip() for t in value.split(",") if t.strip()]
    unknown = set(found) - set(TRANSPORTS)
    if unknown or not found:
        raise SystemExit(f"--transports: choose from {', '.join(TRANSPORTS)}, got {value!r}")
    return found


def ratio_line(name: str, baseline: str, base_s: float, ours: str, ours_s: float) -> str:
    """One result line: both times and the ratio baseline/ours (higher is better for us)."""
    return (
        f"{name}: {baseline} {base_s * 1e3:.1f} ms, {ours} {ours_s * 1e3:.1f} ms, "
        f"ratio {base_s / ours_s:.2f}"
    )


def machine() -> str:
    """One line naming the machine: cores, CPU model, torch version."""
    import torch

    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"machine: {os.cpu_count()} cores ({model}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, Python {platform.python_version()}"
    )


def googlenet_layout(num_classes: int, show: bool = True) -> Layout:
    """The flat layout of GoogLeNet with aux heads, as the shards hold it."""
    from distbelief.models import build_model

    layout = Layout.of(build_model("googlenet", num_classes), "googlenet")
    if show:
        print(machine())
        print(
            f"GoogLeNet ({num_classes} classes, aux heads): {layout.total:,} parameters, "
            f"{layout.total * 4 / 1e6:.1f} MB as f32"
        )
    return layout


def distbelief_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "distbelief", *args]


def run_json(args: list[str], timeout_s: float) -> Any:
    """Run a command that prints JSON on its last stdout line; fail loudly otherwise."""
    with process(args) as proc:
        try:
            code = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{args[3:5]} did not finish in {timeout_s:g} s") from None
        if code != 0:
            raise RuntimeError(f"{args[3:5]} exited with {code}: {stderr_tail(proc)}")
        return json.loads(stdout_text(proc).strip().splitlines()[-1])


def one_cpu_replica(servers: list[str], transport: str, *flags: str, timeout_s: float) -> dict:
    """``distbelief work --cpu 1`` against ``servers`` (metrics off, quiet, ``--json``
    and the flags ``transport`` needs, then ``flags``); its summary."""
    cmd = distbelief_cmd(
        "work",
        "--servers",
        ",".join(servers),
        "--cpu",
        "1",
        "--metrics-port",
        "0",
        "--log-level",
        "WARNING",
        "--json",
        *work_flags(transport),
        *flags,
    )
    (summary,) = run_json(cmd, timeout_s)
    return summary


def replica_flags(args: argparse.Namespace, data: str | None = None) -> list[str]:
    """``work``/``train`` flags for ``args``' data (or ``data``), image size, batch,
    steps and classes."""
    return [
        "--data",
        data or args.data,
        "--image-size",
        str(args.image_size),
        "--batch-size",
        str(args.batch_size),
        "--steps",
        str(args.steps),
        "--num-classes",
        str(args.num_classes),
    ]


def replica_run(args: argparse.Namespace, flags: list[str], timeout_s: float) -> dict:
    """One ``work --cpu 1`` run (``args``' shards, transport and :func:`replica_flags`,
    then ``flags``) against fresh shards; its summary."""
    serve_flags = ("--num-classes", str(args.num_classes), "--lr", str(args.lr))
    with shards(args.shards, *serve_flags, transport=args.transport) as servers:
        return one_cpu_replica(
            servers, args.transport, *replica_flags(args), *flags, timeout_s=timeout_s
        )


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live children (Linux /proc; else 0)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0.0
    with contextlib.suppress(OSError):
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()  # noqa: SIM115
        total += (int(fields[11]) + int(fields[12])) / tick
        for task in os.listdir(f"/proc/{pid}/task"):
            children = open(f"/proc/{pid}/task/{task}/children").read().split()  # noqa: SIM115
            total += sum(cpu_seconds(int(c)) for c in children)
    return total


def throughput_line(name: str, baseline: str, base: float, ours: str, value: float) -> str:
    """One result line for rates (images/s): both rates and the ratio ours/baseline."""
    return (
        f"{name}: {baseline} {base:.1f} images/s, {ours} {value:.1f} images/s, "
        f"ratio {value / base:.2f}"
    )
