"""Load: 8 clients pushing and pulling the full GoogLeNet vector for 60 s against 2 shards.

Nothing is lost or applied twice (each shard's version is exactly the pushes it
accepted, and its weights are the initial ones minus that many gradients), the shards'
resident memory stays flat after warm-up, and no request waits longer than a bound.
"""

from __future__ import annotations

import contextlib
import re
import statistics
import threading
import time
from pathlib import Path

import pytest
import torch
from distbelief.server.service import IDLE_RELEASE_S
from distbelief.server.shard import initial_weights

from distbelief.client import ClientConfig, ParameterClient, probe_stats

from .conftest import LOOPBACK, PLAIN_SGD, free_ports, wait_until_serving

NUM_CLASSES = 10
CLIENTS = 8
LOAD_S = 60.0
WARMUP_S = 15.0
# Shards keep freed message memory for reuse while busy (distbelief/tuning.py), so under
# load their resident memory follows how many 20 MB messages happen to be in flight,
# and swung by 6% between 10 s windows in CI. They give it back after idling
# IDLE_RELEASE_S; what they hold then is what they keep. So memory is read at rest: all
# clients pause after warm-up and the shards are read once idle, then again at the end.
REST_S = IDLE_RELEASE_S + 2.0
REST_READS = 6  # every 0.5 s after REST_S
MAX_WAIT_S = 10.0  # the stated bound on one request (push or pull) under this load
MAX_RSS_GROWTH = 0.05


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) * 1024


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_eight_clients_for_a_minute_lose_nothing_and_hold_memory(procs, capsys):
    base = free_ports(2)
    shards = []
    for index in range(2):
        proc = procs.start(
            "serve",
            "--shard-index",
            str(index),
            "--num-shards",
            "2",
            "--port",
            str(base),
            "--metrics-port",
            "0",
            "--num-classes",
            str(NUM_CLASSES),
            *PLAIN_SGD,
            name=f"shard{index}",
            fork=False,  # its resident memory is measured: a fresh interpreter, as users run it
        )
        wait_until_serving(f"tcp://{LOOPBACK}:{base + index}", proc, proc.log_path)
        shards.append(proc)
    addresses = tuple(f"tcp://{LOOPBACK}:{base + i}" for i in range(2))
    layout, initial = initial_weights("googlenet", NUM_CLASSES, 0)
    g = torch.zeros(layout.total)
    g[: layout.parameters] = 2.0**-14
    began = time.monotonic()
    phase_end = [began + WARMUP_S]  # then, after the rest, the end of the load
    accepted = [[0, 0] for _ in range(CLIENTS)]
    waits: list[list[float]] = [[] for _ in range(CLIENTS)]
    errors: list[BaseException] = []
    rest, resume = threading.Barrier(CLIENTS + 1), threading.Event()

    def client(k: int) -> None:
        try:
            cfg = ClientConfig(servers=addresses, timeout_s=MAX_WAIT_S, retries=0, worker=f"c{k}")
            weights = torch.empty(layout.total)
            with ParameterClient(cfg, layout) as c:
                c.connect()
                n = 0
                for phase in ("warm-up", "load"):
                    while time.monotonic() < phase_end[0]:
                        t0 = time.monotonic()
                        results = c.push(g, examples=1)
                        t1 = time.monotonic()
                        c.pull(weights)
                        t2 = time.monotonic()
                        waits[k] += [t1 - t0, t2 - t1]
                        for i, r in enumerate(results):
                            accepted[k][i] += r.applied
                        n += 1
                        if n % 10 == 0:  # a retried push: the same (worker, seq) again
                            c.seq -= 1
                            assert not any(r.applied for r in c.push(g, examples=1))
                    if phase == "warm-up":
                        rest.wait(MAX_WAIT_S * 2)
                        resume.wait(MAX_WAIT_S * 2)
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)
            rest.abort()

    def at_rest() -> list[int]:
        # the least of a few reads once idle: on a loaded CI machine a shard may give
        # its freed memory back a moment after IDLE_RELEASE_S; what it holds stays
        time.sleep(REST_S)
        reads = []
        for _ in range(REST_READS):
            reads.append([rss_bytes(p.pid) for p in shards])
            time.sleep(0.5)
        return [min(r[i] for r in reads) for i in range(len(shards))]

    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a client failed: see below
        rest.wait(WARMUP_S + MAX_WAIT_S * 2)
        after_warmup = at_rest()
    under_load: list[list[int]] = []
    phase_end[0] = time.monotonic() + LOAD_S - WARMUP_S
    resume.set()
    while any(t.is_alive() for t in threads):
        under_load.append([rss_bytes(p.pid) for p in shards])
        time.sleep(1.0)
    for t in threads:
        t.join(MAX_WAIT_S)
    assert not errors, errors[0]

    # nothing lost, nothing applied twice
    stats = probe_stats(list(addresses), 10)
    totals = [sum(a[i] for a in accepted) for i in range(2)]
    assert [s["version"] for s in stats] == totals
    assert totals[0] == totals[1] >= CLIENTS * 10
    assert stats[0]["duplicates"] >= CLIENTS
    with ParameterClient(ClientConfig(servers=addresses, timeout_s=20), layout) as c:
        c.connect()
        weights = torch.empty(layout.total)
        c.pull(weights)
    # one push more or less would be off by 2^-14 = 6e-5 everywhere
    torch.testing.assert_close(weights, initial - totals[0] * g, rtol=0, atol=2e-6)

    # memory at rest flat after warm-up, and every request answered within the bound
    at_end = at_rest()
    growth = [end / warm - 1 for end, warm in zip(at_end, after_warmup, strict=True)]
    peak = [max(r[i] for r in under_load) for i in range(2)]
    all_waits = sorted(w for ws in waits for w in ws)
    worst = all_waits[-1]
    with capsys.disabled():
        print(
            f"\nload: {CLIENTS} clients, {LOAD_S:g} s, {totals[0]} pushes per shard "
            f"({totals[0] / LOAD_S:.1f}/s), request wait median "
            f"{statistics.median(all_waits) * 1000:.0f} ms, p99 "
            f"{all_waits[int(0.99 * len(all_waits))] * 1000:.0f} ms, max {worst * 1000:.0f} ms; "
            f"shard RSS at rest after warm-up {after_warmup[0] >> 20} / "
            f"{after_warmup[1] >> 20} MB, at the end {growth[0]:+.1%} / {growth[1]:+.1%}, "
            f"peak under load {peak[0] >> 20} / {peak[1] >> 20} MB"
        )
    assert worst <= MAX_WAIT_S
    assert all(x < MAX_RSS_GROWTH for x in growth), growth
