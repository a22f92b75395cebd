"""`distbelief work` and `distbelief up` as real processes: Downpour, restarts, devices."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from distbelief.workers.replica import ReplicaConfig, replica_batches
from distbelief.workers.supervisor import oversubscribed

from distbelief.client import probe_stats
from distbelief.data import load_dataset

NUM_CLASSES = 10
TINY = ["--num-classes", str(NUM_CLASSES), "--batch-size", "8", "--metrics-port", "0"]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_push_every_4_pushes_steps_over_4_per_replica(procs, tmp_path):
    addresses = procs.serve(2, "--num-classes", str(NUM_CLASSES))
    status_dir = tmp_path / "status"
    proc = procs.start(
        "work",
        "--servers",
        ",".join(addresses),
        "--cpu",
        "2",
        "--steps",
        "12",
        "--fetch-every",
        "4",
        "--push-every",
        "4",
        "--status-dir",
        str(status_dir),
        *TINY,
        name="work",
    )
    assert proc.wait(240) == 0, proc.log_path.read_text()[-3000:]
    stats = probe_stats(addresses, 10)
    assert [s["version"] for s in stats] == [2 * 12 // 4] * 2
    assert [s["pulls"] for s in stats] == [2 * 12 // 4] * 2
    for i in range(2):
        status = read_json(status_dir / f"replica-{i}.json")
        assert status["step"] == 12 and status["pushes"] == 3 and status["done"]
        assert status["examples"] == 12 * 8
    summary = proc.log_path.read_text()
    assert "replicas" in summary and "images/s" in summary  # the closing table


def test_killed_replica_is_restarted_and_the_other_goes_on(procs, tmp_path):
    from .conftest import free_ports

    addresses = procs.serve(1, "--num-classes", str(NUM_CLASSES))
    status_dir = tmp_path / "status"
    metrics_port = free_ports(2)
    steps = 40
    proc = procs.start(
        "work",
        "--servers",
        ",".join(addresses),
        "--cpu",
        "2",
        "--steps",
        str(steps),
        "--max-restarts",
        "2",
        "--status-dir",
        str(status_dir),
        *TINY[:4],
        "--metrics-port",
        str(metrics_port),
        name="work",
    )
    victim, survivor = status_dir / "replica-0.json", status_dir / "replica-1.json"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if all(p.exists() and read_json(p)["step"] >= 3 for p in (victim, survivor)):
            break
        time.sleep(0.2)
    else:
        pytest.fail("replica 0 made no progress:\n" + proc.log_path.read_text()[-3000:])
    killed = read_json(victim)
    os.kill(killed["pid"], signal.SIGKILL)
    other_before = read_json(status_dir / "replica-1.json")["step"]
    # the survivor's metrics endpoint (port 9200+i in production) shows its progress
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port + 1}/metrics", timeout=10) as r:
        text = r.read().decode()
    steps_done = float(re.search(r"^distbelief_worker_steps_total (\S+)$", text, re.M).group(1))
    assert steps_done >= other_before and "distbelief_worker_push_seconds_bucket" in text
    assert 'distbelief_build_info{role="worker"' in text
    assert proc.wait(300) == 0, proc.log_path.read_text()[-3000:]
    after = read_json(victim)
    assert after["restarts"] == 1 and after["pid"] != killed["pid"]
    assert after["step"] == steps and after["done"]
    other = read_json(status_dir / "replica-1.json")
    assert other["step"] == steps and other["restarts"] == 0 and other_before < steps
    (stats,) = probe_stats(addresses, 10)
    # every completed step was pushed once; steps the killed process did after its last
    # status write are done again, so the version may exceed 2 × steps by a few
    assert 2 * steps <= stats["version"] <= 2 * steps + 10
    assert "replica[0] exited with -9; restart 1/2" in proc.log_path.read_text()


def test_replicas_read_disjoint_shares_of_each_epoch():
    data = load_dataset("demo", "train", image_size=32)
    n, batch = len(data), 50
    seen = []
    for index in range(3):
        cfg = ReplicaConfig(servers=("tcp://x:1",), index=index, num_replicas=3, batch_size=batch)
        batches = replica_batches(cfg, data)
        labels = [next(batches) for _ in range((n // 3) // batch)]
        assert {epoch for epoch, _, _ in labels} == {0}
        seen.append(torch.cat([lab for _, _, lab in labels]))
    # disjoint index shares: label histograms add up to at most the data set's
    total = torch.bincount(torch.cat(seen), minlength=NUM_CLASSES)
    assert torch.all(total <= torch.bincount(data.labels, minlength=NUM_CLASSES))
    assert sum(len(s) for s in seen) > 0.95 * n
    # the same replica sees another order in the next epoch
    cfg = ReplicaConfig(servers=("tcp://x:1",), index=0, num_replicas=3, batch_size=batch)
    batches = replica_batches(cfg, data)
    first = next(batches)[2]
    for _ in range((n // 3) // batch - 1):
        next(batches)
    epoch, _, again = next(batches)
    assert epoch == 1 and not torch.equal(first, again)


def test_gpu_without_a_gpu_is_a_one_line_error(procs):
    proc = procs.start(
        "work",
        "--gpu",
        "1",
        "--servers",
        "tcp://127.0.0.1:1",
        name="gpu",
        env={"CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.wait(60) == 1
    text = proc.log_path.read_text()
    assert "asked for GPU 0 but this machine has 0 CUDA device(s)" in text
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1


def test_up_with_tiny_settings_trains_and_reports(procs, tmp_path):
    from distbelief.curve import generate_keys

    run_dir, keys = tmp_path / "run", tmp_path / "keys"
    generate_keys(keys)  # every process of the run speaks CURVE with these keys
    proc = procs.start(
        "up",
        "--curve",
        str(keys),
        "--steps",
        "30",
        "--batch-size",
        "16",
        "--lr",
        "0.01",
        "--run-dir",
        str(run_dir),
        "--json",
        name="up",
    )
    assert proc.wait(400) == 0, proc.log_path.read_text()[-3000:]
    summary = read_json(run_dir / "summary.json")
    assert summary["exit_code"] == 0 and len(summary["replicas"]) == 2
    for replica in summary["replicas"]:
        assert replica["step"] == 30
        assert replica["loss_recent"] < replica["loss_first"]
    assert [s["version"] for s in summary["shards"]] == [60, 60]
    assert 0.0 <= summary["top5"] <= 1.0 and summary["top5"] >= summary["top1"]
    # the averager ran beside them: its Polyak average was evaluated too
    assert summary["averaged_snapshots"] >= 1
    assert summary["averaged_top5"] >= summary["averaged_top1"] >= 0.0
    assert (run_dir / "averager" / "averaged.safetensors").exists()
    logs = "".join(p.read_text() for p in run_dir.glob("*.log"))
    assert logs.count("CURVE on: admitting 1 client key(s)") == 3  # 2 shards, the averager
    assert "handshake failed" not in logs


def test_status_shows_each_shard_and_names_the_silent_one(procs):
    import subprocess
    import sys

    from .conftest import free_port

    (alive,) = procs.serve(1, "--num-classes", str(NUM_CLASSES))
    dead = f"tcp://127.0.0.1:{free_port()}"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "distbelief",
            "status",
            "--servers",
            f"{alive},{dead}",
            "--timeout-s",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert f"shard 1 at {dead} did not answer in 1 s" in run.stdout
    assert "no answer" in run.stdout and "version" in run.stdout
    run = subprocess.run(
        [sys.executable, "-m", "distbelief", "status", "--servers", alive, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    (stats,) = json.loads(run.stdout)
    assert stats["version"] == 0 and stats["hparams"]["rule"] == "momentum"


def test_overlap_pushes_every_step_from_the_background(procs, tmp_path):
    (address,) = procs.serve(1, "--num-classes", str(NUM_CLASSES))
    status_dir = tmp_path / "status"
    proc = procs.start(
        "work",
        "--servers",
        address,
        "--cpu",
        "1",
        "--steps",
        "8",
        "--overlap",
        "--status-dir",
        str(status_dir),
        *TINY,
        name="overlap",
    )
    assert proc.wait(240) == 0, proc.log_path.read_text()[-3000:]
    status = read_json(status_dir / "replica-0.json")
    assert status["step"] == 8 and status["pushes"] == 8
    # the first pull is synchronous, then one background pull follows each push
    assert status["pulls"] == 1 + 8
    (stats,) = probe_stats([address], 10)
    assert stats["version"] == 8 and stats["pushes"] == 8
    assert "--overlap on CPU replicas" in proc.log_path.read_text()  # the warning


def test_replicas_on_several_hosts_take_their_global_index(procs, tmp_path):
    # two `work` commands, as on two hosts, one replica each: replicas 0 and 1 of 2, so
    # they read the two disjoint shares of each epoch (see the test above)
    addresses = procs.serve(1, "--num-classes", str(NUM_CLASSES))
    runs = []
    for first in (0, 1):
        status_dir = tmp_path / f"host{first}"
        proc = procs.start(
            "work",
            "--servers",
            addresses[0],
            "--cpu",
            "1",
            "--steps",
            "3",
            "--first-replica",
            str(first),
            "--total-replicas",
            "2",
            "--status-dir",
            str(status_dir),
            *TINY,
            name=f"host{first}",
        )
        runs.append((proc, status_dir, first))
    for proc, status_dir, first in runs:
        assert proc.wait(240) == 0, proc.log_path.read_text()[-3000:]
        status = read_json(status_dir / f"replica-{first}.json")
        assert status["index"] == first and status["step"] == 3 and status["done"]
        assert f"replica[{first}]" in proc.log_path.read_text()
    assert probe_stats(addresses, 10)[0]["version"] == 6
    bad = procs.start("work", "--first-replica", "2", "--total-replicas", "2", name="bad")
    assert bad.wait(60) == 2 and "out of range" in bad.log_path.read_text()


@pytest.mark.parametrize("steps, epochs", [(10, None), (None, 2.0)])
def test_a_restarted_replica_resumes_its_steps_with_steps_or_epochs(tmp_path, steps, epochs):
    """The supervisor's restart path: under --steps and under --epochs (as `up` runs
    replicas) a replica killed after step 4 of 10 goes on from step 4, not from 0."""
    from distbelief.workers.supervisor import _resume

    status = tmp_path / "replica-0.json"
    cfg = ReplicaConfig(servers=("tcp://127.0.0.1:1",), steps=steps, epochs=epochs)
    cfg = replace(cfg, status_file=str(status))
    assert _resume(cfg) == cfg  # first start: no status file yet
    status.write_text(json.dumps({"step": 4, "total_steps": 10, "examples": 32, "epoch": 0}))
    resumed = _resume(cfg)
    assert (resumed.start_step, resumed.start_examples, resumed.restarts) == (4, 32, 1)
    status.write_text(json.dumps({"step": 10, "total_steps": 10, "examples": 80, "epoch": 1}))
    assert _resume(cfg).start_step == 0  # finished: a new run starts from the beginning


def test_a_gradient_with_nan_is_not_pushed_to_any_shard_and_is_counted(procs):
    """A NaN in one shard's slice would be refused by that shard alone while the other
    applied its slice: the replica drops the whole gradient before the push."""
    from distbelief.workers.replica import Replica

    addresses = procs.serve(2, "--num-classes", str(NUM_CLASSES))
    replica = Replica(
        ReplicaConfig(servers=tuple(addresses), num_classes=NUM_CLASSES, batch_size=8)
    )
    replica.client.connect()
    try:
        replica._pull()
        before = replica.weights.clone()
        replica.grads.fill_(1e-3)
        replica.grads[-1] = float("nan")  # in the last shard's slice only
        replica._push(8)
        assert replica.status.non_finite_pushes == 1 and replica.status.pushes == 0
        assert float(replica.grads.abs().sum()) == 0  # dropped, not carried into the next push
        assert (
            replica.metrics.registry.get_sample_value("distbelief_worker_non_finite_pushes_total")
            == 1
        )
        stats = probe_stats(addresses, 10.0)
        assert [s["pushes"] for s in stats] == [0, 0]
        assert [s["rejected"].get("non_finite", 0) for s in stats] == [0, 0]
        replica.grads.fill_(1e-3)
        replica._push(8)  # a finite gradient goes through to both
        replica._pull()
        assert replica.status.pushes == 1
        assert [s["pushes"] for s in probe_stats(addresses, 10.0)] == [1, 1]
        assert not torch.equal(replica.weights, before)
    finally:
        replica.client.close()


def test_more_cpu_replicas_than_cores_are_warned_about():
    message = oversubscribed(["cpu"] * 4, cores=2)
    assert message is not None and message.startswith("4 CPU replicas on 2 core(s)")
    assert "Prefer --cpu 2" in message
    assert oversubscribed(["cpu"] * 2, cores=2) is None
    # GPU replicas do not count: they keep one core each for feeding the device
    assert oversubscribed(["cuda:0", "cuda:1", "cpu"], cores=1) is None
