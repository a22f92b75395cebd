"""The averager: the Polyak mean and EMA, served, evaluated, checkpointed and resumed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter

import torch
from distbelief.server.averager import Average
from distbelief.server.shard import initial_weights
from safetensors.torch import load_file

from distbelief.client import ClientConfig, ParameterClient, probe_stats
from distbelief.layout import Layout
from distbelief.models import googlenet

from .conftest import PLAIN_SGD, free_ports

NUM_CLASSES = 10


def test_polyak_is_the_arithmetic_mean_and_ema_the_closed_form():
    torch.manual_seed(0)
    snaps = [torch.randn(1000) for _ in range(7)]
    polyak = Average(1000, "polyak", 0.0)
    ema = Average(1000, "ema", 0.9)
    for i, s in enumerate(snaps):
        polyak.add(s, i)
        ema.add(s, i)
    torch.testing.assert_close(polyak.value(), torch.stack(snaps).mean(0), rtol=0, atol=1e-6)
    d, n = 0.9, len(snaps)
    closed = d ** (n - 1) * snaps[0].double() + sum(
        (1 - d) * d ** (n - 1 - k) * snaps[k].double() for k in range(1, n)
    )
    torch.testing.assert_close(ema.value(), closed.float(), rtol=0, atol=1e-6)
    assert polyak.versions == list(range(7))


def start_averager(procs, shard, port, output, *extra):
    proc, _ = procs.average(
        shard,
        "--every-s",
        "0.3",
        "--output",
        str(output),
        "--checkpoint-every-s",
        "3600",
        *extra,
        port=port,
    )
    return proc


def pull_average(address: str, layout: Layout) -> tuple[int, torch.Tensor]:
    weights = torch.empty(layout.total)
    with ParameterClient(ClientConfig(servers=(address,), timeout_s=30), layout) as client:
        client.connect()
        (count,) = client.pull(weights)
    return count, weights


def expected_mean(initial: torch.Tensor, g: torch.Tensor, versions: list[int]) -> torch.Tensor:
    """Mean of the shard's weights at each snapshot's version (lr 1, no momentum)."""
    counts = Counter(versions)
    total = torch.zeros(initial.numel(), dtype=torch.float64)
    w = initial.clone()
    for v in range(max(versions) + 1):
        if v:
            w -= g
        if counts[v]:
            total += counts[v] * w.double()
    return (total / len(versions)).float()


def test_averager_serves_the_mean_of_its_snapshots_and_resumes(procs, tmp_path):
    (shard,) = procs.serve(
        1,
        "--num-classes",
        str(NUM_CLASSES),
        *PLAIN_SGD,
    )
    layout, initial = initial_weights("googlenet", NUM_CLASSES, 0)
    port = free_ports(1)
    address = f"tcp://127.0.0.1:{port}"
    output = tmp_path / "avg"
    proc = start_averager(
        procs,
        shard,
        port,
        output,
        "--eval-data",
        "demo",
        "--eval-every-s",
        "1",
        "--eval-examples",
        "200",
    )
    g = torch.full((layout.total,), 2.0**-10)
    g[layout.parameters :] = 0  # the layout's padding (the shard keeps it at zero anyway)
    with ParameterClient(ClientConfig(servers=(shard,), timeout_s=30), layout) as client:
        client.connect()
        for _ in range(12):
            client.push(g, examples=1)
            time.sleep(0.15)
    time.sleep(1.5)  # a few more snapshots of the final weights, and an evaluation
    (stats,) = probe_stats([address], 10)
    count, weights = pull_average(address, layout)
    (stats_after,) = probe_stats([address], 10)
    assert stats_after["snapshots"] >= count >= stats["snapshots"] >= 5
    versions = stats_after["versions"][:count]
    assert versions == sorted(versions) and versions[-1] == 12 and len(set(versions)) >= 3
    torch.testing.assert_close(weights, expected_mean(initial, g, versions), rtol=0, atol=1e-6)
    assert 0.0 <= stats_after["eval"]["top1"] <= 1.0 and stats_after["eval"]["examples"] == 200
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "distbelief",
            "evaluate",
            "--averager",
            address,
            "--data",
            "demo",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert 0.0 <= json.loads(run.stdout)["top1"] <= 1.0

    # SIGTERM: the average is written; a restarted averager resumes it
    assert procs.stop(proc, signal.SIGTERM) == 0
    saved = load_file(str(output / "averaged.safetensors"))
    model = googlenet(num_classes=NUM_CLASSES)
    model.load_state_dict(saved)  # a plain state_dict, aux heads included
    procs.stop_all()  # the shard too: the resumed average must come from the file
    start_averager(
        procs, "tcp://127.0.0.1:1", port, output, "--every-s", "3600", "--timeout-s", "1"
    )
    resumed_count, resumed = pull_average(address, layout)
    assert resumed_count >= count
    assert torch.equal(resumed, layout.from_state_dict(saved))


def test_evaluate_command_scores_an_exported_model(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path / "model.safetensors"
    from distbelief.checkpoint import save_checkpoint

    save_checkpoint(path, googlenet(num_classes=NUM_CLASSES).state_dict(), {"note": "test"})
    run = subprocess.run(
        [sys.executable, "-m", "distbelief", "evaluate", str(path), "--data", "demo", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result = json.loads(run.stdout)
    assert result["examples"] == 2000 and 0.0 <= result["top1"] <= result["top5"] <= 1.0
    # a file that is not a checkpoint of this model: one line, no traceback
    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(3)}, str(bad))
    run = subprocess.run(
        [sys.executable, "-m", "distbelief", "evaluate", str(bad), "--data", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "Error:" in run.stderr


def test_start_epoch_keeps_early_iterates_out(procs, tmp_path):
    (shard,) = procs.serve(1, "--num-classes", str(NUM_CLASSES), *PLAIN_SGD, "--dataset-size", "10")
    layout, _ = initial_weights("googlenet", NUM_CLASSES, 0)
    port = free_ports(1)
    address = f"tcp://127.0.0.1:{port}"
    start_averager(procs, shard, port, tmp_path / "avg", "--start-epoch", "1")
    time.sleep(1.0)
    assert probe_stats([address], 10)[0]["snapshots"] == 0  # epoch 0: nothing averaged
    g = torch.zeros(layout.total)
    with ParameterClient(ClientConfig(servers=(shard,), timeout_s=30), layout) as client:
        client.connect()
        client.push(g, examples=10)  # one epoch of a 10-example data set
    time.sleep(1.5)
    stats = probe_stats([address], 10)[0]
    assert stats["snapshots"] >= 1 and set(stats["versions"]) == {1}
