"""``distbelief work``: flags to one ReplicaConfig per device, run under a supervisor."""

from __future__ import annotations

import logging
import os
import sys

import click

from distbelief.cli.options import (
    augmentation_config,
    client_model_options,
    curve_option,
    data_options,
    downpour_options,
    model_from_servers,
    servers_option,
    split_servers,
    stage_options,
)
from distbelief.config import config_option, option
from distbelief.logs import setup_logging


@click.command()
@config_option("work")
@servers_option
@option("--gpu", type=click.IntRange(min=1), default=None, help="Replicas on cuda:0..N-1.")
@option("--gpu-ids", default=None, help="Replicas on these GPUs, e.g. 2,3.")
@option("--cpu", type=click.IntRange(min=1), default=None, help="K CPU replicas (default 1).")
@option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Torch threads of each CPU replica, or of each of its stages (default: the "
    "host's cores shared out).",
)
@data_options
@downpour_options
@stage_options
@option("--amp", type=click.Choice(["bf16", "f16"]), default=None, help="Autocast on GPU.")
@option("--channels-last/--no-channels-last", default=False)
@client_model_options
@option("--seed", type=int, default=0, help="Seed of the data order and augmentation.")
@option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=9200,
    help="Metrics port of replica 0 (replica i: +i); 0 turns metrics off.",
)
@option("--metrics-bind", default="127.0.0.1")
@option(
    "--supervisor-metrics-port",
    type=click.IntRange(0, 65535),
    default=0,
    help="Metrics port of the supervisor of the replicas (0: off).",
)
@option(
    "--max-restarts",
    type=click.IntRange(min=0),
    default=3,
    help="Restarts per replica after a crash.",
)
@option(
    "--timeout-s",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    help="Seconds to wait for a shard before retrying.",
)
@option("--retries", type=click.IntRange(min=0), default=5)
@curve_option(server=False)
@option(
    "--status-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where replicas write their status files (default: a temporary folder).",
)
@option(
    "--first-replica",
    type=click.IntRange(min=0),
    default=0,
    help="Index of this host's first replica in the whole job (several hosts).",
)
@option(
    "--total-replicas",
    type=click.IntRange(min=1),
    default=None,
    help="Replicas in the whole job (default: --first-replica + this host's).",
)
@option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING"]), default="INFO")
@option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def work(
    servers,
    gpu,
    gpu_ids,
    cpu,
    threads,
    metrics_port,
    supervisor_metrics_port,
    max_restarts,
    status_dir,
    log_level,
    as_json,
    first_replica,
    total_replicas,
    **kw,
) -> None:
    """Run worker replicas (Downpour SGD) against the shards."""
    import json
    import tempfile

    from distbelief.tuning import available_cores
    from distbelief.workers.replica import ReplicaConfig
    from distbelief.workers.supervisor import (
        DeviceError,
        group_stages,
        oversubscribed,
        plan_devices,
        run_replicas,
    )
    from distbelief.workers.supervisor import threads_per_replica as threads_for

    if sum(x is not None for x in (gpu, gpu_ids, cpu)) > 1:
        raise click.UsageError("give one of --gpu, --gpu-ids, --cpu")
    try:
        devices, stage_devices = group_stages(
            plan_devices(gpu=gpu, gpu_ids=gpu_ids, cpu=cpu), kw["stages"]
        )
    except DeviceError as exc:
        raise click.ClickException(str(exc)) from None
    kw["stage_cuts"] = _stage_cuts(kw["stage_cuts"], kw["stages"])
    stage = kw.pop("stage")
    kw["stage_addresses"] = _stage_addresses(
        kw["stage_addresses"], kw["stages"], stage, len(devices)
    )
    if stage:  # a later stage of a replica whose stage 0 runs on another host
        where = (split_servers(servers), devices[0], threads, first_replica, stage)
        _run_lone_stage(*where, kw, level=getattr(logging, log_level), as_json=as_json)
    from distbelief.data import DataError, load_dataset
    from distbelief.loader import default_loader_workers

    augmentation = augmentation_config(kw)
    loader_workers = kw.pop("loader_workers")
    kw["decode"] = kw["decode"] or "loader"
    world = total_replicas or first_replica + len(devices)
    if first_replica + len(devices) > world:
        raise click.UsageError(
            f"replica index {max(first_replica, world)} out of range for {world} (--first-replica "
            f"{first_replica} + {len(devices)} replica(s) > --total-replicas {world})"
        )
    # The data are checked before the shards are asked for the model (a bad folder is one
    # error here, not a crash and restarts in every replica), and against the classifier
    # as soon as its class count is known: given, or after asking.
    train_set = None
    # (synthetic labels are drawn for the classifier; load_dataset refuses --decode
    # device for it)
    if kw["data"] != "synthetic" or kw["decode"] != "loader":
        try:
            train_set = load_dataset(
                kw["data"], "train", image_size=kw["image_size"], decode=kw["decode"]
            )
        except DataError as exc:
            raise click.ClickException(str(exc)) from None
        if len(train_set) // world < kw["batch_size"]:  # the smallest share, the last one's
            raise click.ClickException(
                f"the data set {kw['data']} has {len(train_set)} training examples: "
                f"{world} replicas get {len(train_set) // world} each, fewer than one "
                f"batch of {kw['batch_size']}"
            )
    _check_classes(kw, train_set)
    model_from_servers(kw, split_servers(servers))
    _check_classes(kw, train_set)
    status_dir = status_dir or tempfile.mkdtemp(prefix="distbelief-work-")
    os.makedirs(status_dir, exist_ok=True)
    # each stage's share of the cores
    threads = threads or max(1, threads_for(devices) // kw["stages"])
    try:
        configs = [
            ReplicaConfig(
                servers=split_servers(servers),
                index=first_replica + i,
                num_replicas=world,
                device=device,
                stage_devices=(
                    stage_devices[i] if kw["stages"] > 1 and not kw["stage_addresses"] else None
                ),
                threads=threads if device == "cpu" else 1,
                warm_threads=available_cores() if device == "cpu" else None,
                augmentation=augmentation,
                loader_workers=(
                    default_loader_workers(
                        kw["data"], device=device, replicas=len(devices), cores=available_cores()
                    )
                    if loader_workers is None
                    else loader_workers
                ),
                metrics_port=metrics_port + i if metrics_port else 0,
                status_file=os.path.join(status_dir, f"replica-{first_replica + i}.json"),
                **kw,
            )
            for i, device in enumerate(devices)
        ]
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    level = getattr(logging, log_level)
    setup_logging("work", level=level)
    if kw["overlap"] and "cpu" in devices:
        logging.getLogger("distbelief.work").warning(
            "--overlap on CPU replicas: the background push and pull need the same cores "
            "as the compute they would hide behind, and on 2 cores it was slower than "
            "without (bench/RESULTS.md, overhead). It pays on GPUs or with spare cores."
        )
    crowded = oversubscribed(devices, available_cores())
    if crowded:
        logging.getLogger("distbelief.work").warning(crowded)
    code, summaries = run_replicas(
        configs,
        max_restarts=max_restarts,
        level=level,
        metrics_port=supervisor_metrics_port,
        metrics_bind=kw["metrics_bind"],
    )
    if as_json:
        click.echo(json.dumps(summaries))
    else:
        from distbelief.report import replica_table, show, stage_table

        show(replica_table(summaries), stage_table(summaries))
    sys.exit(code)


def _stage_addresses(
    text: str | None, stages: int, stage: int | None, replicas: int
) -> tuple[str, ...] | None:
    """``--stage-addresses``: one ``tcp://`` address for each stage after the first."""
    if text is None:
        if stage is not None:
            raise click.UsageError("--stage needs --stage-addresses (where the stages listen)")
        return None
    addresses = tuple(a.strip() for a in text.split(",") if a.strip())
    if len(addresses) != stages - 1 or not all(a.startswith("tcp://") for a in addresses):
        raise click.BadParameter(
            f"give {stages - 1} tcp://IP:PORT address(es), one for each stage after the "
            f"first (--stages {stages}); got {text!r}",
            param_hint="--stage-addresses",
        )
    if stage is not None and stage >= stages:
        raise click.BadParameter(f"{stage} is not one of 0..{stages - 1}", param_hint="--stage")
    if replicas != 1:
        raise click.UsageError("with --stage-addresses, one replica (one device) per command")
    return addresses


def _run_lone_stage(servers, device, threads, replica, stage, kw, *, level, as_json) -> None:
    """``work --stage I`` (I ≥ 1): this stage of replica ``replica`` alone, listening on
    its address until stage 0 connects, to the replica's end; exits with its code."""
    import json
    import time
    from dataclasses import asdict

    from distbelief.report import show, stage_table
    from distbelief.tuning import available_cores
    from distbelief.workers.pipeline import StageConfig, run_stage

    model_from_servers(kw, servers)
    cfg = StageConfig(
        servers=servers,
        replica=replica,
        stage=stage,
        num_stages=kw["stages"],
        device=device,
        threads=threads or (available_cores() if device == "cpu" else 1),
        model=kw["model"],
        num_classes=kw["num_classes"],
        seed=kw["seed"],
        wire_dtype=kw["wire_dtype"],
        timeout_s=kw["timeout_s"],
        retries=kw["retries"],
        curve=kw["curve"],
        transport="wire",
        addresses=kw["stage_addresses"],
    )
    setup_logging("stage", stage, level=level)
    began = time.monotonic()
    code, report = run_stage(cfg)
    summary = {"index": replica, "seconds": time.monotonic() - began, "stages": [asdict(report)]}
    if as_json:
        click.echo(json.dumps(summary))
    else:
        show(stage_table([summary]))
    sys.exit(code)


def _stage_cuts(text: str | None, stages: int) -> tuple[str, ...] | None:
    """``--stage-cuts 3b,4e`` as block names, checked against ``--stages``."""
    if text is None:
        return None
    from distbelief.stages import StagePlan

    cuts = tuple(c.strip() for c in text.split(",") if c.strip())
    try:
        plan = StagePlan(cuts)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--stage-cuts") from None
    if plan.num_stages != stages:
        raise click.BadParameter(
            f"{text} cuts a replica into {plan.num_stages} stages; --stages is {stages}",
            param_hint="--stage-cuts",
        )
    return cuts


def _check_classes(kw: dict, train_set) -> None:
    """Refuse a data set with more classes than the classifier, once both are known."""
    if train_set is None or kw["num_classes"] is None:
        return
    if train_set.num_classes > kw["num_classes"]:
        raise click.ClickException(
            f"the data set {kw['data']} has {train_set.num_classes} classes but the "
            f"model's classifier {kw['num_classes']} (--num-classes)"
        )
