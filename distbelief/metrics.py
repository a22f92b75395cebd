"""Prometheus metrics: one registry per process, served on its own ``/metrics`` port.

Names follow Prometheus conventions: prefix ``distbelief_``, the role next
(``shard``, ``worker``, ``averager``), base units, ``_total`` for counters,
``_seconds`` for durations.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    start_http_server,
)

from distbelief import __version__

log = logging.getLogger(__name__)

STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128)
CHUNK_EVENTS = ("handed", "done", "reissued", "released")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class MetricsPortError(RuntimeError):
    """The metrics port could not be bound."""


def new_registry(role: str) -> CollectorRegistry:
    """A fresh registry holding ``distbelief_build_info``."""
    disable_created_metrics()  # the *_created series only double what scrapes show
    registry = CollectorRegistry(auto_describe=True)
    info = Info(
        "distbelief_build", "Version and role of this distbelief process", registry=registry
    )
    info.info({"version": __version__, "role": role})
    return registry


def serve_metrics(registry: CollectorRegistry, port: int, addr: str = "127.0.0.1") -> None:
    """Serve ``registry`` on ``http://addr:port/metrics`` from a daemon thread.

    ``port`` 0 turns the endpoint off. Raises MetricsPortError naming the port when
    it cannot be bound (for example because it is in use).
    """
    if port == 0:
        return
    try:
        start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        raise MetricsPortError(
            f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc} "
            "(choose another --metrics-port, or 0 to turn metrics off)"
        ) from None
    log.info("metrics on http://%s:%d/metrics", addr, port)


def _service_counters(prefix: str, registry: CollectorRegistry) -> tuple[Counter, ...]:
    """What every server counts: refusals by error code, refused handshakes by reason,
    bytes in and out."""
    from distbelief.protocol import ERRORS

    rejected = Counter(
        prefix + "rejected_messages",
        "Requests refused, by error code",
        ["reason"],
        registry=registry,
    )
    for code in ERRORS:
        rejected.labels(reason=code)  # every code shows, at zero until it happens
    handshakes = Counter(
        prefix + "refused_handshakes",
        "Connections refused at the handshake: auth (CURVE key not admitted), "
        "protocol (no CURVE, or not ZeroMQ), other",
        ["reason"],
        registry=registry,
    )
    for reason in ("auth", "protocol", "other"):
        handshakes.labels(reason=reason)
    accepted = Counter(
        prefix + "accepted_connections",
        "TCP connections accepted (peers that do not speak ZeroMQ show here, then vanish)",
        registry=registry,
    )
    received = Counter(prefix + "received_bytes", "Bytes received", registry=registry)
    sent = Counter(prefix + "sent_bytes", "Bytes sent", registry=registry)
    return rejected, handshakes, accepted, received, sent


@dataclass
class ShardMetrics:
    """The metrics a parameter shard exports."""

    registry: CollectorRegistry

    def __post_init__(self) -> None:
        r = self.registry
        p = "distbelief_shard_"
        self.pushes = Counter(p + "pushes", "Pushes applied to the weights", registry=r)
        self.duplicates = Counter(
            p + "duplicate_pushes",
            "Retried pushes recognised by (worker, seq), and commits of steps applied "
            "already, not applied",
            registry=r,
        )
        self.pulls = Counter(p + "pulls", "Pull requests answered", registry=r)
        (
            self.rejected,
            self.refused_handshakes,
            self.accepted_connections,
            self.received_bytes,
            self.sent_bytes,
        ) = _service_counters(p, r)
        self.examples = Counter(p + "examples", "Training examples reported by pushes", registry=r)
        self.apply_seconds = Histogram(
            p + "apply_seconds",
            "Time to check and apply one push",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.staleness = Histogram(
            p + "staleness",
            "Versions applied between a push's base version and its arrival",
            buckets=STALENESS_BUCKETS,
            registry=r,
        )
        self.version = Gauge(p + "version", "Updates applied (the shard's version)", registry=r)
        self.learning_rate = Gauge(p + "learning_rate", "Learning rate in force", registry=r)
        self.epoch = Gauge(p + "epoch", "Examples seen divided by the data set size", registry=r)
        self.parameters = Gauge(
            p + "parameters",
            "Elements of the flat vector held by this shard (the last one's include padding)",
            registry=r,
        )
        self.workers = Gauge(
            p + "workers",
            "Workers that pushed within the liveness timeout (--worker-timeout-s)",
            registry=r,
        )
        self.last_checkpoint = Gauge(
            p + "last_checkpoint_timestamp_seconds",
            "Unix time of the last checkpoint this shard wrote (0: none yet)",
            registry=r,
        )
        self.shared_memory_segments = Gauge(
            p + "shared_memory_segments",
            "Shared-memory segments of clients on this host mapped by the shard",
            registry=r,
        )
        self.mean_staleness = Gauge(
            p + "staleness_mean",
            "Running mean staleness of pushes (what the async-momentum policy reads)",
            registry=r,
        )
        self.effective_momentum = Gauge(
            p + "effective_momentum",
            "Momentum the update rule used for the last push (after the staleness policy)",
            registry=r,
        )
        self.effective_learning_rate = Gauge(
            p + "effective_learning_rate",
            "Learning rate the last push was applied with (after the staleness policy)",
            registry=r,
        )
        self.correction = Gauge(
            p + "staleness_correction_ratio",
            "Size of the last push's delay compensation relative to its gradient",
            registry=r,
        )
        self.history_bytes = Gauge(
            p + "weight_history_bytes",
            "Memory of the weight copies kept for delay compensation",
            registry=r,
        )
        self.history_misses = Counter(
            p + "weight_history_misses",
            "Stale pushes applied uncompensated: their base version was no longer kept",
            registry=r,
        )
        self._misses_seen = 0
        # steps of replicas split into stages, pushed in pieces (server/pieces.py)
        self.pieces = Counter(
            p + "pieces",
            "Pieces held: pushes with ranges, a stage's part of a replica step (retries "
            "and duplicates not counted)",
            registry=r,
        )
        self.incomplete_steps = Counter(
            p + "incomplete_steps",
            "Steps pushed in pieces dropped unapplied: incomplete at their commit (a stage's "
            "pieces missing), or not committed within the piece timeout",
            registry=r,
        )
        self.open_steps = Gauge(
            p + "open_steps", "Steps pushed in pieces held now, not yet committed", registry=r
        )
        # pushes over the wire in parts, each applied as it arrives (server/parts.py)
        self.push_parts = Counter(
            p + "push_parts", "Parts of pushes applied (pushes in parts over the wire)", registry=r
        )
        self.partial_pushes = Counter(
            p + "partial_pushes",
            "Pushes in parts that never completed (their replica stopped between parts): "
            "the parts that came stay applied, the push is not counted",
            registry=r,
        )
        # shard 0's data dispatcher (server/dispatch.py); zero on the other shards
        self.chunks = Counter(
            p + "chunks",
            "Data chunks by event: handed (out), done (every position applied), reissued "
            "(revoked: its replica fell silent; the rest goes out again), released (given back)",
            ["event"],
            registry=r,
        )
        for event in CHUNK_EVENTS:
            self.chunks.labels(event=event)
        self.retrained = Counter(
            p + "retrained_examples",
            "Examples whose gradient was applied twice: trained after their chunk was revoked",
            registry=r,
        )
        self.dropped = Counter(
            p + "dropped_examples",
            "Examples skipped at an epoch's end, fewer than one batch (as drop_last)",
            registry=r,
        )
        self.data_replicas = Gauge(
            p + "data_replicas", "Replicas holding a data chunk now", registry=r
        )
        self.data_epoch = Gauge(p + "data_epoch", "The epoch the dispatcher hands out", registry=r)
        self.epoch_progress = Gauge(
            p + "epoch_progress",
            "Share of the dispatcher's current epoch whose gradient is applied",
            registry=r,
        )
        self._chunks_seen = dict.fromkeys((*CHUNK_EVENTS, "retrained", "dropped"), 0)

    def observe_dispatch(self, dispatcher) -> None:
        """Export the dispatcher's counters (as increments) and gauges."""
        counts = dispatcher.counts
        for event in CHUNK_EVENTS:
            self.chunks.labels(event=event).inc(counts[event] - self._chunks_seen[event])
        self.retrained.inc(counts["retrained"] - self._chunks_seen["retrained"])
        self.dropped.inc(counts["dropped"] - self._chunks_seen["dropped"])
        self._chunks_seen = {k: counts[k] for k in self._chunks_seen}
        self.data_replicas.set(dispatcher.replicas())
        self.data_epoch.set(dispatcher.epoch)
        self.epoch_progress.set(dispatcher.epoch_progress())

    def observe_update(self, applied, updater) -> None:
        """Export what the staleness policy did with one push."""
        self.effective_learning_rate.set(applied.lr)
        if applied.momentum is not None:
            self.effective_momentum.set(applied.momentum)
        self.correction.set(applied.correction)
        if updater.history is not None:
            self.history_bytes.set(updater.history.bytes)
            self.history_misses.inc(updater.history.misses - self._misses_seen)
            self._misses_seen = updater.history.misses


