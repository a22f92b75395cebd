"""The data dispatcher's bookkeeping (server/dispatch.py), on a clock the test moves."""

from __future__ import annotations

import pytest
from distbelief.server.dispatch import DispatchConfig, Dispatcher, parse_progress

from distbelief.protocol import ProtocolError


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(n: int = 100, *, chunk_batches: int = 2, lease_s: float = 10.0):
    clock = Clock()
    cfg = DispatchConfig(dataset_size=n, seed=7, chunk_batches=chunk_batches, lease_s=lease_s)
    return Dispatcher(cfg, clock=clock), clock


def train(d: Dispatcher, worker: str, chunk: dict, batch: int) -> None:
    """Report every batch of ``chunk`` as pushed, one push per batch."""
    for lo in range(chunk["lo"], chunk["hi"], batch):
        assert d.progress(worker, [(chunk["chunk"], lo, min(lo + batch, chunk["hi"]))]) == []


def test_one_replica_reads_each_epoch_in_order_and_drops_the_short_tail():
    d, _ = make(100, chunk_batches=2)
    positions = []
    while (c := d.next_chunk("a", batch_size=8, until=200)).get("chunk"):
        assert c["seed"] == 7 and c["size"] == 100 and (c["hi"] - c["lo"]) % 8 == 0
        positions.append((c["epoch"], c["lo"], c["hi"]))
        train(d, "a", c, 8)
    # 96 of each epoch's 100 positions, in chunks of 16; the last 4 of each are dropped
    epoch0 = [(lo, hi) for e, lo, hi in positions if e == 0]
    assert epoch0 == [(lo, min(lo + 16, 96)) for lo in range(0, 96, 16)]
    assert [p for p in positions if p[0] == 1] == [(1, lo, hi) for lo, hi in epoch0]
    assert d.applied == {0: 96, 1: 96}
    assert d.counts["dropped"] == 8 and d.counts["done"] == d.counts["handed"] == 12
    assert d.next_chunk("a", batch_size=8, until=200) == {"end": True}


def test_a_run_shorter_than_an_epoch_ends_where_it_was_asked_to():
    d, _ = make(100, chunk_batches=4)
    first = d.next_chunk("a", batch_size=10, until=25)
    assert (first["lo"], first["hi"]) == (0, 20)  # whole batches below until
    assert d.next_chunk("b", batch_size=10, until=25) == {"wait": 0.5}  # a holds a chunk
    assert d.next_chunk("a", batch_size=10, until=25) == {"end": True}  # it holds one
    b = d.next_chunk("b", batch_size=5, until=30)  # asking for more: there is more
    assert (b["lo"], b["hi"]) == (20, 30)
    # both hold a chunk: neither waits for the other (they would wait for ever)
    assert d.next_chunk("a", batch_size=5, until=30) == {"end": True}
    assert d.next_chunk("b", batch_size=5, until=30) == {"end": True}


def test_a_silent_replica_s_chunk_goes_to_the_next_asker_from_where_it_stopped():
    d, clock = make(100, chunk_batches=4, lease_s=10.0)
    a = d.next_chunk("a", batch_size=5, until=100)
    b = d.next_chunk("b", batch_size=5, until=100)
    assert (a["lo"], a["hi"], b["lo"], b["hi"]) == (0, 20, 20, 40)
    assert d.progress("a", [(a["chunk"], 0, 10)]) == []  # two of its four batches applied
    clock.now += 9.0
    train(d, "b", b, 5)
    assert d.expire() == []  # a's lease was renewed by its progress 9 s ago
    clock.now += 2.0
    (lapsed,) = d.expire()
    assert lapsed.id == a["chunk"] and lapsed.applied == 10
    again = d.next_chunk("b", batch_size=5, until=100)
    assert (again["epoch"], again["lo"], again["hi"]) == (0, 10, 20)  # before the cursor
    assert d.counts["reissued"] == 1
    # a comes back and pushes its third batch: told it is revoked, counted as trained twice
    assert d.progress("a", [(a["chunk"], 10, 15)]) == [a["chunk"]]
    assert d.counts["retrained"] == 5
    train(d, "b", again, 5)
    assert d.applied[0] == 40  # every position of the first two chunks once


