"""The ``distbelief`` command. Each subcommand only turns flags into a config dataclass.

One module per command (``serve``, ``work``, ``train``, ``status``, ``average``,
``evaluate``, ``keys``, ``up``) holds its flags, their conversion to its config and the
command function; ``options`` holds the flags several commands share. This module
only makes the group and adds the commands to it; the commands never import it.
"""

from __future__ import annotations

import click

from distbelief import __version__
from distbelief.cli import average, evaluate, keys, serve, status, train, up, work
from distbelief.cli.options import DOWNPOUR_SPECS, RULE_SPECS, STALENESS_SPECS
from distbelief.cli.up import (
    DEMO_EPOCHS,
    DEMO_JOIN_RAMP_EPOCHS,
    DEMO_LR,
    DEMO_LR_WARMUP_EPOCHS,
    DEMO_POLICY_SPEC,
    DEMO_STALENESS_POLICY,
    DEMO_WARM_START,
)

__all__ = [
    "DEMO_EPOCHS",
    "DEMO_JOIN_RAMP_EPOCHS",
    "DEMO_LR",
    "DEMO_LR_WARMUP_EPOCHS",
    "DEMO_POLICY_SPEC",
    "DEMO_STALENESS_POLICY",
    "DEMO_WARM_START",
    "DOWNPOUR_SPECS",
    "RULE_SPECS",
    "STALENESS_SPECS",
    "cli",
    "main",
]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="distbelief")
def cli() -> None:
    """Asynchronous parameter-server training of GoogLeNet (DistBelief's Downpour SGD)."""


# the order the commands were declared in before cli/ was a package (--help sorts them)
for _command in (
    serve.serve,
    work.work,
    train.train,
    status.status,
    average.average,
    evaluate.evaluate,
    keys.keys,
    up.up,
):
    cli.add_command(_command)
del _command


def main() -> None:
    cli(prog_name="distbelief")
