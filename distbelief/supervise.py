"""Run several child processes, restart crashed ones, stop them all on a signal.

Used by ``distbelief serve --shards N`` and ``distbelief work``. Children are forked
from a fork server: a copy of the supervisor forked while it still has one thread and
before it starts any child (its children, their arguments and torch already loaded),
which forks each child on request and tells the supervisor their exit codes. So no
child inherits the supervisor's threads, sockets or ZeroMQ state, no child pays for
``import torch`` again, and neither does the server (the ``forkserver`` start method
of ``multiprocessing``, used before, started a fresh interpreter that imported torch
once more: about 2.5 CPU-s a supervisor). The children's arguments never cross a
socket: the server holds them from the fork, a request names the child by its
index. A child that exits with ``CONFIG_ERROR`` is not restarted: its settings would
fail again.

With a metrics port the supervisor serves its own ``/metrics`` (role ``supervisor``):
how many children it runs, which are up, and how often each was restarted.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
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
WAIT_POLL_S = 0.02


@dataclass
class Child:
    name: str
    target: Callable[..., Any]
    args: tuple
    process: Any = None
    restarts: int = 0
    exit_functions: bool = False  # run atexit at its end: a command as an interpreter runs it


def run_as_process(main: Callable[[], Any], *, exit_functions: bool) -> int:
    """Run ``main`` as the body of a process and return the exit code an interpreter
    would give it: 0, the code of a ``SystemExit`` (its message printed when it is
    not a number), or 1 after printing the traceback of any other exception. Then, as
    an interpreter at exit, non-daemon threads are joined, the ``atexit`` functions run
    when ``exit_functions`` (not in a supervisor's child, which like a
    ``multiprocessing`` child must not run the ones it inherited), and the streams are
    flushed."""
    try:
        main()
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - what an interpreter prints and exits 1 for
        traceback.print_exc()
        code = 1
    threading._shutdown()  # type: ignore[attr-defined]  # as the interpreter does at exit
    if exit_functions:
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    return code


def reap(exited: dict[int, int]) -> None:
    """Collect the children of this process that ended, and their exit codes as
    ``subprocess`` and ``multiprocessing`` give them (minus the signal that killed one)."""
    with contextlib.suppress(ChildProcessError):
        while (found := os.waitpid(-1, os.WNOHANG))[0]:
            exited[found[0]] = os.waitstatus_to_exitcode(found[1])


def ask(sock: socket.socket, request: dict, ended: str) -> dict:
    """Send ``request`` as one JSON line on ``sock`` and return the JSON line answered;
    ``RuntimeError(ended)`` when the other side has closed."""
    sock.sendall(json.dumps(request).encode() + b"\n")
    reply = b""
    while not reply.endswith(b"\n"):
        data = sock.recv(65536)
        if not data:
            raise RuntimeError(ended)
        reply += data
    return json.loads(reply)


class ForkServer:
    """A copy of this process that forks its children on request.

    Forked at construction, which must come before this process starts a thread or
    initialises CUDA (a fork copies only the calling thread: a lock another thread held
    would stay locked in the copy). It then holds everything a child needs (the
    ``children``' targets and arguments, the modules this process imported) and talks
    over a socket pair, one JSON object a line: ``{"start": i}`` forks ``children[i]``
    and answers ``{"pid": n}``; ``{"status": n}`` answers ``{"exitcode": code or
    null}``. It ignores SIGINT and SIGTERM (the supervisor decides when its children
    stop) and ends when the supervisor closes its end or dies.
    """

    def __init__(self, children: list[Child]) -> None:
        if threading.active_count() > 1:
            raise RuntimeError("a fork server must be forked before any thread starts")
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            raise RuntimeError("a fork server must be forked before CUDA is initialised")
        self.names = [c.name for c in children]
        self.sock, theirs = socket.socketpair()
        self.lock = threading.Lock()
        for stream in (sys.stdout, sys.stderr):  # nothing buffered is written twice
            stream.flush()
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                self.sock.close()
                code = _serve_forks(theirs, children)
            finally:
                os._exit(code)
        theirs.close()

    def _ask(self, request: dict) -> dict:
        with self.lock:
            return ask(self.sock, request, "the supervisor's fork server ended")

    def start(self, index: int) -> ForkedChild:
        pid = self._ask({"start": index})["pid"]
        return ForkedChild(self, pid, [self.names[index]])

    def exitcode(self, pid: int) -> int | None:
        return self._ask({"status": pid})["exitcode"]

    def close(self) -> None:
        """End the server (children still running go on, as orphans) and reap it."""
        self.sock.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


class ForkedChild:
    """What ``subprocess.Popen`` offers of a process (``poll``, ``wait``, signals,
    ``returncode``), for one a fork server forked: ``server.exitcode(pid)`` tells its
    exit code, since the server, not this process, is its parent."""

    def __init__(self, server: Any, pid: int, args: list[str] | None = None) -> None:
        self.server, self.pid, self.args = server, pid, args or [str(pid)]
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.exitcode(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(WAIT_POLL_S)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _serve_forks(sock: socket.socket, children: list[Child]) -> int:
    """The fork server's loop (in the forked copy); returns when the supervisor is gone."""
    null = os.open(os.devnull, os.O_RDONLY)  # no child reads the supervisor's terminal
    os.dup2(null, 0)
    os.close(null)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    exited: dict[int, int] = {}
    pending = b""
    while True:
        data = sock.recv(4096)
        if not data:
            return 0
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            if "start" in request:
                pid = os.fork()
                if pid == 0:
                    code = 1
                    try:
                        sock.close()
                        # the handlers of a fresh interpreter
                        signal.signal(signal.SIGINT, signal.default_int_handler)
                        signal.signal(signal.SIGTERM, signal.SIG_DFL)
                        child = children[request["start"]]
                        code = run_as_process(
                            lambda c=child: c.target(*c.args), exit_functions=child.exit_functions
                        )
                    finally:
                        os._exit(code)
                reply = {"pid": pid}
            else:
                reap(exited)
                reply = {"exitcode": exited.get(request["status"])}
            sock.sendall(json.dumps(reply).encode() + b"\n")


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
        self.stopping = False
        self.metrics = SupervisorMetrics(new_registry("supervisor"))
        self.metrics.children.set(len(children))
        for child in children:
            self.metrics.child_up.labels(child=child.name).set(0)
            self.metrics.restarts.labels(child=child.name)  # shows at zero from the start
        # before the metrics server's thread starts: the fork copies one thread only
        self.server = ForkServer(children)
        try:  # raises MetricsPortError before any child starts when the port is taken
            serve_metrics(self.metrics.registry, metrics_port, metrics_bind)
        except BaseException:
            self.server.close()
            raise

    def stop(self, *_: Any) -> None:
        self.stopping = True

    def run(self) -> int:
        """Run until every child has exited cleanly, a signal arrives, or one fails for good.

        Returns the process exit status: 0 when all children exited with 0 or were
        stopped by a signal to the supervisor, 1 when one failed after its restarts.
        """
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        try:
            return self._watch()
        finally:
            self.server.close()

    def _watch(self) -> int:
        for child in self.children:
            self._start(child)
        status = 0
        while not self.stopping:
            alive = False
            for child in self.children:
                code = child.process.poll()
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
        child.process = self.server.start(self.children.index(child))
        self.metrics.child_up.labels(child=child.name).set(1)
        log.info("started %s (pid %d)", child.name, child.process.pid)

    def terminate(self) -> None:
        """SIGTERM every live child, wait up to STOP_GRACE_S, then SIGKILL what is left."""
        for child in self.children:
            if child.process is not None:
                child.process.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for child in self.children:
            if child.process is None:
                continue
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %g s; killing it", child.name, STOP_GRACE_S)
                child.process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.process.wait(5)
