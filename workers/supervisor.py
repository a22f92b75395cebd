"""``distbelief work``: one replica process per device, restarted when it crashes.

Each replica writes a small JSON status file (step, images/s, loss, ...) that the
supervisor reads for its final summary and that ``distbelief up`` reads for its
live display. A restarted replica continues its step count from that file.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from distbelief.client import ServerRefused, ServerUnavailable
from distbelief.data import DataError
from distbelief.logs import setup_logging
from distbelief.metrics import MetricsPortError
from distbelief.supervise import CONFIG_ERROR, Child, Supervisor
from distbelief.tuning import available_cores

from .cut import StageLost
from .pipeline import split_replica
from .replica import ReplicaConfig, run_replica

log = logging.getLogger(__name__)


class DeviceError(ValueError):
    """The requested devices do not exist on this machine."""


def plan_devices(*, gpu: int | None, gpu_ids: str | None, cpu: int | None) -> list[str]:
    """The device of each replica: ``cuda:i`` for GPUs, ``cpu`` for CPU replicas."""
    if gpu_ids:
        try:
            ids = [int(x) for x in gpu_ids.split(",") if x.strip()]
        except ValueError:
            raise DeviceError(
                f"--gpu-ids must be comma-separated integers, got {gpu_ids!r}"
            ) from None
        if not ids:
            raise DeviceError("--gpu-ids is empty")
    elif gpu:
        ids = list(range(gpu))
    else:
        return ["cpu"] * (cpu or 1)
    found = torch.cuda.device_count()
    missing = [i for i in ids if i >= found]
    if missing:
        raise DeviceError(
            f"asked for GPU {', '.join(map(str, missing))} but this machine has {found} "
            f"CUDA device(s){' (torch found no GPU)' if found == 0 else ''}"
        )
    return [f"cuda:{i}" for i in ids]


def group_stages(devices: list[str], stages: int) -> tuple[list[str], list[tuple[str, ...]]]:
    """With ``stages`` stages a replica: the device of each replica (its stage 0) and
    the devices of its stages. GPUs go ``stages`` at a time to a replica (``--gpu 4
    --stages 2``: two replicas on cuda:0-1 and cuda:2-3); CPU replicas keep their
    stages on the CPU, each stage with its share of the cores."""
    if stages == 1 or devices[0] == "cpu":
        return devices, [(d,) * stages for d in devices]
    if len(devices) % stages:
        raise DeviceError(
            f"{len(devices)} GPU(s) for replicas of {stages} stages: give a multiple of {stages}"
        )
    groups = [tuple(devices[i : i + stages]) for i in range(0, len(devices), stages)]
    return [g[0] for g in groups], groups


def threads_per_replica(devices: list[str]) -> int:
    """Divide this host's cores among CPU replicas (GPU replicas keep one core each)."""
    return max(1, available_cores() // max(1, devices.count("cpu")))


def oversubscribed(devices: list[str], cores: int) -> str | None:
    """A warning when a host gets more CPU replicas than cores, else None."""
    num_cpu = devices.count("cpu")
    if num_cpu <= cores:
        return None
    return (
        f"{num_cpu} CPU replicas on {cores} core(s): each gets part of a core, so together "
        f"they train no more images per second than {cores} would (measured on 2 cores: 4 "
        "replicas 140,864 images in 300 s, 2 replicas 146,080), and with more replicas "
        "each image teaches less (docs/staleness.md, 'What is left'). Prefer --cpu "
        f"{cores}."
    )


def replica_process(cfg: ReplicaConfig, level: int) -> None:
    """Entry point of one replica child process."""
    setup_logging("replica", cfg.index, level=level)
    cfg = _resume(cfg)
    stages = None
    try:
        if cfg.stages > 1:
            cfg, stages = split_replica(cfg, level)
        status = run_replica(cfg, stages)
    except ServerUnavailable as exc:  # the shards may come back: a restart can help
        log.error("%s", exc)
        sys.exit(1)
    except (ServerRefused, DataError, MetricsPortError, ValueError) as exc:
        mine = ""
        if getattr(exc, "code", None) == "layout_mismatch":
            mine = f"; this replica: {cfg.model} with {cfg.num_classes} classes, "
            mine += f"{len(cfg.servers)} server(s)"
        log.error("%s%s", exc, mine)
        sys.exit(CONFIG_ERROR)  # the same settings would fail again: no restart
    except StageLost as exc:
        log.error("%s", exc)
        sys.exit(1)
    finally:
        if stages is not None:
            stages.stop()
    log.info(
        "done: %d steps, %.1f images/s, last loss %.4f",
        status["step"],
        status["images_per_s"],
        status["loss"],
    )


def _resume(cfg: ReplicaConfig) -> ReplicaConfig:
    """After a restart, run only the steps this replica had not finished (of ``--steps``,
    or of the steps its share of ``--epochs`` came to, as its status file says)."""
    if not cfg.status_file:
        return cfg
    before = read_status(cfg.status_file)
    done = before.get("step", 0)
    total = cfg.steps if cfg.steps is not None else before.get("total_steps", 0)
    if 0 < done < total:
        log.info("resuming after a restart: %d of %d steps were done", done, total)
        return replace(
            cfg,
            start_step=done,
            start_examples=before.get("examples", 0),
            start_epoch=before.get("epoch", 0),
            restarts=before.get("restarts", 0) + 1,
        )
    return cfg


def run_replicas(
    configs: list[ReplicaConfig],
    *,
    max_restarts: int,
    level: int = logging.INFO,
    metrics_port: int = 0,
    metrics_bind: str = "127.0.0.1",
) -> tuple[int, list[dict[str, Any]]]:
    """Run every replica to its end; return the exit status and each one's last status.

    ``metrics_port`` (0: off) serves the supervisor's own ``/metrics``.
    """
    children = [Child(f"replica[{c.index}]", replica_process, (c, level)) for c in configs]
    try:
        supervisor = Supervisor(
            children,
            max_restarts=max_restarts,
            metrics_port=metrics_port,
            metrics_bind=metrics_bind,
        )
    except MetricsPortError as exc:
        log.error("%s", exc)
        return 2, []
    status = supervisor.run()
    return status, [read_status(c.status_file) for c in configs]


def read_status(path: str | None) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text()) if path else {}
    except (OSError, ValueError):
        return {}
