"""Progress of long work: a rich bar on a terminal, log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

log = logging.getLogger(__name__)


class StepProgress:
    """Shows step, images/s and loss. Use as a context manager; call ``update`` per step.

    On a terminal (stderr is a TTY) it draws a live bar; elsewhere (CI, pipes, logs)
    it writes one log line every ``log_every`` steps and at the end.
    """

    def __init__(self, label: str, total: int, *, enabled: bool = True, log_every: int = 20):
        self.label = label
        self.total = total
        self.enabled = enabled
        self.log_every = max(1, log_every)
        self.began = time.perf_counter()
        self.bar: Progress | None = None
        self.task = None

    def __enter__(self) -> StepProgress:
        self.began = time.perf_counter()
        if self.enabled and sys.stderr.isatty():
            self.bar = Progress(
                TextColumn(f"[bold]{self.label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=self.total, info="")
        return self

    def update(self, step: int, *, loss: float, examples: int, **extra: Any) -> None:
        elapsed = time.perf_counter() - self.began
        rate = examples / elapsed if elapsed > 0 else 0.0
        info = f"loss {loss:.4f}  {rate:.1f} img/s" + "".join(
            f"  {k} {v}" for k, v in extra.items()
        )
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        elif self.enabled and (step % self.log_every == 0 or step == self.total):
            log.info("%s step %d/%d  %s", self.label, step, self.total, info)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
