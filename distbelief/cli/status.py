"""``distbelief status``: the shards' stats as a table, JSON or a live display."""

from __future__ import annotations

import sys

import click

from distbelief.cli.options import curve_option, servers_option, split_servers
from distbelief.config import config_option, option


@click.command()
@config_option("status")
@servers_option
@option("--watch", is_flag=True, help="Refresh every --interval-s seconds until Ctrl-C.")
@option("--interval-s", type=click.FloatRange(min=0.2), default=2.0)
@option("--timeout-s", type=click.FloatRange(min=0, min_open=True), default=2.0)
@option("--json", "as_json", is_flag=True, help="Print the shards' stats as JSON.")
@option(
    "--status-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Also show the replicas (and stages) whose status files `work --status-dir` writes there.",
)
@curve_option(server=False)
def status(servers, watch, interval_s, timeout_s, as_json, curve, status_dir) -> None:
    """Show every shard's version, throughput, epoch, learning rate and staleness; with
    --status-dir, every replica's progress and each stage of a split one."""
    import json
    import time

    from rich.console import Group
    from rich.live import Live

    from distbelief.client import probe_stats
    from distbelief.report import shard_table, show

    addresses = list(split_servers(servers))

    def tables():
        stats = probe_stats(addresses, timeout_s, curve)
        return stats, [shard_table(stats, addresses), *replica_tables(status_dir)]

    if as_json:
        click.echo(json.dumps(probe_stats(addresses, timeout_s, curve)))
        return
    if not watch:
        stats, shown = tables()
        show(*shown)
        for i, s in enumerate(stats):
            if s is None:
                click.echo(f"shard {i} at {addresses[i]} did not answer in {timeout_s:g} s")
        sys.exit(0 if all(s is not None for s in stats) else 1)
    try:
        with Live(Group(*tables()[1])) as live:
            while True:
                time.sleep(interval_s)
                live.update(Group(*tables()[1]))
    except KeyboardInterrupt:
        pass


def replica_tables(status_dir: str | None) -> list:
    """The replica and stage tables of the status files in ``status_dir`` (none: [])."""
    if status_dir is None:
        return []
    from pathlib import Path

    from distbelief.report import replica_table, stage_table
    from distbelief.workers.supervisor import read_status

    paths = sorted(Path(status_dir).glob("replica-*.json"), key=lambda p: int(p.stem[8:]))
    statuses = [read_status(str(p)) for p in paths]
    return [t for t in (replica_table(statuses), stage_table(statuses)) if t is not None]
