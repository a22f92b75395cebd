"""The ``distbelief`` command. Each subcommand only turns flags into a config dataclass."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from distbelief import __version__
from distbelief.config import config_option, option
from distbelief.logs import setup_logging

log = logging.getLogger("distbelief.cli")

MODEL_CHOICES = click.Choice(["googlenet"])
RULE_CHOICES = click.Choice(["momentum", "nesterov", "adagrad"])


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="distbelief")
def cli() -> None:
    """Asynchronous parameter-server training of GoogLeNet (DistBelief's Downpour SGD)."""


def model_options(f):
    f = option("--seed", type=int, default=0, help="Seed of the initial weights.")(f)
    f = option(
        "--num-classes",
        type=click.IntRange(min=2),
        default=1000,
        help="Classes of the model's classifier.",
    )(f)
    f = option("--model", type=MODEL_CHOICES, default="googlenet", help="Model to train.")(f)
    return f


RULE_SPECS = [
    ("--rule", dict(type=RULE_CHOICES, default="momentum", help="Update rule.")),
    (
        "--lr",
        dict(
            type=click.FloatRange(min=0, min_open=True),
            default=0.01,
            help="Initial learning rate (lr0).",
        ),
    ),
    (
        "--momentum",
        dict(
            type=click.FloatRange(0, 1, max_open=True),
            default=0.9,
            help="Momentum of momentum and nesterov.",
        ),
    ),
    (
        "--weight-decay",
        dict(
            type=click.FloatRange(min=0),
            default=0.0002,
            help="L2 penalty added to the gradient.",
        ),
    ),
    (
        "--lr-decay",
        dict(
            type=click.FloatRange(0, 1, min_open=True),
            default=0.96,
            help="Factor applied every --lr-decay-epochs.",
        ),
    ),
    (
        "--lr-decay-epochs",
        dict(
            type=click.FloatRange(min=0, min_open=True),
            default=8.0,
            help="Epochs between learning-rate cuts.",
        ),
    ),
    (
        "--lr-warmup-epochs",
        dict(
            type=click.FloatRange(min=0),
            default=0.0,
            help="Raise the learning rate linearly to --lr over these epochs (0: no warm-up).",
        ),
    ),
    (
        "--dataset-size",
        dict(
            type=click.IntRange(min=1),
            default=1_281_167,
            help="Training examples per epoch (drives the schedule; default ImageNet).",
        ),
    ),
]

STALENESS_SPECS = [
    (
        "--staleness-policy",
        dict(
            type=click.Choice(["none", "async-momentum", "lr-scale", "dc-asgd", "gap-aware"]),
            default="none",
            help="How shards adjust a stale push: none (plain Downpour), async-momentum, "
            "lr-scale, dc-asgd or gap-aware (docs/staleness.md).",
        ),
    ),
    (
        "--dc-lambda",
        dict(
            type=click.FloatRange(min=0),
            default=2.0,
            help="DC-ASGD-a's lambda0 (dc-asgd policy).",
        ),
    ),
    (
        "--weight-history",
        dict(
            type=click.IntRange(min=1),
            default=64,
            help="Weight copies a shard keeps for dc-asgd and gap-aware (memory: this many "
            "times the shard's range).",
        ),
    ),
]


def staleness_options(f, **defaults):
    """The staleness-policy flags of serve and up."""
    return _add_options(f, STALENESS_SPECS, defaults)


def staleness_config(kw: dict):
    """Pop the staleness flags from ``kw`` into a StalenessConfig."""
    from distbelief.server.staleness import StalenessConfig

    return StalenessConfig(
        policy=kw.pop("staleness_policy"),
        dc_lambda=kw.pop("dc_lambda"),
        history=kw.pop("weight_history"),
    )


def rule_options(f, **defaults):
    """The update-rule flags; ``defaults`` overrides their defaults (by flag name)."""
    return _add_options(f, RULE_SPECS, defaults)


def _add_options(f, specs, defaults):
    for decl, kw in reversed(specs):
        name = decl.split("/")[0].lstrip("-").replace("-", "_")
        f = option(decl, **(kw | ({"default": defaults[name]} if name in defaults else {})))(f)
    return f


def curve_option(*, server: bool):
    """``--curve DIR``: CURVE authentication and encryption with the keys in DIR; the
    folder is checked up front, so a missing key is a one-line error."""

    def check(ctx, param, value):
        if value is None:
            return None
        from distbelief.curve import Curve, CurveError

        try:
            Curve.load(value, server=False)  # every role is a client of some server
            if server:
                Curve.load(value, server=True)
        except CurveError as exc:
            raise click.BadParameter(str(exc)) from None
        return value

    return option(
        "--curve",
        type=click.Path(file_okay=False),
        default=None,
        callback=check,
        help="Key folder (distbelief keys generate): CURVE auth and encryption.",
    )


@cli.command()
@config_option("serve")
@option(
    "--shards",
    type=click.IntRange(min=1),
    default=None,
    help="Start this many shard processes on this host (ports --port+i).",
)
@option(
    "--shard-index",
    type=click.IntRange(min=0),
    default=None,
    help="Run only shard I of --num-shards (one shard of a multi-host cluster).",
)
@option(
    "--num-shards",
    type=click.IntRange(min=1),
    default=None,
    help="Shards in the whole cluster (with --shard-index).",
)
@option("--bind", default="127.0.0.1", help="Address to listen on (0.0.0.0: every interface).")
@option("--port", type=click.IntRange(1, 65535), default=5570, help="Port of shard 0.")
@option(
    "--ipc-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Also listen on DIR/shard-<i>.sock: workers on this host then connect with "
    "--servers ipc://DIR/shard-0.sock,… (Unix sockets: faster than TCP loopback).",
)
@option(
    "--shared-memory/--no-shared-memory",
    default=True,
    help="Answer workers on this host that offer a /dev/shm segment through it "
    "(work --shared-memory).",
)
@option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=9100,
    help="Metrics port of shard 0 (shard i: +i); 0 turns metrics off.",
)
@option("--metrics-bind", default="127.0.0.1", help="Address of the /metrics endpoints.")
@option(
    "--supervisor-metrics-port",
    type=click.IntRange(0, 65535),
    default=0,
    help="Metrics port of the supervisor of --shards N (0: off).",
)
@model_options
@rule_options
@staleness_options
@option(
    "--checkpoint-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Write checkpoints here (shard-<i>/) and resume from the newest on start.",
)
@option(
    "--checkpoint-every-s",
    type=click.FloatRange(min=0, min_open=True),
    default=600.0,
    help="Seconds between checkpoints (and one at exit).",
)
@option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="torch threads per shard (default: this host's cores / --shards).",
)
@option(
    "--worker-timeout-s",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    help="A worker that has not pushed for this long no longer counts as live.",
)
@curve_option(server=True)
@option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING"]), default="INFO")
def serve(
    shards, shard_index, num_shards, log_level, threads, supervisor_metrics_port, **kw
) -> None:
    """Run parameter shards: --shards N here, or --shard-index I --num-shards N."""
    from distbelief.server.shard import ShardConfig
    from distbelief.server.supervisor import run_shards, shard_process

    if shards is not None and (shard_index is not None or num_shards is not None):
        raise click.UsageError("give either --shards N or --shard-index I --num-shards N")
    if shards is None and (shard_index is None) != (num_shards is None):
        raise click.UsageError("--shard-index and --num-shards go together")
    if shards is None and shard_index is None:
        shards = 1
    from distbelief.tuning import available_cores

    if threads is None and shards:
        threads = max(1, available_cores() // shards)  # the shards of one host share its cores
    kw["threads"] = threads
    if kw["ipc_dir"]:
        try:
            Path(kw["ipc_dir"]).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise click.UsageError(f"--ipc-dir {kw['ipc_dir']}: {exc.strerror}") from None
    try:
        kw["staleness"] = staleness_config(kw)
        if shards is not None:
            configs = [_shard_config(ShardConfig, i, shards, kw) for i in range(shards)]
        else:
            configs = [_shard_config(ShardConfig, shard_index, num_shards, kw)]
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    level = getattr(logging, log_level)
    if len(configs) == 1:
        shard_process(configs[0], level)
    else:
        setup_logging("serve", level=level)
        sys.exit(
            run_shards(
                configs,
                level=level,
                metrics_port=supervisor_metrics_port,
                metrics_bind=kw["metrics_bind"],
            )
        )


def _shard_config(cls, index: int, num_shards: int, kw: dict):
    return cls(
        index=index,
        num_shards=num_shards,
        port=kw["port"] + index,
        metrics_port=kw["metrics_port"] + index if kw["metrics_port"] else 0,
        **{k: v for k, v in kw.items() if k not in ("port", "metrics_port")},
    )


def servers_option(f):
    return option(
        "--servers",
        default="tcp://127.0.0.1:5570",
        help="Comma-separated shard addresses, in shard order.",
    )(f)


def split_servers(value: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in value.split(",") if a.strip())


def data_options(f):
    f = option("--batch-size", type=click.IntRange(min=1), default=32)(f)
    f = option("--image-size", type=click.IntRange(min=32), default=32)(f)
    f = option("--data", default="demo", help="demo, synthetic, or an ImageNet-style folder.")(f)
    return f


DOWNPOUR_SPECS = [
    (
        "--fetch-every",
        dict(type=click.IntRange(min=1), default=1, help="Pull the weights every N steps."),
    ),
    (
        "--push-every",
        dict(
            type=click.IntRange(min=1),
            default=1,
            help="Push the accumulated gradient every N steps.",
        ),
    ),
    (
        "--wire-dtype",
        dict(
            type=click.Choice(["f32", "bf16", "f16"]),
            default="f32",
            help="Element type on the wire (shards keep float32).",
        ),
    ),
    (
        "--overlap/--no-overlap",
        dict(default=False, help="Push and pull in the background."),
    ),
    (
        "--shared-memory/--no-shared-memory",
        dict(
            default=False,
            help="Exchange payloads with shards on this host through /dev/shm (only "
            "headers cross the socket); other shards over the wire.",
        ),
    ),
    (
        "--warm-start",
        dict(
            type=click.FloatRange(0, 1),
            default=0.0,
            help="Share of the first epoch replica 0 trains alone before the others start "
            "(DistBelief's warm start; 0: all at once).",
        ),
    ),
    ("--steps", dict(type=click.IntRange(min=1), default=None, help="Steps per replica.")),
    (
        "--epochs",
        dict(
            type=click.FloatRange(min=0, min_open=True),
            default=None,
            help="Epochs over the data, shared by the replicas.",
        ),
    ),
]


def downpour_options(f, **defaults):
    """The Downpour flags; ``defaults`` overrides their defaults (by flag name)."""
    return _add_options(f, DOWNPOUR_SPECS, defaults)


@cli.command()
@config_option("work")
@servers_option
@option("--gpu", type=click.IntRange(min=1), default=None, help="Replicas on cuda:0..N-1.")
@option("--gpu-ids", default=None, help="Replicas on these GPUs, e.g. 2,3.")
@option("--cpu", type=click.IntRange(min=1), default=None, help="K CPU replicas (default 1).")
@data_options
@downpour_options
@option("--amp", type=click.Choice(["bf16", "f16"]), default=None, help="Autocast on GPU.")
@option("--channels-last/--no-channels-last", default=False)
@model_options
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
    from distbelief.workers.supervisor import DeviceError, plan_devices, run_replicas
    from distbelief.workers.supervisor import threads_per_replica as threads_for

    if sum(x is not None for x in (gpu, gpu_ids, cpu)) > 1:
        raise click.UsageError("give one of --gpu, --gpu-ids, --cpu")
    try:
        devices = plan_devices(gpu=gpu, gpu_ids=gpu_ids, cpu=cpu)
    except DeviceError as exc:
        raise click.ClickException(str(exc)) from None
    from distbelief.data import DataError, load_dataset

    if kw["data"] not in ("demo", "synthetic"):  # generated sets cannot be missing
        try:  # a bad folder is one error here, not a crash and restarts in every replica
            load_dataset(kw["data"], "train", image_size=kw["image_size"])
        except DataError as exc:
            raise click.ClickException(str(exc)) from None
    status_dir = status_dir or tempfile.mkdtemp(prefix="distbelief-work-")
    os.makedirs(status_dir, exist_ok=True)
    threads = threads_for(devices)
    try:
        configs = [
            ReplicaConfig(
                servers=split_servers(servers),
                index=first_replica + i,
                num_replicas=total_replicas or first_replica + len(devices),
                device=device,
                threads=threads if device == "cpu" else 1,
                warm_threads=available_cores() if device == "cpu" else None,
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
        from distbelief.report import replica_table, show

        show(replica_table(summaries))
    sys.exit(code)


@cli.command()
@config_option("train")
@option("--data", default="demo", help="demo, synthetic, or an ImageNet-style folder.")
@option("--image-size", type=click.IntRange(min=32), default=32)
@option("--batch-size", type=click.IntRange(min=1), default=64)
@option("--steps", type=click.IntRange(min=1), default=None)
@option("--epochs", type=click.FloatRange(min=0, min_open=True), default=None)
@model_options
@rule_options
@option("--threads", type=click.IntRange(min=1), default=None, help="torch threads.")
@option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def train(as_json, threads, **kw) -> None:
    """Train in one process with torch.optim.SGD: the reference trainer."""
    import json

    from distbelief.data import DataError
    from distbelief.train import TrainConfig, train_reference

    setup_logging("train")
    kw = {k: v for k, v in kw.items() if k != "rule"}
    try:
        cfg = TrainConfig(threads=threads, **kw)
        result = train_reference(cfg, show_progress=not as_json)
    except (ValueError, DataError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(result.summary()))
    else:
        click.echo(result.describe())


@cli.command()
@config_option("status")
@servers_option
@option("--watch", is_flag=True, help="Refresh every --interval-s seconds until Ctrl-C.")
@option("--interval-s", type=click.FloatRange(min=0.2), default=2.0)
@option("--timeout-s", type=click.FloatRange(min=0, min_open=True), default=2.0)
@option("--json", "as_json", is_flag=True, help="Print the shards' stats as JSON.")
@curve_option(server=False)
def status(servers, watch, interval_s, timeout_s, as_json, curve) -> None:
    """Show every shard's version, throughput, epoch, learning rate and staleness."""
    import json
    import time

    from rich.live import Live

    from distbelief.client import probe_stats
    from distbelief.report import shard_table, show

    addresses = list(split_servers(servers))
    if as_json:
        click.echo(json.dumps(probe_stats(addresses, timeout_s, curve)))
        return
    if not watch:
        stats = probe_stats(addresses, timeout_s, curve)
        show(shard_table(stats, addresses))
        for i, s in enumerate(stats):
            if s is None:
                click.echo(f"shard {i} at {addresses[i]} did not answer in {timeout_s:g} s")
        sys.exit(0 if all(s is not None for s in stats) else 1)
    try:
        with Live(shard_table(probe_stats(addresses, timeout_s, curve), addresses)) as live:
            while True:
                time.sleep(interval_s)
                live.update(shard_table(probe_stats(addresses, timeout_s, curve), addresses))
    except KeyboardInterrupt:
        pass


@cli.command()
@config_option("average")
@servers_option
@option(
    "--mode",
    type=click.Choice(["polyak", "ema"]),
    default="polyak",
    help="polyak: equal-weight mean since --start; ema: exponential moving average.",
)
@option(
    "--decay",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.999,
    help="EMA decay per snapshot.",
)
@option(
    "--start",
    type=click.IntRange(min=0),
    default=0,
    help="Shard version from which snapshots enter the average.",
)
@option(
    "--start-epoch",
    type=click.FloatRange(min=0),
    default=None,
    help="Or: the shards' epoch from which snapshots enter the average.",
)
@option(
    "--every-s",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    help="Seconds between snapshots.",
)
@option("--bind", default="127.0.0.1", help="Address to serve the average on.")
@option("--port", type=click.IntRange(1, 65535), default=5590)
@option("--metrics-port", type=click.IntRange(0, 65535), default=9190)
@option("--metrics-bind", default="127.0.0.1")
@option("--model", type=MODEL_CHOICES, default="googlenet", help="Model to train.")
@option("--num-classes", type=click.IntRange(min=2), default=1000)
@option("--eval-data", default=None, help="demo, synthetic or a folder: evaluate the average.")
@option(
    "--eval-every-s",
    type=click.FloatRange(min=0),
    default=60.0,
    help="Seconds between evaluations (0: never).",
)
@option(
    "--eval-examples",
    type=click.IntRange(min=1),
    default=None,
    help="Evaluate on at most this many held-out examples.",
)
@option("--image-size", type=click.IntRange(min=32), default=32)
@option(
    "--output",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder for averaged.safetensors (resumed from on start).",
)
@option("--checkpoint-every-s", type=click.FloatRange(min=0, min_open=True), default=60.0)
@option(
    "--timeout-s",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    help="Seconds to wait for the shards on each pull.",
)
@curve_option(server=True)
@option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING"]), default="INFO")
def average(servers, log_level, **kw) -> None:
    """Keep the Polyak (or EMA) average of the shards' weights, serve and evaluate it."""
    from distbelief.checkpoint import CheckpointError
    from distbelief.metrics import MetricsPortError
    from distbelief.server.averager import AveragerConfig, run_averager

    setup_logging("averager", level=getattr(logging, log_level))
    try:
        cfg = AveragerConfig(servers=split_servers(servers), **kw)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        run_averager(cfg)
    except (OSError, MetricsPortError, CheckpointError) as exc:
        log.error("%s", exc)
        sys.exit(2)


@cli.command()
@config_option("evaluate")
@click.argument("checkpoint", required=False, type=click.Path(dir_okay=False))
@option("--averager", default=None, help="Evaluate the live average at tcp://host:5590.")
@option("--data", default="demo", help="demo, synthetic, or an ImageNet-style folder.")
@option(
    "--crops",
    type=click.Choice(["1", "10", "144"]),
    default="1",
    help="Test crops per image, softmax averaged (section 7 of the paper).",
)
@option("--image-size", type=click.IntRange(min=32), default=32)
@option("--model", type=MODEL_CHOICES, default="googlenet", help="Model to train.")
@option(
    "--num-classes",
    type=click.IntRange(min=2),
    default=None,
    help="Default: the data set's class count.",
)
@option("--batch-size", type=click.IntRange(min=1), default=64)
@option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@curve_option(server=False)
def evaluate(
    checkpoint, averager, data, crops, image_size, model, num_classes, batch_size, as_json, curve
) -> None:
    """Top-1/top-5 of an exported or averaged model on held-out data."""
    import json

    from distbelief.checkpoint import CheckpointError
    from distbelief.data import DataError
    from distbelief.evaluation import evaluate_model, load_weights

    if (checkpoint is None) == (averager is None):
        raise click.UsageError("give a CHECKPOINT file or --averager tcp://host:port")
    setup_logging("evaluate")
    try:
        result = evaluate_model(
            load_weights(
                checkpoint=checkpoint,
                averager=averager,
                model=model,
                num_classes=num_classes,
                data=data,
                image_size=image_size,
                curve=curve,
            ),
            data=data,
            crops=int(crops),
            image_size=image_size,
            batch_size=batch_size,
            progress=not as_json,
        )
    except (CheckpointError, DataError, ValueError, ConnectionError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(
            f"top-1 {result['top1']:.2%}  top-5 {result['top5']:.2%}  "
            f"({result['examples']} images, {crops} crop(s))"
        )


@cli.group()
def keys() -> None:
    """CurveZMQ keys for --curve (authentication and encryption)."""


@keys.command("generate")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option(
    "--client",
    "clients",
    multiple=True,
    default=("client",),
    show_default=True,
    help="Name of a client key pair to make and admit (repeat for several).",
)
@click.option("--force", is_flag=True, help="Replace existing keys (locks old clients out).")
def keys_generate(directory, clients, force) -> None:
    """Write a server key pair and client key pairs into DIRECTORY."""
    from distbelief.curve import CurveError, generate_keys

    if "client" not in clients:
        clients = ("client", *clients)  # the pair --curve DIR uses on this host
    try:
        written = generate_keys(directory, clients, force=force)
    except CurveError as exc:
        raise click.ClickException(str(exc)) from None
    for path in written:
        click.echo(path)
    click.echo(
        f"servers: --curve {directory} (server.key_secret, clients/*.key); "
        f"clients: --curve with server.key and their own client.key_secret"
    )


# `distbelief up` defaults: the demo, tuned to converge on 2 CPU cores in minutes
DEMO_EPOCHS = 2.75
DEMO_LR = 0.005
# chosen by measurement (bench/RESULTS.md, "staleness")
DEMO_STALENESS_POLICY = "async-momentum"
DEMO_WARM_START = 0.2
DEMO_LR_WARMUP_EPOCHS = 0.0
# the same default as a policy spec of bench.staleness and bench.convergence
DEMO_POLICY_SPEC = DEMO_STALENESS_POLICY + ("+warm" if DEMO_WARM_START else "")


def up_rule_options(f):
    return rule_options(f, dataset_size=None, lr=DEMO_LR, lr_warmup_epochs=DEMO_LR_WARMUP_EPOCHS)


def up_downpour_options(f):
    return downpour_options(f, epochs=DEMO_EPOCHS, shared_memory=True, warm_start=DEMO_WARM_START)


def up_staleness_options(f):
    return staleness_options(f, staleness_policy=DEMO_STALENESS_POLICY)


@cli.command()
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
        train_set = load_dataset(data, "train", image_size=image_size, seed=seed)
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
        *("lr_warmup_epochs", "staleness_policy", "dc_lambda", "weight_history"),
    )
    serve_args += ["--dataset-size", str(kw["dataset_size"] or len(train_set))]
    if checkpoint_dir:
        serve_args += ["--checkpoint-dir", checkpoint_dir]
    replicas = gpu or cpu or 2
    steps = kw["steps"] or int((kw["epochs"] or 1.0) * (len(train_set) // (batch_size * replicas)))
    start = int(average_from * steps * replicas / kw["push_every"])  # shard versions
    work_args = _flags(
        kw, "fetch_every", "push_every", "wire_dtype", "steps", "epochs", "warm_start"
    )
    work_args += ["--batch-size", str(batch_size), "--overlap" if kw["overlap"] else "--no-overlap"]
    work_args += ["--shared-memory" if kw["shared_memory"] else "--no-shared-memory"]
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


def main() -> None:
    cli(prog_name="distbelief")
