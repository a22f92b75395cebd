"""``distbelief average``: flags to AveragerConfig, then the averager."""

from __future__ import annotations

import logging
import sys

import click

from distbelief.cli.options import (
    client_model_options,
    curve_option,
    model_from_servers,
    servers_option,
    split_servers,
)
from distbelief.config import config_option, option
from distbelief.logs import setup_logging

log = logging.getLogger("distbelief.cli")


@click.command()
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
@client_model_options
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
    _model_from_output(kw)
    model_from_servers(kw, split_servers(servers))
    try:
        cfg = AveragerConfig(servers=split_servers(servers), **kw)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        run_averager(cfg)
    except (OSError, MetricsPortError, CheckpointError) as exc:
        log.error("%s", exc)
        sys.exit(2)


def _model_from_output(kw: dict) -> None:
    """Fill ``--model``/``--num-classes`` left out with those of the average that
    ``--output`` holds, so that an averager resumes even while the shards are down (the
    header only: the averager checks the whole file when it resumes)."""
    import json
    from pathlib import Path

    from safetensors import SafetensorError, safe_open

    from distbelief.server.averager import CHECKPOINT_NAME

    path = Path(kw["output"]) / CHECKPOINT_NAME if kw["output"] else None
    if path is None or not path.is_file():
        return
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        for key in ("model", "num_classes"):
            if kw[key] is None and key in meta:
                kw[key] = json.loads(meta[key])
    except (OSError, ValueError, SafetensorError) as exc:
        log.warning("cannot read %s (%s); asking the shards for the model", path, exc)
