"""deploy/: Dockerfile, compose, Kubernetes, Slurm, Prometheus and Grafana files.

No Docker engine, cluster or Slurm here: the files are parsed, their required fields
checked, and every `distbelief` command line in them goes through the CLI's own click
parser (without running it), so a misspelt flag or a bad value fails the test.
Shell-built command lines (the shard StatefulSet, the sbatch script) are run by the
shell against a stub `distbelief` that records its arguments.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import click
import pytest
import yaml

from distbelief.cli import cli
from distbelief.config import read_config
from distbelief.curve import generate_keys
from distbelief.data import DEMO_TRAIN_SIZE

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CONFIG_IN_POD = "/etc/distbelief/cluster.toml"


def parse(args: list[str], env: dict[str, str] | None = None) -> click.Context:
    """Parse ``distbelief ARGS`` as the CLI would, without running the command."""
    assert args and args[0] in cli.commands, f"not a distbelief command: {args}"
    saved = {k: v for k, v in os.environ.items() if k.startswith("DISTBELIEF_")}
    for k in saved:
        del os.environ[k]
    os.environ.update(env or {})
    try:
        root = click.Context(cli, info_name="distbelief")
        return cli.commands[args[0]].make_context(args[0], list(args[1:]), parent=root)
    finally:
        for k in [k for k in os.environ if k.startswith("DISTBELIEF_")]:
            del os.environ[k]
        os.environ.update(saved)


def test_the_parser_refuses_what_the_cli_refuses():
    assert parse(["serve", "--shard-index", "1", "--num-shards", "2"]).params["shard_index"] == 1
    with pytest.raises(click.NoSuchOption):
        parse(["serve", "--shard-idx", "1"])
    with pytest.raises(click.BadParameter):
        parse(["work", "--wire-dtype", "f64"])
    with pytest.raises(click.BadParameter):
        parse(["work", "--cpu", "1"], env={"DISTBELIEF_BATCH_SIZE": "zero"})


def stub_distbelief(tmp_path: Path) -> tuple[Path, Path]:
    """A folder holding a `distbelief` that records each call, and the record folder."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    calls.mkdir()
    stub = bin_dir / "distbelief"
    stub.write_text(f'#!/bin/bash\ntrap "" TERM\nprintf "%s\\0" "$@" > "$(mktemp -p {calls})"\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    return bin_dir, calls


def recorded(calls: Path) -> list[list[str]]:
    return [p.read_bytes().decode().split("\0")[:-1] for p in sorted(calls.iterdir())]


# -- Docker ----------------------------------------------------------------------------


def test_dockerfile_builds_cpu_or_cuda_from_one_build_arg():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M)
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\} AS base-cpu$", text, re.M)
    assert re.search(r"^FROM \$\{CUDA_IMAGE\} AS base-cuda$", text, re.M)
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+$", text, re.M)
    assert re.search(r"^FROM base-\$\{VARIANT\}$", text, re.M)
    for source in re.findall(r"^COPY (\S+)", text, re.M):  # what it copies exists
        assert (ROOT / source).exists(), source
    for source in re.findall(r"^COPY \S+ (\S+) \./$", text, re.M):
        assert (ROOT / source).exists(), source
    assert 'ENTRYPOINT ["distbelief"]' in text and "USER distbelief" in text


