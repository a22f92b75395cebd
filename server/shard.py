"""A parameter shard: one contiguous range of the flat vector and its update rule.

One thread owns all state: :func:`run_shard` polls a ROUTER socket and hands each
request to :meth:`Shard.handle`, which returns the reply frames. Pushes are applied
as soon as they arrive (asynchronous SGD: no barrier, no ordering across shards).
A push with ``ranges`` is a piece of a replica step split into stages: it is held
(:mod:`.pieces`) and answered at once; a ``commit`` of the step applies it, as one
push, once its pieces cover the shard (two phases: a replica commits only when every
stage's pieces are held on every shard, so a step is applied everywhere or nowhere).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass
from typing import Any

import torch

from distbelief import protocol
from distbelief.curve import Curve
from distbelief.layout import Layout, ShardPlan, flat_weights
from distbelief.metrics import ShardMetrics, new_registry, serve_metrics
from distbelief.models import build_model
from distbelief.protocol import ProtocolError
from distbelief.shm import Segment
from distbelief.tuning import keep_freed_memory

from .checkpoints import ShardCheckpointer
from .dispatch import DispatchConfig, Dispatcher, parse_progress
from .parts import Stream, Streams, describe_partial
from .pieces import Assembler, Commits, Committed, Piece, Ranges, Step, parse_ranges
from .rules import RULES, Schedule, make_rule
from .service import Service, ServiceLoop, SnapshotPool, expect_payload, frame_bytes
from .staleness import MOMENTUM_POLICIES, StalenessConfig, Updater

log = logging.getLogger(__name__)

LIVENESS_CHECK_S = 1.0  # how often the loop looks for workers gone silent
MAX_TRACKED_WORKERS = 4096  # bound on the (worker -> last seq) table for idempotent pushes
STALENESS_WINDOW = 1024  # recent staleness values kept for p50/p95 in `stats`
MAX_SEGMENTS = 256  # clients' shared-memory segments mapped at once (least recent unmapped)
# workers in stats' push_bytes (the most recent): stats must fit one header (64 KiB,
# msgpack maps of at most 256 entries)
PUSH_BYTES_WORKERS = 64


@dataclass(frozen=True, kw_only=True)
class ShardConfig:
    """Everything one shard process needs. ``port`` is already this shard's own port."""

    index: int = 0
    num_shards: int = 1
    bind: str = "127.0.0.1"
    port: int = 5570
    metrics_port: int = 9100
    metrics_bind: str = "127.0.0.1"
    model: str = "googlenet"
    num_classes: int = 1000
    seed: int = 0
    rule: str = "momentum"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0002
    lr_decay: float = 0.96
    lr_decay_epochs: float = 8.0
    lr_warmup_epochs: float = 0.0
    dataset_size: int = 1_281_167
    staleness: StalenessConfig = StalenessConfig()
    threads: int | None = None  # torch threads for the update; None: torch's default
    checkpoint_dir: str | None = None
    checkpoint_every_s: float = 600.0
    keep_checkpoints: int = 3
    curve: str | None = None  # a key folder: CURVE with ZAP on the shard's socket
    ipc_dir: str | None = None  # also listen on ipc://<ipc_dir>/shard-<index>.sock
    shared_memory: bool = True  # answer pushes and pulls through clients' /dev/shm segments
    worker_timeout_s: float = 60.0  # a worker silent this long is forgotten
    # a step split into pieces (stages) not committed this long after its first piece is
    # dropped, nothing of it applied: a stage or the committing process died or hangs
    piece_timeout_s: float = 60.0
    chunk_batches: int = 8  # shard 0's dispatcher: batches of the asker's size per chunk
    chunk_lease_s: float = 60.0  # a chunk without progress this long is handed out again

    @property
    def ipc_path(self) -> str | None:
        return shard_socket_path(self.ipc_dir, self.index) if self.ipc_dir else None

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown update rule {self.rule!r}; known: {', '.join(RULES)}")
        if not 0 <= self.index < self.num_shards:
            raise ValueError(f"shard index {self.index} out of range for {self.num_shards} shards")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")
        if self.staleness.policy in MOMENTUM_POLICIES and self.rule == "adagrad":
            raise ValueError(
                f"the {self.staleness.policy} staleness policy needs --rule momentum or nesterov"
            )
        if self.worker_timeout_s <= 0:
            raise ValueError(f"worker timeout must be positive, got {self.worker_timeout_s}")
        if self.piece_timeout_s <= 0:
            raise ValueError(f"piece timeout must be positive, got {self.piece_timeout_s}")
        self.dispatch()  # checks the chunk settings

    def dispatch(self) -> DispatchConfig:
        return DispatchConfig(
            dataset_size=self.dataset_size,
            seed=self.seed,
            chunk_batches=self.chunk_batches,
            lease_s=self.chunk_lease_s,
        )

    def schedule(self) -> Schedule:
        return Schedule(
            lr=self.lr,
            decay=self.lr_decay,
            decay_epochs=self.lr_decay_epochs,
            dataset_size=self.dataset_size,
            warmup_epochs=self.lr_warmup_epochs,
        )

    def hparams(self) -> dict[str, Any]:
        keys = ("rule", "lr", "momentum", "weight_decay", "lr_decay", "lr_decay_epochs")
        d = asdict(self)
        return {k: d[k] for k in keys} | {
            "lr_warmup_epochs": self.lr_warmup_epochs,
            "dataset_size": self.dataset_size,
            "staleness_policy": self.staleness.policy,
        }


