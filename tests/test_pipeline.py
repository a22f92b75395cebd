"""`distbelief work --stages K` as real processes: a replica split into stage processes.

The shards hold the weights; a split replica's stages each push and pull their own
ranges only (counted per worker on the shards), and one replica's run through the
shards with stages ends on the very weights of the same run unsplit.
"""

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

from distbelief.client import ClientConfig, ParameterClient, cut_ranges, probe_stats
from distbelief.layout import Layout, ShardPlan
from distbelief.models import build_model
from distbelief.stages import StagePlan

CLASSES = 10
STEPS = 6
TINY = ["--num-classes", str(CLASSES), "--batch-size", "8", "--metrics-port", "0", "--cpu", "1"]
# oneDNN's convolutions sum in an order that depends on the thread count: the split and
# the unsplit replica compare bit for bit at the same threads per process
ONE_THREAD = ("--threads", "1")


def layout() -> Layout:
    return Layout.of(build_model("googlenet", CLASSES), "googlenet")


def train(procs, tmp_path: Path, shards: int, *flags: str, name: str) -> tuple[list[str], dict]:
    """Fresh shards, one replica for STEPS steps with ``flags``; the addresses and the
    replica's final status."""
    addresses = procs.serve(shards, "--num-classes", str(CLASSES), name=f"serve-{name}")
    status_dir = tmp_path / name
    proc = procs.start(
        "work",
        "--servers",
        ",".join(addresses),
        "--steps",
        str(STEPS),
        "--status-dir",
        str(status_dir),
        *TINY,
        *flags,
        name=name,
    )
    assert proc.wait(240) == 0, proc.log_path.read_text()[-3000:]
    return addresses, json.loads((status_dir / "replica-0.json").read_text())


def pull(addresses: list[str]) -> torch.Tensor:
    lay = layout()
    with ParameterClient(ClientConfig(servers=tuple(addresses)), lay) as client:
        client.connect()
        weights = torch.empty(lay.total)
        client.pull(weights)
    return weights


