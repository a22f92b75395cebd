"""Durable shard state: periodic and final checkpoints, and resuming from the newest.

A shard writes to ``<checkpoint-dir>/shard-<index>/v<version>.safetensors``: its
weights, its optimizer state, and as metadata the version, examples seen, the
layout fingerprint, its place in the cluster and the ``(worker, seq)`` table that
makes retried pushes idempotent (so a push retried across a shard restart is still
applied once); shard 0's also hold its data dispatcher's cursor and unfinished chunks.
It keeps the newest ``keep`` files. On start it resumes from the newest file that
verifies, skipping corrupted ones with a warning, and refuses one written for another
layout or place in the cluster, saying what differs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from distbelief.checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpoint_path,
    latest_valid,
    prune,
    save_checkpoint,
)

if TYPE_CHECKING:
    from .shard import Shard

log = logging.getLogger(__name__)


class ShardCheckpointer:
    """Writes a shard's checkpoints on a timer and on demand; restores the newest."""

    def __init__(self, shard: Shard, directory: str, every_s: float, keep: int = 3) -> None:
        self.shard = shard
        self.directory = Path(directory) / f"shard-{shard.cfg.index}"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.every_s = every_s
        self.keep = keep
        self.last_save = time.monotonic()
        self.saved_version = -1

    def save(self) -> Path:
        """Write a checkpoint of the shard's state now; return its path."""
        s = self.shard
        tensors = {"weights": s.weights, **{f"state.{k}": v for k, v in s.rule.state().items()}}
        tensors |= {f"policy.{k}": v for k, v in s.updater.state().items()}
        meta = {
            "version": s.version,
            "examples": s.examples,
            "fingerprint": s.fingerprint,
            "index": s.cfg.index,
            "num_shards": s.cfg.num_shards,
            "model": s.cfg.model,
            "num_classes": s.cfg.num_classes,
            "rule": s.cfg.rule,
            "start": s.start,
            "stop": s.stop,
            "last_seq": dict(s.last_seq),
        }
        if s.dispatcher is not None:  # the data cursor, consistent with these weights
            meta["dispatch"] = s.dispatcher.state()
        path = save_checkpoint(checkpoint_path(self.directory, s.version), tensors, meta)
        prune(self.directory, self.keep)
        self.last_save = time.monotonic()
        self.saved_version = s.version
        s.metrics.last_checkpoint.set_to_current_time()
        log.info("checkpoint %s (version %d)", path, s.version)
        return path

    def maybe_save(self) -> None:
        """Save when ``every_s`` has passed and something changed since the last save."""
        due = time.monotonic() - self.last_save >= self.every_s
        if due and self.shard.version != self.saved_version:
            self.save()

    def restore(self) -> Checkpoint | None:
        """Load the newest checkpoint that verifies into the shard; None when there is none."""
        ckpt = latest_valid(self.directory)
        if ckpt is None:
            return None
        self._check_fits(ckpt)
        s = self.shard
        s.weights.copy_(ckpt.tensors["weights"])
        s.rule.load_state(
            {k[len("state.") :]: v for k, v in ckpt.tensors.items() if k.startswith("state.")}
        )
        s.updater.load_state(
            {k[len("policy.") :]: v for k, v in ckpt.tensors.items() if k.startswith("policy.")}
        )
        s.version = ckpt.meta_json("version")
        s.examples = ckpt.meta_json("examples")
        s.last_seq.clear()
        s.last_seq.update(ckpt.meta_json("last_seq", {}))
        dispatch = ckpt.meta_json("dispatch", None)
        if s.dispatcher is not None and dispatch is not None:
            s.dispatcher.load_state(dispatch)
            s.metrics.observe_dispatch(s.dispatcher)
        s.publish()
        self.saved_version = s.version
        log.info("resumed from %s at version %d", ckpt.path, s.version)
        return ckpt

    def _check_fits(self, ckpt: Checkpoint) -> None:
        s = self.shard
        theirs = {
            k: ckpt.meta_json(k)
            for k in ("index", "num_shards", "model", "num_classes", "rule", "fingerprint")
        }
        ours = {
            "index": s.cfg.index,
            "num_shards": s.cfg.num_shards,
            "model": s.cfg.model,
            "num_classes": s.cfg.num_classes,
            "rule": s.cfg.rule,
            "fingerprint": s.fingerprint,
        }
        differ = [
            f"{k} {theirs[k]!r} there, {ours[k]!r} here" for k in ours if theirs[k] != ours[k]
        ]
        if differ:
            raise CheckpointError(
                f"checkpoint {ckpt.path} was written by another shard layout: "
                + "; ".join(differ)
                + " (use another --checkpoint-dir, or the settings it was written with)"
            )
        if ckpt.tensors["weights"].numel() != s.size:
            raise CheckpointError(f"checkpoint {ckpt.path} holds a range of another size")
