"""The averager: a separate process keeping the Polyak average of the shards' weights.

Every ``every_s`` seconds it pulls the whole weight vector from the shards (read only)
and folds it into the average. ``polyak`` is the equal-weight mean of the pulled
iterates since ``start`` (the shards' version), as Polyak and Juditsky define it,
accumulated in float64; ``ema`` is an exponential moving average with ``decay``. It
answers ``hello``, ``pull`` and ``stats`` like a one-shard server (so the same client
reads the averaged copy), writes the average as a plain ``state_dict`` checkpoint that
``googlenet(...).load_state_dict`` accepts (auxiliary heads included), resumes from it
after a restart, and, given evaluation data, evaluates the average periodically.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distbelief import protocol
from distbelief.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from distbelief.client import ClientConfig, ParameterClient, ServerRefused, ServerUnavailable
from distbelief.curve import Curve
from distbelief.layout import Layout, flatten_into
from distbelief.metrics import AveragerMetrics, new_registry, serve_metrics
from distbelief.models import build_model
from distbelief.protocol import ProtocolError
from distbelief.tuning import keep_freed_memory

from .service import Service, ServiceLoop, SnapshotPool, expect_payload

log = logging.getLogger(__name__)

MODES = ("polyak", "ema")
CHECKPOINT_NAME = "averaged.safetensors"
MAX_PULL_BACKOFF_S = 30.0  # longest wait between pulls while the shards do not answer


@dataclass(frozen=True, kw_only=True)
class AveragerConfig:
    servers: tuple[str, ...]
    mode: str = "polyak"
    decay: float = 0.999
    start: int = 0  # shard version from which iterates enter the average
    start_epoch: float | None = None  # or: the shards' epoch from which they enter
    every_s: float = 5.0
    bind: str = "127.0.0.1"
    port: int = 5590
    metrics_port: int = 9190
    metrics_bind: str = "127.0.0.1"
    model: str = "googlenet"
    num_classes: int = 1000
    eval_data: str | None = None
    eval_every_s: float = 60.0
    eval_examples: int | None = None
    image_size: int = 32
    output: str | None = None
    checkpoint_every_s: float = 60.0
    timeout_s: float = 10.0  # per pull from the shards; the loop serves nothing meanwhile
    curve: str | None = None  # a key folder: CURVE to the shards and on our own socket

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; known: {', '.join(MODES)}")
        if not 0 < self.decay < 1:
            raise ValueError(f"--decay must lie in (0, 1), got {self.decay}")
        if self.every_s <= 0:
            raise ValueError("--every-s must be positive")


class Average:
    """The running average of flat weight snapshots (pure arithmetic, no I/O)."""

    def __init__(self, total: int, mode: str, decay: float) -> None:
        self.mode = mode
        self.decay = decay
        self.acc = torch.zeros(total, dtype=torch.float64)  # polyak: sum; ema: the average
        self.count = 0
        self.versions: list[int] = []  # the shards' total version of each snapshot

    def add(self, weights: torch.Tensor, version: int) -> None:
        if self.mode == "polyak":
            self.acc.add_(weights)
        elif self.count == 0:
            self.acc.copy_(weights)
        else:
            self.acc.mul_(self.decay).add_(weights, alpha=1 - self.decay)
        self.count += 1
        self.versions.append(version)

    def value(self) -> torch.Tensor:
        """The average as float32 (the mean of the snapshots, or the EMA)."""
        if self.count == 0:
            raise ValueError("no snapshot averaged yet")
        avg = self.acc / self.count if self.mode == "polyak" else self.acc
        return avg.float()

    def restore(self, weights: torch.Tensor, count: int, versions: list[int]) -> None:
        self.acc.copy_(weights.double() * (count if self.mode == "polyak" else 1))
        self.count = count
        self.versions = list(versions)


class Averager(Service):
    """Pulls from the shards, averages, serves the average. Not thread-safe: one owner."""

    def __init__(self, cfg: AveragerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = build_model(cfg.model, cfg.num_classes).eval()
        self.layout = Layout.of(self.model, cfg.model)
        self.total = self.layout.total
        self.fingerprint = self.layout.fingerprint(1)  # served as one range [0, total)
        self.weights, _ = flatten_into(self.model, self.layout)
        self.snapshot = torch.empty(self.total)
        self.average = Average(self.total, cfg.mode, cfg.decay)
        self.current: torch.Tensor | None = None  # float32 average, refreshed per update
        self.snapshots = SnapshotPool(self.total)
        self.client = ParameterClient(
            ClientConfig(servers=cfg.servers, timeout_s=cfg.timeout_s, retries=0, curve=cfg.curve),
            self.layout,
        )
        self.metrics = AveragerMetrics(new_registry("averager"))
        self.next_pull = self.next_eval = time.monotonic()
        self.pull_failures = 0
        self.next_save = time.monotonic() + cfg.checkpoint_every_s
        self.last_save = time.time()
        self.last_eval: dict[str, Any] = {}
        self.shard_version = 0
        self.eval_set = None

    # -- periodic work ---------------------------------------------------------------

    def tick(self) -> None:
        now = time.monotonic()
        if now >= self.next_pull:
            self.next_pull = now + self.cfg.every_s
            self.update()
        if self.cfg.eval_data and self.cfg.eval_every_s > 0 and now >= self.next_eval:
            self.next_eval = now + self.cfg.eval_every_s
            self.evaluate()
        if self.cfg.output and now >= self.next_save and self.average.count:
            self.next_save = now + self.cfg.checkpoint_every_s
            self.save()
        self.metrics.checkpoint_age.set(time.time() - self.last_save)

    def update(self) -> bool:
        """Pull the shards' weights and fold them in (from ``start`` on); True if added."""
        try:
            if not self.client.info:
                self.client.connect()
            # the epoch is read before the pull: epochs only grow, so weights pulled
            # after an answer of "past the start epoch" are past it too
            if not self._past_start_epoch():
                return False
            versions = self.client.pull(self.snapshot)
        except (ServerUnavailable, ServerRefused) as exc:
            # a pull blocks the loop for up to --timeout-s: back off, so that while the
            # shards are away the averager still answers its own clients
            self.pull_failures += 1
            wait = min(MAX_PULL_BACKOFF_S, self.cfg.every_s * 2**self.pull_failures)
            self.next_pull = time.monotonic() + wait
            log.warning("cannot pull from the shards (next try in %.1f s): %s", wait, exc)
            return False
        self.pull_failures = 0
        self.shard_version = sum(versions)
        if min(versions) < self.cfg.start:
            return False
        self.average.add(self.snapshot, self.shard_version)
        self.current = self.average.value()
        m = self.metrics
        m.updates.inc()
        m.snapshots.set(self.average.count)
        mean_version = sum(self.average.versions) / len(self.average.versions)
        m.lag.set(self.shard_version - mean_version)
        return True

    def _past_start_epoch(self) -> bool:
        if self.cfg.start_epoch is None:
            return True
        epochs = [s["epoch"] for s in self.client.stats()]
        return min(epochs) >= self.cfg.start_epoch

    def evaluate(self) -> dict[str, Any]:
        """Top-1/top-5 of the current average on the evaluation data."""
        from distbelief.data import evaluate, load_dataset

        if self.current is None:
            return {}
        if self.eval_set is None:
            self.eval_set = load_dataset(
                self.cfg.eval_data,
                "val",
                image_size=self.cfg.image_size,
                num_classes=self.cfg.num_classes,
            )
        with torch.no_grad():
            self.weights.copy_(self.current)
        scores = evaluate(self.model, self.eval_set, crops=1, max_examples=self.cfg.eval_examples)
        self.last_eval = {**scores, "snapshots": self.average.count}
        self.metrics.top1.set(scores["top1"])
        self.metrics.top5.set(scores["top5"])
        log.info(
            "averaged model (%d snapshots): top-1 %.2f%% top-5 %.2f%%",
            self.average.count,
            100 * scores["top1"],
            100 * scores["top5"],
        )
        return self.last_eval

    # -- checkpoints -----------------------------------------------------------------

    def checkpoint_file(self) -> Path:
        return Path(self.cfg.output) / CHECKPOINT_NAME

    def save(self) -> Path:
        """Write the average as a plain state_dict (safetensors) with its bookkeeping."""
        if self.current is None:
            raise ProtocolError("not_available", "nothing averaged yet")
        Path(self.cfg.output).mkdir(parents=True, exist_ok=True)
        tensors = self.layout.state_dict(self.current)
        meta = {
            "mode": self.cfg.mode,
            "decay": self.cfg.decay,
            "count": self.average.count,
            "versions": self.average.versions,
            "fingerprint": self.fingerprint,
            "model": self.cfg.model,
            "num_classes": self.cfg.num_classes,
        }
        path = save_checkpoint(self.checkpoint_file(), tensors, meta)
        self.last_save = time.time()
        return path

    def restore(self) -> bool:
        """Resume the average from the output folder; False when there is nothing to resume."""
        if not self.cfg.output or not self.checkpoint_file().exists():
            return False
        try:
            ckpt = load_checkpoint(self.checkpoint_file())
        except CheckpointError as exc:
            log.warning("not resuming: %s", exc)
            return False
        if (
            ckpt.meta_json("fingerprint") != self.fingerprint
            or ckpt.meta_json("mode") != self.cfg.mode
        ):
            raise CheckpointError(
                f"{ckpt.path} holds another model or averaging mode "
                f"({ckpt.meta_json('model')}, {ckpt.meta_json('num_classes')} classes, "
                f"{ckpt.meta_json('mode')}); use another --output"
            )
        flat = self.layout.from_state_dict(ckpt.tensors)
        self.average.restore(flat, ckpt.meta_json("count"), ckpt.meta_json("versions"))
        self.current = self.average.value()
        log.info("resumed the average of %d snapshots from %s", self.average.count, ckpt.path)
        return True

    # -- requests --------------------------------------------------------------------

    def _on_hello(self, header: dict, payload: list) -> list[Any]:
        expect_payload(payload, 0)
        if header.get("fingerprint", self.fingerprint) != self.fingerprint:
            raise ProtocolError(
                "layout_mismatch",
                f"the averager holds {self.cfg.model} with {self.cfg.num_classes} classes as "
                "one range; connect to it alone, with the same --model and --num-classes",
            )
        return [
            protocol.reply(
                header["rid"],
                fingerprint=self.fingerprint,
                index=0,
                start=0,
                stop=self.total,
                total=self.total,
                version=self.average.count,
                hparams={"mode": self.cfg.mode},
                model=self.cfg.model,
                num_classes=self.cfg.num_classes,
                num_shards=1,
            )
        ]

    def _on_pull(self, header: dict, payload: list) -> list[Any]:
        expect_payload(payload, 0)
        if self.current is None:
            raise ProtocolError("not_available", "nothing averaged yet")
        dtype = header.get("dtype", "f32")
        frame = self.snapshots.frame(self.current, dtype)
        self.metrics.pulls.inc()
        return [protocol.reply(header["rid"], version=self.average.count, dtype=dtype), frame]

    def _on_stats(self, header: dict, payload: list) -> list[Any]:
        expect_payload(payload, 0)
        return [protocol.reply(header["rid"], stats=self.stats())]

    def _on_save(self, header: dict, payload: list) -> list[Any]:
        expect_payload(payload, 0)
        if not self.cfg.output:
            raise ProtocolError("not_available", "the averager was started without --output")
        return [protocol.reply(header["rid"], path=str(self.save()))]

    def stats(self) -> dict[str, Any]:
        return {
            "role": "averager",
            "mode": self.cfg.mode,
            "snapshots": self.average.count,
            "versions": self.average.versions[-1000:],
            "shard_version": self.shard_version,
            "start": self.cfg.start,
            "eval": self.last_eval,
            "rejected": dict(self.rejected),
        }


def run_averager(cfg: AveragerConfig) -> None:
    """Build the averager, bind its socket and serve until SIGINT or SIGTERM."""
    curve = Curve.load(cfg.curve, server=True) if cfg.curve else None
    keep_freed_memory()
    averager = Averager(cfg)
    averager.restore()
    loop = ServiceLoop(
        averager,
        name="averager",
        bind=cfg.bind,
        port=cfg.port,
        max_bytes=protocol.MAX_HEADER_BYTES * 2,
        curve=curve,
    )
    try:
        serve_metrics(averager.metrics.registry, cfg.metrics_port, cfg.metrics_bind)
        signal.signal(signal.SIGTERM, loop.stop)
        signal.signal(signal.SIGINT, loop.stop)
        log.info(
            "averaging %s (%s) every %g s; serving on %s",
            ",".join(cfg.servers),
            cfg.mode,
            cfg.every_s,
            loop.address,
        )
        loop.run()
        if cfg.output and averager.current is not None:
            log.info("final average written to %s", averager.save())
    finally:
        averager.client.close()
        loop.close()
