"""A real Prometheus against a running `distbelief up`: targets, metrics, dashboard, alerts.

One `up` run (2 shards, the averager, 2 CPU replicas, tiny settings) and one
`prometheus` (Debian's package; `make test` installs it) on free loopback ports serve
every test in this module; both are stopped at the end, also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from distbelief import __version__

from .conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
READY_TIMEOUT_S = 40.0  # prometheus opening its TSDB
TRAINING_TIMEOUT_S = 240.0  # `up` importing torch and building GoogLeNet 5 times, on 2 cores
STOP_TIMEOUT_S = 60.0
NAME = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)")
METRIC_IN_QUERY = re.compile(r"\b(distbelief_[a-z0-9_]+)")
# all bounded sets (stage: under the 14 blocks of GoogLeNet; direction: sent, received)
ALLOWED_LABELS = {"reason", "child", "le", "version", "role", "event", "stage", "direction"}


@dataclass
class Stack:
    up: subprocess.Popen
    prometheus: subprocess.Popen
    url: str
    targets: list[dict]
    run_dir: Path
    log_dir: Path

    def query(self, promql: str) -> list[dict]:
        """The result of an instant query; fails the test on a PromQL error."""
        qs = urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{qs}", timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", (promql, body)
        return body["data"]["result"]

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}"
            for p in sorted([*self.log_dir.glob("*.log"), *self.run_dir.glob("*.log")])
        )


def get(url: str, timeout_s: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return r.read().decode()


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail("no `prometheus` binary: `make test` installs Debian's prometheus package")
    return path


def write_config(path: Path, targets_file: Path, alerts: Path) -> None:
    """deploy/prometheus/prometheus.yml, scraping every second from this run's targets."""
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    cfg["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}
    cfg["rule_files"] = [str(alerts)]
    (job,) = cfg["scrape_configs"]
    (sd,) = job["file_sd_configs"]
    sd["files"] = [str(targets_file)]
    path.write_text(yaml.safe_dump(cfg))


def stop(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # said in the summary: it costs the suite a minute
            message = f"{proc.args[:4]} did not stop on signal {sig} in {STOP_TIMEOUT_S:g} s"
            warnings.warn(message, stacklevel=2)
    with contextlib.suppress(ProcessLookupError):  # `up`'s children share its group
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def start_up(run_dir: Path, log_dir: Path) -> subprocess.Popen:
    args = ["up", "--shards", "2", "--cpu", "2", "--steps", "100000", "--batch-size", "8"]
    args += ["--warm-start", "0"]  # both replicas train from the start: this is about scraping
    args += ["--image-size", "32", "--run-dir", str(run_dir), "--json"]
    return subprocess.Popen(
        [sys.executable, "-m", "distbelief", *args],
        stdout=(log_dir / "up.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def start_prometheus(tmp: Path, targets_file: Path, port: int) -> subprocess.Popen:
    config = tmp / "prometheus.yml"
    write_config(config, targets_file, DEPLOY / "prometheus" / "alerts.yml")
    return subprocess.Popen(
        [
            prometheus_binary(),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=(tmp / "prometheus.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for(what: str, check, timeout_s: float, stack: Stack | None = None):
    """Poll ``check()`` until it returns something true; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last_error = None
    while time.monotonic() < deadline:
        if stack is not None and stack.up.poll() is not None:
            pytest.fail(f"`up` exited with {stack.up.returncode}:\n{stack.logs()}")
        try:
            value = check()
            if value:
                return value
        except (OSError, ValueError, urllib.error.URLError) as exc:
            last_error = exc
        time.sleep(1.0)
    detail = stack.logs() if stack is not None else ""
    pytest.fail(f"{what} not seen in {timeout_s:g} s (last error: {last_error})\n{detail}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("prometheus")
    run_dir = tmp / "run"
    up = start_up(run_dir, tmp)
    prometheus = None
    try:
        targets_file = run_dir / "prometheus-targets.json"
        wait_for("the targets file", targets_file.exists, 60)
        port = free_port()
        prometheus = start_prometheus(tmp, targets_file, port)
        url = f"http://127.0.0.1:{port}"
        targets = json.loads(targets_file.read_text())
        s = Stack(up, prometheus, url, targets, run_dir, tmp)
        wait_for("prometheus ready", lambda: "Ready" in get(f"{url}/-/ready"), READY_TIMEOUT_S)
        yield s
    finally:
        if prometheus is not None:
            stop(prometheus, signal.SIGTERM)
        stop(up, signal.SIGINT)  # as Ctrl-C: `up` stops its children cleanly
        # ... within the minute, with Ctrl-C's exit code, even though it may have been
        # started with SIGINT ignored (CI's shell ran pytest as a background job)
        assert up.returncode == 128 + signal.SIGINT, (tmp / "up.log").read_text()[-2000:]


@pytest.fixture(scope="module")
def training(stack: Stack) -> Stack:
    """The stack once every target is up and every replica's examples grow."""

    def healthy():
        up = stack.query("up")
        rates = stack.query("rate(distbelief_worker_examples_total[30s]) > 0")
        return (
            len(up) == len(stack.targets)
            and all(r["value"][1] == "1" for r in up)
            and (len(rates) == 2)
        )

    wait_for("every target up and both replicas training", healthy, TRAINING_TIMEOUT_S, stack)
    return stack


def test_up_lists_every_process_for_file_sd(stack):
    roles = sorted((g["labels"]["role"], g["labels"].get("index", "")) for g in stack.targets)
    assert roles == [
        ("averager", ""),
        ("shard", "0"),
        ("shard", "1"),
        ("supervisor", ""),
        ("supervisor", ""),
        ("worker", "0"),
        ("worker", "1"),
    ]
    assert all(len(g["targets"]) == 1 for g in stack.targets)
    assert len({g["targets"][0] for g in stack.targets}) == 7  # seven distinct endpoints


def test_prometheus_scrapes_every_target_and_sees_training(training):
    up = training.query("up")
    seen = {(r["metric"]["role"], r["metric"].get("index", ""), r["value"][1]) for r in up}
    assert len(up) == 7 and {value for *_, value in seen} == {"1"}
    assert {role for role, *_ in seen} == {"shard", "worker", "averager", "supervisor"}
    rates = training.query("rate(distbelief_worker_examples_total[30s]) > 0")
    assert sorted(r["metric"]["index"] for r in rates) == ["0", "1"]
    assert all(float(r["value"][1]) > 0 for r in rates)
    # the supervisors see their children: 2 shards and 2 replicas running, none restarted
    (children,) = training.query("sum(distbelief_supervisor_child_up)")
    assert children["value"][1] == "4"
    (restarts,) = training.query("sum(distbelief_supervisor_restarts_total)")
    assert restarts["value"][1] == "0"
    (versions,) = training.query("min(distbelief_shard_version)")
    assert float(versions["value"][1]) > 0


def scrape_all(stack: Stack) -> dict[str, str]:
    return {
        g["labels"]["role"] + str(g["labels"]): get(f"http://{g['targets'][0]}/metrics")
        for g in stack.targets
    }


def test_every_endpoint_passes_promtool_and_the_naming_rules(training):
    promtool = shutil.which("promtool")
    assert promtool, "`make test` installs Debian's prometheus package, which has promtool"
    for target in training.targets:
        role = target["labels"]["role"]
        text = get(f"http://{target['targets'][0]}/metrics")
        check = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
        )
        assert check.returncode == 0 and not check.stdout.strip(), (role, check.stdout)
        (info,) = re.findall(r"^distbelief_build_info\{(.*)\} 1\.0$", text, re.M)
        assert sorted(info.split(",")) == [f'role="{role}"', f'version="{__version__}"'], info
        helps = dict(re.findall(r"^# HELP (\S+) (.+)$", text, re.M))
        types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
        assert set(helps) == set(types) and all(h.strip() for h in helps.values())
        for name, kind in types.items():
            assert name.startswith("distbelief_"), name
            if kind == "counter":
                assert name.endswith("_total"), name
            if kind == "histogram":
                assert name.endswith(("_seconds", "_staleness")), name
        labels = set(re.findall(r"[{,]([a-z_]+)=\"", text))
        assert labels <= ALLOWED_LABELS, labels


def dashboard_queries() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "distbelief.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def test_every_dashboard_query_runs_on_metrics_that_exist(training):
    exposed = set()
    for text in scrape_all(training).values():
        exposed |= {NAME.match(line).group(1) for line in text.splitlines() if line[:1].isalpha()}
    queries = dashboard_queries()
    assert len(queries) >= 12
    names = {m for q in queries for m in METRIC_IN_QUERY.findall(q)}
    assert names and names <= exposed, sorted(names - exposed)
    for panel_metric in (
        "distbelief_worker_examples_total",
        "distbelief_worker_loss",
        "distbelief_shard_staleness_bucket",
        "distbelief_shard_learning_rate",
        "distbelief_shard_epoch",
        "distbelief_worker_push_seconds_bucket",
        "distbelief_worker_pull_seconds_bucket",
        "distbelief_shard_version",
        "distbelief_averager_eval_top1",
        "distbelief_shard_last_checkpoint_timestamp_seconds",
        "distbelief_averager_checkpoint_age_seconds",
    ):
        assert panel_metric in names, panel_metric
    for q in queries:  # Grafana's variables, as Grafana would fill them in
        training.query(q.replace("$__rate_interval", "30s").replace("$job", ".*"))
    throughput = training.query(dashboard_queries()[0])
    assert float(throughput[0]["value"][1]) > 0


def test_alert_rules_load_and_evaluate(training):
    with urllib.request.urlopen(f"{training.url}/api/v1/rules", timeout=10) as r:
        groups = json.load(r)["data"]["groups"]
    rules = {rule["name"]: rule for g in groups for rule in g["rules"]}
    assert set(rules) == {
        "DistbeliefShardDown",
        "DistbeliefReplicaNotProgressing",
        "DistbeliefStalenessHigh",
        "DistbeliefLossNotFinite",
        "DistbeliefCheckpointOld",
        "DistbeliefReplicaRestarting",
        "DistbeliefChunksReissued",
    }

    def evaluated():
        rs = json.loads(get(f"{training.url}/api/v1/rules"))["data"]["groups"][0]["rules"]
        return all(r.get("lastEvaluation", "").startswith("20") for r in rs) and rs

    for rule in wait_for("every rule evaluated", evaluated, 30, training):
        assert rule["health"] == "ok", rule
        assert rule["state"] == "inactive", rule  # a healthy run fires nothing
    exposed = " ".join(scrape_all(training).values())
    for rule in rules.values():
        for name in METRIC_IN_QUERY.findall(rule["query"]):
            assert name in exposed, (rule["name"], name)
