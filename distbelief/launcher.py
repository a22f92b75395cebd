"""``distbelief up``: shards, averager and replicas on this machine, with a live display.

It is a composition of the real commands: ``distbelief serve --shards S``,
``distbelief average`` and ``distbelief work --cpu K`` (or ``--gpu N``) run as child
processes on free loopback ports, their logs in the run folder. The children are
forked from a copy of this process made before it opens a socket or starts a thread
(``distbelief.supervise.ForkServer``), each running the command as ``python -m
distbelief`` would: torch is imported once for all of them. While they run, the
display shows each replica's status file and each shard's ``stats``. When the
replicas finish, the launcher evaluates on the held-out split both the shards' final
weights and the averager's Polyak average, stops everything (SIGTERM: shards write a
final checkpoint when they have a folder, the averager writes the average) and prints
a summary.

It also writes ``prometheus-targets.json`` in the run folder: every child's metrics
endpoint with ``role`` and ``index`` labels, in the format of Prometheus'
``file_sd_configs`` (``deploy/prometheus/prometheus.yml`` reads it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distbelief.client import ClientConfig, ParameterClient, probe_stats
from distbelief.report import replica_table, shard_table
from distbelief.supervise import Child, ForkedChild, ForkServer

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0  # shards import torch and build the model before they listen
REFRESH_S = 1.0
STOP_TIMEOUT_S = 30.0
TARGETS_FILE = "prometheus-targets.json"


@dataclass(frozen=True, kw_only=True)
class UpConfig:
    shards: int = 2
    cpu: int | None = None
    gpu: int | None = None
    run_dir: str
    serve_args: tuple[str, ...] = ()  # flags passed through to `distbelief serve`
    work_args: tuple[str, ...] = ()  # flags passed through to `distbelief work`
    model: str = "googlenet"
    num_classes: int = 10
    seed: int = 0
    data: str = "demo"
    image_size: int = 32
    live: bool = True
    average_args: tuple[str, ...] = ()  # flags passed through to `distbelief average`
    average_every_s: float = 2.0
    curve: str | None = None  # a key folder: CURVE between every process
    ipc: bool = True  # replicas and averager reach the shards over Unix sockets


@dataclass
class UpResult:
    replicas: list[dict[str, Any]] = field(default_factory=list)
    shards: list[dict[str, Any] | None] = field(default_factory=list)
    top1: float | None = None
    top5: float | None = None
    averaged_top1: float | None = None
    averaged_top5: float | None = None
    averaged_snapshots: int = 0
    seconds: float = 0.0
    exit_code: int = 0
    addresses: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


def free_port_run(count: int, start: int) -> int:
    """The first of ``count`` consecutive free loopback ports at or above ``start``."""
    port = start
    while port + count < 65535:
        ok = True
        for p in range(port, port + count):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    port = p + 1
                    break
        if ok:
            return port
    raise OSError(f"no {count} consecutive free ports at or above {start}")


class Launcher:
    def __init__(self, cfg: UpConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        num_replicas = cfg.gpu or cfg.cpu or 2
        self.num_replicas = num_replicas
        self.taken: set[int] = set()
        self.shard_port = self._ports(cfg.shards, 5570)
        self.shard_metrics = self._ports(cfg.shards, 9100)
        self.work_metrics = self._ports(num_replicas, 9200)
        self.addresses = [f"tcp://127.0.0.1:{self.shard_port + i}" for i in range(cfg.shards)]
        self.average_port = self._ports(1, 5590)
        self.average_metrics = self._ports(1, 9190)
        # the supervisors of `serve --shards S` and `work` serve /metrics too (off by
        # default outside `up`): below the shards' range, 9098 and 9099 when free
        self.serve_supervisor_metrics = self._ports(1, 9098)
        self.work_supervisor_metrics = self._ports(1, 9099)
        self.averager = f"tcp://127.0.0.1:{self.average_port}"
        # the data path (replicas, averager) goes over Unix sockets: no TCP stack, about
        # a quarter less time per model-sized message than loopback TCP here
        # (bench/RESULTS.md); status, tests and operators keep the TCP addresses. A short
        # folder of its own: socket paths are limited to 107 bytes.
        self.ipc_dir = tempfile.mkdtemp(prefix="distbelief-") if cfg.ipc else None
        self.data_addresses = self.addresses
        if self.ipc_dir:
            from distbelief.server.shard import shard_socket_path

            self.data_addresses = [
                f"ipc://{shard_socket_path(self.ipc_dir, i)}" for i in range(cfg.shards)
            ]
        self.server: ForkServer | None = None
        self.serve: ForkedChild | None = None
        self.average: ForkedChild | None = None
        self.work: ForkedChild | None = None

    def _ports(self, count: int, start: int) -> int:
        """The first of ``count`` consecutive free ports from ``start``, none handed out yet."""
        while True:
            base = free_port_run(count, start)
            ports = set(range(base, base + count))
            if not ports & self.taken:
                self.taken |= ports
                return base
            start = base + 1

    @property
    def curve_args(self) -> list[str]:
        return ["--curve", self.cfg.curve] if self.cfg.curve else []

    def start(self) -> None:
        cfg = self.cfg
        model = ["--model", cfg.model, "--num-classes", str(cfg.num_classes)]  # every role's
        serve = [
            "serve",
            "--shards",
            str(cfg.shards),
            "--port",
            str(self.shard_port),
            "--metrics-port",
            str(self.shard_metrics),
            "--supervisor-metrics-port",
            str(self.serve_supervisor_metrics),
            *model,
            "--seed",
            str(cfg.seed),
            *(["--ipc-dir", self.ipc_dir] if self.ipc_dir else []),
            *cfg.serve_args,
            *self.curve_args,
        ]
        average = [
            "average",
            "--servers",
            ",".join(self.data_addresses),
            "--port",
            str(self.average_port),
            "--metrics-port",
            str(self.average_metrics),
            *model,
            "--every-s",
            str(cfg.average_every_s),
            "--eval-every-s",
            "0",
            "--output",
            str(self.run_dir / "averager"),
            *cfg.average_args,
            *self.curve_args,
        ]
        devices = ["--gpu", str(cfg.gpu)] if cfg.gpu else ["--cpu", str(self.num_replicas)]
        work = [
            "work",
            "--servers",
            ",".join(self.data_addresses),
            *devices,
            "--metrics-port",
            str(self.work_metrics),
            "--supervisor-metrics-port",
            str(self.work_supervisor_metrics),
            "--status-dir",
            str(self.run_dir),
            *model,
            "--seed",
            str(cfg.seed),
            "--data",
            cfg.data,
            "--image-size",
            str(cfg.image_size),
            *cfg.work_args,
            *self.curve_args,
        ]
        # the three commands are forked from a copy of this process (torch loaded once),
        # made before this process's first socket or thread (distbelief/supervise.py)
        self.server = ForkServer(
            [
                Child(
                    name,
                    run_command,
                    (argv, str(self.run_dir / f"{name}.log")),
                    exit_functions=True,
                )
                for name, argv in (("serve", serve), ("average", average), ("work", work))
            ]
        )
        self.serve = self.server.start(0)
        self._wait_for_shards()
        self.average = self.server.start(1)
        self.work = self.server.start(2)

    def _wait_for_shards(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.serve.poll() is not None:
                raise RuntimeError(
                    f"the shards exited with {self.serve.returncode}; see {self.run_dir}/serve.log:"
                    f"\n{_tail(self.run_dir / 'serve.log')}"
                )
            if all(s is not None for s in probe_stats(self.addresses, 1.0, self.cfg.curve)):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the shards did not answer in {READY_TIMEOUT_S:g} s")

    def statuses(self) -> list[dict[str, Any]]:
        out = []
        for i in range(self.num_replicas):
            try:
                out.append(json.loads((self.run_dir / f"replica-{i}.json").read_text()))
            except (OSError, ValueError):
                out.append({})
        return out

    def watch(self) -> int:
        """Show progress until the replicas finish; return their exit code."""
        if self.cfg.live and sys.stdout.isatty():
            from rich.console import Group
            from rich.live import Live

            def view():
                return Group(
                    replica_table(self.statuses()),
                    shard_table(probe_stats(self.addresses, 1.0, self.cfg.curve), self.addresses),
                )

            with Live(view(), refresh_per_second=2) as live:
                while self.work.poll() is None:
                    time.sleep(REFRESH_S)
                    live.update(view())
        else:
            last = 0.0
            while self.work.poll() is None:
                time.sleep(REFRESH_S)
                if time.monotonic() - last >= 10:
                    last = time.monotonic()
                    log.info("%s", _one_line(self.statuses()))
        return self.work.returncode

    def final_weights(self, addresses: list[str]):
        """The weights served at ``addresses`` (the shards, or the averager) in a model."""
        import torch

        from distbelief.layout import Layout, flatten_into
        from distbelief.models import build_model

        model = build_model(self.cfg.model, self.cfg.num_classes)
        layout = Layout.of(model, self.cfg.model)
        weights, _ = flatten_into(model, layout)
        with ParameterClient(
            ClientConfig(servers=tuple(addresses), curve=self.cfg.curve), layout
        ) as client:
            client.connect()
            with torch.no_grad():
                (version, *_) = client.pull(weights)
        return model.eval(), version

    def metrics_targets(self) -> list[dict[str, Any]]:
        """Every child's metrics endpoint as Prometheus file_sd target groups."""
        groups = []

        def add(port: int, role: str, **labels: str) -> None:
            groups.append({"targets": [f"127.0.0.1:{port}"], "labels": {"role": role, **labels}})

        for i in range(self.cfg.shards):
            add(self.shard_metrics + i, "shard", index=str(i))
        add(self.average_metrics, "averager")
        for i in range(self.num_replicas):
            add(self.work_metrics + i, "worker", index=str(i))
        if self.cfg.shards > 1:  # `serve --shards 1` runs its shard without a supervisor
            add(self.serve_supervisor_metrics, "supervisor", supervises="shard")
        add(self.work_supervisor_metrics, "supervisor", supervises="worker")
        return groups

    def write_targets(self) -> Path:
        """Write ``prometheus-targets.json`` (file_sd format) into the run folder."""
        path = self.run_dir / TARGETS_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.metrics_targets(), indent=2) + "\n")
        tmp.replace(path)  # Prometheus re-reads the file on change: never show half of it
        return path

    def metrics_urls(self) -> list[str]:
        return [f"http://{g['targets'][0]}/metrics" for g in self.metrics_targets()]

    def stop(self) -> None:
        procs = (self.work, self.average, self.serve)
        for proc in procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            if proc is None:
                continue
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self.server is not None:
            self.server.close()
        if self.ipc_dir:
            shutil.rmtree(self.ipc_dir, ignore_errors=True)


