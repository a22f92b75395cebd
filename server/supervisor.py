"""``distbelief serve --shards N``: N shard processes on this host under one supervisor."""

from __future__ import annotations

import logging
import sys

from distbelief.checkpoint import CheckpointError
from distbelief.logs import setup_logging
from distbelief.metrics import MetricsPortError
from distbelief.supervise import CONFIG_ERROR, Child, Supervisor

from .shard import ShardConfig, run_shard

log = logging.getLogger(__name__)

RESTARTS = 3  # restarts per shard, when it has checkpoints to come back from


def shard_process(cfg: ShardConfig, level: int) -> None:
    """Entry point of one shard child process."""
    setup_logging("shard", cfg.index, level=level)
    try:
        run_shard(cfg)
    except (OSError, MetricsPortError, CheckpointError) as exc:
        log.error("%s", exc)
        sys.exit(CONFIG_ERROR)


def run_shards(
    configs: list[ShardConfig],
    *,
    level: int = logging.INFO,
    metrics_port: int = 0,
    metrics_bind: str = "127.0.0.1",
) -> int:
    """Run one child process per config until a signal.

    With ``--checkpoint-dir`` a crashed shard is restarted (up to ``RESTARTS`` times)
    and resumes from its newest checkpoint; without one it would come back with its
    initial weights, silently undoing training, so then a shard that fails stops all.
    ``metrics_port`` (0: off) serves the supervisor's own ``/metrics``.
    """
    children = [Child(f"shard[{c.index}]", shard_process, (c, level)) for c in configs]
    restarts = RESTARTS if all(c.checkpoint_dir for c in configs) else 0
    try:
        supervisor = Supervisor(
            children, max_restarts=restarts, metrics_port=metrics_port, metrics_bind=metrics_bind
        )
    except MetricsPortError as exc:
        log.error("%s", exc)
        return 2
    return supervisor.run()
