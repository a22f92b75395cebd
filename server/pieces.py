"""Steps split into pieces: one replica cut into stages (model parallelism).

Each stage of a replica owns some layers and pushes only their gradient: a push with
``ranges`` is a *piece* of the step ``(group, seq)``, where ``group`` names the replica
and every stage numbers its pushes alike. A shard must still apply one update per
replica step over its whole range (momentum, version, examples and the staleness
policy as for an unsplit replica) and never a part of one, so the pieces of a step
are gathered here, converted to f32, and the shard applies them as one push once they
cover its parameters (the layout's padding at the end of the last shard may be left
out: it is kept at zero anyway).

:class:`Assembler` is the rule object the shard's push handler calls. It holds at most
``MAX_OPEN_STEPS`` steps in assembly (memory: that many f32 copies of the shard's
range) and hands back those still incomplete ``timeout_s`` after their first piece,
for the shard to refuse. Not thread-safe: the shard's one thread owns it.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from distbelief import protocol
from distbelief.protocol import ProtocolError

MAX_OPEN_STEPS = 16  # steps in assembly at once; each holds a gradient of the shard's range
SPARE_BUFFERS = 2  # assembly buffers kept for reuse: no range-sized allocation per step

Ranges = list[tuple[int, int]]


@dataclass
class Piece:
    """One stage's push of a step, parked until the step is applied or dropped."""

    header: dict[str, Any]  # its request: rid, worker, seq, pull (a retry replaces it)
    ranges: Ranges  # [lo, hi) relative to the shard's start
    identity: bytes | None  # where its reply goes (a retry reopens the socket: a new one)

    @property
    def worker(self) -> str:
        return self.header["worker"]


@dataclass
class Step:
    """The pieces of one replica step gathered so far, and their gradient."""

    group: str
    seq: int
    grad: torch.Tensor  # f32, the shard's range; uncovered elements are undefined
    opened_at: float  # time.monotonic() of its first piece
    examples: int
    base_version: int  # the smallest over its pieces: the oldest weights any stage read
    pieces: list[Piece] = field(default_factory=list)
    covered: Ranges = field(default_factory=list)  # every piece's ranges, sorted
    filled: int = 0  # parameters covered (the padding not counted)
    progress: tuple[str, list[tuple[int, int, int]]] | None = None  # (worker, entries)

    def piece_of(self, worker: str) -> Piece | None:
        return next((p for p in self.pieces if p.worker == worker), None)


def parse_ranges(value: Any, start: int, stop: int, index: int) -> Ranges:
    """A request's ``ranges`` as ``[lo, hi)`` pairs relative to ``start``.

    Raises ProtocolError (``bad_field``) naming the shard's range unless ``value`` is a
    list of 1 to ``MAX_RANGES`` integer pairs inside ``[start, stop)``, each non-empty,
    ascending and not overlapping.
    """
    holds = f"shard {index} holds [{start}, {stop})"
    if not isinstance(value, list) or not 1 <= len(value) <= protocol.MAX_RANGES:
        raise ProtocolError(
            "bad_field", f"ranges must be a list of 1 to {protocol.MAX_RANGES} [lo, hi] pairs"
        )
    out: Ranges = []
    previous = start
    for pair in value:
        if not isinstance(pair, list) or len(pair) != 2 or any(type(x) is not int for x in pair):
            raise ProtocolError(
                "bad_field", f"ranges entry {repr(pair)[:40]} is not a pair of integers [lo, hi]"
            )
        lo, hi = pair
        if not start <= lo < hi <= stop:
            raise ProtocolError(
                "bad_field", f"range [{lo}, {hi}) is empty or not inside this shard: {holds}"
            )
        if lo < previous:
            raise ProtocolError(
                "bad_field",
                f"range [{lo}, {hi}) starts before the one ahead of it ends: ranges must be "
                f"ascending and not overlap ({holds})",
            )
        previous = hi
        out.append((lo - start, hi - start))
    return out


