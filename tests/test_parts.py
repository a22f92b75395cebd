"""Pushes in parts (server/parts.py): each part applied and answered as it arrives, the
push counted once at its last part. Real shards, in process."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from distbelief.server.shard import Shard, ShardConfig
from distbelief.server.staleness import StalenessConfig
from torch import nn

from distbelief import protocol
from distbelief.layout import Layout, flat_weights

from .test_shard import call, push, shard_metrics_text

PARTS = 3  # of a shard of this model: 2,816 parameters in parts of 1,024


def make_shard(index=0, **kw) -> Shard:
    """One of two shards of a model large enough for a few parts (2 × 2,816 parameters)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 50), nn.Linear(50, 10))
    layout = Layout.of(model, "googlenet")
    cfg = ShardConfig(index=index, num_shards=2, metrics_port=0, num_classes=10, **kw)
    return Shard(cfg, layout, flat_weights(model, layout))


def part(shard, grad, k, *, parts=PARTS, seq=1, worker="w", base_version=0, dtype="f32", **kw):
    """Push part ``k`` of ``parts`` of ``grad`` (the shard's whole range) with ``pull``;
    the reply header and the weights it brought back (f32)."""
    lo, hi = protocol.part_range(shard.size, parts, k)
    body = protocol.to_wire(grad[lo:hi].clone(), dtype).tobytes()
    fields = dict(worker=worker, seq=seq, base_version=base_version, examples=4, dtype=dtype)
    fields |= dict(part=k, parts=parts, pull="f32") | kw
    header, payload = call(shard, "push", body, **fields)
    weights = protocol.from_wire(payload[0].buffer, "f32").clone() if payload else None
    return header, weights


def test_hello_says_whether_the_shard_takes_parts():
    assert call(make_shard(), "hello")[0]["parts"] is True
    assert call(make_shard(rule="nesterov"), "hello")[0]["parts"] is True
    for kw in (dict(rule="adagrad"), dict(staleness=StalenessConfig(policy="dc-asgd"))):
        shard = make_shard(**kw)
        assert call(shard, "hello")[0]["parts"] is False
        reply, _ = part(shard, torch.ones(shard.size), 0)
        assert reply["error"] == "not_available" and "whole pushes only" in reply["message"]


def test_the_parts_tile_the_range_at_aligned_offsets():
    for size in (1, 1023, 1024, 2816, 1_672_288):
        for parts in (1, 2, 3, 7):
            edges = [protocol.part_range(size, parts, k) for k in range(parts)]
            assert edges[0][0] == 0 and edges[-1][1] == size
            assert all(a[1] == b[0] for a, b in zip(edges, edges[1:], strict=False))
            assert all(lo % protocol.PART_ALIGN == 0 for lo, hi in edges if lo < hi)
    # the client's count: parts of at most part_bytes, none empty
    n = protocol.parts_for(1_672_288, 4 * 1_672_288, 256 * 1024)
    assert n == 26 and all(
        0 < hi - lo <= 65_536 for lo, hi in (protocol.part_range(1_672_288, n, k) for k in range(n))
    )
    assert protocol.parts_for(2816, 4 * 2816, 4096) == 3  # aligned: 1,024 a part