def test_compose_runs_two_shards_averager_two_workers_prometheus_and_grafana():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {
        "shard-0",
        "shard-1",
        "averager",
        "worker-0",
        "worker-1",
        "prometheus",
        "grafana",
    }
    commands = {}
    for name, svc in services.items():
        if not svc.get("image", "").startswith("distbelief"):
            continue
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).exists()
        env = {k: str(v) for k, v in svc.get("environment", {}).items()}
        commands[name] = parse(svc["command"], env).params
    assert [commands[f"shard-{i}"]["shard_index"] for i in range(2)] == [0, 1]
    assert {commands[f"shard-{i}"]["num_shards"] for i in range(2)} == {2}
    assert commands["shard-0"]["metrics_bind"] == "0.0.0.0"  # from the environment
    servers = "tcp://shard-0:5570,tcp://shard-1:5571"  # shard i listens on --port + i
    for name in ("averager", "worker-0", "worker-1"):
        assert commands[name]["servers"] == servers
    # the same command twice: no replica index; shard 0 dispatches the demo set's chunks
    assert commands["worker-0"] == commands["worker-1"]
    assert commands["worker-0"]["total_replicas"] is None
    assert commands["worker-0"]["data_order"] == "auto" and commands["worker-0"]["data"] == "demo"
    assert {commands[f"shard-{i}"]["dataset_size"] for i in range(2)} == {DEMO_TRAIN_SIZE}
    # Prometheus and Grafana get files that exist in deploy/
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            assert (DEPLOY / source).exists(), volume
    prom = yaml.safe_load((DEPLOY / "prometheus" / "compose.yml").read_text())
    targets = {t for c in prom["scrape_configs"][0]["static_configs"] for t in c["targets"]}
    assert {"shard-0:9100", "shard-1:9101", "averager:9190", "worker-0:9200"} <= targets


def test_grafana_provisioning_points_at_the_dashboard_and_its_datasource():
    prov = DEPLOY / "grafana" / "provisioning"
    (source,) = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    (provider,) = yaml.safe_load((prov / "dashboards" / "distbelief.yml").read_text())["providers"]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    dash = json.loads((DEPLOY / "grafana" / "distbelief.json").read_text())
    titles = {p["title"] for p in dash["panels"]}
    assert {
        "Throughput",
        "Training loss",
        "Staleness",
        "Learning rate",
        "Epoch",
        "Push and pull latency",
        "Versions per shard",
        "Averaged-model accuracy",
        "Checkpoint age",
    } <= titles
    assert {p["type"] for p in dash["panels"] if p["title"] == "Staleness"} == {"heatmap"}
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == source["uid"] and panel["targets"]
        assert all(t["expr"].strip() for t in panel["targets"])
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


# -- Prometheus ------------------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("no promtool: `make test` installs Debian's prometheus package")
    return subprocess.run(
        [path, *args], capture_output=True, text=True, timeout=60, cwd=DEPLOY / "prometheus"
    )


def test_prometheus_config_and_alert_rules_pass_promtool(tmp_path):
    run = promtool("check", "config", "prometheus.yml")
    assert run.returncode == 0, run.stdout + run.stderr
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["scrape_configs"][0]["file_sd_configs"][0]["files"] == ["targets/*.json"]
    compose = (DEPLOY / "prometheus" / "compose.yml").read_text()
    alerts = DEPLOY / "prometheus" / "alerts.yml"
    (tmp_path / "compose.yml").write_text(
        compose.replace("/etc/prometheus/alerts.yml", str(alerts))
    )
    run = promtool("check", "config", str(tmp_path / "compose.yml"))
    assert run.returncode == 0, run.stdout + run.stderr
    run = promtool("check", "rules", "alerts.yml")
    assert run.returncode == 0 and "SUCCESS: 7 rules found" in run.stdout, run.stdout
    run = promtool("test", "rules", "alerts_test.yml")  # every alert fires when it should
    assert run.returncode == 0 and "SUCCESS" in run.stdout, run.stdout + run.stderr


# -- Kubernetes ------------------------------------------------------------------------


def k8s_objects() -> list[dict]:
    objects = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], path
            objects.append(doc)
    return objects


def by_kind(kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in k8s_objects() if o["kind"] == kind}


CURVE_IN_POD = "/etc/distbelief-curve"


def cluster_toml(tmp_path: Path) -> Path:
    """The ConfigMap's cluster.toml, with fresh keys standing in for the CURVE Secret."""
    (cm,) = by_kind("ConfigMap").values()
    keys = tmp_path / "curve"
    if not keys.exists():
        generate_keys(keys)
    path = tmp_path / "cluster.toml"
    path.write_text(cm["data"]["cluster.toml"].replace(CURVE_IN_POD, str(keys)))
    return path


