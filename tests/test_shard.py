"""The shard's request handler, in process (the same code the poll loop calls)."""

import math

import msgpack
import numpy as np
import pytest
import torch
from distbelief.server.shard import Shard, ShardConfig
from torch import nn

from distbelief import protocol
from distbelief.layout import Layout, flat_weights


def make_shard(index=0, num_shards=2, **kw) -> tuple[Shard, Layout, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 5))
    layout = Layout.of(model, "googlenet")
    weights = flat_weights(model, layout)
    cfg = ShardConfig(index=index, num_shards=num_shards, metrics_port=0, num_classes=10, **kw)
    return Shard(cfg, layout, weights), layout, weights


def call(shard: Shard, op: str, *payload, **fields) -> tuple[dict, list]:
    out = shard.handle([protocol.request(op, 1, **fields), *payload])
    return protocol.decode(out[0]), out[1:]


def push(shard, grad, seq=1, worker="w", base_version=0, dtype="f32", examples=4):
    body = protocol.to_wire(grad, dtype).tobytes()
    return call(
        shard,
        "push",
        body,
        worker=worker,
        seq=seq,
        base_version=base_version,
        examples=examples,
        dtype=dtype,
    )[0]


def test_hello_reports_range_and_refuses_other_layouts():
    shard, layout, _ = make_shard()
    reply, _ = call(shard, "hello", fingerprint=layout.fingerprint(2))
    assert reply["ok"] and (reply["start"], reply["stop"]) == (0, 3 * 64)  # 325 in 64-blocks
    reply, _ = call(shard, "hello", fingerprint=layout.fingerprint(3))
    assert reply["error"] == "layout_mismatch" and "--num-classes" in reply["message"]
    assert shard.rejected["layout_mismatch"] == 1
    # no fingerprint: nothing checked, nothing refused; the shard says what it holds
    reply, _ = call(shard, "hello")
    assert reply["ok"] and reply["fingerprint"] == layout.fingerprint(2)
    assert (reply["model"], reply["num_classes"], reply["num_shards"]) == ("googlenet", 10, 2)
    assert shard.rejected["layout_mismatch"] == 1


@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
def test_pull_returns_the_range_in_the_asked_dtype(dtype):
    shard, layout, weights = make_shard(index=1)
    reply, payload = call(shard, "pull", dtype=dtype)
    got = protocol.from_wire(payload[0].buffer, dtype).float()
    tol = {"f32": 0, "bf16": 1e-2, "f16": 1e-3}[dtype]
    torch.testing.assert_close(got, weights[shard.start :], rtol=tol, atol=tol)
    assert shard.stop == layout.total
    assert reply["version"] == 0 and reply["dtype"] == dtype


def test_pull_is_a_snapshot_not_a_view():
    shard, _, _ = make_shard(lr=1.0, momentum=0.0, weight_decay=0.0)
    _, first = call(shard, "pull")
    before = np.frombuffer(first[0].buffer, dtype=np.float32).copy()
    push(shard, torch.ones(shard.size))
    _, second = call(shard, "pull")  # the first frame is still alive: another buffer
    assert np.array_equal(np.frombuffer(first[0].buffer, dtype=np.float32), before)
    assert np.array_equal(np.frombuffer(second[0].buffer, dtype=np.float32), before - 1)


def test_the_layouts_padding_stays_zero_whatever_a_client_pushes():
    shard, layout, weights = make_shard(index=1, lr=1.0, momentum=0.9, weight_decay=0.1)
    assert (layout.parameters, layout.total, shard.padding) == (325, 384, 59)
    for seq in (1, 2):
        push(shard, torch.ones(shard.size), seq=seq)
    _, payload = call(shard, "pull")
    got = torch.from_numpy(np.frombuffer(payload[0].buffer, dtype=np.float32).copy())
    assert not got[-shard.padding :].any()
    assert torch.all(got[: -shard.padding] != weights[shard.start : layout.parameters])


def test_push_applies_sgd_counts_examples_and_staleness():
    shard, _, _ = make_shard(lr=0.5, momentum=0.0, weight_decay=0.0)
    w0 = shard.weights.clone()
    assert push(shard, torch.ones(shard.size), seq=1)["applied"]
    reply = push(shard, torch.ones(shard.size), seq=2, worker="v", base_version=0)
    assert reply["staleness"] == 1 and reply["version"] == 2
    torch.testing.assert_close(shard.weights, w0 - 1.0)
    stats = shard.stats()
    assert stats["version"] == 2 and stats["examples"] == 8 and stats["workers_recent"] == 2


