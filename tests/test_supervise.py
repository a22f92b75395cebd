"""The supervisors' fork server (distbelief/supervise.py), in a fresh interpreter.

The server must be forked while its process has one thread, which a pytest worker
(execnet's threads) does not: each scenario runs in ``python -c`` and prints JSON.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from distbelief.supervise import CONFIG_ERROR, Child, ForkServer, Supervisor

ROOT = Path(__file__).resolve().parents[1]


def exits_with(code: int) -> None:
    sys.exit(code)


def raises() -> None:
    raise ValueError("this child failed")


def killed() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def reports(path: str) -> None:
    """Write what this child sees of its process: threads, stdin, its signal handlers."""
    Path(path).write_text(
        json.dumps(
            {
                "threads": threading.active_count(),
                "stdin": sys.stdin.read(),
                "sigterm_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
                "ppid": os.getppid(),
            }
        )
    )


def fails_once(marker: str) -> None:
    """Exit 3 the first time (leaving ``marker``), 0 after a restart."""
    if not os.path.exists(marker):
        Path(marker).write_text("crashed")
        sys.exit(3)


def server_scenario(folder: str) -> None:
    report = os.path.join(folder, "report.json")
    children = [
        Child("ok", exits_with, (0,)),
        Child("config", exits_with, (CONFIG_ERROR,)),
        Child("raises", raises, ()),
        Child("killed", killed, ()),
        Child("reports", reports, (report,)),
    ]
    server = ForkServer(children)
    started = threading.Event()
    threading.Thread(target=started.wait, daemon=True).start()  # a thread after the fork
    try:
        ForkServer(children)
        refused = ""
    except RuntimeError as exc:
        refused = str(exc)
    processes = [server.start(i) for i in range(len(children))]
    codes = [p.wait(30) for p in processes]
    started.set()
    server.close()
    print(json.dumps({"codes": codes, "refused": refused, "server": server.pid,
                      "report": json.loads(Path(report).read_text())}))  # fmt: skip


def supervisor_scenario(folder: str) -> None:
    children = [
        Child("steady", exits_with, (0,)),
        Child("flaky", fails_once, (os.path.join(folder, "marker"),)),
    ]
    supervisor = Supervisor(children, max_restarts=1)
    code = supervisor.run()
    restarts = [c.restarts for c in children]
    print(json.dumps({"code": code, "restarts": restarts, "server": supervisor.server.pid}))


def run_scenario(name: str, folder: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", f"import tests.test_supervise as t; t.{name}({str(folder)!r})"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "stderr": done.stderr}


def gone(pid: int) -> bool:
    """Whether ``pid`` no longer runs (the server was reaped, not left behind)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_children_exit_as_processes_do_and_inherit_no_thread(tmp_path):
    out = run_scenario("server_scenario", tmp_path)
    # 0, a SystemExit's code, 1 after an exception, minus the signal that killed one
    assert out["codes"] == [0, CONFIG_ERROR, 1, -signal.SIGKILL, 0], out
    assert "ValueError: this child failed" in out["stderr"]
    assert "before any thread starts" in out["refused"]
    report = out["report"]
    assert report["threads"] == 1 and report["stdin"] == "" and report["sigterm_default"]
    assert report["ppid"] == out["server"]  # forked by the server, not by the supervisor
    assert gone(out["server"])


def test_a_child_that_fails_is_restarted_from_the_same_server(tmp_path):
    out = run_scenario("supervisor_scenario", tmp_path)
    assert out["code"] == 0 and out["restarts"] == [0, 1], out
    assert "flaky exited with 3; restart 1/1" in out["stderr"]
    assert gone(out["server"])