def test_every_pod_mounts_the_curve_secret_where_cluster_toml_points(tmp_path):
    (cm,) = by_kind("ConfigMap").values()
    assert f'curve = "{CURVE_IN_POD}"' in cm["data"]["cluster.toml"]
    written = {
        p.relative_to(tmp_path / "curve").as_posix() for p in generate_keys(tmp_path / "curve")
    }
    for obj in [*by_kind("StatefulSet").values(), *by_kind("Deployment").values()]:
        (container,) = containers(obj)
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in obj["spec"]["template"]["spec"]["volumes"]}
        secret = volumes[mounts[CURVE_IN_POD]]["secret"]
        assert secret["secretName"] == "distbelief-curve"
        paths = {item["path"] for item in secret["items"]}
        # what `--curve` reads, on both sides: the same files `keys generate` writes
        assert paths == written


def test_kustomization_lists_every_manifest():
    kustom = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    files = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustom["resources"]) == files


def test_configmap_cluster_toml_reads_for_every_command(tmp_path):
    path = cluster_toml(tmp_path)
    every = {p.name for c in cli.commands.values() for p in c.params if p.name}
    settings = {}
    for command in ("serve", "work", "average"):
        known = {p.name for p in cli.commands[command].params if p.name}
        settings[command] = read_config(path, command, known, every)
    servers = "tcp://distbelief-shard-0.distbelief-shard:5570,"
    servers += "tcp://distbelief-shard-1.distbelief-shard:5570"
    assert settings["work"]["servers"] == settings["average"]["servers"] == servers
    assert settings["serve"]["num_shards"] == 2
    assert settings["serve"]["checkpoint_dir"] == "/checkpoints"
    assert settings["average"]["output"] == "/averager"
    statefulset = by_kind("StatefulSet")["distbelief-shard"]
    assert statefulset["spec"]["replicas"] == settings["serve"]["num_shards"]


def containers(obj: dict) -> list[dict]:
    return obj["spec"]["template"]["spec"]["containers"]


def check_probes(container: dict) -> None:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/metrics" and get["port"] in ports, (container["name"], probe)


