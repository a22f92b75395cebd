"""Settings from three places besides the command line: TOML files and the environment.

Precedence, highest first: command-line flag, ``DISTBELIEF_<NAME>`` environment
variable, the ``--config`` TOML file, the built-in default.

A config file holds top-level keys that apply to every command that has such a
flag, and tables named after commands (``[serve]``, ``[work]``, ``[average]``,
``[up]``, ``[status]``) for keys that apply to one command only. Keys are flag
names with ``-`` or ``_`` (``lr``, ``weight-decay``, ``servers``); a list is accepted
where the flag takes a comma-separated list::

    servers = ["tcp://10.0.0.1:5570", "tcp://10.0.0.2:5571"]
    lr = 0.01

    [serve]
    checkpoint-dir = "/var/lib/distbelief"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

ENV_PREFIX = "DISTBELIEF_"
COMMAND_TABLES = ("serve", "work", "average", "up", "status", "evaluate", "train")


def envvar(name: str) -> str:
    """The environment variable for a flag: ``--weight-decay`` → ``DISTBELIEF_WEIGHT_DECAY``."""
    return ENV_PREFIX + name.lstrip("-").replace("-", "_").upper()


def option(*decls: str, **kwargs: Any):
    """``click.option`` that also reads ``DISTBELIEF_<NAME>`` and shows its default."""
    long_name = next(d for d in decls if d.startswith("--"))
    kwargs.setdefault("show_default", True)
    return click.option(*decls, envvar=envvar(long_name), show_envvar=True, **kwargs)


def read_config(path: str | Path, command: str, known: set[str], every: set[str]) -> dict[str, Any]:
    """The settings in ``path`` that apply to ``command`` whose flags are ``known``.

    ``every`` holds the flag names of all commands: a top-level key that no command
    knows is reported, one that another command knows is left to that command.

    Raises click.BadParameter naming the file and key for unreadable files and
    unknown keys.
    """
    import tomllib  # here, not at the top: `distbelief --help` does not need it

    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{path} is not valid TOML: {exc}") from None
    settings: dict[str, Any] = {}
    for key, value in data.items():
        if key in COMMAND_TABLES:
            if not isinstance(value, dict):
                raise click.BadParameter(f"{path}: [{key}] must be a table")
            if key == command:
                settings.update(_normalise(value, known, every, f"{path} [{key}]", strict=True))
        else:
            settings.update(_normalise({key: value}, known, every, str(path), strict=False))
    return settings


def _normalise(
    table: dict, known: set[str], every: set[str], where: str, *, strict: bool
) -> dict[str, Any]:
    out = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in known:
            if strict or name not in every:
                raise click.BadParameter(f"{where}: unknown setting {key!r}")
            continue
        out[name] = ",".join(map(str, value)) if isinstance(value, list) else value
    return out


def config_option(command: str):
    """The ``--config FILE`` flag: eager, so the file's values become click defaults."""

    def load(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if not value:
            return
        known = {p.name for p in ctx.command.params if p.name}
        root = ctx.find_root().command
        commands = getattr(root, "commands", {}).values()
        every = {p.name for c in commands for p in c.params if p.name} | known
        settings = read_config(value, command, known, every)
        ctx.default_map = {**(ctx.default_map or {}), **settings}

    return click.option(
        "--config",
        type=click.Path(dir_okay=False),
        is_eager=True,
        expose_value=False,
        callback=load,
        envvar=envvar("config"),
        show_envvar=True,
        help="TOML file with settings (flags and DISTBELIEF_* variables override it).",
    )