@pytest.mark.parametrize(
    "schedule",
    [(), ("--fetch-every", "3", "--push-every", "2")],
    ids=["every step", "pull every 3 push every 2"],
)
def test_a_split_replica_ends_on_the_unsplit_replicas_weights(procs, tmp_path, schedule):
    flags = (*ONE_THREAD, *schedule)
    split_at, status = train(
        procs, tmp_path, 3, "--stages", "2", "--stage-cuts", "4b", *flags, name="split"
    )
    whole_at, whole = train(procs, tmp_path, 3, *flags, name="whole")
    assert torch.equal(pull(split_at), pull(whole_at))
    assert status["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    # every shard applied one update a push, counted the examples once
    pushes = STEPS // (2 if schedule else 1)
    for stats in probe_stats(split_at, 10):
        assert stats["version"] == pushes and stats["examples"] == STEPS * 8
    # each stage pushed its own ranges and nothing else: bytes counted on the shards
    lay, plan = layout(), StagePlan(("4b",))
    servers = ShardPlan(total=lay.total, num_shards=3).ranges()
    stats = probe_stats(split_at, 10)
    for k in range(2):
        mine = cut_ranges(plan.ranges(lay, k), servers)
        for i, shard in enumerate(stats):
            pushed = sum(b for w, b in shard["push_bytes"].items() if w.endswith(f"-stage{k}"))
            expected = sum(hi - lo for lo, hi, _ in mine.get(i, []))
            assert pushed == pushes * 4 * expected, (k, i)
    assert [s["stage"] for s in status["stages"]] == [0, 1]
    assert all(s["compute_s"] > 0 and s["sent_bytes"] > 0 for s in status["stages"])


def test_three_stages_with_micro_batches_over_the_wire_train(procs, tmp_path):
    addresses, status = train(
        procs,
        tmp_path,
        2,
        "--stages",
        "3",
        "--micro-batches",
        "4",
        "--stage-transport",
        "wire",
        name="three",
    )
    assert status["done"] and status["step"] == STEPS and status["pushes"] == STEPS
    assert 0 < status["loss"] < 10
    assert [s["stage"] for s in status["stages"]] == [0, 1, 2]
    assert 0 < status["pipeline_s"] <= status["seconds"]
    for stats in probe_stats(addresses, 10):
        assert stats["version"] == STEPS and stats["incomplete_steps"] == 0


def test_a_killed_stage_restarts_its_replica_whole(procs, tmp_path):
    from .conftest import free_port

    addresses = procs.serve(2, "--num-classes", str(CLASSES))
    metrics_port = free_port()
    status_dir = tmp_path / "status"
    steps = 30
    proc = procs.start(
        "work",
        "--servers",
        ",".join(addresses),
        "--steps",
        str(steps),
        "--stages",
        "2",
        "--stage-cuts",
        "4c",
        "--status-dir",
        str(status_dir),
        *TINY,
        "--metrics-port",
        str(metrics_port),
        name="work",
    )
    path = status_dir / "replica-0.json"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status = json.loads(path.read_text()) if path.exists() else {}
        if status.get("step", 0) >= 3 and len(status.get("stages", [])) == 2:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the split replica made no progress:\n" + proc.log_path.read_text()[-3000:])
    # stage 0 serves every stage's figures
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    for k in ("0", "1"):
        found = re.search(
            rf'^distbelief_worker_stage_compute_seconds{{stage="{k}"}} (\S+)$', text, re.M
        )
        assert found and float(found.group(1)) > 0, text[-2000:]
    assert 'distbelief_worker_stage_cut_bytes{direction="sent",stage="1"}' in text
    victim = status["stages"][1]["pid"]
    os.kill(victim, signal.SIGKILL)
    assert proc.wait(300) == 0, proc.log_path.read_text()[-3000:]
    log = proc.log_path.read_text()
    assert "stage 1 exited with -9: stopping the replica" in log
    after = json.loads(path.read_text())
    assert after["restarts"] == 1 and after["done"] and after["step"] == steps
    assert after["stages"][1]["pid"] != victim
    stats = probe_stats(addresses, 10)
    # nothing half-pushed was applied: every shard applied the same whole steps, each
    # counting its 8 examples once (one replica: a torn step would leave them apart)
    for shard in stats:
        assert shard["version"] >= steps and shard["examples"] == 8 * shard["version"]
    assert stats[0]["version"] == stats[1]["version"]
    assert "conv1-4b" in log and "4c-head" in log  # work's closing table of the stages
    shown = procs.start(
        "status", "--servers", ",".join(addresses), "--status-dir", str(status_dir), name="status"
    )
    assert shown.wait(60) == 0
    text = shown.log_path.read_text()
    assert "stages" in text and "conv1-4b" in text and "4c-head" in text, text


def test_bad_stage_flags_are_one_line_errors(procs):
    addresses = procs.serve(1, "--num-classes", str(CLASSES))
    for flags, message in [
        (["--stages", "2", "--stage-cuts", "4x"], "unknown block '4x'"),
        (["--stages", "3", "--stage-cuts", "4b"], "2 stages; --stages is 3"),
        (["--stages", "2", "--overlap"], "--overlap with --stages"),
        (["--stages", "2", "--micro-batches", "9"], "more than the batch of 8"),
    ]:
        proc = procs.start("work", "--servers", addresses[0], "--steps", "1", *TINY, *flags)
        assert proc.wait(120) == 2, flags
        assert message in proc.log_path.read_text(), proc.log_path.read_text()[-2000:]


def _json_line(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def test_stages_on_other_hosts_listen_and_train_over_tcp(procs, tmp_path):
    """`work --stage 1` on "another host" (here loopback), stage 0 connecting to it: the
    activations over TCP, the same weights as the unsplit replica."""
    from .conftest import free_port

    addresses = procs.serve(2, "--num-classes", str(CLASSES), name="serve-hosts")
    common = [
        "--servers",
        ",".join(addresses),
        "--stages",
        "2",
        "--stage-addresses",
        f"tcp://127.0.0.1:{free_port()}",
        *TINY,
        *ONE_THREAD,
    ]
    lone = procs.start("work", *common, "--stage", "1", "--json", name="stage1")
    first = procs.start(
        "work",
        *common,
        "--steps",
        str(STEPS),
        "--stage-cuts",
        "4b",
        "--status-dir",
        str(tmp_path / "hosts"),
        name="stage0",
    )
    assert first.wait(240) == 0, first.log_path.read_text()[-3000:]
    assert lone.wait(60) == 0, lone.log_path.read_text()[-3000:]
    (report,) = _json_line(lone.log_path.read_text())["stages"]
    assert report["stage"] == 1 and report["pushes"] == STEPS and report["compute_s"] > 0
    assert report["blocks"] == "4b-head" and report["received_bytes"] > 0
    whole_at, _ = train(procs, tmp_path, 2, *ONE_THREAD, name="whole-hosts")
    assert torch.equal(pull(addresses), pull(whole_at))


def test_a_lost_stage_on_another_host_stops_its_replica_at_once(procs, tmp_path):
    from .conftest import free_port

    addresses = procs.serve(1, "--num-classes", str(CLASSES))
    common = ["--servers", addresses[0], "--stages", "2", *TINY]
    common += ["--stage-addresses", f"tcp://127.0.0.1:{free_port()}"]
    lone = procs.start("work", *common, "--stage", "1", name="stage1")
    status_dir = tmp_path / "status"
    first = procs.start(
        "work",
        *common,
        "--steps",
        "10000",
        "--max-restarts",
        "0",
        "--status-dir",
        str(status_dir),
        name="stage0",
    )
    path = status_dir / "replica-0.json"
    deadline = time.monotonic() + 180
    while not (path.exists() and json.loads(path.read_text()).get("step", 0) >= 2):
        assert time.monotonic() < deadline, first.log_path.read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(lone.pid, signal.SIGKILL)
    began = time.monotonic()
    assert first.wait(60) != 0
    assert time.monotonic() - began < 20  # seen as a lost connection, not a timeout
    assert "a neighbouring stage of this replica is gone" in first.log_path.read_text()
