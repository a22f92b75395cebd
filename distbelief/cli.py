"""The ``distbelief`` command. Each subcommand only turns flags into a config dataclass."""

from __future__ import annotations

import logging
import sys

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
    f = option("--num-classes", type=click.IntRange(min=2), default=1000)(f)
    f = option("--model", type=MODEL_CHOICES, default="googlenet")(f)
    return f


def rule_options(f):
    for decl, kw in reversed(
        [
            ("--rule", dict(type=RULE_CHOICES, default="momentum", help="Update rule.")),
            ("--lr", dict(type=click.FloatRange(min=0, min_open=True), default=0.01)),
            ("--momentum", dict(type=click.FloatRange(0, 1, max_open=True), default=0.9)),
            ("--weight-decay", dict(type=click.FloatRange(min=0), default=0.0002)),
            (
                "--lr-decay",
                dict(
                    type=click.FloatRange(0, 1, min_open=True),
                    default=0.96,
                    help="Factor applied every --lr-decay-epochs.",
                ),
            ),
            ("--lr-decay-epochs", dict(type=click.FloatRange(min=0, min_open=True), default=8.0)),
            (
                "--dataset-size",
                dict(
                    type=click.IntRange(min=1),
                    default=1_281_167,
                    help="Training examples per epoch (drives the schedule).",
                ),
            ),
        ]
    ):
        f = option(decl, **kw)(f)
    return f


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
@option("--num-shards", type=click.IntRange(min=1), default=None)
@option("--bind", default="127.0.0.1", help="Address to listen on (0.0.0.0: every interface).")
@option("--port", type=click.IntRange(1, 65535), default=5570, help="Port of shard 0.")
@option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=9100,
    help="Metrics port of shard 0 (shard i: +i); 0 turns metrics off.",
)
@option("--metrics-bind", default="127.0.0.1", help="Address of the /metrics endpoints.")
@model_options
@rule_options
@option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING"]), default="INFO")
def serve(shards, shard_index, num_shards, log_level, **kw) -> None:
    """Run parameter shards: --shards N here, or --shard-index I --num-shards N."""
    from distbelief.server.shard import ShardConfig
    from distbelief.server.supervisor import run_shards, shard_process

    if shards is not None and (shard_index is not None or num_shards is not None):
        raise click.UsageError("give either --shards N or --shard-index I --num-shards N")
    if shards is None and (shard_index is None) != (num_shards is None):
        raise click.UsageError("--shard-index and --num-shards go together")
    if shards is None and shard_index is None:
        shards = 1
    try:
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
        sys.exit(run_shards(configs, level=level))


def _shard_config(cls, index: int, num_shards: int, kw: dict):
    return cls(
        index=index,
        num_shards=num_shards,
        port=kw["port"] + index,
        metrics_port=kw["metrics_port"] + index if kw["metrics_port"] else 0,
        **{k: v for k, v in kw.items() if k not in ("port", "metrics_port")},
    )


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


def main() -> None:
    cli(prog_name="distbelief")
