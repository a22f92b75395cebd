"""Logging set-up: every line names the process's role and index (``shard[1]``)."""

from __future__ import annotations

import logging
import sys


def setup_logging(role: str, index: int | None = None, *, level: int = logging.INFO) -> None:
    """Route ``logging`` to stderr with the role and index in every line.

    Call once per process (each shard, replica and averager is its own process).
    """
    tag = role if index is None else f"{role}[{index}]"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s {tag} %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
