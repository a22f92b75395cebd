"""``distbelief up``: shards, replicas and the averager on this machine (the demo).

The ``DEMO_*`` constants are up's defaults; it hands its flags on to ``serve``,
``work`` and ``average`` as command lines (UpConfig)."""

from __future__ import annotations

import logging
import os
import sys

import click

from distbelief.cli.options import (
    MODEL_CHOICES,
    curve_option,
    data_options,
    downpour_options,
    input_flags,
    rule_options,
    staleness_options,
)
from distbelief.config import config_option, option
from distbelief.logs import setup_logging

# `distbelief up` defaults: the demo, tuned to converge on 2 CPU cores in minutes
DEMO_EPOCHS = 2.75
DEMO_LR = 0.005
# chosen by measurement (bench/RESULTS.md, "staleness")
DEMO_STALENESS_POLICY = "async-momentum-lr"
DEMO_WARM_START = 0.2
DEMO_JOIN_RAMP_EPOCHS = 0.2  # the rate ramps up from the stable policy's after the join
DEMO_LR_WARMUP_EPOCHS = 0.0
# the same default as a policy spec of bench.staleness and bench.convergence
DEMO_POLICY_SPEC = DEMO_STALENESS_POLICY + ("+warm" if DEMO_WARM_START else "")


def up_rule_options(f):
    return rule_options(f, dataset_size=None, lr=DEMO_LR, lr_warmup_epochs=DEMO_LR_WARMUP_EPOCHS)


def up_downpour_options(f):
    return downpour_options(f, epochs=DEMO_EPOCHS, shared_memory=True, warm_start=DEMO_WARM_START)


def up_staleness_options(f):
    return staleness_options(
        f, staleness_policy=DEMO_STALENESS_POLICY, join_ramp_epochs=DEMO_JOIN_RAMP_EPOCHS
    )


