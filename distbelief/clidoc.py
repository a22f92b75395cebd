"""The settings tables of docs/settings.md, generated from the CLI itself.

``python -m distbelief.clidoc`` rewrites the part of docs/settings.md between the
``settings:start`` and ``settings:end`` markers (or of the file given as its argument);
a test fails when it is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from distbelief.cli import cli
from distbelief.config import envvar

START, END = "<!-- settings:start -->", "<!-- settings:end -->"
SETTINGS = Path("docs") / "settings.md"


def _default(param: click.Option, ctx: click.Context) -> str:
    """The default as a user sees it: ``on``/``off`` for switches, blank for none (a
    switch whose default depends on other settings, as its help says)."""
    # get_default, not param.default: for a flag without an explicit default click
    # keeps an internal sentinel there (it printed as `Sentinel.UNSET`)
    value = param.get_default(ctx, call=False)
    if param.is_bool_flag and value is not None:
        return "`on`" if value else "`off`"
    if value is None or callable(value):
        return ""
    if isinstance(value, (tuple, list)):
        return f"`{','.join(str(v) for v in value)}`" if value else ""
    return f"`{value}`"


def _commands(
    group: click.Group, prefix: str = "distbelief"
) -> list[tuple[str, click.Command, click.Context]]:
    """Every leaf command, with its full name (groups such as ``keys`` descended into)."""
    out = []
    for name, command in sorted(group.commands.items()):
        full = f"{prefix} {name}"
        if isinstance(command, click.Group):
            out += _commands(command, full)
        else:
            out.append((full, command, click.Context(command, info_name=full)))
    return out


def flags_markdown() -> str:
    """One table per command: flag, environment variable, default, help."""
    out = []
    for full, command, ctx in _commands(cli):
        out.append(f"### `{full}`\n")
        out.append(
            f"`{full} {' '.join(command.collect_usage_pieces(ctx))}`: "
            f"{command.get_short_help_str(limit=200)}\n"
        )
        out.append("| flag | environment | default | meaning |")
        out.append("|---|---|---|---|")
        for p in command.params:
            if not isinstance(p, click.Option) or p.name == "config":
                continue
            flags = " / ".join(f"`{o}`" for o in p.opts + p.secondary_opts)
            env = f"`{envvar(p.opts[0])}`" if p.envvar else ""
            text = (p.help or "").replace("|", "\\|")
            out.append(f"| {flags} | {env} | {_default(p, ctx)} | {text} |")
        out.append("")
    return "\n".join(out)


def update_settings(path: Path = SETTINGS) -> bool:
    """Rewrite the settings section of ``path``; True when it changed."""
    text = path.read_text()
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    new = f"{before}{START}\n{flags_markdown()}\n{END}{after}"
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else SETTINGS
    changed = update_settings(target)
    print(f"{target}: settings updated" if changed else f"{target}: settings already current")
