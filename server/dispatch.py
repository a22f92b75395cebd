"""The data dispatcher on shard 0: every epoch handed out in chunks to whichever replica asks.

Epoch ``e`` reads the data set in one order, the permutation
``partition_indices(n, rank=0, world=1, epoch=e, seed)``: the order the reference
trainer reads. A **position** is a place in that order. The dispatcher cuts the
epoch, from a cursor, into **chunks**: ranges ``[lo, hi)`` of positions, each
``chunk_batches`` batches of the asking replica's batch size. A replica trains a
chunk's batches in order and says how far it got in the header of each push
(``progress``: ``[[chunk, from, upto], ...]``, the positions ``[from, upto)`` of each
chunk whose gradient the push carries); shard 0 credits those positions once the push
is applied to its weights. So a position's gradient counts as applied exactly when the
push that carries it is applied on shard 0, and a chunk is done when its last position
is.

**Leases.** A chunk whose owner was silent for ``lease_s`` seconds (no push, no
request: a replica killed, hung, or cut off) is revoked: the positions not yet
credited go back to the front of the queue as a new chunk, handed out before the
cursor moves on. What the killed replica had computed but not pushed was never
applied, so nothing is applied twice and nothing is lost. A revoked owner that comes
back learns it from shard 0's push reply (``revoked``) and drops the chunk's remaining
batches; the positions that push carried are trained twice, and counted as
``retrained``. A replica that is slow but alive keeps its chunk: with a few batches a
chunk, it holds an epoch's end open for one chunk of its own time at most.

**Ends.** The tail of an epoch shorter than the asker's batch is skipped (counted as
``dropped``), as the reference trainer's ``drop_last`` does; then the cursor moves to
the next epoch without waiting for the last chunks of this one. A replica that asks
once the data it asked for (``until``, in positions since epoch 0) are all handed out
is told to ``wait`` while other replicas still hold chunks (one of them may be revoked
and need a trainer), and ``end`` once none do, or if it holds chunks itself (it
finishes those and stops).

**Warm start.** With ``warm_examples`` W in its request (the replica works W out
from ``--warm-start`` and its run's length) the first replica to ask trains alone
until W examples are applied; the others are told to ``wait``. If that replica goes
silent for ``lease_s`` another one takes over.

**Restarts.** ``state()`` and ``load_state()`` carry the cursor, the unfinished chunks
(as what is left of each) and the counters into shard 0's checkpoint, consistent with
its weights: a shard restored from a checkpoint hands out again every position whose
gradient the restored weights do not hold. Chunk ids carry a generation drawn at every
start, so an id from before a restart is recognised as revoked, never confused with a
new chunk: a replica that outlived the shard learns it at its first push after the
restart, whose positions are then counted as ``retrained`` (one push per replica).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distbelief.protocol import ProtocolError

log = logging.getLogger(__name__)

WAIT_S = 0.5  # how long a replica told to wait sleeps before asking again
GENERATION_BITS = 32  # chunk id = generation << GENERATION_BITS | serial
MAX_PROGRESS_ENTRIES = 64  # per push: chunks a push may report progress on
EPOCHS_KEPT = 16  # per-epoch applied counts kept in stats and checkpoints


@dataclass(frozen=True, kw_only=True)
class DispatchConfig:
    dataset_size: int
    seed: int = 0
    chunk_batches: int = 8
    lease_s: float = 60.0

    def __post_init__(self) -> None:
        if self.dataset_size < 1:
            raise ValueError(f"dataset size must be positive, got {self.dataset_size}")
        if self.chunk_batches < 1:
            raise ValueError(f"--chunk-batches must be at least 1, got {self.chunk_batches}")
        if self.lease_s <= 0:
            raise ValueError(f"--chunk-lease-s must be positive, got {self.lease_s}")


@dataclass
class Chunk:
    id: int
    epoch: int
    lo: int
    hi: int
    applied: int  # positions [lo, applied) have their gradient applied
    owner: str = ""


class Dispatcher:
    """The cursor, the chunks handed out and their leases. One owner thread (the shard's)."""

    def __init__(self, cfg: DispatchConfig, *, clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.clock = clock
        self.generation = secrets.randbelow(2**20) + 1
        self.serial = 0
        self.epoch = 0  # the cursor: the next position not handed out is (epoch, cursor)
        self.cursor = 0
        self.open: dict[int, Chunk] = {}  # handed out, not finished
        self.queue: deque[Chunk] = deque()  # remainders of revoked chunks: handed out first
        self.applied: dict[int, int] = {}  # epoch -> positions credited
        self.counts = dict.fromkeys(
            ("handed", "done", "reissued", "released", "retrained", "dropped"), 0
        )
        self.heard: dict[str, float] = {}  # worker -> clock of its last request or push
        self.warm_owner: str | None = None  # the replica training alone in the warm start
        self.warm_over = False

    # -- the chunk op ----------------------------------------------------------------

    def next_chunk(
        self,
        worker: str,
        *,
        batch_size: int,
        until: int | None = None,
        warm_examples: int = 0,
        release: list[int] | tuple[int, ...] = (),
        want: bool = True,
    ) -> dict[str, Any]:
        """The reply fields to a replica asking for work: ``{chunk, epoch, lo, hi, seed,
        size}``, ``{wait}`` or ``{end}``; first the chunks it gives back are requeued."""
        now = self.clock()
        self.heard[worker] = now
        for cid in release:
            self._release(worker, cid)
        if not want:
            return {"released": len(release)}
        n = self.cfg.dataset_size
        if batch_size > n:
            raise ProtocolError(
                "bad_field", f"batch of {batch_size} exceeds the data set's {n} examples"
            )
        wait = self._warm_wait(worker, now, warm_examples)
        if wait is not None:
            return wait
        chunk = self._requeued(worker, now) or self._cut(worker, batch_size, until, now)
        if chunk is None:
            # an idle replica stays on call while others hold chunks (one of them may
            # fall silent and its chunk need a trainer); one still holding chunks of its
            # own finishes them and ends (two such replicas waiting for each other would
            # wait for ever: each keeps the other's lease alive)
            holders = {c.owner for c in self.open.values()}
            if holders and worker not in holders:
                return {"wait": WAIT_S}
            return {"end": True}
        return {
            "chunk": chunk.id,
            "epoch": chunk.epoch,
            "lo": chunk.lo,
            "hi": chunk.hi,
            "seed": self.cfg.seed,
            "size": n,
            "left": self._left(until),
            "replicas": self.replicas(),
            "warm_until": warm_examples if self.warm_owner == worker else 0,
        }

    def _left(self, until: int | None) -> int:
        """Positions below ``until`` not handed out yet (-1: no end)."""
        if until is None:
            return -1
        queued = sum(c.hi - c.lo for c in self.queue)
        return max(0, until - self.epoch * self.cfg.dataset_size - self.cursor) + queued

    def _warm_wait(self, worker: str, now: float, goal: int) -> dict[str, Any] | None:
        """``{wait}`` for every replica but the warm-start owner until the warm start is over."""
        if self.warm_over or goal <= 0:
            return None
        if self.total_applied() >= goal:
            if self.warm_owner is not None:
                log.info("warm start over at %d examples: every replica gets chunks", goal)
            self.warm_over = True
            return None
        if self.warm_owner is None or (
            self.warm_owner != worker and not self._alive(self.warm_owner, now)
        ):
            if self.warm_owner is not None:
                log.warning("warm start: %s went silent; %s takes over", self.warm_owner, worker)
            self.warm_owner = worker
            log.info("warm start: %s trains alone until %d examples are applied", worker, goal)
        if worker == self.warm_owner:
            return None
        return {"wait": WAIT_S, "warm": True, "applied": self.total_applied(), "goal": goal}

    def _requeued(self, worker: str, now: float) -> Chunk | None:
        """A revoked or released chunk's remainder (which may end in a short batch)."""
        if not self.queue:
            return None
        old = self.queue.popleft()
        return self._new(old.epoch, old.lo, old.hi, worker, now)

    def _cut(self, worker: str, batch_size: int, until: int | None, now: float) -> Chunk | None:
        """A new chunk from the cursor, or None when the positions asked for are handed out."""
        n = self.cfg.dataset_size
        while True:
            start = self.epoch * n + self.cursor
            if until is not None and start >= until:
                return None
            room = n - self.cursor  # positions left in this epoch
            if until is not None:
                room = min(room, until - start)
            take = min(room, self.cfg.chunk_batches * batch_size) // batch_size * batch_size
            if take > 0:
                break
            if self.epoch * n + n > (until if until is not None else start + n):
                return None  # the run ends inside this epoch, less than a batch from here
            self.counts["dropped"] += n - self.cursor  # the epoch's tail: less than a batch
            self.epoch, self.cursor = self.epoch + 1, 0
        chunk = self._new(self.epoch, self.cursor, self.cursor + take, worker, now)
        self.cursor += take
        return chunk

    def _new(self, epoch: int, lo: int, hi: int, worker: str, now: float) -> Chunk:
        self.serial += 1
        cid = (self.generation << GENERATION_BITS) | self.serial
        chunk = Chunk(cid, epoch, lo, hi, lo, owner=worker)
        self.open[cid] = chunk
        self.counts["handed"] += 1
        return chunk

    def _release(self, worker: str, cid: int) -> None:
        chunk = self.open.get(cid)
        if chunk is None or chunk.owner != worker:
            return  # finished, revoked or someone else's: nothing to give back
        del self.open[cid]
        self.queue.appendleft(_rest(chunk))
        self.counts["released"] += 1

    # -- progress, carried by pushes ---------------------------------------------------

    def progress(self, worker: str, entries: list[tuple[int, int, int]]) -> list[int]:
        """Credit the ``(chunk, from, upto)`` entries (``parse_progress``) of an applied
        push of ``worker``; return the chunks named that are no longer its own (revoked,
        or from before a restart): their positions in this push are trained twice."""
        self.heard[worker] = self.clock()
        revoked = []
        for cid, start, upto in entries:
            chunk = self.open.get(cid)
            if chunk is not None and chunk.owner == worker:
                self._credit(chunk, upto)
                continue
            # trained after its lease ran out (or the shard's restart): what was left of
            # the chunk went back to the queue, so these positions are trained again
            self.counts["retrained"] += max(0, upto - start)
            revoked.append(cid)
        return revoked

    def _credit(self, chunk: Chunk, upto: int) -> None:
        upto = max(chunk.applied, min(upto, chunk.hi))
        self.applied[chunk.epoch] = self.applied.get(chunk.epoch, 0) + upto - chunk.applied
        chunk.applied = upto
        if upto == chunk.hi:
            del self.open[chunk.id]
            self.counts["done"] += 1
            while len(self.applied) > EPOCHS_KEPT:
                del self.applied[min(self.applied)]

    def _alive(self, worker: str, now: float) -> bool:
        return now - self.heard.get(worker, -math.inf) <= self.cfg.lease_s

    def expire(self) -> list[Chunk]:
        """Revoke the chunks of owners silent for a lease; requeue what is left of them."""
        now = self.clock()
        lapsed = [c for c in self.open.values() if not self._alive(c.owner, now)]
        for chunk in lapsed:
            del self.open[chunk.id]
            self.queue.append(_rest(chunk))
            self.counts["reissued"] += 1
            log.warning(
                "chunk %d (epoch %d, positions %d-%d) of %s: silent for %g s; "
                "its %d untrained examples go to the next replica that asks",
                chunk.id & (2**GENERATION_BITS - 1),
                chunk.epoch,
                chunk.lo,
                chunk.hi,
                chunk.owner,
                self.cfg.lease_s,
                chunk.hi - chunk.applied,
            )
        owners = {c.owner for c in self.open.values()} | {self.warm_owner}
        for worker in [w for w in self.heard if w not in owners and not self._alive(w, now)]:
            del self.heard[worker]  # gone, and holding nothing: forget it
        return lapsed

    # -- what it reports and keeps -----------------------------------------------------

    def total_applied(self) -> int:
        return sum(self.applied.values())

    def replicas(self) -> int:
        """Replicas holding a chunk now (the ones training, as far as the data go)."""
        return len({c.owner for c in self.open.values()})

    def epoch_progress(self) -> float:
        """The cursor's epoch as a fraction done (positions applied / data set size)."""
        return self.applied.get(self.epoch, 0) / self.cfg.dataset_size

    def stats(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "epoch_progress": self.epoch_progress(),
            "open": len(self.open),
            "queued": len(self.queue),
            "replicas": self.replicas(),
            "chunk_batches": self.cfg.chunk_batches,
            "lease_s": self.cfg.lease_s,
            "applied": {str(e): k for e, k in sorted(self.applied.items())},
            **self.counts,
        }

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the cursor, what is left of every unfinished chunk,
        the per-epoch counts (JSON-able)."""
        left = [_rest(c) for c in self.open.values()] + list(self.queue)
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "left": [[c.epoch, c.lo, c.hi] for c in left],
            "applied": {str(e): k for e, k in self.applied.items()},
            "counts": dict(self.counts),
            "warm_over": self.warm_over,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Resume from ``state()``: every unfinished chunk is handed out again from where
        its credited positions end; ids from before are unknown (revoked) from now on."""
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.open.clear()
        self.queue = deque(
            Chunk(0, int(e), int(lo), int(hi), int(lo)) for e, lo, hi in state["left"]
        )
        self.applied = {int(e): int(k) for e, k in state.get("applied", {}).items()}
        self.counts.update(
            {k: int(v) for k, v in state.get("counts", {}).items() if k in self.counts}
        )
        self.warm_over = bool(state.get("warm_over", False))


def parse_progress(entries: Any) -> list[tuple[int, int, int]]:
    """A push's ``progress`` field as ``(chunk, from, upto)`` tuples; ProtocolError if
    malformed."""
    if not isinstance(entries, list) or len(entries) > MAX_PROGRESS_ENTRIES:
        raise ProtocolError(
            "bad_field", f"progress must be a list of at most {MAX_PROGRESS_ENTRIES} entries"
        )
    out = []
    for entry in entries:
        if not isinstance(entry, list) or len(entry) != 3 or any(type(x) is not int for x in entry):
            raise ProtocolError("bad_field", "progress entries are [chunk, from, upto] integers")
        out.append((entry[0], entry[1], entry[2]))
    return out


def _rest(chunk: Chunk) -> Chunk:
    """What is left of ``chunk``: its positions not yet credited."""
    return Chunk(0, chunk.epoch, chunk.applied, chunk.hi, chunk.applied)
