"""Checkpoints: atomic safetensors files, verification, and shards that resume from them."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from distbelief.server.rules import make_rule
from distbelief.server.shard import initial_weights

from distbelief.checkpoint import (
    CheckpointError,
    checkpoint_path,
    latest_valid,
    list_checkpoints,
    load_checkpoint,
    prune,
    save_checkpoint,
)
from distbelief.client import ClientConfig, ParameterClient

NUM_CLASSES = 10


def tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "weights": torch.randn(1000, generator=g),
        "state.momentum": torch.randn(7, generator=g),
    }


def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    path = save_checkpoint(tmp_path / "a.safetensors", tensors(0), {"version": 5, "who": "x"})
    ckpt = load_checkpoint(path)
    for k, v in tensors(0).items():
        assert torch.equal(ckpt.tensors[k], v)
    assert ckpt.meta_json("version") == 5 and ckpt.meta_json("who") == "x"
    assert not list(tmp_path.glob(".*tmp*")), "the temporary file was renamed away"


def test_corrupted_and_truncated_files_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "a.safetensors", tensors(0), {"version": 1})
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # a flipped bit in the tensor bytes: the header still parses
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        load_checkpoint(path)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(path)


def test_latest_valid_skips_bad_files_and_prune_keeps_the_newest(tmp_path, caplog):
    for version in (1, 2, 3):
        save_checkpoint(checkpoint_path(tmp_path, version), tensors(version), {"version": version})
    newest = checkpoint_path(tmp_path, 3)
    newest.write_bytes(newest.read_bytes()[:100])
    ckpt = latest_valid(tmp_path)
    assert ckpt.meta_json("version") == 2
    assert str(newest) in caplog.text
    prune(tmp_path, keep=2)
    assert list_checkpoints(tmp_path) == [newest, checkpoint_path(tmp_path, 2)]
    assert latest_valid(tmp_path / "missing") is None


# -- shards that stop and come back -----------------------------------------------------

HP = [
    "--num-classes",
    str(NUM_CLASSES),
    "--lr",
    "0.1",
    "--momentum",
    "0.9",
    "--weight-decay",
    "0.001",
    "--checkpoint-every-s",
    "3600",
]


def grad(step: int, layout) -> torch.Tensor:
    """A gradient as a replica sends it: zero on the layout's padding."""
    g = torch.randn(layout.total, generator=torch.Generator().manual_seed(step)) * 1e-3
    g[layout.parameters :] = 0
    return g


def expected_after(steps: list[int]) -> torch.Tensor:
    """The weights after pushes of ``grad(s)`` for s in ``steps``, computed locally."""
    layout, weights = initial_weights("googlenet", NUM_CLASSES, 0)
    rule = make_rule("momentum", weights, weight_decay=0.001, momentum=0.9)
    for s in steps:
        rule.apply(grad(s, layout), 0.1)
    return weights


def connect(address):
    layout, _ = initial_weights("googlenet", NUM_CLASSES, 0)
    client = ParameterClient(ClientConfig(servers=(address,), timeout_s=30), layout)
    client.connect()
    return client, layout


def push_steps(address, steps):
    client, layout = connect(address)
    with client:
        for s in steps:
            assert client.push(grad(s, layout), examples=1)[0].applied


def pull(address):
    client, layout = connect(address)
    with client:
        weights = torch.empty(layout.total)
        version = client.pull(weights)[0]
    return version, weights


def start_shard(procs, port, ckpt_dir, *extra):
    from .conftest import wait_until_serving

    proc = procs.start(
        "serve",
        "--port",
        str(port),
        "--metrics-port",
        "0",
        "--checkpoint-dir",
        str(ckpt_dir),
        *HP,
        *extra,
        name="shard",
    )
    wait_until_serving(f"tcp://127.0.0.1:{port}", proc, proc.log_path)
    return proc


def test_sigterm_writes_a_final_checkpoint_and_restart_loses_nothing(procs, tmp_path):
    from .conftest import free_port

    port, ckpt = free_port(), tmp_path / "ckpt"
    address = f"tcp://127.0.0.1:{port}"
    proc = start_shard(procs, port, ckpt)
    push_steps(address, [1, 2, 3])
    assert procs.stop(proc, signal.SIGTERM) == 0
    assert list_checkpoints(ckpt / "shard-0")
    start_shard(procs, port, ckpt)
    version, weights = pull(address)
    assert version == 3
    assert torch.equal(weights, expected_after([1, 2, 3]))
    # the momentum came back too: one more push lands exactly where it would have
    push_steps(address, [4])
    assert torch.equal(pull(address)[1], expected_after([1, 2, 3, 4]))


def test_kill_9_resumes_from_the_last_checkpoint_and_skips_a_corrupt_one(procs, tmp_path):
    from .conftest import free_port

    port, ckpt = free_port(), tmp_path / "ckpt"
    address = f"tcp://127.0.0.1:{port}"
    proc = start_shard(procs, port, ckpt)
    push_steps(address, [1, 2])
    client, _ = connect(address)
    with client:
        (first,) = client.save()
        push_steps(address, [3])
        (second,) = client.save()
    push_steps(address, [4, 5])  # after the last checkpoint: lost to kill -9
    procs.stop(proc, signal.SIGKILL)
    start_shard(procs, port, ckpt)
    version, weights = pull(address)
    assert version == 3 and torch.equal(weights, expected_after([1, 2, 3]))
    procs.stop_all()
    # corrupt the newest checkpoint: the shard falls back to the one before it
    data = bytearray(Path(second).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(second).write_bytes(bytes(data))
    proc = start_shard(procs, port, ckpt)
    version, weights = pull(address)
    assert version == 2 and torch.equal(weights, expected_after([1, 2]))
    assert (
        "skipping checkpoint" in proc.log_path.read_text() and second in proc.log_path.read_text()
    )
    assert first.endswith("v000000000002.safetensors")


def test_checkpoint_of_another_layout_is_refused(procs, tmp_path):
    from .conftest import free_port

    port, ckpt = free_port(), tmp_path / "ckpt"
    proc = start_shard(procs, port, ckpt)
    push_steps(f"tcp://127.0.0.1:{port}", [1])
    procs.stop(proc, signal.SIGTERM)
    bad = procs.start(
        "serve",
        "--port",
        str(port),
        "--metrics-port",
        "0",
        "--checkpoint-dir",
        str(ckpt),
        *HP[2:],
        "--num-classes",
        "11",
        name="bad",
    )
    assert bad.wait(90) == 2
    text = bad.log_path.read_text()
    assert "written by another shard layout" in text and "num_classes 10 there, 11 here" in text
    assert "Traceback" not in text
