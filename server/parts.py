"""Pushes in parts: a replica's push over the wire, applied part by part as it arrives.

Between hosts the link is the limit. A push answered with the weights after it (push
and pull in one round trip) could only answer once the whole slice had arrived; sent
to every shard at once, every answer would then follow every upload and the exchange
take twice the link's time. Cut into parts (``protocol.part_range``), each applied and
answered on arrival, the upload of the later parts and the download of the earlier
ones share the link's two directions, to and from every shard at once.

One push is still one update of the shard: the rate and momentum come from its
staleness when its first part arrives (``Updater.begin``), every part is stepped with
them, and the version, the examples and the data dispatcher's progress count once,
when the last part is applied. Parts of different replicas' pushes may interleave, as
their whole pushes would. A push whose replica died between its parts stays partly
applied (the parts that came), uncounted: :class:`Streams` drops it when the same
worker starts a newer push, or ``timeout_s`` after its last part, and counts it.

:class:`Streams` holds the pushes under way, one per worker (a client's pushes to one
shard follow each other), at most ``MAX_STREAMS``. Not thread-safe: the shard's one
thread owns it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from .staleness import Applied

MAX_STREAMS = 1024  # pushes under way at once (one per worker), the oldest dropped past it


@dataclass
class Stream:
    """One push under way: what its first part fixed, and the parts applied so far."""

    worker: str
    seq: int
    parts: int
    applied: Applied  # the rate and momentum every part is stepped with
    staleness: int
    examples: int
    touched: float  # time.monotonic() of its last part
    done: set[int] = field(default_factory=set)
    apply_s: float = 0.0  # time spent applying its parts
    progress: list | None = None  # from part 0 (shard 0's dispatcher), credited at the end

    @property
    def complete(self) -> bool:
        return len(self.done) == self.parts


class Streams:
    """The pushes under way on one shard, by worker."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.under_way: OrderedDict[str, Stream] = OrderedDict()
        self.parts = 0  # parts applied, all pushes
        self.partial = 0  # pushes dropped with some parts applied and others never come

    def find(self, worker: str, seq: int) -> Stream | None:
        stream = self.under_way.get(worker)
        return stream if stream is not None and stream.seq == seq else None

    def newer(self, worker: str, seq: int) -> bool:
        """Whether ``worker`` has a push under way newer than ``seq`` (a stale part)."""
        stream = self.under_way.get(worker)
        return stream is not None and stream.seq > seq

    def open(self, stream: Stream) -> list[Stream]:
        """Start ``stream``; return the pushes it ends unfinished (the same worker's
        older one, the oldest past ``MAX_STREAMS``), counted partial."""
        dropped = []
        older = self.under_way.pop(stream.worker, None)
        if older is not None:
            dropped.append(older)
        self.under_way[stream.worker] = stream
        if len(self.under_way) > MAX_STREAMS:
            dropped.append(self.under_way.popitem(last=False)[1])
        self.partial += len(dropped)
        return dropped

    def applied(self, stream: Stream, part: int, seconds: float) -> None:
        stream.done.add(part)
        stream.touched = time.monotonic()
        stream.apply_s += seconds
        self.parts += 1
        if stream.complete:
            del self.under_way[stream.worker]

    def expired(self, now: float) -> list[Stream]:
        """Drop and return the pushes no part of which came for ``timeout_s``."""
        old = [s for s in self.under_way.values() if now - s.touched > self.timeout_s]
        for stream in old:
            del self.under_way[stream.worker]
        self.partial += len(old)
        return old


def describe_partial(stream: Stream, index: int) -> str:
    return (
        f"shard {index}: push {stream.seq} of worker {stream.worker} ended with "
        f"{len(stream.done)} of its {stream.parts} parts applied (its replica stopped "
        "between them?): those stay applied, the push is not counted"
    )
