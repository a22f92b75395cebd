"""``distbelief serve``: flags to ShardConfig, then one shard or a supervisor of N."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from distbelief.cli.options import (
    curve_option,
    model_options,
    rule_options,
    staleness_config,
    staleness_options,
)
from distbelief.config import config_option, option
from distbelief.logs import setup_logging


@click.command()
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
@option(
    "--chunk-batches",
    type=click.IntRange(min=1),
    default=8,
    help="Shard 0 hands out the data in chunks of this many batches of the asking replica.",
)
@option(
    "--chunk-lease-s",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    help="A chunk whose replica is silent (no push, no request) this long is handed out again.",
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