@pytest.mark.parametrize(
    "rule,policy,dtype",
    [
        ("momentum", "none", "f32"),
        ("nesterov", "lr-scale", "bf16"),
        ("momentum", "async-momentum-lr", "f32"),
    ],
)
def test_parts_apply_exactly_what_one_whole_push_applies(rule, policy, dtype):
    kw = dict(rule=rule, lr=0.1, momentum=0.9, weight_decay=0.01)
    kw |= dict(staleness=StalenessConfig(policy=policy))  # the staleness matters
    whole, parted = make_shard(**kw), make_shard(**kw)
    torch.manual_seed(1)
    for seq, base, order in (
        (1, 0, (0, 1, 2)),
        (2, 0, (2, 0, 1)),
        (3, 2, (1, 2, 0)),
        (4, 1, (0, 2, 1)),
    ):
        grad = torch.randn(whole.size)
        reply = push(whole, grad, seq=seq, base_version=base, dtype=dtype)
        for n, k in enumerate(order):
            got, weights = part(parted, grad, k, seq=seq, base_version=base, dtype=dtype)
            last = n == PARTS - 1
            assert got["ok"] and got["applied"] and got["complete"] is last
            assert got["staleness"] == reply["staleness"]  # fixed by the first part
            assert got["version"] == seq - 1 + last  # counted at the last part only
            lo, hi = protocol.part_range(parted.size, PARTS, k)
            assert torch.equal(weights, parted.weights[lo:hi])  # the part after its update
        assert torch.equal(parted.weights, whole.weights)  # bit for bit
        assert parted.updater.mean_staleness == whole.updater.mean_staleness
    assert (parted.version, parted.examples) == (whole.version, whole.examples) == (4, 16)
    stats = parted.stats()
    assert (stats["parts"], stats["pushes"], stats["partial_pushes"]) == (12, 4, 0)
    assert parted.last_seq == {"w": 4}
    assert "distbelief_shard_push_parts_total 12.0" in shard_metrics_text(parted)


def test_two_replicas_parts_may_interleave():
    """Each element sees both pushes once, in the order their parts reached it."""
    whole, parted = make_shard(lr=0.1, momentum=0.9), make_shard(lr=0.1, momentum=0.9)
    a, b = torch.randn(whole.size), torch.randn(whole.size)
    push(whole, a, worker="a")
    push(whole, b, worker="b")
    for worker, k, grad in (("a", 0, a), ("a", 1, a), ("b", 0, b), ("a", 2, a), ("b", 1, b)):
        assert part(parted, grad, k, worker=worker)[0]["applied"]
    got, _ = part(parted, b, 2, worker="b")
    assert got["complete"] and got["version"] == 2 and got["staleness"] == 0  # b began at 0
    assert torch.equal(parted.weights, whole.weights)
    assert parted.examples == 8 and parted.last_seq == {"a": 1, "b": 1}


def test_a_repeated_part_changes_nothing_and_brings_the_weights_back():
    shard = make_shard(lr=0.5)
    grad = torch.ones(shard.size)
    part(shard, grad, 0)
    after = shard.weights.clone()
    again, weights = part(shard, grad, 0)  # its reply was lost: the client sends it again
    assert again["ok"] and not again["applied"] and not again["complete"]
    assert torch.equal(shard.weights, after) and torch.equal(weights, after[:1024])
    for k in (1, 2):
        part(shard, grad, k)
    done = shard.weights.clone()
    late, _ = part(shard, grad, 1)  # a part of a push counted already
    assert not late["applied"] and late["version"] == 1
    stale, _ = part(shard, grad, 0, seq=0)  # an older push than the last one
    assert not stale["applied"]
    assert torch.equal(shard.weights, done) and (shard.version, shard.examples) == (1, 4)
    assert shard.stats()["duplicates"] == 3


def test_a_push_left_unfinished_is_counted_partial_its_parts_kept(caplog):
    shard = make_shard(lr=0.5, momentum=0.0, weight_decay=0.0, piece_timeout_s=0.05)
    w0 = shard.weights.clone()
    grad = torch.ones(shard.size)
    part(shard, grad, 0, seq=1)
    with caplog.at_level(logging.WARNING):
        part(shard, grad, 1, seq=2)  # the same worker's next push: the first never ends
    lo, hi = protocol.part_range(shard.size, PARTS, 1)
    assert torch.equal(shard.weights[:1024], w0[:1024] - 0.5)  # push 1's part 0 stays
    assert torch.equal(shard.weights[lo:hi], w0[lo:hi] - 0.5)  # push 2's part 1
    assert (shard.version, shard.examples, shard.stats()["partial_pushes"]) == (0, 0, 1)
    part(shard, grad, 0, seq=3, worker="other")
    shard.tick()
    assert shard.stats()["partial_pushes"] == 1  # not yet
    time.sleep(0.1)
    with caplog.at_level(logging.WARNING):
        shard.tick()  # nothing more of push 2 of w, nor of other's came in time
    assert shard.stats()["partial_pushes"] == 3 and not shard.streams.under_way
    assert "distbelief_shard_partial_pushes_total 3.0" in shard_metrics_text(shard)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("push 1 of worker w ended with 1 of its 3 parts applied" in m for m in warned), (
        warned
    )
    assert shard.version == 0 and shard.last_seq == {}