def _one_line(statuses: list[dict[str, Any]]) -> str:
    parts = []
    for s in statuses:
        if s:
            waited = s.get("data_wait_s", 0.0) / s["seconds"] if s.get("seconds") else 0.0
            parts.append(
                f"replica[{s['index']}] step {s['step']}/{s['total_steps']} "
                f"loss {s['loss']:.3f} {s['images_per_s']:.0f} img/s "
                f"staleness {s.get('staleness', 0.0):.1f} data wait {waited:.1%}"
            )
    return "; ".join(parts) or "replicas starting"


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_command(argv: list[str], log: str) -> None:
    """The body of a ``distbelief argv`` process that ``up`` forks: what ``python -m
    distbelief argv`` would do, its output in the file ``log``."""
    from distbelief.cli import cli

    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    sys.argv = [sys.argv[0], *argv]
    cli.main(args=argv, prog_name="distbelief")


def run_up(cfg: UpConfig) -> UpResult:
    """Start everything, watch it, evaluate the result, stop everything."""
    from distbelief.data import evaluate, load_dataset

    began = time.monotonic()
    launcher = Launcher(cfg)
    result = UpResult(addresses=launcher.addresses, metrics=launcher.metrics_urls())
    stopped_by: list[int] = []

    def interrupt(signum: int, _frame: Any) -> None:
        stopped_by.append(signum)
        raise KeyboardInterrupt

    # SIGINT and SIGTERM stop everything cleanly, also when this process was started
    # with SIGINT ignored (a script's background job: the stack of test_prometheus
    # waited a minute for that, 2026-12-04) or is stopped by a process manager's SIGTERM
    # (which used to end `up` alone and leave its children running)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    try:
        targets = launcher.write_targets()
        log.info("Prometheus targets (file_sd) in %s", targets)
        launcher.start()
        log.info("shards on %s; logs and status in %s", ",".join(launcher.addresses), cfg.run_dir)
        try:
            result.exit_code = launcher.watch()
        except KeyboardInterrupt:  # Ctrl-C: the children got SIGINT too and stop cleanly
            log.info("interrupted; stopping every process")
            result.exit_code = 128 + (stopped_by[-1] if stopped_by else signal.SIGINT)
        result.replicas = launcher.statuses()
        result.shards = probe_stats(launcher.addresses, 5.0, cfg.curve)
        if result.exit_code == 0:
            val = load_dataset(cfg.data, "val", image_size=cfg.image_size, seed=cfg.seed)
            scores = evaluate(launcher.final_weights(launcher.addresses)[0], val, crops=1)
            result.top1, result.top5 = scores["top1"], scores["top5"]
            time.sleep(cfg.average_every_s + 0.5)  # let the averager take the final iterate
            averaged, result.averaged_snapshots = launcher.final_weights([launcher.averager])
            scores = evaluate(averaged, val, crops=1)
            result.averaged_top1, result.averaged_top5 = scores["top1"], scores["top5"]
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second one must not cut the stop short
            signal.signal(sig, signal.SIG_IGN)
        launcher.stop()
    result.seconds = time.monotonic() - began
    (Path(cfg.run_dir) / "summary.json").write_text(json.dumps(result.to_json(), indent=2))
    return result