def test_duplicate_push_changes_nothing():
    shard, _, _ = make_shard(lr=0.5, momentum=0.0, weight_decay=0.0)
    assert push(shard, torch.ones(shard.size), seq=5)["applied"]
    after = shard.weights.clone()
    for seq in (5, 4):
        reply = push(shard, torch.ones(shard.size), seq=seq)
        assert reply["ok"] and not reply["applied"] and reply["version"] == 1
    assert torch.equal(shard.weights, after)
    assert shard.counts["duplicates"] == 2 and shard.examples == 4


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_a_push_with_pull_answers_with_the_weights_after_it(dtype):
    shard, _, _ = make_shard(lr=0.5, momentum=0.0, weight_decay=0.0)
    w0 = shard.weights.clone()
    body = protocol.to_wire(torch.ones(shard.size), "f32").tobytes()
    fields = dict(worker="w", seq=1, base_version=0, examples=4, dtype="f32", pull=dtype)
    reply, payload = call(shard, "push", body, **fields)
    assert reply["applied"] and reply["version"] == 1 and reply["pull"] == dtype
    got = protocol.from_wire(payload[0].buffer, dtype).float()
    _, pulled = call(shard, "pull", dtype=dtype)  # what a pull sent after reads
    assert torch.equal(got, protocol.from_wire(pulled[0].buffer, dtype).float())
    tol = {"f32": 0, "bf16": 1e-2}[dtype]
    torch.testing.assert_close(got, w0 - 0.5, rtol=tol, atol=tol)
    # a retried push-and-pull applies nothing again and still brings the weights
    reply, payload = call(shard, "push", body, **fields)
    assert not reply["applied"] and reply["version"] == 1 and len(payload) == 1
    assert shard.counts == {"pushes": 1, "duplicates": 1, "pulls": 3}
    reply, payload = call(shard, "push", body, **fields | {"seq": 2, "pull": "f64"})
    assert reply["error"] == "bad_field" and "pull" in reply["message"] and not payload
    assert shard.version == 1


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_gradient_is_refused_and_changes_nothing(bad):
    shard, _, _ = make_shard()
    w0 = shard.weights.clone()
    grad = torch.zeros(shard.size)
    grad[3] = bad
    reply = push(shard, grad)
    assert reply["error"] == "non_finite"
    assert torch.equal(shard.weights, w0) and shard.version == 0
    assert shard.rejected["non_finite"] == 1
    # the same (worker, seq) sent again with a good gradient is not a duplicate
    assert push(shard, torch.zeros(shard.size))["applied"]


def test_large_but_finite_gradient_is_not_mistaken_for_non_finite():
    shard, _, _ = make_shard(lr=1e-38, momentum=0.0, weight_decay=0.0)
    assert push(shard, torch.full((shard.size,), 3e38))["applied"]


@pytest.mark.parametrize(
    "frames,code",
    [
        ([], "bad_header"),
        ([b"\x00garbage"], "bad_header"),
        ([msgpack.packb({"v": 1, "op": "pull", "rid": 1}), b"extra"], "bad_size"),
        (
            [
                protocol.request(
                    "push", 1, worker="w", seq=1, base_version=0, examples=1, dtype="f32"
                ),
                b"\x00" * 12,
            ],
            "bad_size",
        ),
        (
            [
                protocol.request(
                    "push", 1, worker="w", seq=1, base_version=0, examples=1, dtype="f32"
                )
            ],
            "bad_size",
        ),
        ([protocol.request("save", 1)], "not_available"),
    ],
)
def test_malformed_requests_are_answered_with_codes(frames, code):
    shard, _, _ = make_shard()
    w0 = shard.weights.clone()
    reply = protocol.decode(shard.handle(frames)[0])
    assert reply["ok"] is False and reply["error"] == code
    assert torch.equal(shard.weights, w0)
    assert shard.rejected[code] == 1


def test_metrics_count_what_the_handler_saw():
    shard, _, _ = make_shard()
    call(shard, "pull")
    shard.handle([b"junk"])
    text = shard_metrics_text(shard)
    assert 'distbelief_shard_rejected_messages_total{reason="bad_header"} 1.0' in text
    assert "distbelief_shard_pulls_total 1.0" in text
    assert "distbelief_build_info" in text


def shard_metrics_text(shard) -> str:
    from prometheus_client import generate_latest

    return generate_latest(shard.metrics.registry).decode()
