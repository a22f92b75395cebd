"""Tables people read: replicas, shards, and the end-of-run summary (rich)."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table


def _num(value: Any, fmt: str = "{:,.0f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def _share(part: Any, whole: Any) -> str:
    if part is None or not whole:
        return "-"
    return f"{part / whole:.1%}"


def replica_table(statuses: list[dict[str, Any]], *, title: str = "replicas") -> Table:
    """One row per replica: steps, images, images/s, loss, staleness, the share of its
    time spent waiting for data, retries, restarts."""
    table = Table(title=title, title_justify="left")
    for col in (
        "replica",
        "device",
        "step",
        "images",
        "images/s",
        "loss",
        "staleness",
        "data wait",
        "retries",
        "restarts",
    ):
        table.add_column(col, justify="left" if col in ("replica", "device") else "right")
    for i, s in enumerate(statuses):
        if not s:
            table.add_row(str(i), "-", "no status", *["-"] * 7)
            continue
        step = f"{s.get('step', 0)}/{s.get('total_steps', 0)}"
        table.add_row(
            str(s.get("index", i)),
            s.get("device", "-"),
            step,
            _num(s.get("examples")),
            _num(s.get("images_per_s"), "{:.1f}"),
            _num(s.get("loss"), "{:.4f}"),
            _num(s.get("staleness"), "{:.1f}"),
            _share(s.get("data_wait_s"), s.get("seconds")),
            _num(s.get("retries")),
            _num(s.get("restarts")),
        )
    return table


def shard_table(stats: list[dict[str, Any] | None], addresses: list[str]) -> Table:
    """One row per shard; a shard that did not answer gets a row saying so."""
    table = Table(title="shards", title_justify="left")
    for col in (
        "shard",
        "address",
        "version",
        "updates/s",
        "examples",
        "epoch",
        "lr",
        "staleness p50/p95",
        "policy (momentum)",
        "replicas",
    ):
        table.add_column(col, justify="left" if col in ("shard", "address") else "right")
    for i, (s, address) in enumerate(zip(stats, addresses, strict=True)):
        if s is None:
            table.add_row(str(i), address, "[red]no answer[/red]", *["-"] * 7)
            continue
        table.add_row(
            str(i),
            address,
            _num(s["version"]),
            _num(s["updates_per_s"], "{:.1f}"),
            _num(s["examples"]),
            _num(s["epoch"], "{:.2f}"),
            _num(s["lr"], "{:.4g}"),
            f"{s['staleness_p50']:.0f}/{s['staleness_p95']:.0f}",
            _policy(s),
            _num(s["workers_recent"]),
        )
    dispatch = stats[0].get("dispatch") if stats and stats[0] else None
    if dispatch:
        table.caption = dispatch_line(dispatch)
        table.caption_justify = "left"
    return table


def dispatch_line(d: dict[str, Any]) -> str:
    """Shard 0's data dispatcher in one line: where the data are and what was re-issued."""
    line = (
        f"data: epoch {d['epoch']}, {d['epoch_progress']:.0%} applied; "
        f"{d['replicas']} replica(s) holding chunks; chunks handed {d['handed']}, "
        f"done {d['done']}, re-issued {d['reissued']}"
    )
    if d["retrained"]:
        line += f"; {d['retrained']} examples trained twice"
    return line


def _policy(stats: dict[str, Any]) -> str:
    """The staleness policy in force and the momentum the last push was applied with."""
    policy = stats.get("staleness_policy", "-")
    momentum = stats.get("effective_momentum")
    return policy if momentum is None else f"{policy} ({momentum:.2f})"


def stage_table(statuses: list[dict[str, Any]], *, title: str = "stages") -> Table | None:
    """One row per stage of each split replica (``work --stages``): its blocks, the
    parameters it holds, its share of the time computing and waiting at its cuts, the
    megabytes over its cuts, its pushes. None when no replica is split."""
    rows = [(s.get("index", i), r, s) for i, s in enumerate(statuses) for r in s.get("stages", [])]
    if not rows:
        return None
    table = Table(title=title, title_justify="left")
    for col in (
        "replica",
        "stage",
        "blocks",
        "parameters",
        "computing",
        "waiting",
        "cut MB",
        "pushes",
    ):
        table.add_column(col, justify="left" if col == "blocks" else "right")
    for index, r, s in rows:
        seconds = s.get("seconds")
        megabytes = (r.get("sent_bytes", 0) + r.get("received_bytes", 0)) / 1e6
        table.add_row(
            str(index),
            str(r["stage"]),
            r.get("blocks", "-"),
            _num(r.get("parameters")),
            _share(r.get("compute_s"), seconds),
            _share(r.get("wait_s"), seconds),
            _num(megabytes, "{:,.1f}"),
            _num(r.get("pushes")),
        )
    return table


def show(*renderables: Any, stderr: bool = False) -> None:
    console = Console(stderr=stderr)
    if not console.is_terminal:  # logs and pipes: wide enough that no column is cut
        console = Console(stderr=stderr, width=160)
    for r in renderables:
        if r is not None:
            console.print(r)
