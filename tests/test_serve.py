"""`distbelief serve` as real processes on loopback: exactness, concurrency, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from distbelief.server.shard import initial_weights

from distbelief import protocol
from distbelief.cli import DEMO_JOIN_RAMP_EPOCHS, DEMO_STALENESS_POLICY
from distbelief.client import ClientConfig, ParameterClient, ServerRefused
from distbelief.layout import Layout
from distbelief.models import build_model

from .conftest import PLAIN_SGD, free_port, port_is_free
from .exactness import BATCH, DATASET_SIZE, HP, NUM_CLASSES, STEPS


def client_for(addresses, layout, **kw) -> ParameterClient:
    cfg = ClientConfig(servers=tuple(addresses), timeout_s=20, retries=1, **kw)
    client = ParameterClient(cfg, layout)
    client.connect()
    return client


@pytest.mark.parametrize(
    "rule,policy,warmup,parts",
    [
        ("momentum", "none", 0.0, False),
        ("nesterov", "none", 0.0, False),
        # distbelief up's default policy, with a warm-up over the first 5 steps
        (
            "momentum",
            DEMO_STALENESS_POLICY,
            5 * BATCH / DATASET_SIZE,
            False,
        ),
        ("momentum", "dc-asgd", 0.0, False),
        # push-and-pulls in parts, each applied as it arrives (server/parts.py)
        ("nesterov", "none", 0.0, True),
        ("momentum", DEMO_STALENESS_POLICY, 5 * BATCH / DATASET_SIZE, True),
        # dc-asgd reads the whole slice's history: its shards take whole pushes only
        ("momentum", "dc-asgd", 0.0, True),
    ],
)
def test_one_worker_through_two_shards_reproduces_torch_sgd(procs, rule, policy, warmup, parts):
    addresses = procs.serve(
        2,
        "--staleness-policy",
        policy,
        "--lr-warmup-epochs",
        str(warmup),
        "--join-ramp-epochs",  # up's; only async-momentum-lr reads it, after a stale push
        str(DEMO_JOIN_RAMP_EPOCHS),
        "--num-classes",
        str(NUM_CLASSES),
        "--seed",
        "0",
        "--rule",
        rule,
        "--lr",
        str(HP["lr"]),
        "--momentum",
        str(HP["momentum"]),
        "--weight-decay",
        str(HP["weight_decay"]),
        "--dataset-size",
        str(DATASET_SIZE),
        "--lr-decay-epochs",
        "0.5",
    )
    # the worker and the reference run in a fresh interpreter: CPU kernels other tests
    # warmed up in this process (oneDNN's primitive cache) must not be part of the result
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.exactness",
            rule,
            ",".join(addresses),
            str(warmup),
            "parts" if parts else "whole",
        ],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert result["all_applied_fresh"] and result["trained"] and result["initial_match"]
    assert result["worst_relative_diff"] <= 1e-5
    assert result["bit_exact_steps"] == STEPS  # not just close: the same floats
    assert result["padding_zero"]
    assert result["versions"] == [STEPS, STEPS]
    assert result["examples"] == STEPS * BATCH
    assert result["lr"] == pytest.approx(HP["lr"] * 0.96 ** (STEPS * BATCH // 16))
    # every other step is a push-and-pull: in parts where asked and the shards can
    by_range = parts and policy != "dc-asgd"
    assert result["in_parts"] == [by_range, by_range]
    expected = [STEPS // 2 * n for n in result["part_counts"]] if by_range else [0, 0]
    assert result["parts"] == expected


def test_concurrent_clients_lose_nothing_and_apply_retries_once(procs):
    # momentum 0, lr 1, no decay and identical gradients: the final weights are the initial
    # ones minus (accepted pushes) × g, whatever the order the pushes arrived in
    addresses = procs.serve(
        2,
        "--num-classes",
        str(NUM_CLASSES),
        *PLAIN_SGD,
    )
    layout, initial = initial_weights("googlenet", NUM_CLASSES, 0)
    g = torch.full((layout.total,), 2.0**-12)
    g[layout.parameters :] = 0  # a replica's gradient has none on the layout's padding
    pushes_each, num_clients = 12, 4
    applied = []
    errors = []

    def run(worker: int) -> None:
        try:
            with client_for(addresses, layout, worker=f"w{worker}") as client:
                n = 0
                for i in range(pushes_each):
                    n += all(r.applied for r in client.push(g, examples=1))
                    if i % 3 == 0:  # a retried push: same (worker, seq) again, applied once
                        client.seq -= 1
                        assert not any(r.applied for r in client.push(g, examples=1))
                applied.append(n)
        except Exception as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(num_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sum(applied) == pushes_each * num_clients
    weights = torch.empty(layout.total)
    with client_for(addresses, layout) as client:
        versions = client.pull(weights)
        stats = client.stats()
    assert versions == [pushes_each * num_clients] * 2
    assert [s["duplicates"] for s in stats] == [num_clients * 4] * 2
    expected = initial.clone()
    for _ in range(pushes_each * num_clients):
        expected -= g
    assert torch.equal(weights, expected)


def test_a_push_in_parts_refused_half_way_keeps_what_came_and_asks_for_a_pull(procs):
    # each part's weights are taken as its reply arrives: a part refused half-way (NaN)
    # leaves the parts before it applied and taken, the error clear, and a pull owed
    addresses = procs.serve(1, "--num-classes", str(NUM_CLASSES), *PLAIN_SGD)
    layout, initial = initial_weights("googlenet", NUM_CLASSES, 0)
    g = torch.full((layout.total,), 2.0**-10)
    g[layout.parameters :] = 0
    with client_for(addresses, layout, wire_parts="on", part_bytes=1 << 20) as client:
        assert client.in_parts == [True]
        weights = torch.empty(layout.total)
        client.pull(weights)
        n = protocol.parts_for(layout.total, 4 * layout.total, 1 << 20)
        bad_lo, _ = protocol.part_range(layout.total, n, n // 2)
        g[bad_lo + 5] = float("nan")
        with pytest.raises(ServerRefused, match="non_finite.*NaN"):
            client.push(g, examples=1, pull_into=weights)
        assert client.must_pull
        # every part before the refused one came back updated, one step from the start
        assert torch.equal(weights[:bad_lo], initial[:bad_lo] - g[:bad_lo])
        fresh = torch.empty(layout.total)
        client.pull(fresh)
        assert not client.must_pull
        assert torch.equal(fresh[:bad_lo], weights[:bad_lo])
        assert torch.equal(fresh[bad_lo : bad_lo + 1024], initial[bad_lo : bad_lo + 1024])
        stats = client.stats()[0]
    assert stats["version"] == 0  # the push never completed: not counted
    assert stats["parts"] >= n // 2
    assert stats["rejected"]["non_finite"] == 1


def test_a_shard_that_takes_no_parts_gets_whole_slices_on_a_fresh_socket(procs):
    # adagrad reads the whole slice: its hello says parts false, and a client set to
    # send parts reopens that socket (its send buffer is for whole slices) and pushes whole
    addresses = procs.serve(1, "--num-classes", str(NUM_CLASSES), "--rule", "adagrad")
    layout, initial = initial_weights("googlenet", NUM_CLASSES, 0)
    with ParameterClient(
        ClientConfig(servers=tuple(addresses), timeout_s=20, retries=1, wire_parts="on"), layout
    ) as client:
        assert client.in_parts == [True]  # the setting, until the shard says
        before = client.sockets[0]
        client.connect()
        assert client.in_parts == [False] and client.sockets[0] is not before
        weights = torch.empty(layout.total)
        client.pull(weights)
        assert torch.equal(weights, initial)
        (result,) = client.push(torch.full((layout.total,), 1e-3), examples=1, pull_into=weights)
        assert result.applied and result.version == 1
        assert not torch.equal(weights, initial)
        assert client.stats()[0]["parts"] == 0


def test_wrong_layout_is_refused_with_a_clear_message(procs):
    addresses = procs.serve(1, "--num-classes", str(NUM_CLASSES))
    layout = Layout.of(build_model("googlenet", NUM_CLASSES + 1), "googlenet")
    client = ParameterClient(ClientConfig(servers=tuple(addresses), timeout_s=20), layout)
    with client, pytest.raises(ServerRefused, match="layout_mismatch.*--num-classes"):
        client.connect()


def test_port_in_use_is_a_one_line_error(procs):
    import socket

    port = free_port()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        proc = procs.start(
            "serve", "--port", str(port), "--metrics-port", "0", "--num-classes", "10", name="busy"
        )
        assert proc.wait(90) == 2
    text = proc.log_path.read_text()
    assert f"cannot listen on 127.0.0.1:{port}" in text and "port in use" in text
    assert "Traceback" not in text


def refused_serve(procs, *args: str) -> str:
    """Start one shard that must refuse to start (exit 2, no traceback); its log."""
    proc = procs.start(
        "serve",
        "--port",
        str(free_port()),
        "--metrics-port",
        "0",
        "--num-classes",
        str(NUM_CLASSES),
        *args,
        name="refused",
    )
    assert proc.wait(90) == 2
    text = proc.log_path.read_text()
    assert "Traceback" not in text
    return text


def test_ipc_dir_serves_the_same_shards_over_unix_sockets(procs):
    # a short folder of our own: Unix socket paths are limited to 107 bytes
    with tempfile.TemporaryDirectory(prefix="db-test-") as ipc_dir:
        tcp = procs.serve(2, "--num-classes", str(NUM_CLASSES), *PLAIN_SGD, "--ipc-dir", ipc_dir)
        ipc = [f"ipc://{ipc_dir}/shard-{i}.sock" for i in range(2)]
        layout, initial = initial_weights("googlenet", NUM_CLASSES, 0)
        g = torch.zeros(layout.total)
        g[: layout.parameters] = 2.0**-10
        with client_for(ipc, layout) as client:
            assert [r.applied for r in client.push(g, examples=1)] == [True, True]
        over_tcp, over_ipc = torch.empty(layout.total), torch.empty(layout.total)
        with client_for(tcp, layout) as client:
            assert client.pull(over_tcp) == [1, 1]
        with client_for(ipc, layout) as client:
            assert client.pull(over_ipc) == [1, 1]
        assert torch.equal(over_ipc, over_tcp) and torch.equal(over_tcp, initial - g)

        # a second server on the same sockets is refused, not allowed to steal them
        text = refused_serve(procs, "--ipc-dir", ipc_dir)
        assert f"cannot listen on ipc://{ipc_dir}/shard-0.sock: another server uses it" in text
        with client_for(ipc, layout) as client:  # the first one still answers there
            assert client.pull(over_ipc) == [1, 1]

        procs.stop_all()
        assert not list(Path(ipc_dir).glob("*.sock"))  # shards remove their sockets

    long_dir = "/tmp/" + "d" * 120
    assert "longer than 100 bytes" in refused_serve(procs, "--ipc-dir", long_dir)
    shutil.rmtree(long_dir, ignore_errors=True)


def test_unknown_rule_and_flag_are_one_line_errors(procs):
    for args, message in [
        (["--rule", "sgd"], "Invalid value for '--rule'"),
        (["--lrr", "1"], "No such option '--lrr'"),
        (["--shards", "2", "--shard-index", "0"], "either --shards N or --shard-index"),
    ]:
        proc = procs.start("serve", *args, name="bad")
        assert proc.wait(60) == 2
        text = proc.log_path.read_text()
        assert message in text and "Traceback" not in text


def test_wrong_types_in_config_env_and_data_are_one_line_errors(procs, tmp_path):
    (tmp_path / "bad.toml").write_text('lr = "fast"\n')
    (tmp_path / "broken.toml").write_text("[serve\nlr = 1\n")
    for args, env, message in [
        (["serve", "--config", str(tmp_path / "bad.toml")], {}, "'fast' is not a valid float"),
        (["serve", "--config", str(tmp_path / "broken.toml")], {}, "is not valid TOML"),
        (["serve"], {"DISTBELIEF_LR": "abc"}, "'abc' is not a valid float"),
        (["serve", "--port", "99999"], {}, "99999 is not in the range"),
        (["work", "--fetch-every", "0"], {}, "0 is not in the range x>=1"),
        (["work", "--data", str(tmp_path / "none")], {}, "data folder"),
    ]:
        proc = procs.start(*args, name="bad", env=env)
        assert proc.wait(60) in (1, 2)
        text = proc.log_path.read_text()
        assert message in text and "Traceback" not in text, text
        last = text.strip().splitlines()[-1].replace(str(tmp_path), "<tmp>")
        assert len(last) < 300  # short, whatever the length of the test's own folder


def test_config_file_and_environment_set_flags(procs, tmp_path):
    port = free_port()
    assert port_is_free(port + 1)
    config = tmp_path / "cluster.toml"
    config.write_text(f"lr = 0.125\nnum-classes = {NUM_CLASSES}\n[serve]\nport = {port}\n")
    proc = procs.start(
        "serve",
        "--config",
        str(config),
        "--metrics-port",
        "0",
        env={"DISTBELIEF_MOMENTUM": "0.5"},
        name="cfg",
    )
    from .conftest import wait_until_serving

    address = f"tcp://127.0.0.1:{port}"
    wait_until_serving(address, proc, proc.log_path)
    layout = Layout.of(build_model("googlenet", NUM_CLASSES), "googlenet")
    with client_for([address], layout) as client:
        hp = client.info[0].hparams
    assert hp["lr"] == 0.125 and hp["momentum"] == 0.5


def test_config_file_with_unknown_key_is_refused(procs, tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[serve]\nlearning_rate = 3\n")
    proc = procs.start("serve", "--config", str(config), name="badcfg")
    assert proc.wait(60) == 2
    text = proc.log_path.read_text()
    assert "unknown setting 'learning_rate'" in text and "Traceback" not in text


def test_client_retries_until_a_late_shard_answers(procs):
    from .conftest import free_ports, wait_until_serving

    port = free_ports(1)
    address = f"tcp://127.0.0.1:{port}"
    layout = Layout.of(build_model("googlenet", NUM_CLASSES), "googlenet")
    cfg = ClientConfig(
        servers=(address,), timeout_s=1.0, retries=30, backoff_s=0.2, max_backoff_s=1.0
    )
    result = {}

    def connect_early() -> None:
        with ParameterClient(cfg, layout) as client:
            result["info"] = client.connect()
            result["retries"] = client.retries_total

    thread = threading.Thread(target=connect_early)
    thread.start()  # nothing listens yet: the client times out, reopens and resends
    time.sleep(2.5)
    proc = procs.start(
        "serve",
        "--port",
        str(port),
        "--metrics-port",
        "0",
        "--num-classes",
        str(NUM_CLASSES),
        name="late",
    )
    wait_until_serving(address, proc, proc.log_path)
    thread.join(60)
    assert result["info"][0].stop == layout.total
    assert result["retries"] >= 2


def test_client_gives_up_with_a_clear_error(procs):
    from distbelief.client import ServerUnavailable

    from .conftest import free_ports

    address = f"tcp://127.0.0.1:{free_ports(1)}"
    layout = Layout.of(build_model("googlenet", NUM_CLASSES), "googlenet")
    cfg = ClientConfig(servers=(address,), timeout_s=0.3, retries=2, backoff_s=0.1)
    began = time.monotonic()
    with (
        ParameterClient(cfg, layout) as client,
        pytest.raises(ServerUnavailable, match="no answer from server 0 .* after 3 tries"),
    ):
        client.connect()
    assert time.monotonic() - began < 5
