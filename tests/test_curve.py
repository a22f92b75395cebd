"""CurveZMQ: keys, an authenticated cluster, and peers without an admitted key."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import urllib.request

import pytest
import torch
from distbelief.server.shard import initial_weights

from distbelief import protocol
from distbelief.client import ClientConfig, ParameterClient, ServerUnavailable
from distbelief.curve import Curve, CurveError, generate_keys, warn_if_exposed

from .conftest import LOOPBACK, PLAIN_SGD, free_port, raw_request

NUM_CLASSES = 10


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distbelief", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def metric(port: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{name}{{{want}}} (\S+)$" if labels else rf"^{name} (\S+)$"
    found = re.search(pattern, text, re.M)
    assert found, f"{name} {labels} not exported"
    return float(found.group(1))


def test_keys_generate_writes_pairs_admits_clients_and_refuses_to_overwrite(tmp_path):
    keys = tmp_path / "keys"
    run = cli("keys", "generate", str(keys), "--client", "worker-b")
    assert run.returncode == 0, run.stderr
    names = sorted(p.relative_to(keys).as_posix() for p in keys.rglob("*") if p.is_file())
    assert names == [
        "client.key_secret",
        "clients/client.key",
        "clients/worker-b.key",
        "server.key",
        "server.key_secret",
        "worker-b.key_secret",
    ]
    assert all((keys / n).stat().st_mode & 0o077 == 0 for n in names if n.endswith("_secret"))
    server, client = Curve.load(keys, server=True), Curve.load(keys, server=False)
    assert server.own_public == client.server_public and server.admitted() == 2
    assert client.own_public != server.own_public and len(client.own_secret) == 40
    again = cli("keys", "generate", str(keys))
    assert again.returncode == 1 and "use --force" in again.stderr
    assert Curve.load(keys, server=True).own_public == server.own_public  # untouched
    assert cli("keys", "generate", str(keys), "--force").returncode == 0
    assert Curve.load(keys, server=True).own_public != server.own_public


def test_missing_or_incomplete_key_folders_are_one_line_errors(tmp_path):
    run = cli("serve", "--curve", str(tmp_path / "nowhere"), "--metrics-port", "0")
    assert run.returncode == 2 and "cannot read CURVE key" in run.stderr
    assert "Traceback" not in run.stderr
    generate_keys(tmp_path / "k")
    (tmp_path / "k" / "server.key_secret").unlink()  # a client's folder: no server secret
    run = cli("serve", "--curve", str(tmp_path / "k"), "--metrics-port", "0")
    assert run.returncode == 2 and "server.key_secret" in run.stderr
    with pytest.raises(CurveError, match="server.key_secret"):
        Curve.load(tmp_path / "k", server=True)
    Curve.load(tmp_path / "k", server=False)  # enough for a client


def test_listening_beyond_loopback_without_curve_warns(caplog):
    with caplog.at_level(logging.WARNING):
        warn_if_exposed("127.0.0.1", None, "shard 0")
        assert not caplog.records
        warn_if_exposed("0.0.0.0", None, "shard 0")
    assert "without --curve" in caplog.text and "0.0.0.0" in caplog.text


def test_only_admitted_keys_get_data_and_refusals_are_counted(procs, tmp_path):
    keys, strangers = tmp_path / "keys", tmp_path / "strangers"
    generate_keys(keys)
    generate_keys(strangers)
    (strangers / "server.key").write_bytes((keys / "server.key").read_bytes())  # knows the server
    metrics_port = free_port()
    (address,) = procs.serve(
        1,
        "--num-classes",
        str(NUM_CLASSES),
        *PLAIN_SGD,
        "--metrics-port",
        str(metrics_port),
        curve=str(keys),
    )
    layout, initial = initial_weights("googlenet", NUM_CLASSES, 0)
    g = torch.zeros(layout.total)
    g[: layout.parameters] = 2.0**-10

    # an admitted client trains, encrypted
    cfg = ClientConfig(servers=(address,), timeout_s=20, retries=0, curve=str(keys))
    with ParameterClient(cfg, layout) as client:
        client.connect()
        assert client.push(g, examples=1)[0].applied
        weights = torch.empty(layout.total)
        assert client.pull(weights) == [1]
    torch.testing.assert_close(weights, initial - g, rtol=0, atol=0)

    # no key, and an unknown key: no data, a clear error after the timeout. Several
    # reconnects each: a refused handshake drops the connection, and a send must not
    # wait for one that never comes (it once blocked this test until its timeout)
    for curve in (None, str(strangers)):
        cfg = ClientConfig(
            servers=(address,), timeout_s=0.5, retries=4, backoff_s=0.05, curve=curve
        )
        with ParameterClient(cfg, layout) as client, pytest.raises(ServerUnavailable) as err:
            client.connect()
        assert "unreachable or not authorised" in str(err.value)
    assert raw_request(address, [protocol.request("stats", 1)], 1.0) is None

    # the server counted both kinds of refusal and changed nothing
    assert metric(metrics_port, "distbelief_shard_refused_handshakes_total", reason="auth") >= 1
    assert metric(metrics_port, "distbelief_shard_refused_handshakes_total", reason="protocol") >= 1
    assert metric(metrics_port, "distbelief_shard_pushes_total") == 1

    # status with the key reads the shard; without it, it says the shard did not answer
    run = cli("status", "--servers", address, "--json", "--curve", str(keys))
    assert run.returncode == 0 and json.loads(run.stdout)[0]["version"] == 1
    run = cli("status", "--servers", address, "--timeout-s", "1")
    assert run.returncode == 1 and "did not answer" in run.stdout


def test_averager_with_curve_pulls_from_curve_shards_and_serves_admitted_clients(procs, tmp_path):
    keys = tmp_path / "keys"
    generate_keys(keys)
    (shard,) = procs.serve(1, "--num-classes", str(NUM_CLASSES), curve=str(keys))
    _, address = procs.average(shard, "--every-s", "0.2", curve=str(keys))
    layout, initial = initial_weights("googlenet", NUM_CLASSES, 0)
    cfg = ClientConfig(servers=(address,), timeout_s=20, retries=3, backoff_s=0.5, curve=str(keys))
    with ParameterClient(cfg, layout) as client:
        client.connect()
        weights = torch.empty(layout.total)
        client.pull(weights)  # the average of snapshots of untouched weights: the weights
    torch.testing.assert_close(weights, initial, rtol=0, atol=1e-7)
    run = cli("evaluate", "--averager", address, "--json", "--curve", str(keys), timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert 0.0 <= json.loads(run.stdout)["top1"] <= 1.0
