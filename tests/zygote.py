"""A fork server for the `distbelief` processes the tests start.

A fresh ``python -m distbelief`` spends 2 to 3 CPU-seconds importing torch and the
project before it does anything, and the suite starts a few hundred of them on 2 cores.
This server imports all of it once; each process a test asks for is then forked from
it and runs the same command function ``python -m distbelief`` runs (``cli.main``),
in a session of its own, with the test's environment, working folder and log file, and
exits with the code that command would exit with. The processes are as real as
before: own pid, own sockets, signals and ``kill -9`` work as on any process. What
differs is only the interpreter's start, which the packaging tests still run for real.

The test process talks to the server over a Unix socket, one JSON object a line:
``{"op": "spawn", "argv": [...], "env": {...}, "cwd": ..., "log": ...}`` (and
optionally ``"stdout"``: a file for stdout apart from the log) answers
``{"pid": n}``; ``{"op": "status", "pid": n}`` answers ``{"returncode": code or null}``
(the server is the children's parent: it reaps them and keeps their exit codes).
The server ends when the test process closes the connection; its children, each in
its own session, are stopped by the tests as before.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import random
import select
import socket
import sys
import traceback

from distbelief.supervise import reap, run_as_process

# what `python -m distbelief` and its commands import, loaded once here
PRELOAD = (
    "torch",
    "numpy",
    "zmq",
    "msgpack",
    "safetensors.torch",
    "prometheus_client",
    "rich.console",
    "click",
    "distbelief.cli",
    "distbelief.client",
    "distbelief.data",
    "distbelief.loader",
    "distbelief.launcher",
    "distbelief.train",
    "distbelief.evaluation",
    "distbelief.report",
    "distbelief.models",
    "distbelief.server.shard",
    "distbelief.server.supervisor",
    "distbelief.server.averager",
    "distbelief.workers.replica",
    "distbelief.workers.supervisor",
)
# variables read once at import or at the first parallel op: a process asked for with
# one of these set differently from the server's own start is not forked from it
IMPORT_TIME_ENV = ("OMP_", "MKL_", "KMP_", "GOMP_", "PYTHON", "LD_", "TORCH_", "CUDA_")
REAP_EVERY_S = 0.05


def forkable(env: dict[str, str]) -> bool:
    """Whether a process with environment ``env`` behaves the same forked from this
    server as started fresh (nothing that is read at import time differs)."""
    names = {n for n in (*env, *os.environ) if n.startswith(IMPORT_TIME_ENV)}
    return all(env.get(n) == os.environ.get(n) for n in names)


def run_command(argv: list[str]) -> int:
    """Run ``distbelief argv`` as ``python -m distbelief`` would, and return the exit
    code an interpreter would give it (non-daemon threads joined, atexit run)."""
    from distbelief.cli import cli

    return run_as_process(lambda: cli.main(args=argv, prog_name="distbelief"), exit_functions=True)


def spawn(request: dict, listening: socket.socket, conn: socket.socket) -> int:
    """Fork a child that runs the requested command; return its pid (in the server)."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        listening.close()
        conn.close()
        os.setsid()
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        out = log
        if request.get("stdout"):  # stdout to a file of its own, stderr to the log
            out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(log, 2)
        for fd in {log, out, null}:
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        random.seed()
        sys.argv = [MAIN, *request["argv"]]
        code = run_command(request["argv"])
    except BaseException:  # noqa: BLE001 - the child's set-up failed: say why in its log
        traceback.print_exc()
    finally:
        os._exit(code)


def serve(path: str) -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(path)
    listening.listen(1)
    conn, _ = listening.accept()
    exited: dict[int, int] = {}
    pending = b""
    while True:
        reap(exited)
        readable, _, _ = select.select([conn], [], [], REAP_EVERY_S)
        if not readable:
            continue
        data = conn.recv(65536)
        if not data:
            return
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            if request["op"] == "spawn":
                pid = spawn(request, listening, conn)
                exited.pop(pid, None)
                reply = {"pid": pid}
            else:
                reap(exited)
                reply = {"returncode": exited.get(request["pid"])}
            conn.sendall(json.dumps(reply).encode() + b"\n")


MAIN = str(importlib.util.find_spec("distbelief.__main__").origin)  # type: ignore[union-attr]

if __name__ == "__main__":
    serve(sys.argv[1])
