"""``distbelief serve --shards N``: N shard processes on this host under one supervisor."""

from __future__ import annotations

import logging
import sys

from distbelief.checkpoint import CheckpointError
from distbelief.logs import setup_logging
from distbelief.metrics import MetricsPortError
from distbelief.supervise import Child, Supervisor

from .shard import ShardConfig, run_shard

log = logging.getLogger(__name__)


def shard_process(cfg: ShardConfig, level: int) -> None:
    """Entry point of one shard child process."""
    setup_logging("shard", cfg.index, level=level)
    try:
        run_shard(cfg)
    except (OSError, MetricsPortError, CheckpointError) as exc:
        log.error("%s", exc)
        sys.exit(2)


def run_shards(
    configs: list[ShardConfig],
    *,
    level: int = logging.INFO,
    metrics_port: int = 0,
    metrics_bind: str = "127.0.0.1",
) -> int:
    """Run one child process per config until a signal; a shard that fails stops all.

    A crashed shard is not restarted here: without a checkpoint it would come back
    with its initial weights, silently undoing training. ``metrics_port`` (0: off)
    serves the supervisor's own ``/metrics``.
    """
    children = [Child(f"shard[{c.index}]", shard_process, (c, level)) for c in configs]
    try:
        supervisor = Supervisor(
            children, max_restarts=0, metrics_port=metrics_port, metrics_bind=metrics_bind
        )
    except MetricsPortError as exc:
        log.error("%s", exc)
        return 2
    return supervisor.run()
