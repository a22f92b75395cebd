"""A replica's side of the data dispatcher: the chunks shard 0 hands it, as batch keys.

``ChunkFeed`` asks shard 0 for a chunk (the ``chunk`` op), yields the keys of its
batches (``data.ChunkStream``) and asks again when they run out; the loader decodes
the batches. It runs on its own connection to shard 0 (``ParameterClient`` is not
thread-safe, and with ``--overlap`` the pushes run in another thread). Told to wait
(the warm start, or the run's data all handed out while others still hold chunks), it
sleeps and asks again; told ``end``, it stops.

The replica reports in each push which positions of which chunks its gradient covers,
and hands the chunks shard 0 says are no longer its own to ``revoke``: their batches
still in the loader are skipped.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from typing import Any

from distbelief.client import ParameterClient

log = logging.getLogger(__name__)

WAIT_LOG_S = 10.0  # how often a waiting replica says so
SERIAL_BITS = 32  # a chunk id: the dispatcher's generation << 32 | its number in that life
SERIAL_MASK = 2**SERIAL_BITS - 1


class DataMismatch(ValueError):
    """The shards order another data set than this replica reads."""


class ChunkFeed:
    """Batch keys ``(seed, epoch, chunk, lo, hi)`` of the chunks the dispatcher hands out."""

    def __init__(
        self,
        client: ParameterClient,
        *,
        worker: str,
        batch_size: int,
        dataset_size: int,
        until: int | None = None,
        warm_examples: int = 0,
    ) -> None:
        self.client = client
        self.worker = worker
        self.batch_size = batch_size
        self.dataset_size = dataset_size
        self.until = until
        self.warm_examples = warm_examples
        self.held: dict[int, int] = {}  # chunk -> positions [lo, hi) end, handed to us
        self.revoked: set[int] = set()
        self.warm_until = 0  # > 0: we train the warm start alone until this many examples
        self.first: dict[str, Any] | None = None
        self.last: dict[str, Any] = {}  # the last chunk handed to us

    def steps_left(self) -> int | None:
        """About how many more batches this replica will train: the last chunk's, plus
        its part of the data not handed out yet (shared with the replicas holding chunks
        then); None without an end (``--steps``)."""
        left = self.last.get("left", -1)
        if left < 0:
            return None
        mine = left / max(1, self.last.get("replicas", 1))
        return math.ceil((self.last["hi"] - self.last["lo"] + mine) / self.batch_size)

    def ask(self) -> dict[str, Any] | None:
        """The next chunk (waiting while told to), or None at the end."""
        logged = 0.0
        while True:
            fields: dict[str, Any] = {"worker": self.worker, "batch_size": self.batch_size}
            if self.until is not None:
                fields["until"] = self.until
            if self.warm_examples > 0:
                fields["warm_examples"] = self.warm_examples
            reply = self.client.chunk(**fields)
            if reply.get("end"):
                return None
            if "chunk" in reply:
                if reply["size"] != self.dataset_size:
                    raise DataMismatch(
                        f"the shards hand out a data set of {reply['size']} examples "
                        f"(serve --dataset-size); this replica's has {self.dataset_size}"
                    )
                self.held[reply["chunk"]] = reply["hi"]
                self.warm_until = max(self.warm_until, reply.get("warm_until", 0))
                self.last = reply
                return reply
            pause = float(reply.get("wait", 0.5))
            now = time.monotonic()
            if now - logged >= WAIT_LOG_S:
                if reply.get("warm"):
                    log.info(
                        "warm start: another replica trains alone (%d of %d examples)",
                        reply.get("applied", 0),
                        reply.get("goal", 0),
                    )
                else:
                    log.info("the data asked for are handed out; waiting for the last chunks")
                logged = now
            time.sleep(pause)

    def __iter__(self) -> Iterator[tuple[int, int, int, int, int]]:
        chunk = self.first if self.first is not None else self.ask()
        self.first = None
        while chunk is not None:
            lo, hi = chunk["lo"], chunk["hi"]
            for b in range(lo, hi, self.batch_size):
                key = (chunk["seed"], chunk["epoch"], chunk["chunk"], b)
                yield (*key, min(hi, b + self.batch_size))
            chunk = self.ask()

    def revoke(self, chunks: tuple[int, ...] | list[int], generation: int = 0) -> None:
        """Skip the rest of ``chunks``; and when shard 0 answers from another
        ``generation`` (it restarted), of every chunk handed out before."""
        if chunks and generation:
            chunks = [*chunks, *(c for c in list(self.held) if c >> SERIAL_BITS != generation)]
        for c in chunks:
            if self.held.pop(c, None) is not None:
                log.warning(
                    "chunk %d was handed to another replica: skipping its rest",
                    c & SERIAL_MASK,  # the number shard 0's log gives it
                )
            self.revoked.add(c)

    def done(self, chunk: int, upto: int) -> None:
        """The batch ending at ``upto`` of ``chunk`` has been pushed."""
        if self.held.get(chunk) == upto:
            self.held.pop(chunk, None)

    def release(self) -> None:
        """Give back the chunks handed to us and not finished (a clean stop)."""
        if self.held:
            self.client.chunk(
                worker=self.worker,
                batch_size=self.batch_size,
                release=list(self.held)[:64],
                want=False,
            )
            log.info("gave back %d unfinished chunk(s)", len(self.held))
            self.held.clear()
