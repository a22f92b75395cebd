"""Faults survived with nothing lost: lost replies, a bad network, kill -9 of a shard and
of the averager, and a worker that hangs. Real processes, real sockets, real files."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from distbelief.server.shard import initial_weights

from distbelief.checkpoint import load_checkpoint
from distbelief.client import ClientConfig, ParameterClient, probe_stats

from .conftest import LOOPBACK, PLAIN_SGD, free_port
from .faultproxy import FaultProxy

NUM_CLASSES = 10
TINY = ["--num-classes", str(NUM_CLASSES), "--batch-size", "8", "--image-size", "32"]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=10) as r:
        found = re.search(rf"^{name} (\S+)$", r.read().decode(), re.M)
    assert found, f"{name} not exported"
    return float(found.group(1))


def wait_for(condition, timeout_s: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    tail = "" if log is None else "\n" + log.read_text()[-3000:]
    pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}{tail}")


def gradient(layout, value: float = 2.0**-10) -> torch.Tensor:
    g = torch.zeros(layout.total)
    g[: layout.parameters] = value
    return g


def start_work(procs, servers: str, status_dir: Path, steps: int, *extra: str):
    """One CPU replica for ``steps`` steps that must not crash (no restarts)."""
    return procs.start(
        "work",
        "--servers",
        servers,
        "--cpu",
        "1",
        "--steps",
        str(steps),
        "--max-restarts",
        "0",
        "--metrics-port",
        "0",
        "--status-dir",
        str(status_dir),
        *TINY,
        *extra,
        name="work",
    )


def test_a_push_whose_reply_is_lost_is_retried_and_applied_once(procs):
    (shard,) = procs.serve(1, "--num-classes", str(NUM_CLASSES), *PLAIN_SGD)
    layout, initial = initial_weights("googlenet", NUM_CLASSES, 0)
    g = gradient(layout)
    port = int(shard.rsplit(":", 1)[1])
    with FaultProxy(port, lose_replies=1) as proxy:
        cfg = ClientConfig(servers=(proxy.address,), timeout_s=3, retries=3, backoff_s=0.2)
        with ParameterClient(cfg, layout) as client:
            client.connect()
            (result,) = client.push(g, examples=1)  # the shard applies it; the reply is lost
            assert proxy.lost_replies == 1 and client.retries_total == 1
            # the retry carried the same (worker, seq): the shard said "already applied"
            assert result.version == 1 and not result.applied
            weights = torch.empty(layout.total)
            assert client.pull(weights) == [1]
    torch.testing.assert_close(weights, initial - g, rtol=0, atol=0)  # once, not twice
    (stats,) = probe_stats([shard], 10)
    assert stats["pushes"] == 1 and stats["duplicates"] == 1


def test_a_push_in_parts_whose_reply_is_lost_is_retried_and_applied_once(procs):
    """The reply to one part of a push in parts is lost: the client reopens the socket
    and sends every part still unanswered again; those the shard applied already are
    answered, not applied again, and the push counts once."""
    (shard,) = procs.serve(1, "--num-classes", str(NUM_CLASSES), *PLAIN_SGD)
    layout, initial = initial_weights("googlenet", NUM_CLASSES, 0)
    g = gradient(layout)
    port = int(shard.rsplit(":", 1)[1])
    with FaultProxy(port, lose_replies=1) as proxy:
        cfg = ClientConfig(
            servers=(proxy.address,), timeout_s=3, retries=3, backoff_s=0.2, wire_parts="on"
        )
        with ParameterClient(cfg, layout) as client:
            client.connect()
            weights = torch.empty(layout.total)
            client.pull(weights)
            (result,) = client.push(g, examples=1, pull_into=weights)
            assert proxy.lost_replies == 1 and client.retries_total == 1
            assert result.version == 1 and client.part_counts[0] > 1
    torch.testing.assert_close(weights, initial - g, rtol=0, atol=0)  # once, not twice
    (stats,) = probe_stats([shard], 10)
    assert stats["pushes"] == 1 and stats["parts"] == client.part_counts[0]
    assert stats["duplicates"] >= 1 and stats["partial_pushes"] == 0


@pytest.mark.parametrize("wire_parts", ["auto", "on"])  # whole slices on loopback; parts
def test_a_slow_flaky_network_costs_retries_not_updates(procs, tmp_path, wire_parts):
    addresses = procs.serve(2, "--num-classes", str(NUM_CLASSES))
    port = int(addresses[1].rsplit(":", 1)[1])
    status_dir = tmp_path / "status"
    steps = 12
    # between the replica and shard 1: 5 ms latency, 100 MB/s, connections cut at random
    # (on average every 100 MB; a step moves 2 × 20 MB through it)
    bad = {"latency_s": 0.005, "bandwidth": 100e6, "cut_mean_bytes": 100e6, "seed": 7}
    with FaultProxy(port, **bad) as proxy:
        servers = f"{addresses[0]},{proxy.address}"
        proc = start_work(
            procs,
            servers,
            status_dir,
            steps,
            "--timeout-s",
            "3",
            "--retries",
            "30",
            "--wire-parts",
            wire_parts,
        )
        assert proc.wait(300) == 0, proc.log_path.read_text()[-3000:]
        cuts = proxy.cuts
    status = read_json(status_dir / "replica-0.json")
    assert status["step"] == steps and status["done"] and status["restarts"] == 0
    assert cuts >= 1 and status["retries"] >= 1  # every cut surfaced as a retry...
    assert "Traceback" not in proc.log_path.read_text()  # ...not as a crash
    stats = probe_stats(addresses, 10)
    # each step's push reached each shard exactly once, cuts or not
    assert [s["version"] for s in stats] == [steps, steps]
    assert [s["examples"] for s in stats] == [steps * 8] * 2
    assert (stats[1]["parts"] > 0) is (wire_parts == "on")


def test_a_shard_killed_with_kill_9_comes_back_from_its_checkpoint(procs, tmp_path):
    ckpt = tmp_path / "ckpt"
    addresses = procs.serve(
        2,
        "--num-classes",
        str(NUM_CLASSES),
        "--lr",
        "0.01",
        "--checkpoint-dir",
        str(ckpt),
        "--checkpoint-every-s",
        "4",
    )
    serve = procs.started[-1][0]
    status_dir = tmp_path / "status"
    steps = 80
    work = start_work(
        procs, ",".join(addresses), status_dir, steps, "--timeout-s", "2", "--retries", "12"
    )
    status = status_dir / "replica-0.json"
    newest = ckpt / "shard-1"

    def checkpoint_then_more_steps() -> bool:
        # mid-run, a few steps after shard 1's newest checkpoint: the kill loses those
        files = sorted(newest.glob("v*.safetensors")) if newest.is_dir() else []
        if not files or not status.exists():
            return False
        step = read_json(status)["step"]
        return 20 <= step < steps - 20 and step >= int(files[-1].stem[1:]) + 3

    wait_for(checkpoint_then_more_steps, 240, "steps after a checkpoint", work.log_path)
    (pid,) = re.findall(r"started shard\[1\] \(pid (\d+)\)", serve.log_path.read_text())
    os.kill(int(pid), signal.SIGKILL)
    killed_at = read_json(status)["step"]
    saved = max(int(p.stem[1:]) for p in newest.glob("v*.safetensors"))
    assert work.wait(300) == 0, work.log_path.read_text()[-3000:]

    final = read_json(status)
    # it waited for the shard instead of crashing: all its steps, no restart of its own.
    # (Not necessarily a retry: a push sent after the kill waits in ZeroMQ's queue and
    # goes out when the restarted shard binds again, often within one --timeout-s.)
    assert final["step"] == steps and final["restarts"] == 0 and killed_at < steps
    assert final["loss_recent"] < final["loss_first"]  # and training went on
    log = serve.log_path.read_text()
    assert "shard[1] exited with -9; restart 1/3" in log  # the supervisor brought it back
    resumed = int(re.search(r"resumed from .*v0*(\d+)\.safetensors", log).group(1))
    assert resumed >= saved  # its newest checkpoint (one more may have landed meanwhile)
    if resumed < killed_at:  # (unless a checkpoint landed between our look and the kill)
        assert "went back from version" in work.log_path.read_text()  # noticed; re-pulled
    s0, s1 = probe_stats(addresses, 10)
    # shard 0 saw every push; shard 1 lost only what came after its last checkpoint
    assert s0["version"] == steps
    assert steps - (killed_at - saved) - 3 <= s1["version"] <= steps


def test_the_averager_killed_with_kill_9_resumes_its_average(procs, tmp_path):
    (shard,) = procs.serve(1, "--num-classes", str(NUM_CLASSES), *PLAIN_SGD)
    port, output = free_port(), tmp_path / "avg"
    args = ["--every-s", "0.2", "--checkpoint-every-s", "0.5", "--output", str(output)]
    proc, address = procs.average(shard, *args, "--timeout-s", "2", port=port)
    layout, _ = initial_weights("googlenet", NUM_CLASSES, 0)
    cfg = ClientConfig(servers=(shard,), timeout_s=20)
    with ParameterClient(cfg, layout) as client:
        client.connect()
        for _ in range(5):
            client.push(gradient(layout), examples=1)
            time.sleep(0.3)
    saved_file = output / "averaged.safetensors"
    wait_for(lambda: saved_file.exists(), 60, "the averager's checkpoint", proc.log_path)
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL
    saved = load_checkpoint(saved_file)
    count = saved.meta_json("count")
    assert count >= 3
    # back up, with the shards gone: the average it serves is the one it had saved
    procs.stop_all()
    procs.average(f"tcp://{LOOPBACK}:1", *args, "--timeout-s", "2", port=port, name="again")
    (stats,) = probe_stats([address], 10)
    assert stats["snapshots"] == count
    cfg = ClientConfig(servers=(address,), timeout_s=20)
    with ParameterClient(cfg, layout) as client:
        client.connect()
        weights = torch.empty(layout.total)
        client.pull(weights)
    assert torch.equal(weights, layout.from_state_dict(saved.tensors))


def test_a_silent_worker_is_forgotten_after_the_liveness_timeout(procs):
    metrics_port = free_port()
    (shard,) = procs.serve(
        1,
        "--num-classes",
        str(NUM_CLASSES),
        "--worker-timeout-s",
        "2",
        "--metrics-port",
        str(metrics_port),
    )
    layout, _ = initial_weights("googlenet", NUM_CLASSES, 0)
    for worker in ("hangs", "also-hangs"):
        cfg = ClientConfig(servers=(shard,), timeout_s=20, worker=worker)
        with ParameterClient(cfg, layout) as client:
            client.connect()
            client.push(gradient(layout), examples=1)
    assert metric(metrics_port, "distbelief_shard_workers") == 2
    assert probe_stats([shard], 10)[0]["workers_recent"] == 2
    # the workers hang: no push for longer than the timeout
    wait_for(lambda: metric(metrics_port, "distbelief_shard_workers") == 0, 10, "workers forgotten")
    assert probe_stats([shard], 10)[0]["workers_recent"] == 0
