"""Helpers shared by the benchmarks: medians, free ports, servers as subprocesses."""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

from distbelief.client import probe_stats
from distbelief.launcher import free_port_run

START_TIMEOUT_S = 120.0


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


@contextlib.contextmanager
def process(args: list[str]) -> Iterator[subprocess.Popen]:
    """Run ``args`` in its own process group; always stop it (SIGTERM, then SIGKILL)."""
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
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


@contextlib.contextmanager
def shards(num_shards: int, *extra: str) -> Iterator[list[str]]:
    """``distbelief serve --shards N`` on free ports; yields the addresses once they answer."""
    base = free_port_run(num_shards, 21000)
    addresses = [f"tcp://127.0.0.1:{base + i}" for i in range(num_shards)]
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
    with process(args) as proc:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(s is not None for s in probe_stats(addresses, 1.0)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"shards did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.3)
        yield addresses


def ratio_line(name: str, baseline: str, base_s: float, ours: str, ours_s: float) -> str:
    """One result line: both times and the ratio baseline/ours (higher is better for us)."""
    return (
        f"{name}: {baseline} {base_s * 1e3:.1f} ms, {ours} {ours_s * 1e3:.1f} ms, "
        f"ratio {base_s / ours_s:.2f}"
    )