def test_late_progress_never_counts_an_example_twice_in_the_epoch():
    d, clock = make(40, chunk_batches=8, lease_s=1.0)
    a = d.next_chunk("a", batch_size=4, until=40)
    clock.now += 2
    d.expire()
    b = d.next_chunk("b", batch_size=4, until=40)
    assert d.progress("a", [(a["chunk"], 0, 32)]) == [a["chunk"]]
    train(d, "b", b, 4)
    assert d.applied[0] == 32 and d.counts["retrained"] == 32  # [0, 32): once each


def test_warm_start_lets_one_replica_train_alone_and_passes_on_when_it_goes_silent():
    d, clock = make(100, chunk_batches=1, lease_s=10.0)
    a = d.next_chunk("a", batch_size=10, until=100, warm_examples=30)
    assert a["warm_until"] == 30
    wait = d.next_chunk("b", batch_size=10, until=100, warm_examples=30)
    assert wait["wait"] and wait["warm"] and wait["goal"] == 30
    train(d, "a", a, 10)
    a2 = d.next_chunk("a", batch_size=10, until=100, warm_examples=30)
    clock.now += 11  # a falls silent: b takes over the warm start
    b = d.next_chunk("b", batch_size=10, until=100, warm_examples=30)
    assert b["warm_until"] == 30 and d.warm_owner == "b"
    train(d, "b", b, 10)
    d.progress("a", [(a2["chunk"], a2["lo"], a2["hi"])])
    assert d.total_applied() == 30
    c = d.next_chunk("c", batch_size=10, until=100, warm_examples=30)
    assert "chunk" in c and c["warm_until"] == 0 and d.warm_over


def test_the_state_in_a_checkpoint_hands_out_again_what_the_weights_lack():
    d, _ = make(64, chunk_batches=2)
    a = d.next_chunk("a", batch_size=8, until=128)
    b = d.next_chunk("b", batch_size=8, until=128)
    train(d, "a", a, 8)
    d.progress("b", [(b["chunk"], b["lo"], b["lo"] + 8)])
    state = d.state()
    restored, _ = make(64, chunk_batches=2)
    restored.load_state(state)
    assert restored.generation != d.generation or restored.serial == 0
    again = restored.next_chunk("c", batch_size=8, until=128)
    assert (again["epoch"], again["lo"], again["hi"]) == (0, 24, 32)
    fresh = restored.next_chunk("c", batch_size=8, until=128)
    assert (fresh["lo"], fresh["hi"]) == (32, 48)  # then the cursor, where it was
    assert restored.applied == {0: 24}
    # b's chunk id from before the restart is not its own any more
    assert restored.progress("b", [(b["chunk"], b["lo"] + 8, b["hi"])]) == [b["chunk"]]
    assert restored.counts["retrained"] == 8  # that push's positions are trained again


def test_released_chunks_are_handed_out_first_and_the_rest_only():
    d, _ = make(100, chunk_batches=4)
    a = d.next_chunk("a", batch_size=5, until=100)
    d.progress("a", [(a["chunk"], 0, 5)])
    assert d.next_chunk("a", batch_size=5, release=[a["chunk"]], want=False) == {"released": 1}
    again = d.next_chunk("b", batch_size=5, until=100)
    assert (again["lo"], again["hi"]) == (5, 20)
    assert d.counts["released"] == 1


def test_malformed_progress_and_batches_larger_than_the_data_are_refused():
    for bad in ([[1, 2]], [[1, 0, "2"]], "x", [[1, 0, True]], [[0, 0, 0]] * 65):
        with pytest.raises(ProtocolError) as err:
            parse_progress(bad)
        assert err.value.code == "bad_field"
    assert parse_progress([[3, 0, 4]]) == [(3, 0, 4)]
    d, _ = make(10)
    with pytest.raises(ProtocolError, match="exceeds the data set"):
        d.next_chunk("a", batch_size=11)
    with pytest.raises(ValueError, match="chunk-batches"):
        DispatchConfig(dataset_size=10, chunk_batches=0)