def test_a_non_finite_part_is_refused_and_applies_nothing():
    shard = make_shard(lr=0.5)
    grad = torch.ones(shard.size)
    grad[1500] = float("nan")
    w0 = shard.weights.clone()
    part(shard, grad, 0)
    reply, _ = part(shard, grad, 1)
    assert reply["error"] == "non_finite" and shard.rejected["non_finite"] == 1
    lo, hi = protocol.part_range(shard.size, PARTS, 1)
    assert torch.equal(shard.weights[lo:], w0[lo:])  # part 1 not applied, part 2 not come
    assert shard.version == 0 and shard.stats()["parts"] == 1


def test_progress_with_part_zero_is_credited_when_the_push_completes():
    shard = make_shard(index=0, dataset_size=64)  # shard 0: the data dispatcher
    chunk, _ = call(shard, "chunk", worker="w", batch_size=4)
    cid, lo = chunk["chunk"], chunk["lo"]
    grad = torch.ones(shard.size)
    part(shard, grad, 0, progress=[[cid, lo, lo + 4]])
    part(shard, grad, 1)
    assert shard.dispatcher.stats()["applied"] == {}  # not yet: the push is not complete
    reply, _ = part(shard, grad, 2)
    assert reply["complete"] and "revoked" not in reply
    assert shard.dispatcher.stats()["applied"] == {"0": 4}
    # a chunk that is not the worker's comes back revoked, with the last part's reply
    for k in range(PARTS):
        progress = dict(progress=[[cid + 1, 0, 4]]) if k == 0 else {}
        reply, _ = part(shard, grad, k, seq=2, **progress)
    assert reply["revoked"] == [cid + 1] and reply["generation"] == shard.dispatcher.generation


@pytest.mark.parametrize(
    "fields,code,says",
    [
        (dict(part=0, parts=None), "bad_field", "needs both 'part' and 'parts'"),
        (dict(part=3, parts=3), "bad_field", "0 <= part < parts"),
        (dict(parts=protocol.MAX_PARTS + 1), "bad_field", "0 <= part < parts"),
        (dict(part=4, parts=10), "bad_field", "is empty"),
        (dict(shm="seg"), "bad_field", "over the wire only"),
        (dict(ranges=[[0, 10]], group="r0"), "bad_field", "over the wire only"),
        (dict(part=-1), "bad_field", "out of range"),
        (dict(parts="3"), "bad_field", "must be an integer"),
    ],
)
def test_malformed_parts_are_refused_and_change_nothing(fields, code, says):
    shard = make_shard(lr=0.5)
    w0 = shard.weights.clone()
    body = torch.ones(1024).numpy().tobytes()
    header = dict(worker="w", seq=1, base_version=0, examples=4, dtype="f32", part=0, parts=3)
    header = {k: v for k, v in (header | fields).items() if v is not None}
    reply, _ = call(shard, "push", body, **header)
    assert reply["error"] == code and says in reply["message"], reply
    assert torch.equal(shard.weights, w0) and shard.version == 0


def test_a_part_of_the_wrong_size_or_count_is_refused():
    shard = make_shard(lr=0.5)
    grad = torch.ones(shard.size)
    body = torch.ones(1000).numpy().tobytes()
    fields = dict(worker="w", seq=1, base_version=0, examples=4, dtype="f32", part=0, parts=3)
    reply, _ = call(shard, "push", body, **fields)
    assert reply["error"] == "bad_size" and "part 0 of 3 holds 1024 parameters" in reply["message"]
    part(shard, grad, 0)
    reply, _ = part(shard, grad, 1, parts=2)  # the push said 3 parts
    assert reply["error"] == "bad_field" and "came in 3 parts" in reply["message"]
    assert shard.stats()["parts"] == 1
