"""Elastic replicas with real processes: shard 0's dispatcher hands out every example of
every epoch once while replicas join, are killed, hang, are stopped, straggle, and while
shard 0 itself is killed and comes back from its checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.jpegs import make_jpeg_folder
from distbelief.client import probe_stats

from .test_faults import read_json, wait_for

CLASSES, PER_CLASS, BATCH = 10, 48, 8
N = CLASSES * PER_CLASS  # 480 training images: 60 batches an epoch
CHUNK_BATCHES, LEASE_S = 2, 3.0
CHUNK = CHUNK_BATCHES * BATCH


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("jpegs") / "set"
    make_jpeg_folder(
        root, classes=CLASSES, train_per_class=PER_CLASS, val_per_class=2, size=(40, 36)
    )
    return str(root)


def serve(procs, shards: int, *extra: str) -> list[str]:
    return procs.serve(
        shards,
        *("--num-classes", str(CLASSES), "--dataset-size", str(N), "--lr", "0.005"),
        *("--chunk-batches", str(CHUNK_BATCHES), "--chunk-lease-s", str(LEASE_S)),
        *extra,
    )


def work(
    procs, servers: list[str], folder: str, status_dir: Path, cpu: int, *extra: str, core=None
):
    """``distbelief work``; with ``core``, pinned to that one of this machine's cores (its
    replicas then train on one thread: four replicas on two cores do not oversubscribe)."""
    mine = sorted(os.sched_getaffinity(0))
    if core is not None:
        os.sched_setaffinity(0, {mine[core % len(mine)]})  # the child inherits it
    try:
        return procs.start(
            "work",
            *("--servers", ",".join(servers), "--cpu", str(cpu), "--data", folder),
            *("--num-classes", str(CLASSES), "--batch-size", str(BATCH)),
            *("--loader-workers", "0", "--metrics-port", "0", "--max-restarts", "0"),
            *("--status-dir", str(status_dir)),
            *extra,
            name="work",
        )
    finally:
        os.sched_setaffinity(0, mine)


def dispatch(servers: list[str]) -> dict:
    stats = probe_stats(servers[:1], 10)[0]
    assert stats is not None, "shard 0 does not answer"
    return stats["dispatch"] | {"examples": stats["examples"]}


def applied(servers: list[str]) -> int:
    return sum(dispatch(servers)["applied"].values())


def status(path: Path) -> dict:
    return read_json(path) if path.exists() else {}


def test_replicas_join_die_hang_and_stop_and_every_example_is_applied_once_per_epoch(
    procs, tmp_path, folder
):
    # one `work` process per replica, as pods of a Deployment: none knows the others
    servers = serve(procs, 1)
    dirs = [tmp_path / f"r{i}" for i in range(4)]
    first = [
        work(procs, servers, folder, d, 1, "--epochs", "3", core=i) for i, d in enumerate(dirs[:2])
    ]
    wait_for(lambda: applied(servers) >= 4 * CHUNK, 180, "the first replicas", first[0].log_path)
    joined = [
        work(procs, servers, folder, d, 1, "--epochs", "3", core=i) for i, d in enumerate(dirs[2:])
    ]
    wait_for(
        lambda: all(status(d / "replica-0.json").get("step", 0) >= 2 for d in dirs[2:]),
        180,
        "the two replicas that joined to train",
        joined[0].log_path,
    )
    assert applied(servers) < 2 * N, "the run is nearly over before the faults: make it longer"
    pid = [status(d / "replica-0.json")["pid"] for d in dirs]
    os.kill(pid[1], signal.SIGKILL)  # gone for good (no restarts)
    os.kill(pid[2], signal.SIGSTOP)  # hangs longer than its lease, then comes back
    os.kill(pid[3], signal.SIGTERM)  # stopped
    time.sleep(LEASE_S + 3)
    os.kill(pid[2], signal.SIGCONT)
    for proc in (*first, *joined):
        proc.wait(300)
    d = dispatch(servers)
    # every position of every epoch applied once: nothing lost with the killed, hung or
    # stopped replica's chunk; what the hung one pushed late is counted as trained twice
    assert d["applied"] == {"0": N, "1": N, "2": N}, d
    assert d["reissued"] >= 2 and d["dropped"] == 0 and d["open"] == d["queued"] == 0
    assert d["retrained"] <= CHUNK, d  # at most the hung replica's one late push
    assert d["examples"] == 3 * N + d["retrained"]  # the shard's own count of pushed examples
    if d["retrained"]:
        assert "was handed to another replica: skipping its rest" in joined[0].log_path.read_text()
    for i in (0, 2):  # the survivors trained to the end
        assert status(dirs[i] / "replica-0.json")["done"]
        assert status(dirs[i] / "replica-0.json")["data_order"] == "dispatch"
    shown = subprocess.run(
        [sys.executable, "-m", "distbelief", "status", "--servers", servers[0]],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout
    assert f"chunks handed {d['handed']}, done {d['done']}, re-issued {d['reissued']}" in shown


def test_a_replica_twice_as_slow_gets_about_half_the_chunks(procs, tmp_path, folder):
    servers = serve(procs, 1)
    status_dir = tmp_path / "s"
    proc = work(procs, servers, folder, status_dir, 2, "--epochs", "3")
    wait_for(lambda: status(status_dir / "replica-1.json").get("step", 0) >= 1, 180, "replica 1")
    slow = status(status_dir / "replica-1.json")["pid"]
    done = threading.Event()

    # A straggler computing at half the other's rate: with a core each, stopped half
    # of the time; sharing one core (a pytest worker's share of this machine), stopped a
    # third of it, since the other then has the core to itself: 1/3 + 2/3 × 1/2 = 2/3
    # against 2/3 × 1/2 = 1/3 of the core.
    stopped_s, running_s = (0.1, 0.1) if len(os.sched_getaffinity(0)) >= 2 else (0.1, 0.2)

    def slowed() -> None:
        while not done.is_set():
            try:
                os.kill(slow, signal.SIGSTOP)
                time.sleep(stopped_s)
                os.kill(slow, signal.SIGCONT)
            except ProcessLookupError:
                return
            time.sleep(running_s)

    thread = threading.Thread(target=slowed, daemon=True)
    start = [status(status_dir / f"replica-{i}.json").get("examples", 0) for i in (0, 1)]
    thread.start()
    try:
        assert proc.wait(300) == 0, proc.log_path.read_text()[-3000:]
    finally:
        done.set()
        thread.join(5)
        with contextlib.suppress(ProcessLookupError):
            os.kill(slow, signal.SIGCONT)
    fast_n, slow_n = (
        status(status_dir / f"replica-{i}.json")["examples"] - start[i] for i in (0, 1)
    )
    ratio = slow_n / fast_n
    assert 0.5 * 0.85 <= ratio <= 0.5 * 1.15, (fast_n, slow_n)
    assert dispatch(servers)["applied"] == {str(e): N for e in range(3)}


def test_shard_0_killed_comes_back_from_its_checkpoint_and_loses_no_example(
    procs, tmp_path, folder
):
    ckpt = tmp_path / "ckpt"
    servers = serve(procs, 2, "--checkpoint-dir", str(ckpt), "--checkpoint-every-s", "1")
    serve_proc = procs.started[-1][0]
    status_dir = tmp_path / "s"
    proc = work(
        procs,
        servers,
        folder,
        status_dir,
        2,
        "--epochs",
        "2",
        "--timeout-s",
        "2",
        "--retries",
        "15",
        "--loader-workers",  # the chunks' batches decoded ahead, in a loader process
        "1",
    )
    newest = ckpt / "shard-0"

    def checkpoint_then_more() -> bool:
        files = sorted(newest.glob("v*.safetensors")) if newest.is_dir() else []
        return bool(files) and N // 2 <= applied(servers) < 3 * N // 2

    wait_for(checkpoint_then_more, 240, "a checkpoint mid-run", proc.log_path)
    (pid,) = re.findall(r"started shard\[0\] \(pid (\d+)\)", serve_proc.log_path.read_text())
    os.kill(int(pid), signal.SIGKILL)
    assert proc.wait(300) == 0, proc.log_path.read_text()[-3000:]
    assert "shard[0] exited with -9; restart 1/3" in serve_proc.log_path.read_text()
    d = dispatch(servers)
    # the positions applied after the checkpoint were lost with the weights and handed
    # out again: each epoch complete once in the weights shard 0 holds
    assert d["applied"] == {"0": N, "1": N}, d
    assert d["retrained"] <= 2 * BATCH  # one push per replica that outlived the shard
    assert d["examples"] == 2 * N + d["retrained"]
    assert json.loads((status_dir / "replica-0.json").read_text())["data_order"] == "dispatch"


def test_dispatch_asked_for_on_shards_that_order_another_data_set_is_one_line(procs, tmp_path):
    (server,) = procs.serve(1, "--num-classes", "10")  # --dataset-size: ImageNet's default
    proc = procs.start(
        "work", "--servers", server, "--cpu", "1", "--steps", "2", "--data-order", "dispatch",
        "--batch-size", "8", "--metrics-port", "0", "--status-dir", str(tmp_path / "s"),
        name="work",
    )  # fmt: skip
    assert proc.wait(120) != 0
    log = proc.log_path.read_text()
    assert "Traceback" not in log and "restart 1/" not in log, log  # not restarted either
    assert (
        "the shards order a data set of 1281167 examples (serve --dataset-size); this "
        "replica's demo has 50000: start the shards with --dataset-size 50000"
    ) in log, log
    # auto (the default) reads its static share instead, and says why
    proc = procs.start(
        "work", "--servers", server, "--cpu", "1", "--steps", "2", "--batch-size", "8",
        "--metrics-port", "0", "--status-dir", str(tmp_path / "t"), name="auto",
    )  # fmt: skip
    assert proc.wait(120) == 0, proc.log_path.read_text()[-3000:]
    assert "reading the static share 0 of 1" in proc.log_path.read_text()
    assert status(tmp_path / "t" / "replica-0.json")["data_order"] == "static"
