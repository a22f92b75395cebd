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
