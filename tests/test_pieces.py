"""Steps pushed in pieces (a replica split into stages): real shards, in process and
through a real ServiceLoop."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
import zmq
from distbelief.server.service import ServiceLoop
from distbelief.server.staleness import StalenessConfig

from distbelief import protocol

from .test_shard import make_shard, push, shard_metrics_text

RECV_TIMEOUT_S = 5.0


def piece(shard, grad, ranges, worker, *, seq=1, identity=None, rid=1, dtype="f32", **fields):
    """Push the part of ``grad`` (the shard's whole range) over the absolute ``ranges``
    as ``worker``; the reply (header, payload), or None when the shard parked it."""
    body = b"".join(
        protocol.to_wire(grad[lo - shard.start : hi - shard.start].clone(), dtype).tobytes()
        for lo, hi in ranges
    )
    header = dict(
        worker=worker, seq=seq, base_version=0, examples=4, dtype=dtype, group="r0"
    ) | dict(ranges=[list(r) for r in ranges], **fields)
    out = shard.handle([protocol.request("push", rid, **header), body], identity)
    return None if out is None else (protocol.decode(out[0]), out[1:])


def outbox(shard) -> list[tuple[bytes | None, dict, list]]:
    """The replies the shard queued for parked requests, taken out."""
    out = [(ident, protocol.decode(frames[0]), frames[1:]) for ident, frames in shard.outbox]
    shard.outbox.clear()
    return out


def values(frame, dtype="f32") -> torch.Tensor:
    return protocol.from_wire(frame.buffer, dtype).float()


def halves(shard) -> tuple[list, list]:
    """Two stages' ranges straddling the shard: the first takes two pieces of it."""
    a, b = shard.start + 40, shard.start + 90
    return [(shard.start, a), (b, b + 30)], [(a, b), (b + 30, shard.stop)]


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("index", [0, 1])
def test_pieces_apply_exactly_what_one_whole_push_applies(dtype, index):
    kw = dict(index=index, lr=0.1, momentum=0.9, weight_decay=0.01)
    kw |= dict(staleness=StalenessConfig(policy="lr-scale"))  # the staleness matters
    whole, _, _ = make_shard(**kw)
    split, _, _ = make_shard(**kw)
    first, second = halves(split)
    torch.manual_seed(1)
    for seq, bases in ((1, (0, 0)), (2, (1, 1)), (3, (2, 0)), (4, (1, 3))):
        grad = torch.randn(whole.size)
        # the whole push carries the oldest base any stage read, as one unsplit replica
        reply = push(whole, grad, seq=seq, base_version=min(bases), dtype=dtype)
        assert piece(split, grad, first, "s0", seq=seq, base_version=bases[0], dtype=dtype) is None
        got, _ = piece(split, grad, second, "s1", seq=seq, base_version=bases[1], dtype=dtype)
        (_, parked, _), *_ = outbox(split)
        for r in (got, parked):
            assert r["applied"] and (r["version"], r["staleness"]) == (
                reply["version"],
                reply["staleness"],
            )
        assert torch.equal(split.weights, whole.weights)  # bit for bit
    assert (split.version, split.examples) == (whole.version, whole.examples) == (4, 16)
    assert split.stats()["staleness_mean"] == whole.stats()["staleness_mean"]
    assert split.stats()["pieces"] == 8 and split.counts["pushes"] == 4
    assert split.last_seq == {"s0": 4, "s1": 4}


def test_the_last_shards_padding_may_be_left_out_or_covered():
    shard, layout, _ = make_shard(index=1, lr=1.0, momentum=0.0, weight_decay=0.0)
    w0 = shard.weights.clone()
    real = layout.parameters  # 325 of [192, 384): the rest is padding
    grad = torch.ones(shard.size)
    assert piece(shard, grad, [(shard.start, 250)], "s0") is None
    reply, _ = piece(shard, grad, [(250, real)], "s1")  # the padding left out
    assert reply["applied"] and shard.version == 1
    assert piece(shard, grad, [(shard.start, 250)], "s0", seq=2) is None
    reply, _ = piece(shard, grad, [(250, shard.stop)], "s1", seq=2)  # the padding covered
    assert reply["applied"] and shard.version == 2
    n = real - shard.start
    assert torch.equal(shard.weights[:n], w0[:n] - 1.0 - 1.0) and not shard.weights[n:].any()


def test_a_piece_is_answered_once_its_step_is_applied_with_the_weights_of_its_ranges():
    shard, _, _ = make_shard(lr=0.5, momentum=0.0, weight_decay=0.0)
    first, second = halves(shard)
    grad = torch.arange(shard.size, dtype=torch.float32)
    assert piece(shard, grad, first, "s0", identity=b"stage0", rid=7, pull="bf16") is None
    assert not shard.outbox and shard.version == 0 and shard.stats()["open_steps"] == 1
    reply, payload = piece(shard, grad, second, "s1", identity=b"stage1", rid=9, pull="f32")
    [(ident, parked, parked_payload)] = outbox(shard)
    assert ident == b"stage0" and parked["rid"] == 7 and parked["pull"] == "bf16"
    assert reply["rid"] == 9 and reply["pull"] == "f32"
    for r in (reply, parked):
        assert r["ok"] and r["applied"] and r["version"] == 1 and r["staleness"] == 0
    w = shard.weights
    assert torch.equal(values(payload[0]), torch.cat([w[40:90], w[120:]]))
    mine = torch.cat([w[0:40], w[90:120]])
    torch.testing.assert_close(values(parked_payload[0], "bf16"), mine, rtol=1e-2, atol=1e-2)
    stats = shard.stats()
    assert (stats["version"], stats["examples"], stats["open_steps"]) == (1, 4, 0)
    assert stats["push_bytes"] == {"s0": 70 * 4, "s1": (50 + shard.size - 120) * 4}


def test_a_retried_piece_is_answered_at_its_new_address_and_after_the_step_as_a_duplicate():
    shard, _, _ = make_shard(lr=0.5, momentum=0.0, weight_decay=0.0)
    first, second = halves(shard)
    grad = torch.ones(shard.size)
    assert piece(shard, grad, first, "s0", identity=b"old", rid=1) is None
    # the stage timed out and retried on a reopened socket: a new identity and rid
    assert piece(shard, grad, first, "s0", identity=b"new", rid=2) is None
    assert not shard.outbox and shard.stats()["pieces"] == 1
    reply, _ = piece(shard, grad, second, "s1")
    [(ident, parked, _)] = outbox(shard)
    assert (ident, parked["rid"], parked["applied"]) == (b"new", 2, True)
    assert reply["applied"] and shard.version == 1
    after = shard.weights.clone()
    reply, payload = piece(shard, grad, first, "s0", identity=b"again", rid=3, pull="f32")
    assert reply["ok"] and not reply["applied"] and reply["version"] == 1
    assert torch.equal(values(payload[0]), torch.cat([after[0:40], after[90:120]]))
    assert torch.equal(shard.weights, after) and shard.counts["duplicates"] == 1
    assert not shard.outbox and shard.examples == 4


def test_a_step_still_incomplete_after_the_timeout_is_refused_and_applies_nothing():
    shard, _, _ = make_shard(piece_timeout_s=0.05, lr=0.5)
    w0 = shard.weights.clone()
    first, second = halves(shard)
    grad = torch.ones(shard.size)
    assert piece(shard, grad, first, "s0", seq=12, identity=b"stage0", rid=5) is None
    shard.tick()
    assert not shard.outbox  # not yet
    time.sleep(0.1)
    shard.tick()
    [(ident, refused, payload)] = outbox(shard)
    assert ident == b"stage0" and refused["rid"] == 5 and not payload
    assert refused["ok"] is False and refused["error"] == "incomplete"
    assert refused["message"] == (
        "step 12 of replica group r0: pieces cover 70 of 192 parameters of shard 0 after "
        "0.05 s (pieces from s0); a stage did not push; nothing applied"
    )
    assert torch.equal(shard.weights, w0) and shard.version == 0 and shard.examples == 0
    stats = shard.stats()
    assert (stats["incomplete_steps"], stats["open_steps"], stats["pieces"]) == (1, 0, 1)
    assert stats["rejected"]["incomplete"] == 1
    text = shard_metrics_text(shard)
    assert "distbelief_shard_incomplete_steps_total 1.0" in text
    assert "distbelief_shard_open_steps 0.0" in text
    assert "distbelief_shard_pieces_total 1.0" in text
    # nothing was recorded: the same step pushed again whole is applied
    assert piece(shard, grad, first, "s0", seq=12) is None
    assert piece(shard, grad, second, "s1", seq=12)[0]["applied"] and shard.version == 1


def test_a_non_finite_step_refuses_every_piece_and_applies_nothing():
    shard, _, _ = make_shard()
    w0 = shard.weights.clone()
    first, second = halves(shard)
    grad = torch.zeros(shard.size)
    grad[100] = torch.nan  # in the second stage's part
    assert piece(shard, grad, first, "s0", identity=b"stage0") is None
    reply, _ = piece(shard, grad, second, "s1")
    [(ident, parked, _)] = outbox(shard)
    assert reply["error"] == parked["error"] == "non_finite" and ident == b"stage0"
    assert torch.equal(shard.weights, w0) and shard.version == 0
    assert shard.rejected["non_finite"] == 2 and shard.stats()["open_steps"] == 0
    # not recorded as pushed: the same (worker, seq) with a good gradient applies
    good = torch.zeros(shard.size)
    assert piece(shard, good, first, "s0") is None
    assert piece(shard, good, second, "s1")[0]["applied"]


def test_pull_with_ranges_returns_exactly_those_slices():
    shard, _, weights = make_shard(index=1)
    ranges = [[200, 210], [250, 251], [300, 384]]
    for dtype in ("f32", "bf16"):
        out = shard.handle([protocol.request("pull", 1, dtype=dtype, ranges=ranges)])
        reply = protocol.decode(out[0])
        assert reply["ok"] and reply["dtype"] == dtype and reply["version"] == 0
        want = torch.cat([weights[lo:hi] for lo, hi in ranges])
        got = values(out[1], dtype)
        tol = {"f32": 0, "bf16": 1e-2}[dtype]
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    out = shard.handle([protocol.request("pull", 1, ranges=[[0, 10]])])
    reply = protocol.decode(out[0])
    assert reply["error"] == "bad_field" and "shard 1 holds [192, 384)" in reply["message"]


BAD_RANGES = [
    ([[0, 300]], "bad_field", "shard 0 holds [0, 192)"),  # past the shard's end
    ([[-5, 10]], "bad_field", "shard 0 holds [0, 192)"),
    ([[10, 10]], "bad_field", "empty"),
    ([[0, 20], [10, 30]], "bad_field", "ascending and not overlap"),  # overlapping
    ([[20, 30], [0, 10]], "bad_field", "ascending and not overlap"),  # unsorted
    ([[0, 10, 20]], "bad_field", "pair of integers"),
    ([[0]], "bad_field", "pair of integers"),
    ([[0, 1.5]], "bad_field", "pair of integers"),
    ([], "bad_field", "1 to 64"),
    ([[i, i + 1] for i in range(65)], "bad_field", "1 to 64"),
    (7, "bad_field", "'ranges' must be list"),
]


@pytest.mark.parametrize("ranges,code,says", BAD_RANGES)
def test_malformed_ranges_are_refused_and_change_nothing(ranges, code, says):
    shard, _, _ = make_shard()
    w0 = shard.weights.clone()
    fields = dict(worker="s0", seq=1, base_version=0, examples=4, dtype="f32", group="r0")
    body = b"\x00" * 4 * 10
    for op, request in (
        ("push", protocol.request("push", 1, ranges=ranges, **fields)),
        ("pull", protocol.request("pull", 1, ranges=ranges)),
    ):
        out = shard.handle([request, body] if op == "push" else [request])
        reply = protocol.decode(out[0])
        assert reply["error"] == code and says in reply["message"], (op, reply)
    assert torch.equal(shard.weights, w0) and shard.version == 0 and not shard.outbox
    assert shard.stats()["open_steps"] == 0 and shard.rejected[code] == 2


@pytest.mark.parametrize(
    "change,code,says",
    [
        (dict(shm="seg"), "bad_field", "not with shm"),
        (dict(group=None), "bad_field", "needs 'group'"),
        (dict(body=b"\x00" * 4 * 11), "bad_size", "its ranges hold 10 parameters = 40 bytes"),
        (dict(body=b"\x00" * 2 * 10), "bad_size", "its ranges hold 10"),  # f16 bytes as f32
    ],
)
def test_malformed_pieces_are_refused_and_change_nothing(change, code, says):
    shard, _, _ = make_shard()
    w0 = shard.weights.clone()
    fields = dict(worker="s0", seq=1, base_version=0, examples=4, dtype="f32", group="r0")
    fields |= dict(ranges=[[0, 10]])
    change = dict(change)
    body = change.pop("body", b"\x00" * 4 * 10)
    fields = {k: v for k, v in (fields | change).items() if v is not None}
    out = shard.handle([protocol.request("push", 1, **fields), body])
    reply = protocol.decode(out[0])
    assert reply["error"] == code and says in reply["message"], reply
    assert torch.equal(shard.weights, w0) and not shard.outbox
    assert shard.stats()["open_steps"] == 0 and shard.stats()["pieces"] == 0


def test_pieces_that_disagree_with_their_step_are_refused_and_change_nothing():
    shard, _, _ = make_shard(index=0, lr=1.0, momentum=0.0, weight_decay=0.0)
    w0 = shard.weights.clone()
    first, second = halves(shard)
    grad = torch.ones(shard.size)
    assert piece(shard, grad, first, "s0", progress=[[0, 0, 4]]) is None
    for worker, ranges, more, says in [
        ("s1", [(30, 50)], {}, "[30, 50) overlaps a piece already in"),
        ("s1", second, {"examples": 5}, "reports 5 examples, the pieces before it 4"),
        ("s1", second, {"progress": [[0, 0, 4]]}, "progress comes with one piece"),
    ]:
        reply, _ = piece(shard, grad, ranges, worker, **more)
        assert reply["error"] == "bad_field" and says in reply["message"], reply
        assert torch.equal(shard.weights, w0) and shard.version == 0
    assert shard.stats()["open_steps"] == 1 and shard.stats()["pieces"] == 1
    reply, _ = piece(shard, grad, second, "s1")  # the right piece still completes the step
    assert reply["applied"] and torch.equal(shard.weights, w0 - 1.0)


def test_at_most_sixteen_steps_are_assembled_at_once():
    shard, _, _ = make_shard()
    first, _ = halves(shard)
    grad = torch.ones(shard.size)
    for r in range(16):
        assert piece(shard, grad, first, f"r{r}-s0", group=f"r{r}") is None
    reply, _ = piece(shard, grad, first, "r16-s0", group="r16")
    assert reply["error"] == "not_available" and "the most it holds at once" in reply["message"]
    assert shard.stats()["open_steps"] == 16


# -- through a real ServiceLoop ----------------------------------------------------------


def recv(sock: zmq.Socket, timeout_s: float = RECV_TIMEOUT_S) -> list[bytes]:
    assert sock.poll(timeout_s * 1000), f"no reply within {timeout_s} s"
    return sock.recv_multipart()


def piece_frames(shard, grad, ranges, worker, seq=1) -> list[bytes]:
    body = np.concatenate([grad[lo:hi].numpy() for lo, hi in ranges]).tobytes()
    header = protocol.request(
        "push",
        seq,
        worker=worker,
        seq=seq,
        base_version=0,
        examples=4,
        dtype="f32",
        group="r0",
        ranges=[list(r) for r in ranges],
        pull="f32",
    )
    return [header, body]


def test_through_the_service_loop_a_piece_is_answered_after_the_last_piece():
    from .conftest import free_port

    shard, layout, _ = make_shard(
        num_shards=1, piece_timeout_s=0.5, lr=1.0, momentum=0.0, weight_decay=0.0
    )
    after = shard.weights - 1.0
    after[layout.parameters :] = 0  # the padding stays zero
    port = free_port()
    loop = ServiceLoop(shard, name="shard 0", bind="127.0.0.1", port=port, max_bytes=1 << 20)
    thread = threading.Thread(target=loop.run, daemon=True)
    context = zmq.Context()
    stages = [context.socket(zmq.DEALER) for _ in range(2)]
    try:
        thread.start()
        for sock in stages:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://127.0.0.1:{port}")
        first, second = [(0, 100), (200, 300)], [(100, 200), (300, shard.size)]
        grad = torch.ones(shard.size)
        stages[0].send_multipart(piece_frames(shard, grad, first, "s0"))
        assert not stages[0].poll(300), "the first piece was answered before the second"
        stages[1].send_multipart(piece_frames(shard, grad, second, "s1"))
        for sock, ranges in zip(stages, (first, second), strict=True):
            header, payload = recv(sock)
            reply = protocol.decode(header)
            assert reply["applied"] and reply["version"] == 1
            got = np.frombuffer(payload, dtype=np.float32)
            want = torch.cat([after[lo:hi] for lo, hi in ranges]).numpy()
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        # a lone piece: the loop's tick answers it `incomplete` after the timeout
        stages[0].send_multipart(piece_frames(shard, grad, first, "s0", seq=2))
        reply = protocol.decode(recv(stages[0])[0])
        assert reply["error"] == "incomplete" and "step 2 of replica group r0" in reply["message"]
    finally:
        loop.stop()
        thread.join(timeout=10)
        for sock in stages:
            sock.close(linger=0)
        context.term()
        loop.close()
    assert not thread.is_alive()
