"""Steps pushed in pieces (a replica split into stages), held and then committed: real
shards, in process and through a real ServiceLoop."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
import torch
import zmq
from distbelief.server.service import ServiceLoop
from distbelief.server.staleness import StalenessConfig

from distbelief import protocol

from .test_shard import call, make_shard, push, shard_metrics_text

RECV_TIMEOUT_S = 5.0
HELD = dict(ok=True, applied=False, staleness=0, held=True)


def piece(shard, grad, ranges, worker, *, seq=1, rid=1, dtype="f32", **fields):
    """Push the part of ``grad`` (the shard's whole range) over the absolute ``ranges``
    as ``worker``, a piece of step ``seq`` of replica group r0; the reply header."""
    body = b"".join(
        protocol.to_wire(grad[lo - shard.start : hi - shard.start].clone(), dtype).tobytes()
        for lo, hi in ranges
    )
    header = dict(worker=worker, seq=seq, base_version=0, examples=4, dtype=dtype, group="r0")
    header |= dict(ranges=[list(r) for r in ranges], **fields)
    out = shard.handle([protocol.request("push", rid, **header), body])
    assert len(out) == 1, "a piece is answered without a payload"
    return protocol.decode(out[0])


def commit(shard, seq=1, group="r0", **fields) -> tuple[dict, list]:
    return call(shard, "commit", group=group, seq=seq, **fields)


def held(reply: dict, version: int = 0) -> bool:
    return {k: reply.get(k) for k in HELD} == HELD and reply["version"] == version


def values(frame, dtype="f32") -> torch.Tensor:
    return protocol.from_wire(frame.buffer, dtype).float()


def over(weights: torch.Tensor, ranges, start: int) -> torch.Tensor:
    return torch.cat([weights[lo - start : hi - start] for lo, hi in ranges])


def halves(shard) -> tuple[list, list]:
    """Two stages' ranges straddling the shard: each takes two pieces of it."""
    a, b = shard.start + 40, shard.start + 90
    return [(shard.start, a), (b, b + 30)], [(a, b), (b + 30, shard.stop)]


def hold_step(shard, grad, seq=1, **fields) -> None:
    """Both stages' pieces of step ``seq``, answered held."""
    first, second = halves(shard)
    assert held(piece(shard, grad, first, "s0", seq=seq, **fields), shard.version)
    assert held(piece(shard, grad, second, "s1", seq=seq), shard.version)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("index", [0, 1])
def test_pieces_and_a_commit_apply_exactly_what_one_whole_push_applies(dtype, index):
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
        for ranges, worker, base in ((first, "s0", bases[0]), (second, "s1", bases[1])):
            got = piece(split, grad, ranges, worker, seq=seq, base_version=base, dtype=dtype)
            assert held(got, seq - 1)
        committed, payload = commit(split, seq)
        assert committed["applied"] and not payload and "held" not in committed
        assert (committed["version"], committed["staleness"]) == (
            reply["version"],
            reply["staleness"],
        )
        assert torch.equal(split.weights, whole.weights)  # bit for bit
    assert (split.version, split.examples) == (whole.version, whole.examples) == (4, 16)
    assert split.stats()["staleness_mean"] == whole.stats()["staleness_mean"]
    stats = split.stats()
    assert (stats["pieces"], stats["pushes"], stats["duplicates"], stats["open_steps"]) == (
        8,
        4,
        0,
        0,
    )
    assert split.last_seq == {"s0": 4, "s1": 4}


def test_the_last_shards_padding_may_be_left_out_or_covered():
    shard, layout, _ = make_shard(index=1, lr=1.0, momentum=0.0, weight_decay=0.0)
    w0 = shard.weights.clone()
    real = layout.parameters  # 325 of [192, 384): the rest is padding
    grad = torch.ones(shard.size)
    assert held(piece(shard, grad, [(shard.start, 250)], "s0"))
    assert held(piece(shard, grad, [(250, real)], "s1"))  # the padding left out
    assert commit(shard, 1)[0]["applied"] and shard.version == 1
    assert held(piece(shard, grad, [(shard.start, 250)], "s0", seq=2), 1)
    assert held(piece(shard, grad, [(250, shard.stop)], "s1", seq=2), 1)  # covered
    assert commit(shard, 2)[0]["applied"] and shard.version == 2
    n = real - shard.start
    assert torch.equal(shard.weights[:n], w0[:n] - 1.0 - 1.0) and not shard.weights[n:].any()


def test_a_complete_step_is_held_and_applied_only_by_its_commit():
    shard, _, _ = make_shard(lr=0.5, momentum=0.0, weight_decay=0.0)
    w0 = shard.weights.clone()
    first, second = halves(shard)
    grad = torch.arange(shard.size, dtype=torch.float32)
    assert held(piece(shard, grad, first, "s0", rid=7))
    assert held(piece(shard, grad, second, "s1", rid=9))  # the step is complete: still held
    # a retry of a held piece (another gradient, to tell): held again, not copied again
    assert held(piece(shard, torch.zeros(shard.size), first, "s0", rid=8))
    assert torch.equal(shard.weights, w0) and (shard.version, shard.examples) == (0, 0)
    stats = shard.stats()
    assert (stats["open_steps"], stats["pieces"], stats["pushes"]) == (1, 2, 0)
    assert stats["push_bytes"] == {"s0": 2 * 70 * 4, "s1": (50 + shard.size - 120) * 4}
    assert "distbelief_shard_open_steps 1.0" in shard_metrics_text(shard)
    reply, _ = commit(shard, 1)
    assert reply["applied"] and (reply["version"], reply["staleness"]) == (1, 0)
    assert torch.equal(shard.weights, w0 - 0.5 * grad) and shard.examples == 4
    assert shard.stats()["open_steps"] == 0
    assert "distbelief_shard_open_steps 0.0" in shard_metrics_text(shard)


def test_a_second_commit_is_not_applied_and_returns_the_weights_over_its_ranges():
    shard, _, _ = make_shard(lr=0.5, momentum=0.0, weight_decay=0.0)
    first, second = halves(shard)
    grad = torch.arange(shard.size, dtype=torch.float32)
    hold_step(shard, grad)
    reply, payload = commit(shard, 1, pull="bf16", ranges=[list(r) for r in first])
    assert reply["applied"] and reply["version"] == 1 and reply["pull"] == "bf16"
    after = shard.weights.clone()
    mine = over(after, first, shard.start)
    torch.testing.assert_close(values(payload[0], "bf16"), mine, rtol=1e-2, atol=1e-2)
    # the other stage commits the same step: applied already, its weights come back
    reply, payload = commit(shard, 1, pull="f32", ranges=[list(r) for r in second])
    assert (
        reply["ok"]
        and not reply["applied"]
        and (reply["version"], reply["staleness"])
        == (
            1,
            0,
        )
    )
    assert torch.equal(values(payload[0]), over(after, second, shard.start))
    reply, payload = commit(shard, 1, pull="f32")  # without ranges: the whole range
    assert not reply["applied"] and torch.equal(values(payload[0]), after)
    reply, payload = commit(shard, 1)
    assert not reply["applied"] and not payload and "pull" not in reply
    assert torch.equal(shard.weights, after) and (shard.version, shard.examples) == (1, 4)
    assert shard.counts["duplicates"] == 3 and shard.counts["pushes"] == 1
    assert "distbelief_shard_duplicate_pushes_total 3.0" in shard_metrics_text(shard)


def test_pieces_of_a_step_applied_already_are_duplicates():
    shard, _, _ = make_shard(lr=0.5, momentum=0.0, weight_decay=0.0)
    first, second = halves(shard)
    grad = torch.ones(shard.size)
    hold_step(shard, grad)
    assert commit(shard, 1)[0]["applied"]
    after = shard.weights.clone()
    # a stage's retry after the step was applied: recognised by (worker, seq)
    reply = piece(shard, grad, first, "s0")
    assert reply["ok"] and not reply["applied"] and "held" not in reply
    # a piece the step was applied without (the shard was covered): by the group's step
    reply = piece(shard, grad, [(shard.start, shard.start + 10)], "s2")
    assert reply["ok"] and not reply["applied"] and "held" not in reply
    assert torch.equal(shard.weights, after) and shard.version == 1
    stats = shard.stats()
    assert (stats["duplicates"], stats["open_steps"], stats["pieces"]) == (2, 0, 2)
    hold_step(shard, grad, seq=2)  # the next step is held as usual
    assert commit(shard, 2)[0]["applied"] and shard.version == 2


def test_a_commit_of_an_incomplete_step_drops_it_and_applies_nothing():
    shard, _, _ = make_shard(lr=0.5)
    w0 = shard.weights.clone()
    first, second = halves(shard)
    grad = torch.ones(shard.size)
    assert held(piece(shard, grad, first, "s0", seq=12))
    reply, payload = commit(shard, 12, pull="f32")
    assert reply["ok"] is False and reply["error"] == "incomplete" and not payload
    assert reply["message"] == (
        "step 12 of replica group r0: pieces cover 70 of 192 parameters of shard 0 at "
        "commit; a stage's pieces are missing; nothing applied"
    )
    assert torch.equal(shard.weights, w0) and (shard.version, shard.examples) == (0, 0)
    stats = shard.stats()
    assert (stats["incomplete_steps"], stats["open_steps"], stats["pieces"]) == (1, 0, 1)
    assert stats["rejected"]["incomplete"] == 1
    text = shard_metrics_text(shard)
    assert "distbelief_shard_incomplete_steps_total 1.0" in text
    assert "distbelief_shard_open_steps 0.0" in text
    # dropped: a commit of it again, or of a step never pushed, finds nothing
    for seq in (12, 13):
        reply, _ = commit(shard, seq)
        assert reply["error"] == "incomplete" and reply["message"] == (
            f"step {seq} of replica group r0: no pieces of it here (expired after "
            "piece_timeout_s = 60 s, or the shard restarted); nothing applied"
        )
    assert shard.rejected["incomplete"] == 3 and shard.stats()["incomplete_steps"] == 1
    # nothing was recorded: the step pushed again in full and committed is applied
    hold_step(shard, grad, seq=12)
    assert commit(shard, 12)[0]["applied"] and shard.version == 1


def test_held_steps_not_committed_in_time_expire_and_change_nothing(caplog):
    shard, _, _ = make_shard(piece_timeout_s=0.05, lr=0.5)
    w0 = shard.weights.clone()
    first, _ = halves(shard)
    grad = torch.ones(shard.size)
    hold_step(shard, grad, seq=3)  # complete, but its commit never comes
    assert held(piece(shard, grad, first, "s0", seq=4))  # incomplete
    shard.tick()
    assert shard.stats()["open_steps"] == 2  # not yet
    time.sleep(0.1)
    with caplog.at_level(logging.WARNING):
        shard.tick()
    stats = shard.stats()
    assert (stats["incomplete_steps"], stats["open_steps"], stats["pieces"]) == (2, 0, 3)
    assert stats["rejected"]["incomplete"] == 0  # nobody to answer: pieces were answered
    assert torch.equal(shard.weights, w0) and (shard.version, shard.examples) == (0, 0)
    assert shard.last_seq == {}
    text = shard_metrics_text(shard)
    assert "distbelief_shard_incomplete_steps_total 2.0" in text
    assert "distbelief_shard_open_steps 0.0" in text
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "step 4 of replica group r0: pieces cover 70 of 192 parameters of shard 0 (pieces "
        "from s0), not committed 0.05 s after its first piece" in m
        for m in warned
    ), warned
    reply, _ = commit(shard, 3)  # too late
    assert reply["error"] == "incomplete" and "no pieces of it here" in reply["message"]
    assert torch.equal(shard.weights, w0) and shard.version == 0