def shard_socket_path(ipc_dir: str, index: int) -> str:
    """The Unix socket shard ``index`` listens on with ``serve --ipc-dir ipc_dir``."""
    return os.path.join(ipc_dir, f"shard-{index}.sock")


def initial_weights(model_name: str, num_classes: int, seed: int) -> tuple[Layout, torch.Tensor]:
    """The model's layout and its full flat initial weights, deterministic in ``seed``."""
    torch.manual_seed(seed)
    model = build_model(model_name, num_classes)
    layout = Layout.of(model, model_name)
    return layout, flat_weights(model, layout)


class Shard(Service):
    """The state of one shard and the request handler. Not thread-safe: one owner."""

    def __init__(self, cfg: ShardConfig, layout: Layout, weights: torch.Tensor) -> None:
        super().__init__()
        self.cfg = cfg
        self.layout = layout
        self.plan = ShardPlan(total=layout.total, num_shards=cfg.num_shards)
        self.start, self.stop = self.plan.range(cfg.index)
        self.size = self.stop - self.start
        # the layout's zero padding at the end of the last shard: kept at zero
        self.padding = self.weights_padding(layout, self.start, self.stop)
        self.fingerprint = layout.fingerprint(cfg.num_shards)
        self.weights = weights[self.start : self.stop].clone()
        self.rule = make_rule(
            cfg.rule, self.weights, weight_decay=cfg.weight_decay, momentum=cfg.momentum
        )
        self.schedule = cfg.schedule()
        self.updater = Updater(self.rule, self.schedule, cfg.staleness)
        self.grad = torch.empty(self.size, dtype=torch.float32)  # bf16/f16 pushes land here
        self.snapshots = SnapshotPool(self.size)
        self.checkpointer: ShardCheckpointer | None = None
        # shard 0 hands out the data (server/dispatch.py); the others only hold weights
        self.dispatcher = Dispatcher(cfg.dispatch()) if cfg.index == 0 else None
        self.version = 0
        self.examples = 0
        self.last_seq: OrderedDict[str, int] = OrderedDict()
        self.last_seen: dict[str, float] = {}  # live workers: time of their last push
        self.next_liveness_check = 0.0
        self.segments: OrderedDict[str, tuple[Segment, float]] = OrderedDict()
        self.staleness: deque[int] = deque(maxlen=STALENESS_WINDOW)
        self.push_times: deque[float] = deque(maxlen=256)
        self.counts = {"pushes": 0, "duplicates": 0, "pulls": 0}
        self.hellos = 0  # clients connected (hello with a fingerprint): `arrival` in hello
        self.assembler = Assembler(
            start=self.start,
            size=self.size,
            padding=self.padding,
            index=cfg.index,
            timeout_s=cfg.piece_timeout_s,
        )
        self.commits = Commits()  # the last step applied per replica group
        self.streams = Streams(timeout_s=cfg.piece_timeout_s)  # pushes in parts, under way
        self.push_bytes: OrderedDict[str, int] = OrderedDict()  # worker -> payload bytes
        self.metrics = ShardMetrics(new_registry("shard"))
        self.metrics.parameters.set(self.size)
        self.publish()

    @staticmethod
    def weights_padding(layout: Layout, start: int, stop: int) -> int:
        """How many elements at the end of ``[start, stop)`` are the layout's padding."""
        return max(0, stop - max(start, layout.parameters))

    # -- requests (dispatched by Service.handle) -----------------------------------

    def _on_hello(self, header: dict, payload: list) -> list[Any]:
        expect_payload(payload, 0)
        if header.get("fingerprint", self.fingerprint) != self.fingerprint:
            raise ProtocolError(
                "layout_mismatch",
                f"shard {self.cfg.index} holds {self.cfg.model} with {self.cfg.num_classes} "
                f"classes cut into {self.cfg.num_shards} shards (fingerprint {self.fingerprint}); "
                f"the peer's fingerprint {header['fingerprint'][:32]!r} differs: check --model, "
                "--num-classes and the number of servers",
            )
        arrival = self.hellos  # clients that connected before this one
        if "fingerprint" in header and "shm" not in header:  # a client connecting
            self.hellos += 1
        shm: dict[str, str] = {}
        if "shm" in header and "fingerprint" in header:  # a segment offered: do we see it?
            try:
                shm["shm_token"] = self._segment(header["shm"]).token.hex()
            except ProtocolError as exc:
                shm["shm_error"] = exc.message
        return [
            protocol.reply(
                header["rid"],
                fingerprint=self.fingerprint,
                index=self.cfg.index,
                start=self.start,
                stop=self.stop,
                total=self.layout.total,
                version=self.version,
                hparams=self.cfg.hparams(),
                model=self.cfg.model,
                num_classes=self.cfg.num_classes,
                num_shards=self.cfg.num_shards,
                arrival=arrival,
                parts=self.updater.by_range,
                **shm,
            )
        ]

    def _segment(self, name: str) -> Segment:
        """The client's shared-memory segment ``name``, mapped once and then reused."""
        if not self.cfg.shared_memory:
            raise ProtocolError(
                "not_available", f"shard {self.cfg.index} runs with --no-shared-memory"
            )
        now = time.monotonic()
        if name in self.segments:
            segment = self.segments[name][0]
            self.segments.move_to_end(name)
        else:
            try:
                segment = Segment.attach(name, self.layout.total)
            except ValueError as exc:
                raise ProtocolError("bad_field", f"shared memory: {exc}") from None
            if len(self.segments) >= MAX_SEGMENTS:
                self.segments.popitem(last=False)[1][0].close()
        self.segments[name] = (segment, now)
        self.metrics.shared_memory_segments.set(len(self.segments))
        return segment

    def _on_pull(self, header: dict, payload: list) -> list[Any]:
        ranges = self._ranges(header)
        expect_payload(payload, 0)
        dtype, frames = self._weights_out(header.get("shm"), header.get("dtype", "f32"), ranges)
        return [protocol.reply(header["rid"], version=self.version, dtype=dtype), *frames]

    def _ranges(self, header: dict) -> Ranges | None:
        """A request's ``ranges``, checked against this shard's range and made relative
        to its start; None without. On a push they make it a piece (with ``group``, no
        ``pull``); on a commit they name the weights ``pull`` sends back."""
        if "ranges" not in header:
            return None
        if "shm" in header:
            raise ProtocolError("bad_field", "ranges travel over the wire only, not with shm")
        if header["op"] == "push" and "group" not in header:
            raise ProtocolError(
                "bad_field",
                "a push with ranges needs 'group': the replica whose stages share the step",
            )
        if header["op"] == "push" and "pull" in header:
            raise ProtocolError(
                "bad_field", "a piece is held, not applied: ask for the weights with commit"
            )
        if header["op"] == "commit" and "pull" not in header:
            raise ProtocolError(
                "bad_field", "ranges on a commit name the weights to send back: only with pull"
            )
        return parse_ranges(header["ranges"], self.start, self.stop, self.cfg.index)

    def _weights_out(
        self, shm: str | None, dtype: str, ranges: Ranges | None = None
    ) -> tuple[str, list[Any]]:
        """The weights as a ``pull`` (or a push with ``pull``) answers them: written into
        the client's segment (no frame, f32) or a frame of ``dtype``, over ``ranges`` only
        when given."""
        if shm:
            self._segment(shm).weights[self.start : self.stop].copy_(self.weights)
            dtype, frames = "f32", []
        elif ranges is not None:
            frames = [self.snapshots.gathered(self.weights, ranges, dtype)]
        else:
            # a snapshot, not a view: the send is zero-copy and the next push changes it
            frames = [self.snapshots.frame(self.weights, dtype)]
        self.updater.pulled(self.version)  # the base of this client's next push
        self.counts["pulls"] += 1
        self.metrics.pulls.inc()
        return dtype, frames

    def _on_push(self, header: dict, payload: list) -> list[Any]:
        began = time.perf_counter()
        if "part" in header or "parts" in header:
            return self._push_part(header, payload, began)
        ranges = self._ranges(header)
        body = self._push_body(header, payload, ranges)
        worker, seq = header["worker"], header["seq"]
        progress = None
        if self.dispatcher is not None and "progress" in header:
            progress = parse_progress(header["progress"])  # refused before anything is applied
        staleness = max(0, self.version - header["base_version"])
        # before reading the segment: a retried push's segment may hold its successor
        if self._is_duplicate(header, ranges is not None):
            self.counts["duplicates"] += 1
            self.metrics.duplicates.inc()
            return self._update_reply(
                header, applied=False, staleness=staleness, shm=header.get("shm")
            )
        if ranges is not None:
            return self._hold_piece(header, ranges, body, progress)
        if body is None:  # through shared memory: the client's f32 gradient, read in place
            grad = self._segment(header["shm"]).grads[self.start : self.stop]
        else:
            grad = self._gradient(body, header["dtype"], 0, self.size)
        _check_finite(grad)
        staleness, revoked = self._apply(
            grad,
            base_version=header["base_version"],
            examples=header["examples"],
            pushed_by=[(worker, seq)],
            progress=(worker, progress) if progress else None,
            began=began,
        )
        return self._update_reply(
            header, applied=True, staleness=staleness, revoked=revoked, shm=header.get("shm")
        )

    def _gradient(self, body: Any, dtype: str, lo: int, hi: int) -> torch.Tensor:
        """The f32 gradient of ``[lo, hi)`` from a push's bytes: a view of them for
        f32, converted into the shard's gradient buffer for bf16/f16."""
        if dtype == "f32":
            return protocol.from_wire(body, "f32")
        return self.grad[lo:hi].copy_(protocol.from_wire(body, dtype))

    def _is_duplicate(self, header: dict, piece: bool) -> bool:
        """A push applied already: its (worker, seq), or for a piece its step, was."""
        if header["seq"] <= self.last_seq.get(header["worker"], -1):
            return True
        # a late piece of a step applied without it must not open that step again
        return piece and self.commits.applied(header["group"], header["seq"]) is not None

    def _push_body(
        self, header: dict, payload: list, ranges: Ranges | None, part: tuple[int, int] = None
    ) -> Any:
        """The push's gradient bytes, checked against its range (or ``part``, ``[lo,
        hi)``) and dtype; None through shared memory."""
        dtype, shm = header["dtype"], header.get("shm")
        expect_payload(payload, 0 if shm else 1)
        if shm and dtype != "f32":
            raise ProtocolError("bad_field", "a push through shared memory is f32")
        if shm:
            return None
        body = frame_bytes(payload[0])
        count = self.size if ranges is None else sum(hi - lo for lo, hi in ranges)
        if part is not None:
            count = part[1] - part[0]
        expected = protocol.wire_bytes(dtype, count)
        if len(body) != expected:
            holds = f"shard {self.cfg.index} holds {self.size}"
            if ranges is not None:
                holds = f"its ranges hold {count}"
            if part is not None:
                holds = f"part {header['part']} of {header['parts']} holds {count}"
            raise ProtocolError(
                "bad_size",
                f"gradient of {len(body)} bytes; {holds} parameters = {expected} bytes as {dtype}",
            )
        self.push_bytes[header["worker"]] = self.push_bytes.pop(header["worker"], 0) + len(body)
        if len(self.push_bytes) > PUSH_BYTES_WORKERS:
            self.push_bytes.popitem(last=False)
        return body

    def _hold_piece(
        self, header: dict, ranges: Ranges, body: Any, progress: list | None
    ) -> list[Any]:
        """A stage's piece of the step ``(group, seq)``: copied into the step and answered
        at once, ``held``. Nothing is applied until a ``commit`` of the step."""
        step = self.assembler.find(header["group"], header["seq"])
        if step is None or step.piece_of(header["worker"]) is None:  # a retry is held already
            piece = Piece(
                group=header["group"],
                seq=header["seq"],
                worker=header["worker"],
                ranges=ranges,
                examples=header["examples"],
                base_version=header["base_version"],
            )
            self.assembler.add(piece, protocol.from_wire(body, header["dtype"]), progress)
            self.metrics.pieces.inc()
            self.metrics.open_steps.set(len(self.assembler.steps))
        return [
            protocol.reply(
                header["rid"], version=self.version, applied=False, staleness=0, held=True
            )
        ]

    def _on_commit(self, header: dict, payload: list) -> list[Any]:
        """Apply the held step ``(group, seq)`` once its pieces cover the shard; answer a
        commit of a step applied already (another stage's, or a retry) with its figures."""
        began = time.perf_counter()
        expect_payload(payload, 0)
        ranges = self._ranges(header)
        group, seq = header["group"], header["seq"]
        done = self.commits.applied(group, seq)
        if done is not None:
            return self._recommit(header, done, ranges)
        step = self._committable(group, seq)
        try:
            self._check_step_finite(step)
            staleness, revoked = self._apply(
                step.grad,
                base_version=step.base_version,
                examples=step.examples,
                pushed_by=step.applied_by(),
                progress=step.progress,
                began=began,
            )
        finally:  # applied or refused, the step is over
            self.assembler.close(step)
            self.metrics.open_steps.set(len(self.assembler.steps))
        self.commits.remember(group, seq, staleness, revoked)
        return self._update_reply(
            header, applied=True, staleness=staleness, revoked=revoked, ranges=ranges
        )

    def _recommit(self, header: dict, done: Committed, ranges: Ranges | None) -> list[Any]:
        """A commit of a step applied already: nothing applied again, counted a duplicate.
        The figures recorded are those of the group's last step, so only its commits get
        them; an older step's (a very late retry) are no longer kept."""
        self.counts["duplicates"] += 1
        self.metrics.duplicates.inc()
        same = header["seq"] == done.seq
        return self._update_reply(
            header,
            applied=False,
            staleness=done.staleness if same else 0,
            revoked=done.revoked if same else None,
            ranges=ranges,
        )

    def _committable(self, group: str, seq: int) -> Step:
        """The held step ``(group, seq)`` when its pieces cover the shard. Refuses
        (``incomplete``) an unknown step, and an incomplete one, which is dropped: its
        replica commits only once every stage's pieces are held, so the rest never comes."""
        step = self.assembler.find(group, seq)
        if step is None:
            raise ProtocolError(
                "incomplete",
                f"step {seq} of replica group {group}: no pieces of it here (expired after "
                f"piece_timeout_s = {self.cfg.piece_timeout_s:g} s, or the shard restarted); "
                "nothing applied",
            )
        if not self.assembler.complete(step):
            self.assembler.drop(step)
            self.metrics.incomplete_steps.inc()
            self.metrics.open_steps.set(len(self.assembler.steps))
            raise ProtocolError(
                "incomplete",
                f"{self.assembler.coverage(step)} at commit; a stage's pieces are missing; "
                "nothing applied",
            )
        return step

    def _check_step_finite(self, step: Step) -> None:
        try:
            _check_finite(step.grad)
        except ProtocolError as exc:
            log.warning("step %d of replica group %s: %s", step.seq, step.group, exc.message)
            raise

    def _apply(
        self,
        grad: torch.Tensor,
        *,
        base_version: int,
        examples: int,
        pushed_by: list[tuple[str, int]],
        progress: tuple[str, list] | None,
        began: float,
    ) -> tuple[int, list[int]]:
        """Apply one replica step's (finite) gradient and count it once; return its
        staleness and the chunks the dispatcher revoked."""
        staleness = max(0, self.version - base_version)
        applied = self.updater.apply(
            grad, examples_before=self.examples, staleness=staleness, base_version=base_version
        )
        self.metrics.observe_update(applied, self.updater)
        if self.padding:
            self.weights[-self.padding :] = 0  # whatever a client sent for it
        revoked = self._count_step(
            examples, staleness, pushed_by, progress, time.perf_counter() - began
        )
        return staleness, revoked

    def _count_step(
        self,
        examples: int,
        staleness: int,
        pushed_by: list[tuple[str, int]],
        progress: tuple[str, list] | None,
        apply_s: float,
    ) -> list[int]:
        """Count one replica step applied (whole, or its last part); return the chunks
        the dispatcher revoked."""
        for worker, seq in pushed_by:  # every stage's (worker, seq): its retries are duplicates
            self._remember_push(worker, seq)
        self._count_push(examples, staleness)
        revoked = self.dispatcher.progress(*progress) if progress else []
        self.metrics.apply_seconds.observe(apply_s)
        return revoked

    def _push_part(self, header: dict, payload: list, began: float) -> list[Any]:
        """One part of a push (``part`` of ``parts``): applied at once with the rate and
        momentum its push's first part fixed, answered with its weights after the update
        (with ``pull``); the push counts when its last part is applied
        (server/parts.py)."""
        lo, hi = self._part_range(header)
        body = self._push_body(header, payload, None, part=(lo, hi))
        worker, seq, part = header["worker"], header["seq"], header["part"]
        progress = None
        if self.dispatcher is not None and "progress" in header:
            progress = parse_progress(header["progress"])  # refused before anything is applied
        stream = self.streams.find(worker, seq)
        stale = seq <= self.last_seq.get(worker, -1) or self.streams.newer(worker, seq)
        if stale or (stream is not None and part in stream.done):
            self.counts["duplicates"] += 1
            self.metrics.duplicates.inc()
            return self._part_reply(header, (lo, hi), applied=False, stream=stream)
        if stream is not None and stream.parts != header["parts"]:
            raise ProtocolError(
                "bad_field",
                f"push {seq} of worker {worker} came in {stream.parts} parts, "
                f"this part says {header['parts']}",
            )
        grad = self._gradient(body, header["dtype"], lo, hi)
        _check_finite(grad)
        if stream is None:
            stream = self._open_stream(header)
        if progress:
            stream.progress = (worker, progress)
        self.updater.step(grad, stream.applied, lo, hi)
        if self.padding and hi > self.size - self.padding:
            self.weights[-self.padding :] = 0
        self.streams.applied(stream, part, time.perf_counter() - began)
        self.metrics.push_parts.inc()
        revoked = None
        if stream.complete:
            revoked = self._count_step(
                stream.examples, stream.staleness, [(worker, seq)], stream.progress, stream.apply_s
            )
        return self._part_reply(header, (lo, hi), applied=True, stream=stream, revoked=revoked)

    def _part_range(self, header: dict) -> tuple[int, int]:
        """``[lo, hi)`` of a push's part in this shard's range, the request checked."""
        if "part" not in header or "parts" not in header:
            raise ProtocolError("bad_field", "a push in parts needs both 'part' and 'parts'")
        part, parts = header["part"], header["parts"]
        if not part < parts <= protocol.MAX_PARTS:
            raise ProtocolError(
                "bad_field",
                f"part {part} of {parts}: needs 0 <= part < parts <= {protocol.MAX_PARTS}",
            )
        if "shm" in header or "ranges" in header:
            raise ProtocolError(
                "bad_field", "parts travel over the wire only, not with shm or ranges"
            )
        if not self.updater.by_range:
            raise ProtocolError(
                "not_available",
                f"shard {self.cfg.index} applies whole pushes only (rule {self.cfg.rule}, "
                f"policy {self.cfg.staleness.policy}): its hello said parts false",
            )
        lo, hi = protocol.part_range(self.size, parts, part)
        if lo >= hi:
            raise ProtocolError(
                "bad_field",
                f"part {part} of {parts} of shard {self.cfg.index}'s {self.size} is empty",
            )
        return lo, hi

    def _open_stream(self, header: dict) -> Stream:
        """A push's first arriving part: its staleness, rate and momentum, fixed now."""
        staleness = max(0, self.version - header["base_version"])
        applied = self.updater.begin(examples_before=self.examples, staleness=staleness)
        self.metrics.observe_update(applied, self.updater)
        stream = Stream(
            worker=header["worker"],
            seq=header["seq"],
            parts=header["parts"],
            applied=applied,
            staleness=staleness,
            examples=header["examples"],
            touched=time.monotonic(),
        )
        for dropped in self.streams.open(stream):
            self._partial(dropped)
        return stream

    def _partial(self, stream: Stream) -> None:
        log.warning("%s", describe_partial(stream, self.cfg.index))
        self.metrics.partial_pushes.inc()

    def _part_reply(
        self,
        header: dict,
        part: tuple[int, int],
        *,
        applied: bool,
        stream: Stream | None,
        revoked: list[int] | None = None,
    ) -> list[Any]:
        """A part's reply: a push's (the push's staleness), ``complete`` on its last
        part, and with ``pull`` the part's weights after the update."""
        return self._update_reply(
            header,
            applied=applied,
            staleness=stream.staleness if stream is not None else 0,
            revoked=revoked,
            ranges=[part],
            complete=applied and stream is not None and stream.complete,
        )

    def _update_reply(
        self,
        header: dict,
        *,
        applied: bool,
        staleness: int,
        revoked: list[int] | None = None,
        ranges: Ranges | None = None,
        shm: str | None = None,
        **fields: Any,
    ) -> list[Any]:
        """A push's or commit's reply (with ``fields`` besides); with ``pull``, the
        weights after the update over ``ranges`` (or the whole range), or written into
        the segment ``shm``."""
        more = dict(fields)
        if revoked:
            # with the dispatcher's generation: chunks of another one (from before shard 0
            # restarted) are all void, also those the replica has not pushed for yet
            more |= {"revoked": revoked, "generation": self.dispatcher.generation}
        frames = []
        if "pull" in header:  # push-and-pull: the weights after this update come back
            more["pull"], frames = self._weights_out(shm, header["pull"], ranges)
        return [
            protocol.reply(
                header["rid"], version=self.version, applied=applied, staleness=staleness, **more
            ),
            *frames,
        ]

    def _on_chunk(self, header: dict, payload: list) -> list[Any]:
        expect_payload(payload, 0)
        if self.dispatcher is None:
            raise ProtocolError(
                "not_available", f"shard {self.cfg.index} hands out no data: ask shard 0"
            )
        release = header.get("release", [])
        if len(release) > 64 or not all(type(c) is int for c in release):
            raise ProtocolError("bad_field", "release is a list of at most 64 chunk ids")
        fields = self.dispatcher.next_chunk(
            header["worker"],
            batch_size=header["batch_size"],
            until=header.get("until"),
            warm_examples=header.get("warm_examples", 0),
            release=release,
            want=header.get("want", True),
        )
        self.metrics.observe_dispatch(self.dispatcher)
        return [protocol.reply(header["rid"], **fields)]

    def _remember_push(self, worker: str, seq: int) -> None:
        self.last_seq[worker] = seq
        self.last_seq.move_to_end(worker)
        if len(self.last_seq) > MAX_TRACKED_WORKERS:
            self.last_seq.popitem(last=False)
        self.last_seen[worker] = time.monotonic()
        self.metrics.workers.set(len(self.last_seen))

    def _count_push(self, examples: int, staleness: int) -> None:
        self.version += 1
        self.examples += examples
        self.push_times.append(time.monotonic())
        self.staleness.append(staleness)
        self.counts["pushes"] += 1
        self.metrics.pushes.inc()
        self.metrics.examples.inc(examples)
        self.metrics.staleness.observe(staleness)
        self.publish()

    def tick(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.maybe_save()
        now = time.monotonic()
        if now >= self.next_liveness_check:
            self.next_liveness_check = now + LIVENESS_CHECK_S
            if self.dispatcher is not None:  # its metrics once a second, not per push
                self.dispatcher.expire()
                self.metrics.observe_dispatch(self.dispatcher)
            self.forget_silent_workers(now)
            self.unmap_idle_segments(now)
        for stream in self.streams.expired(now):
            self._partial(stream)
        expired = self.assembler.expired(now)
        for step in expired:  # nothing to answer: its pieces were answered held
            log.warning("%s", self.assembler.expired_message(step))
            self.metrics.incomplete_steps.inc()
        if expired:
            self.metrics.open_steps.set(len(self.assembler.steps))

    def unmap_idle_segments(self, now: float) -> None:
        """Unmap segments no request has named for ``worker_timeout_s`` (clients gone)."""
        idle = [n for n, (_, t) in self.segments.items() if now - t > self.cfg.worker_timeout_s]
        for name in idle:
            self.segments.pop(name)[0].close()
        self.metrics.shared_memory_segments.set(len(self.segments))

    def forget_silent_workers(self, now: float) -> list[str]:
        """Drop workers that have not pushed for ``worker_timeout_s``; return them.

        A hung or vanished replica stops counting as live (``workers`` metric and
        ``workers_recent`` in stats). Its last sequence number is kept, so a push it
        retries later is still applied at most once.
        """
        gone = [w for w, t in self.last_seen.items() if now - t > self.cfg.worker_timeout_s]
        for worker in gone:
            del self.last_seen[worker]
            log.warning(
                "worker %s silent for %g s: no longer counted", worker, self.cfg.worker_timeout_s
            )
        self.metrics.workers.set(len(self.last_seen))
        return gone

    def _on_stats(self, header: dict, payload: list) -> list[Any]:
        expect_payload(payload, 0)
        return [protocol.reply(header["rid"], stats=self.stats())]

    def _on_save(self, header: dict, payload: list) -> list[Any]:
        expect_payload(payload, 0)
        if self.checkpointer is None:
            raise ProtocolError("not_available", "this shard was started without --checkpoint-dir")
        return [protocol.reply(header["rid"], path=str(self.checkpointer.save()))]

    # -- bookkeeping -----------------------------------------------------------------

    def publish(self) -> None:
        m = self.metrics
        m.version.set(self.version)
        m.learning_rate.set(self.schedule.lr_at(self.examples))
        m.mean_staleness.set(self.updater.mean_staleness)
        m.epoch.set(self.schedule.epoch(self.examples))

    def recent_workers(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        return sum(1 for t in self.last_seen.values() if now - t <= self.cfg.worker_timeout_s)

    def stats(self) -> dict[str, Any]:
        """Counters and hyper-parameters, as the ``stats`` op returns them."""
        now = time.monotonic()
        self.metrics.workers.set(self.recent_workers(now))
        recent = [t for t in self.push_times if now - t <= 10.0]
        span = now - recent[0] if len(recent) > 1 else 0.0
        stale = sorted(self.staleness)
        return {
            "index": self.cfg.index,
            "start": self.start,
            "stop": self.stop,
            "version": self.version,
            "examples": self.examples,
            "epoch": self.schedule.epoch(self.examples),
            "lr": self.schedule.lr_at(self.examples),
            "updates_per_s": (len(recent) - 1) / span if span > 0 else 0.0,
            "staleness_p50": _quantile(stale, 0.5),
            "staleness_p95": _quantile(stale, 0.95),
            "staleness_mean": self.updater.mean_staleness,
            "staleness_policy": self.cfg.staleness.policy,
            "effective_lr": self.updater.last.lr,
            "effective_momentum": self.updater.last.momentum,
            "correction": self.updater.last.correction,
            "history_misses": self.updater.history.misses if self.updater.history else 0,
            "workers_recent": self.recent_workers(now),
            **self.counts,
            "pieces": self.assembler.received,
            "incomplete_steps": self.assembler.dropped,
            "open_steps": len(self.assembler.steps),
            "parts": self.streams.parts,
            "partial_pushes": self.streams.partial,
            "push_bytes": dict(self.push_bytes),
            "rejected": dict(self.rejected),
            "hparams": self.cfg.hparams(),
        } | ({"dispatch": self.dispatcher.stats()} if self.dispatcher is not None else {})


def _check_finite(grad: torch.Tensor) -> None:
    # one reduction pass; only when the sum is not finite look closer (a sum can
    # overflow while every element is finite)
    if not torch.isfinite(grad.sum()) and not bool(torch.isfinite(grad).all()):
        bad = int((~torch.isfinite(grad)).sum())
        raise ProtocolError("non_finite", f"gradient holds {bad} NaN or Inf values; not applied")


def _quantile(values: list[int], q: float) -> float:
    if not values:
        return 0.0
    return float(values[min(len(values) - 1, int(q * len(values)))])


def run_shard(cfg: ShardConfig) -> None:
    """Build the shard, bind its sockets and serve until SIGINT or SIGTERM."""
    curve = Curve.load(cfg.curve, server=True) if cfg.curve else None
    keep_freed_memory()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    layout, weights = initial_weights(cfg.model, cfg.num_classes, cfg.seed)
    shard = Shard(cfg, layout, weights)
    if cfg.checkpoint_dir:
        shard.checkpointer = ShardCheckpointer(
            shard, cfg.checkpoint_dir, cfg.checkpoint_every_s, cfg.keep_checkpoints
        )
        shard.checkpointer.restore()
    server = ServiceLoop(
        shard,
        name=f"shard {cfg.index}",
        bind=cfg.bind,
        port=cfg.port,
        # the largest legal message: an f32 gradient of this shard's range and a header
        max_bytes=protocol.wire_bytes("f32", shard.size) + protocol.MAX_HEADER_BYTES,
        curve=curve,
        ipc_path=cfg.ipc_path,
    )
    try:
        serve_metrics(shard.metrics.registry, cfg.metrics_port, cfg.metrics_bind)
        signal.signal(signal.SIGTERM, server.stop)
        signal.signal(signal.SIGINT, server.stop)
        log.info(
            "serving parameters [%d, %d) of %d (%s, %s) on %s",
            shard.start,
            shard.stop,
            layout.total,
            cfg.model,
            f"{cfg.rule}, staleness policy {cfg.staleness.policy}",
            server.address + (f" and ipc://{server.ipc_path}" if server.ipc_path else ""),
        )
        server.run()
        log.info("stopping at version %d", shard.version)
        if shard.checkpointer is not None:
            shard.checkpointer.save()
    finally:
        server.close()
