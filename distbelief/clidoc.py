"""The settings table in the README, generated from the CLI itself.

``python -m distbelief.clidoc`` rewrites the part of README.md between the
``settings:start`` and ``settings:end`` markers; a test fails when it is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from distbelief.cli import cli
from distbelief.config import envvar

START, END = "<!-- settings:start -->", "<!-- settings:end -->"


def _default(param: click.Parameter) -> str:
    if param.default is None or param.default is False:
        return ""
    return f"`{param.default}`"


def flags_markdown() -> str:
    """One table per command: flag, environment variable, default, help."""
    out = []
    for name, command in sorted(cli.commands.items()):
        out.append(f"### `distbelief {name}`\n")
        out.append("| flag | environment | default | meaning |")
        out.append("|---|---|---|---|")
        for p in command.params:
            if not isinstance(p, click.Option) or p.name == "config":
                continue
            flags = " / ".join(f"`{o}`" for o in p.opts + p.secondary_opts)
            env = f"`{envvar(p.opts[0])}`" if p.envvar else ""
            text = (p.help or "").replace("|", "\\|")
            out.append(f"| {flags} | {env} | {_default(p)} | {text} |")
        out.append("")
    return "\n".join(out)


def update_readme(path: Path) -> bool:
    """Rewrite the settings section of ``path``; True when it changed."""
    text = path.read_text()
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    new = f"{before}{START}\n{flags_markdown()}\n{END}{after}"
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    changed = update_readme(Path(sys.argv[1] if len(sys.argv) > 1 else "README.md"))
    print("README settings updated" if changed else "README settings already current")