def test_a_non_finite_step_is_refused_at_commit_and_applies_nothing():
    shard, _, _ = make_shard()
    w0 = shard.weights.clone()
    grad = torch.zeros(shard.size)
    grad[100] = torch.nan  # in the second stage's part
    hold_step(shard, grad)  # held: a piece is not checked, its step is
    reply, payload = commit(shard, 1, pull="f32")
    assert reply["error"] == "non_finite" and not payload
    assert torch.equal(shard.weights, w0) and shard.version == 0
    stats = shard.stats()
    assert (stats["open_steps"], stats["incomplete_steps"]) == (0, 0)
    assert shard.rejected["non_finite"] == 1 and shard.last_seq == {}
    # not recorded as pushed: the same step with a good gradient applies
    hold_step(shard, torch.zeros(shard.size))
    assert commit(shard, 1)[0]["applied"] and shard.version == 1


@pytest.mark.parametrize(
    "fields,says",
    [
        (dict(group=None), "commit needs field 'group'"),
        (dict(group=3), "field 'group' must be str"),
        (dict(seq=-1), "field 'seq' = -1 out of range"),
        (dict(seq=None), "commit needs field 'seq'"),
        (dict(pull="f64"), "field 'pull' must be one of"),
        (dict(ranges=[[0, 10]]), "only with pull"),
        (dict(pull="f32", ranges=[[0, 300]]), "shard 0 holds [0, 192)"),
        (dict(pull="f32", ranges=[[20, 30], [0, 10]]), "ascending and not overlap"),
        (dict(pull="f32", ranges="0-10"), "'ranges' must be list"),
    ],
)
def test_malformed_commits_are_refused_and_change_nothing(fields, says):
    shard, _, _ = make_shard(lr=0.5)
    w0 = shard.weights.clone()
    hold_step(shard, torch.ones(shard.size))
    header = {k: v for k, v in (dict(group="r0", seq=1) | fields).items() if v is not None}
    reply = protocol.decode(shard.handle([protocol.request("commit", 5, **header)])[0])
    assert reply["error"] == "bad_field" and says in reply["message"], reply
    assert torch.equal(shard.weights, w0) and shard.version == 0
    assert shard.stats()["open_steps"] == 1  # the step is still held
    assert commit(shard, 1)[0]["applied"] and shard.version == 1