@click.command()
@config_option("up")
@option("--shards", type=click.IntRange(min=1), default=2)
@option("--cpu", type=click.IntRange(min=1), default=None, help="CPU replicas (default 2).")
@option("--gpu", type=click.IntRange(min=1), default=None, help="GPU replicas.")
@data_options
@up_downpour_options
@option("--model", type=MODEL_CHOICES, default="googlenet")
@option(
    "--num-classes",
    type=click.IntRange(min=2),
    default=None,
    help="Default: the data set's class count.",
)
@option("--seed", type=int, default=0)
@up_rule_options
@up_staleness_options
@option(
    "--run-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Logs, status files and summary (default runs/<time>).",
)
@option(
    "--checkpoint-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Shard checkpoints (resumed from on the next run).",
)
@option(
    "--average-from",
    type=click.FloatRange(0, 1),
    default=0.75,
    help="Fraction of the run after which iterates enter the Polyak average.",
)
@option(
    "--ipc/--no-ipc",
    default=True,
    help="Replicas and averager reach the shards over Unix sockets (faster) or TCP.",
)
@option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@curve_option(server=True)
def up(
    shards,
    cpu,
    gpu,
    data,
    image_size,
    batch_size,
    model,
    num_classes,
    seed,
    run_dir,
    as_json,
    checkpoint_dir,
    average_from,
    curve,
    ipc,
    **kw,
) -> None:
    """Run shards and replicas on this machine with a live display (the demo)."""
    import json
    import time

    from distbelief.data import DataError, load_dataset
    from distbelief.launcher import UpConfig, run_up

    if cpu is not None and gpu is not None:
        raise click.UsageError("give --cpu or --gpu, not both")
    if kw["steps"] is not None:
        source = click.get_current_context().get_parameter_source("epochs")
        if source is not click.core.ParameterSource.DEFAULT:
            raise click.UsageError("give --steps or --epochs, not both")
        kw["epochs"] = None  # --steps replaces the demo's default epochs
    setup_logging("up")
    try:
        train_set = load_dataset(
            data, "train", image_size=image_size, seed=seed, decode=kw["decode"] or "loader"
        )
    except DataError as exc:
        raise click.ClickException(str(exc)) from None
    if gpu:
        from distbelief.workers.supervisor import DeviceError, plan_devices

        try:
            plan_devices(gpu=gpu, gpu_ids=None, cpu=None)
        except DeviceError as exc:
            raise click.ClickException(str(exc)) from None
    ctx = click.get_current_context()
    if kw["rule"] == "adagrad" and ctx.get_parameter_source("staleness_policy") == (
        click.core.ParameterSource.DEFAULT
    ):
        kw["staleness_policy"] = "none"  # up's default policy adjusts momentum adagrad lacks
    serve_args = _flags(
        kw,
        *("rule", "lr", "momentum", "weight_decay", "lr_decay", "lr_decay_epochs"),
        *("lr_warmup_epochs", "staleness_policy", "join_ramp_epochs", "dc_lambda"),
        "weight_history",
    )
    serve_args += ["--dataset-size", str(kw["dataset_size"] or len(train_set))]
    if checkpoint_dir:
        serve_args += ["--checkpoint-dir", checkpoint_dir]
    replicas = gpu or cpu or 2
    if not gpu:
        from distbelief.tuning import available_cores
        from distbelief.workers.supervisor import oversubscribed

        crowded = oversubscribed(["cpu"] * replicas, available_cores())
        if crowded:
            logging.getLogger("distbelief.up").warning(crowded)
    steps = kw["steps"] or int((kw["epochs"] or 1.0) * (len(train_set) // (batch_size * replicas)))
    start = int(average_from * steps * replicas / kw["push_every"])  # shard versions
    work_args = _flags(
        kw,
        "fetch_every",
        "push_every",
        "wire_dtype",
        "wire_parts",
        "steps",
        "epochs",
        "warm_start",
        "data_order",
    )
    work_args += ["--batch-size", str(batch_size), "--overlap" if kw["overlap"] else "--no-overlap"]
    work_args += ["--shared-memory" if kw["shared_memory"] else "--no-shared-memory"]
    work_args += input_flags(kw)
    cfg = UpConfig(
        shards=shards,
        cpu=cpu,
        gpu=gpu,
        data=data,
        image_size=image_size,
        model=model,
        num_classes=num_classes or train_set.num_classes,
        seed=seed,
        run_dir=run_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")),
        serve_args=tuple(serve_args),
        work_args=tuple(work_args),
        live=not as_json,
        average_args=("--start", str(start)),
        curve=curve,
        ipc=ipc,
    )
    try:
        result = run_up(cfg)
    except (RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(result.to_json()))
    else:
        _print_up_summary(result, cfg.run_dir)
    sys.exit(result.exit_code)


def _flags(values: dict, *names: str) -> list[str]:
    out = []
    for name in names:
        if values.get(name) is not None:
            out += ["--" + name.replace("_", "-"), str(values[name])]
    return out


def _print_up_summary(result, run_dir: str) -> None:
    from distbelief.report import replica_table, shard_table, show

    show(replica_table(result.replicas), shard_table(result.shards, result.addresses))
    if result.top1 is not None:
        # the averaged model is the one for inference, as in the GoogLeNet paper; the
        # last iterate of asynchronous training swings from one snapshot to the next
        click.echo(
            f"held-out top-1 {result.averaged_top1:.2%}  top-5 {result.averaged_top5:.2%}  "
            f"(Polyak average of {result.averaged_snapshots} snapshots: the model for inference)"
        )
        click.echo(f"held-out top-1 {result.top1:.2%}  top-5 {result.top5:.2%}  (final weights)")
    elif result.exit_code == 130:
        click.echo("stopped by Ctrl-C; shards wrote their final checkpoints if they had a folder")
    else:
        click.echo(f"the replicas failed (exit {result.exit_code}); see {run_dir}/work.log")
    click.echo(f"finished in {result.seconds:.0f} s; logs, status and summary.json in {run_dir}")
    click.echo("metrics (while running): " + ", ".join(result.metrics))