@dataclass
class WorkerMetrics:
    """The metrics a worker replica exports."""

    registry: CollectorRegistry

    def __post_init__(self) -> None:
        r = self.registry
        p = "distbelief_worker_"
        self.steps = Counter(p + "steps", "Training steps completed", registry=r)
        self.examples = Counter(p + "examples", "Training examples processed", registry=r)
        self.loss = Gauge(p + "loss", "Training loss of the last step", registry=r)
        self.step_seconds = Histogram(
            p + "step_seconds",
            "Forward and backward time of one step",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.data_wait = Histogram(
            p + "data_wait_seconds",
            "Time the training loop waited for its next batch (loader not keeping up)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.pull_seconds = Histogram(
            p + "pull_seconds",
            "Time to pull the weights from every shard (a pull of its own)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.push_seconds = Histogram(
            p + "push_seconds",
            "Time to push the gradient to every shard (and get the weights back: push-and-pull)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.retries = Counter(p + "retries", "Requests retried after a timeout", registry=r)
        self.non_finite = Counter(
            p + "non_finite_pushes",
            "Gradients holding NaN or Inf, not pushed (no shard applies a part of one)",
            registry=r,
        )
        self.staleness = Histogram(
            p + "staleness",
            "Mean staleness over shards of this worker's pushes",
            buckets=STALENESS_BUCKETS,
            registry=r,
        )
        # a split replica (work --stages): each stage's figures, as its reports say
        stage = ("stage",)
        self.stage_compute = Gauge(
            p + "stage_compute_seconds",
            "Seconds of forward and backward passes of each stage",
            stage,
            registry=r,
        )
        self.stage_wait = Gauge(
            p + "stage_wait_seconds",
            "Seconds each stage waited at its cuts for activations or gradients",
            stage,
            registry=r,
        )
        self.stage_bytes = Gauge(
            p + "stage_cut_bytes",
            "Bytes each stage sent and received over its cuts",
            (*stage, "direction"),
            registry=r,
        )
        self.stage_parameters = Gauge(
            p + "stage_parameters",
            "Parameters each stage holds, pushes and pulls (its ranges)",
            stage,
            registry=r,
        )

    def observe_stages(self, reports: list[dict]) -> None:
        """Set the stage gauges from the stages' reports (workers/pipeline.py)."""
        for report in reports:
            k = str(report["stage"])
            self.stage_compute.labels(stage=k).set(report["compute_s"])
            self.stage_wait.labels(stage=k).set(report["wait_s"])
            self.stage_bytes.labels(stage=k, direction="sent").set(report["sent_bytes"])
            self.stage_bytes.labels(stage=k, direction="received").set(report["received_bytes"])
            self.stage_parameters.labels(stage=k).set(report["parameters"])


@dataclass
class AveragerMetrics:
    """The metrics the averager exports."""

    registry: CollectorRegistry

    def __post_init__(self) -> None:
        r = self.registry
        p = "distbelief_averager_"
        self.updates = Counter(p + "updates", "Snapshots folded into the average", registry=r)
        self.snapshots = Gauge(p + "snapshots", "Snapshots in the average", registry=r)
        self.lag = Gauge(
            p + "lag_versions",
            "Shard versions between the latest snapshot and the average's mean snapshot",
            registry=r,
        )
        self.pulls = Counter(p + "pulls", "Pulls of the averaged weights answered", registry=r)
        (
            self.rejected,
            self.refused_handshakes,
            self.accepted_connections,
            self.received_bytes,
            self.sent_bytes,
        ) = _service_counters(p, r)
        self.top1 = Gauge(p + "eval_top1", "Top-1 accuracy of the last evaluation", registry=r)
        self.top5 = Gauge(p + "eval_top5", "Top-5 accuracy of the last evaluation", registry=r)
        self.checkpoint_age = Gauge(
            p + "checkpoint_age_seconds",
            "Seconds since the average was last written",
            registry=r,
        )


@dataclass
class SupervisorMetrics:
    """The metrics of a supervisor (``serve --shards N``, ``work``): its children's health.

    The ``child`` label takes one value per child process (``shard[0]``, ``replica[1]``),
    so its set is bounded by the number of children.
    """

    registry: CollectorRegistry

    def __post_init__(self) -> None:
        r = self.registry
        p = "distbelief_supervisor_"
        self.children = Gauge(p + "children", "Child processes this supervisor runs", registry=r)
        self.child_up = Gauge(
            p + "child_up",
            "1 while the child process is running, 0 once it has exited",
            ["child"],
            registry=r,
        )
        self.restarts = Counter(
            p + "restarts",
            "Restarts of a child process after it exited with an error",
            ["child"],
            registry=r,
        )