def check_selector(obj: dict) -> None:
    labels = obj["spec"]["template"]["metadata"]["labels"]
    assert obj["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert labels["app.kubernetes.io/part-of"] == "distbelief"


def test_shards_are_a_statefulset_with_stable_names_and_a_volume_each(tmp_path):
    statefulset = by_kind("StatefulSet")["distbelief-shard"]
    service = by_kind("Service")[statefulset["spec"]["serviceName"]]
    assert service["spec"]["clusterIP"] == "None"  # headless: distbelief-shard-<i>.<service>
    check_selector(statefulset)
    assert service["spec"]["selector"].items() <= (
        statefulset["spec"]["template"]["metadata"]["labels"].items()
    )
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    (container,) = containers(statefulset)
    check_probes(container)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/checkpoints"
    assert mounts["config"] == str(Path(CONFIG_IN_POD).parent)
    # the command line, as the pod's shell builds it for each shard index
    bin_dir, calls = stub_distbelief(tmp_path)
    config = cluster_toml(tmp_path)
    for index in range(statefulset["spec"]["replicas"]):
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOSTNAME": f"distbelief-shard-{index}"}
        subprocess.run([*container["command"], *container["args"]], env=env, check=True)
    runs = [[a.replace(CONFIG_IN_POD, str(config)) for a in args] for args in recorded(calls)]
    assert len(runs) == statefulset["spec"]["replicas"]
    for args in runs:
        params = parse(args).params
        # every shard pod listens on the ports its container declares
        assert params["port"] + params["shard_index"] == 5570
        assert params["metrics_port"] + params["shard_index"] == 9100
        assert params["num_shards"] == 2 and params["bind"] == "0.0.0.0"
    assert sorted(parse(a).params["shard_index"] for a in runs) == [0, 1]


def test_workers_are_a_gpu_deployment_and_the_averager_has_its_volume(tmp_path):
    config = str(cluster_toml(tmp_path))
    deployments = by_kind("Deployment")
    claims = by_kind("PersistentVolumeClaim")
    worker = deployments["distbelief-worker"]
    (container,) = containers(worker)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    check_selector(worker)
    check_probes(container)
    params = parse([a.replace(CONFIG_IN_POD, config) for a in container["args"]]).params
    assert params["gpu"] == 1 and params["supervisor_metrics_port"] == 9299
    # pods are alike (no ordinal): shard 0 hands each its chunks of the data set, whose
    # size the shards are told
    assert params["total_replicas"] is None and params["data_order"] == "auto"
    serve_params = parse(["serve", "--config", config]).params
    assert serve_params["dataset_size"] == 1281167 and params["data"] == "/data/imagenet"
    assert params["servers"].startswith("tcp://distbelief-shard-0.distbelief-shard:5570")
    averager = deployments["distbelief-averager"]
    check_selector(averager)
    assert averager["spec"]["strategy"]["type"] == "Recreate"
    (container,) = containers(averager)
    check_probes(container)
    params = parse([a.replace(CONFIG_IN_POD, config) for a in container["args"]]).params
    volumes = {v["name"]: v for v in averager["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    claim = volumes[mounts[params["output"]]]["persistentVolumeClaim"]["claimName"]
    assert claim in claims
    assert by_kind("Service")["distbelief-averager"]["spec"]["ports"][0]["port"] == params["port"]


def test_podmonitor_scrapes_every_metrics_port():
    (monitor,) = by_kind("PodMonitor").values()
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    ports = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    declared = set()
    for obj in [*by_kind("StatefulSet").values(), *by_kind("Deployment").values()]:
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
        declared |= {
            p["name"] for c in containers(obj) for p in c["ports"] if "metrics" in p["name"]
        }
    assert ports == declared == {"metrics", "sup-metrics"}


# -- Slurm -----------------------------------------------------------------------------


def test_sbatch_script_parses_and_its_command_lines_parse(tmp_path):
    script = DEPLOY / "slurm" / "distbelief.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    bin_dir, calls = stub_distbelief(tmp_path)
    (bin_dir / "scontrol").write_text('#!/bin/bash\nprintf "%s\\n" gpu01 gpu02 gpu03\n')
    # srun: drop its own options, run the command on "every node" once
    (bin_dir / "srun").write_text(
        '#!/bin/bash\nwhile [[ "$1" == -* ]]; do shift; done\nexec "$@"\n'
    )
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "SLURM_JOB_NODELIST": "gpu[01-03]",
        "NUM_SHARDS": "3",
        "HOME": str(tmp_path),
        "SLURM_PROCID": "1",  # as srun sets it in the second worker node's task
        "SLURM_NTASKS": "2",
    }
    # TERM ignored from the start, so the script's exit trap cannot kill a background
    # stub before it has recorded its call (on a loaded machine it can start late)
    run = subprocess.run(
        ["bash", str(script)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN),
    )
    assert run.returncode == 0, run.stderr
    assert "shards on gpu01" in run.stdout and "workers on gpu02,gpu03" in run.stdout
    runs = {args[0]: parse(args).params for args in recorded(calls)}
    assert set(runs) == {"serve", "status", "average", "work"}
    servers = "tcp://gpu01:5570,tcp://gpu01:5571,tcp://gpu01:5572"
    assert runs["serve"]["shards"] == 3 and runs["serve"]["bind"] == "0.0.0.0"
    assert runs["status"]["servers"] == runs["average"]["servers"] == servers
    assert runs["work"]["servers"] == servers and runs["work"]["gpu"] == 4
    # no index per node: shard 0 dispatches ImageNet's chunks to every replica
    assert (runs["work"]["first_replica"], runs["work"]["total_replicas"]) == (0, None)
    assert runs["work"]["data_order"] == "auto" and runs["serve"]["dataset_size"] == 1281167
