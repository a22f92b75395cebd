"""Run several child processes, restart crashed ones, stop them all on a signal.

Used by ``distbelief serve --shards N`` and ``distbelief work``. Children are
started with the ``forkserver`` method: a server process, started once, imports the
children's module (torch included) and forks each child from that clean state, so no
child inherits the supervisor's threads, sockets or ZeroMQ state, and no child pays
for ``import torch`` again (about 1.5 s of CPU each; a restart is as cheap). Their
arguments are plain config dataclasses. A child that exits with ``CONFIG_ERROR`` is
not restarted: its settings would fail again.

With a metrics port the supervisor serves its own ``/metrics`` (role ``supervisor``):
how many children it runs, which are up, and how often each was restarted.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from distbelief.metrics import SupervisorMetrics, new_registry, serve_metrics

log = logging.getLogger(__name__)

POLL_S = 0.5
# a child that exits with this status failed on its settings (a model the shards do not
# hold, a port in use, a bad data folder): starting it again would fail the same way
CONFIG_ERROR = 2
STOP_GRACE_S = 30.0  # a shard writes its final checkpoint before exiting


@dataclass
class Child:
    name: str
    target: Callable[..., Any]
    args: tuple
    process: Any = None
    restarts: int = 0


class Supervisor:
    """Starts children, watches them, restarts up to ``max_restarts`` each."""

    def __init__(
        self,
        children: list[Child],
        *,
        max_restarts: int = 0,
        metrics_port: int = 0,
        metrics_bind: str = "127.0.0.1",
    ) -> None:
        self.children = children
        self.max_restarts = max_restarts
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(sorted({c.target.__module__ for c in children}))
        self.stopping = False
        self.metrics = SupervisorMetrics(new_registry("supervisor"))
        self.metrics.children.set(len(children))
        for child in children:
            self.metrics.child_up.labels(child=child.name).set(0)
            self.metrics.restarts.labels(child=child.name)  # shows at zero from the start
        # raises MetricsPortError before any child starts when the port is taken
        serve_metrics(self.metrics.registry, metrics_port, metrics_bind)

    def stop(self, *_: Any) -> None:
        self.stopping = True

    def run(self) -> int:
        """Run until every child has exited cleanly, a signal arrives, or one fails for good.

        Returns the process exit status: 0 when all children exited with 0 or were
        stopped by a signal to the supervisor, 1 when one failed after its restarts.
        """
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        for child in self.children:
            self._start(child)
        status = 0
        while not self.stopping:
            alive = False
            for child in self.children:
                code = child.process.exitcode
                self.metrics.child_up.labels(child=child.name).set(int(code is None))
                if code is None:
                    alive = True
                elif code != 0:
                    if code != CONFIG_ERROR and child.restarts < self.max_restarts:
                        child.restarts += 1
                        self.metrics.restarts.labels(child=child.name).inc()
                        log.warning(
                            "%s exited with %s; restart %d/%d",
                            child.name,
                            code,
                            child.restarts,
                            self.max_restarts,
                        )
                        self._start(child)
                        alive = True
                    else:
                        log.error("%s exited with %s; stopping everything", child.name, code)
                        status = 1
                        self.stopping = True
            if not alive:
                break
            time.sleep(POLL_S)
        self.terminate()
        return status

    def _start(self, child: Child) -> None:
        child.process = self.ctx.Process(target=child.target, args=child.args, name=child.name)
        child.process.start()
        self.metrics.child_up.labels(child=child.name).set(1)
        log.info("started %s (pid %d)", child.name, child.process.pid)

    def terminate(self) -> None:
        """SIGTERM every live child, wait up to STOP_GRACE_S, then SIGKILL what is left."""
        for child in self.children:
            if child.process is not None and child.process.is_alive():
                child.process.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for child in self.children:
            if child.process is None:
                continue
            child.process.join(max(0.0, deadline - time.monotonic()))
            if child.process.is_alive():
                log.warning("%s did not stop in %g s; killing it", child.name, STOP_GRACE_S)
                child.process.kill()
                child.process.join(5)