class Assembler:
    """Gathers the pieces of replica steps until each covers the shard's parameters."""

    def __init__(self, *, start: int, size: int, padding: int, index: int, timeout_s: float):
        self.start = start
        self.size = size
        self.needed = size - padding  # parameters a step's pieces must cover
        self.index = index
        self.timeout_s = timeout_s
        self.steps: dict[tuple[str, int], Step] = {}
        self.spare: list[torch.Tensor] = []
        self.received = 0  # pieces taken into a step
        self.dropped = 0  # steps expired incomplete

    def find(self, group: str, seq: int) -> Step | None:
        return self.steps.get((group, seq))

    def add(self, piece: Piece, values: torch.Tensor, progress: list | None) -> Step:
        """Copy ``piece``'s gradient (``values``: over its ranges, in order, any dtype)
        into its step, opening the step with its first piece. Raises ProtocolError,
        with nothing changed, when the piece does not fit the pieces already there."""
        h = piece.header
        step = self.find(h["group"], h["seq"])
        if step is None:
            self._check_room(h["group"], h["seq"])
        else:
            self._check_fits(step, piece, progress)
        if step is None:
            step = self._open(h["group"], h["seq"], h["examples"], h["base_version"])
        offset = 0
        for lo, hi in piece.ranges:
            step.grad[lo:hi].copy_(values[offset : offset + hi - lo])  # converted to f32
            offset += hi - lo
            bisect.insort(step.covered, (lo, hi))
            step.filled += min(hi, self.needed) - min(lo, self.needed)
        step.base_version = min(step.base_version, h["base_version"])
        if progress:
            step.progress = (piece.worker, progress)
        step.pieces.append(piece)
        self.received += 1
        return step

    def complete(self, step: Step) -> bool:
        return step.filled == self.needed

    def close(self, step: Step) -> None:
        """Forget ``step`` (applied or refused); its buffer is kept for the next one."""
        del self.steps[(step.group, step.seq)]
        if len(self.spare) < SPARE_BUFFERS:
            self.spare.append(step.grad)

    def expired(self, now: float) -> list[Step]:
        """Close and return the steps still incomplete ``timeout_s`` after their first piece."""
        late = [s for s in self.steps.values() if now - s.opened_at >= self.timeout_s]
        for step in late:
            self.close(step)
        self.dropped += len(late)
        return late

    def incomplete_message(self, step: Step) -> str:
        stages = ", ".join(p.worker for p in step.pieces)
        return (
            f"step {step.seq} of replica group {step.group}: pieces cover {step.filled} of "
            f"{self.needed} parameters of shard {self.index} after {self.timeout_s:g} s "
            f"(pieces from {stages}); a stage did not push; nothing applied"
        )

    def _open(self, group: str, seq: int, examples: int, base_version: int) -> Step:
        grad = self.spare.pop() if self.spare else torch.empty(self.size, dtype=torch.float32)
        grad[self.needed :] = 0  # the padding, which pieces may leave out
        step = Step(group, seq, grad, time.monotonic(), examples, base_version)
        self.steps[(group, seq)] = step
        return step

    def _check_room(self, group: str, seq: int) -> None:
        if len(self.steps) >= MAX_OPEN_STEPS:
            waiting = ", ".join(sorted({g for g, _ in self.steps}))[:200]
            raise ProtocolError(
                "not_available",
                f"shard {self.index} is assembling {len(self.steps)} steps split into pieces, "
                f"the most it holds at once (replica groups {waiting}); their stages have not "
                f"all pushed: step {seq} of replica group {group} refused",
            )

    def _check_fits(self, step: Step, piece: Piece, progress: list | None) -> None:
        h, what = piece.header, f"step {step.seq} of replica group {step.group}"
        if h["examples"] != step.examples:
            raise ProtocolError(
                "bad_field",
                f"{what}: worker {piece.worker} reports {h['examples']} examples, the pieces "
                f"before it {step.examples}; the stages of a replica push the same step",
            )
        if progress and step.progress is not None:
            raise ProtocolError(
                "bad_field",
                f"{what}: progress comes with one piece of a step; worker "
                f"{step.progress[0]} sent it already, worker {piece.worker} too",
            )
        for lo, hi in piece.ranges:
            i = bisect.bisect_left(step.covered, (lo, hi))
            if (i > 0 and step.covered[i - 1][1] > lo) or (
                i < len(step.covered) and step.covered[i][0] < hi
            ):
                raise ProtocolError(
                    "bad_field",
                    f"{what}: worker {piece.worker}'s range [{lo + self.start}, "
                    f"{hi + self.start}) overlaps a piece already in: two stages pushed the "
                    "same parameters",
                )