def test_a_commit_with_a_payload_is_refused():
    shard, _, _ = make_shard()
    hold_step(shard, torch.ones(shard.size))
    out = shard.handle([protocol.request("commit", 1, group="r0", seq=1), b"\x00" * 8])
    assert protocol.decode(out[0])["error"] == "bad_size"
    assert shard.version == 0 and shard.stats()["open_steps"] == 1


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
    assert torch.equal(shard.weights, w0) and shard.version == 0
    assert shard.stats()["open_steps"] == 0 and shard.rejected[code] == 2


@pytest.mark.parametrize(
    "change,code,says",
    [
        (dict(shm="seg"), "bad_field", "not with shm"),
        (dict(group=None), "bad_field", "needs 'group'"),
        (dict(pull="f32"), "bad_field", "a piece is held, not applied: ask for the weights"),
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
    assert torch.equal(shard.weights, w0)
    assert shard.stats()["open_steps"] == 0 and shard.stats()["pieces"] == 0


def test_pieces_that_disagree_with_their_step_are_refused_and_change_nothing():
    shard, _, _ = make_shard(index=0, lr=1.0, momentum=0.0, weight_decay=0.0)
    w0 = shard.weights.clone()
    first, second = halves(shard)
    grad = torch.ones(shard.size)
    assert held(piece(shard, grad, first, "s0", progress=[[0, 0, 4]]))
    for worker, ranges, more, says in [
        ("s1", [(30, 50)], {}, "[30, 50) overlaps a piece already in"),
        ("s1", second, {"examples": 5}, "reports 5 examples, the pieces before it 4"),
        ("s1", second, {"progress": [[0, 0, 4]]}, "progress comes with one piece"),
    ]:
        reply = piece(shard, grad, ranges, worker, **more)
        assert reply["error"] == "bad_field" and says in reply["message"], reply
        assert torch.equal(shard.weights, w0) and shard.version == 0
    assert shard.stats()["open_steps"] == 1 and shard.stats()["pieces"] == 1
    assert held(piece(shard, grad, second, "s1"))  # the right piece still completes it
    assert commit(shard, 1)[0]["applied"] and torch.equal(shard.weights, w0 - 1.0)


def test_at_most_sixteen_steps_are_held_at_once():
    shard, _, _ = make_shard()
    first, _ = halves(shard)
    grad = torch.ones(shard.size)
    for r in range(16):
        assert held(piece(shard, grad, first, f"r{r}-s0", group=f"r{r}"))
    reply = piece(shard, grad, first, "r16-s0", group="r16")
    assert reply["error"] == "not_available" and "the most it holds at once" in reply["message"]
    assert shard.stats()["open_steps"] == 16


def test_progress_on_one_piece_is_read_at_commit_and_revoked_chunks_come_back():
    shard, _, _ = make_shard(index=0, dataset_size=64)  # shard 0: the data dispatcher
    # stage 0 (worker s0) asks for the data and reports progress with its piece
    chunk, _ = call(shard, "chunk", worker="s0", batch_size=4)
    cid, lo = chunk["chunk"], chunk["lo"]
    grad = torch.ones(shard.size)
    hold_step(shard, grad, seq=1, progress=[[cid, lo, lo + 4]])
    assert shard.dispatcher.stats()["applied"] == {}  # held: not read yet
    reply, _ = commit(shard, 1)
    assert reply["applied"] and "revoked" not in reply
    assert shard.dispatcher.stats()["applied"] == {"0": 4}  # epoch 0: 4 positions
    # a chunk that is not the replica's (revoked, or from before a restart)
    hold_step(shard, grad, seq=2, progress=[[cid + 1, 0, 4]])
    generation = shard.dispatcher.generation
    for applied in (True, False):  # the first commit, then another stage's
        reply, _ = commit(shard, 2)
        assert reply["applied"] is applied and reply["staleness"] == 1  # recorded
        assert (reply["revoked"], reply["generation"]) == ([cid + 1], generation)
    assert shard.dispatcher.stats()["retrained"] == 4  # read once
    hold_step(shard, grad, seq=3)
    assert "revoked" not in commit(shard, 3)[0]
    assert "revoked" not in commit(shard, 2)[0]  # an older step's figures are not kept


# -- through a real ServiceLoop ----------------------------------------------------------


def recv(sock: zmq.Socket, timeout_s: float = RECV_TIMEOUT_S) -> list[bytes]:
    assert sock.poll(timeout_s * 1000), f"no reply within {timeout_s} s"
    return sock.recv_multipart()


def piece_frames(grad, ranges, worker, seq=1) -> list[bytes]:
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
    )
    return [header, body]


def commit_frames(ranges, seq=1) -> list[bytes]:
    ranges = [list(r) for r in ranges]
    return [protocol.request("commit", 100 + seq, group="r0", seq=seq, pull="f32", ranges=ranges)]


def test_through_the_service_loop_pieces_are_held_at_once_and_a_commit_applies():
    from .conftest import free_port

    shard, layout, _ = make_shard(num_shards=1, lr=1.0, momentum=0.0, weight_decay=0.0)
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
        for sock, ranges, worker in zip(stages, (first, second), ("s0", "s1"), strict=True):
            sock.send_multipart(piece_frames(grad, ranges, worker))
            assert held(protocol.decode(recv(sock)[0]))  # at once, the other piece or not
        for sock, ranges, applied in zip(stages, (first, second), (True, False), strict=True):
            sock.send_multipart(commit_frames(ranges))
            header, payload = recv(sock)
            reply = protocol.decode(header)
            assert (reply["applied"], reply["version"], reply["rid"]) == (applied, 1, 101)
            got = np.frombuffer(payload, dtype=np.float32)
            want = torch.cat([after[lo:hi] for lo, hi in ranges]).numpy()
            np.testing.assert_array_equal(got, want)
        # a lone piece: its commit is refused, nothing applied
        stages[0].send_multipart(piece_frames(grad, first, "s0", seq=2))
        assert held(protocol.decode(recv(stages[0])[0]), 1)
        stages[0].send_multipart(commit_frames(first, seq=2))
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
    assert shard.version == 1 and torch.equal(shard.weights, after)
