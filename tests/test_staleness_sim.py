"""The staleness simulator (bench/staleness.py): τ = 0 is the reference trainer bit for
bit; with staleness it runs every policy and reports a table."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import torch

from bench.staleness import POLICY_SPECS as POLICIES
from bench.staleness import SimConfig, StalenessModel, read_histogram, simulate
from distbelief.train import TrainConfig, train_reference

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH = 12, 8
HP = {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.0005}


def test_one_replica_is_the_reference_trainer_bit_for_bit():
    ref = train_reference(
        TrainConfig(steps=STEPS, batch_size=BATCH, num_classes=10, seed=3, **HP),
        show_progress=False,
    )
    sim = simulate(SimConfig(replicas=1, examples=STEPS * BATCH, batch_size=BATCH, seed=3, **HP))
    assert ref.weights is not None and not torch.equal(ref.weights, torch.zeros(1))
    assert torch.equal(sim.weights, ref.weights)  # the same floats, not just close
    stale = simulate(SimConfig(replicas=4, examples=STEPS * BATCH, batch_size=BATCH, seed=3, **HP))
    assert not torch.equal(stale.weights, ref.weights)  # staleness changes the run


def test_fresh_gradients_leave_only_the_policys_rate_and_momentum():
    ref = simulate(SimConfig(replicas=1, examples=STEPS * BATCH, batch_size=BATCH, seed=3, **HP))
    run = dict(replicas=4, examples=STEPS * BATCH, batch_size=BATCH, seed=3, **HP)
    # plain Downpour ignores τ: with every gradient on the newest weights, the reference
    plain = simulate(SimConfig(policy="none", fresh_gradients=True, **run))
    assert torch.equal(plain.weights, ref.weights)
    # a policy told τ = 3 still lowers its rate and momentum: another run, and not the
    # delayed one
    fresh = simulate(SimConfig(policy="async-momentum-lr", fresh_gradients=True, **run))
    delayed = simulate(SimConfig(policy="async-momentum-lr", **run))
    assert not torch.equal(fresh.weights, ref.weights)
    assert not torch.equal(fresh.weights, delayed.weights)
    # smaller steps: it moved less from the start than the reference did
    initial = simulate(SimConfig(examples=0, batch_size=BATCH, seed=3, **HP)).weights
    assert (fresh.weights - initial).norm() < (ref.weights - initial).norm()


def test_the_polyak_average_is_the_mean_of_the_versions_after_its_start():
    cfg = SimConfig(examples=STEPS * BATCH, batch_size=BATCH, seed=3, budgets=(32, 64), **HP)
    run = simulate(cfg)  # polyak_from 0.5: the versions after 48 examples, steps 7 to 12
    versions = [
        simulate(SimConfig(examples=k * BATCH, batch_size=BATCH, seed=3, **HP)).weights
        for k in range(STEPS // 2 + 1, STEPS + 1)
    ]
    expected = torch.stack([v.double() for v in versions]).mean(0).float()
    assert torch.allclose(run.average, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(run.average, run.weights, atol=1e-4)  # an average, not the last
    # evaluated from the first budget past its start: at 64 and 96 examples, not at 32
    assert [b for b, _ in run.polyak] == [64, 96] and [b for b, _ in run.curve] == [32, 64, 96]
    assert all(0 <= t <= 1 for _, t in run.polyak)


def test_a_bf16_wire_rounds_what_crosses_it_and_the_shard_keeps_f32():
    f32 = simulate(SimConfig(examples=STEPS * BATCH, batch_size=BATCH, seed=3, **HP))
    cfg = SimConfig(examples=STEPS * BATCH, batch_size=BATCH, seed=3, wire_dtype="bf16", **HP)
    bf16 = simulate(cfg)
    assert bf16.weights.dtype == torch.float32
    # the shard's vector holds updates of bf16 gradients: not bf16 values themselves
    assert not torch.equal(bf16.weights, bf16.weights.bfloat16().float())
    assert not torch.equal(bf16.weights, f32.weights)  # the rounding changed the run
    # and only by about bf16's precision (2^-8 relative) per step, not more
    initial = simulate(SimConfig(examples=0, batch_size=BATCH, seed=3, **HP)).weights
    moved, off = (f32.weights - initial).abs().max(), (bf16.weights - f32.weights).abs().max()
    assert 0 < off < 0.2 * moved, (off, moved)


def test_round_robin_staleness_ramps_to_n_minus_one_after_the_warm_start():
    model = StalenessModel(SimConfig(replicas=4), warm_steps=3)
    assert [model.tau(t) for t in range(9)] == [0, 0, 0, 0, 1, 2, 3, 3, 3]


def test_histogram_from_a_shards_metrics_text(tmp_path):
    text = "\n".join(
        [
            "# HELP distbelief_shard_staleness Versions applied",
            "# TYPE distbelief_shard_staleness histogram",
            'distbelief_shard_staleness_bucket{le="0.0"} 10.0',
            'distbelief_shard_staleness_bucket{le="1.0"} 10.0',
            'distbelief_shard_staleness_bucket{le="2.0"} 40.0',
            'distbelief_shard_staleness_bucket{le="+Inf"} 40.0',
            "distbelief_shard_staleness_count 40.0",
            "distbelief_shard_staleness_sum 70.0",
        ]
    )
    (tmp_path / "metrics.txt").write_text(text)
    assert read_histogram(str(tmp_path / "metrics.txt")) == ((0, 0.25), (2, 0.75))
    model = StalenessModel(
        SimConfig(replicas=2, staleness_histogram=((0, 0.25), (2, 0.75))), warm_steps=0
    )
    draws = [model.tau(100) for _ in range(400)]
    assert set(draws) == {0, 2} and 250 < draws.count(2) < 350


def test_replicas_join_one_by_one_over_the_join_window():
    model = StalenessModel(SimConfig(replicas=5, join_over=0.1), warm_steps=10, join_steps=8)
    taus = [model.tau(step) for step in range(24)]
    # alone for 10 updates; replica 1 joins at once, 2, 3 and 4 every 2 updates after
    assert taus == [0] * 10 + [0, 1, 2, 2, 3, 3] + [4] * 8
    at_once = StalenessModel(SimConfig(replicas=5), warm_steps=10)
    assert [at_once.tau(step) for step in range(10, 16)] == [0, 1, 2, 3, 4, 4]


def test_the_command_runs_every_policy_and_prints_ratios(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "bench.staleness", "--replicas", "1,4", "--seeds", "0,1"]
        + ["--examples", "64", "--batch-size", "8", "--points", "2", "--eval-examples", "64"]
        + ["--policies", ",".join(POLICIES)]
        + ["--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    assert len(re.findall(r"\| ratio \d", out)) == 1 + len(POLICIES), out  # N = 1, each at N = 4
    summary = json.loads((tmp_path / "staleness.json").read_text())["summary"]
    assert {r["policy"] for r in summary if r["replicas"] == 4} == set(POLICIES)
    assert all(0 <= t <= 1 for r in summary for t in r["top1"] + r["polyak"])
    assert all(r["polyak_ratio"] is not None for r in summary)
    assert len(re.findall(r"\| ratio \d\.\d\d \| \d+\.\d% \| \d\.\d\d \|", out)) == 1 + len(
        POLICIES
    )


def test_the_command_reports_each_wire_type_against_the_f32_reference(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "bench.staleness", "--replicas", "1,2", "--seeds", "0"]
        + ["--examples", "32", "--batch-size", "8", "--points", "2", "--eval-examples", "32"]
        + ["--policies", "async-momentum-lr+warm", "--wire-dtypes", "f32,bf16"]
        + ["--out", str(tmp_path), "--jobs", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    summary = json.loads((tmp_path / "staleness.json").read_text())["summary"]
    rows = {(r["replicas"], r["wire_dtype"]): r for r in summary}
    assert set(rows) == {(1, "f32"), (1, "bf16"), (2, "f32"), (2, "bf16")}
    reference = rows[(1, "f32")]["top1"][-1]
    assert rows[(1, "f32")]["ratio"] == 1.0
    for row in summary:
        assert row["ratio"] == row["top1"][-1] / max(reference, 1e-9)
