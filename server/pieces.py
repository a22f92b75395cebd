"""Steps split into pieces: one replica cut into stages (model parallelism).

Each stage of a replica owns some layers and pushes only their gradient: a push with
``ranges`` is a *piece* of the step ``(group, seq)``, where ``group`` names the replica
and every stage numbers its pushes alike. A shard must apply one update per replica
step over its whole range (momentum, version, examples and the staleness policy as for
an unsplit replica) and never a part of one; and a step must be applied on every shard
or on none. So a piece is only *held*: copied here, converted to f32, into its step's
assembly buffer. The step is applied, as one push, when a ``commit`` of it arrives and
its pieces cover the shard's parameters (the layout's padding at the end of the last
shard may be left out: it is kept at zero anyway). A replica commits only once every
stage's pieces are held on every shard, so a stage that dies before pushing leaves no
shard with the step applied.

:class:`Assembler` is the rule object the shard's push and commit handlers call. It
holds at most ``MAX_OPEN_STEPS`` steps (memory: that many f32 copies of the shard's
range) and drops those not committed ``timeout_s`` after their first piece.
:class:`Commits` remembers the last step applied per replica group, so that the
commits of the other stages (and retries) are answered without applying it twice.
Neither is thread-safe: the shard's one thread owns them.
"""

from __future__ import annotations

import bisect
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from distbelief import protocol
from distbelief.protocol import ProtocolError

MAX_OPEN_STEPS = 16  # steps held at once; each holds a gradient of the shard's range
SPARE_BUFFERS = 2  # assembly buffers kept for reuse: no range-sized allocation per step
MAX_TRACKED_GROUPS = 4096  # bound on the (group -> last step applied) table for commits

Ranges = list[tuple[int, int]]


@dataclass(frozen=True)
class Piece:
    """One stage's push of a step, as far as its step needs it."""

    group: str
    seq: int
    worker: str
    ranges: Ranges  # [lo, hi) relative to the shard's start
    examples: int
    base_version: int


@dataclass
class Step:
    """The pieces of one replica step held so far, and their gradient."""

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

    def applied_by(self) -> list[tuple[str, int]]:
        """Every piece's (worker, seq): once applied, their retries are duplicates."""
        return [(p.worker, p.seq) for p in self.pieces]


@dataclass(frozen=True)
class Committed:
    """What the commit that applied a group's last step answered."""

    seq: int
    staleness: int
    revoked: list[int]


class Commits:
    """The last step applied per replica group (the ``MAX_TRACKED_GROUPS`` most recent)."""

    def __init__(self) -> None:
        self.last: OrderedDict[str, Committed] = OrderedDict()

    def applied(self, group: str, seq: int) -> Committed | None:
        """The group's last commit when ``seq`` is at or below it (applied already)."""
        done = self.last.get(group)
        return done if done is not None and seq <= done.seq else None

    def remember(self, group: str, seq: int, staleness: int, revoked: list[int]) -> None:
        self.last[group] = Committed(seq, staleness, revoked)
        self.last.move_to_end(group)
        if len(self.last) > MAX_TRACKED_GROUPS:
            self.last.popitem(last=False)


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
    """Holds the pieces of replica steps until each is committed (or dropped)."""

    def __init__(self, *, start: int, size: int, padding: int, index: int, timeout_s: float):
        self.start = start
        self.size = size
        self.needed = size - padding  # parameters a step's pieces must cover
        self.index = index
        self.timeout_s = timeout_s
        self.steps: dict[tuple[str, int], Step] = {}
        self.spare: list[torch.Tensor] = []
        self.received = 0  # pieces taken into a step
        self.dropped = 0  # steps dropped unapplied: incomplete at commit, or expired

    def find(self, group: str, seq: int) -> Step | None:
        return self.steps.get((group, seq))

    def add(self, piece: Piece, values: torch.Tensor, progress: list | None) -> Step:
        """Copy ``piece``'s gradient (``values``: over its ranges, in order, any dtype)
        into its step, opening the step with its first piece. Raises ProtocolError,
        with nothing changed, when the piece does not fit the pieces already there."""
        step = self.find(piece.group, piece.seq)
        if step is None:
            self._check_room(piece.group, piece.seq)
        else:
            self._check_fits(step, piece, progress)
        if step is None:
            step = self._open(piece)
        offset = 0
        for lo, hi in piece.ranges:
            step.grad[lo:hi].copy_(values[offset : offset + hi - lo])  # converted to f32
            offset += hi - lo
            bisect.insort(step.covered, (lo, hi))
            step.filled += min(hi, self.needed) - min(lo, self.needed)
        step.base_version = min(step.base_version, piece.base_version)
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

    def drop(self, step: Step) -> None:
        """Forget ``step`` unapplied, counted: its pieces did not all come, or in time."""
        self.close(step)
        self.dropped += 1

    def expired(self, now: float) -> list[Step]:
        """Drop and return the steps not committed ``timeout_s`` after their first piece."""
        late = [s for s in self.steps.values() if now - s.opened_at >= self.timeout_s]
        for step in late:
            self.drop(step)
        return late

    def coverage(self, step: Step) -> str:
        return (
            f"step {step.seq} of replica group {step.group}: pieces cover {step.filled} of "
            f"{self.needed} parameters of shard {self.index}"
        )

    def expired_message(self, step: Step) -> str:
        stages = ", ".join(p.worker for p in step.pieces)
        return (
            f"{self.coverage(step)} (pieces from {stages}), not committed {self.timeout_s:g} s "
            "after its first piece: a stage or the committing process died; dropped, "
            "nothing applied"
        )

    def _open(self, piece: Piece) -> Step:
        grad = self.spare.pop() if self.spare else torch.empty(self.size, dtype=torch.float32)
        grad[self.needed :] = 0  # the padding, which pieces may leave out
        step = Step(
            piece.group, piece.seq, grad, time.monotonic(), piece.examples, piece.base_version
        )
        self.steps[(piece.group, piece.seq)] = step
        return step

    def _check_room(self, group: str, seq: int) -> None:
        if len(self.steps) >= MAX_OPEN_STEPS:
            waiting = ", ".join(sorted({g for g, _ in self.steps}))[:200]
            raise ProtocolError(
                "not_available",
                f"shard {self.index} holds {len(self.steps)} steps split into pieces, the "
                f"most it holds at once (replica groups {waiting}); none of them committed "
                f"yet: step {seq} of replica group {group} refused",
            )

    def _check_fits(self, step: Step, piece: Piece, progress: list | None) -> None:
        what = f"step {step.seq} of replica group {step.group}"
        if piece.examples != step.examples:
            raise ProtocolError(
                "bad_field",
                f"{what}: worker {piece.worker} reports {piece.examples} examples, the pieces "
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
