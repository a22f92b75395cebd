"""Pushes and pulls through shared memory with shards on this host (work --shared-memory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from distbelief.server.shard import initial_weights

from distbelief import protocol, shm
from distbelief.client import ClientConfig, ParameterClient

from .conftest import PLAIN_SGD, free_ports, raw_request
from .test_fuzz import counter, metrics_text

NUM_CLASSES = 10


def connected(addresses, layout, **kw) -> ParameterClient:
    client = ParameterClient(
        ClientConfig(servers=tuple(addresses), timeout_s=20, retries=1, **kw), layout
    )
    client.connect()
    return client


def our_segments() -> set[str]:
    prefix = f"distbelief-{os.getpid()}-"
    return {n for n in os.listdir(shm.SHM_DIR) if n.startswith(prefix)}


def test_shared_memory_exchange_equals_the_wire_and_moves_only_headers(procs):
    metrics = free_ports(2)
    flags = ("--num-classes", str(NUM_CLASSES), "--seed", "3", "--momentum", "0.9")
    shared = procs.serve(2, *flags, "--metrics-port", str(metrics), name="shared")
    wire = procs.serve(2, *flags, "--no-shared-memory", name="wire")
    layout, initial = initial_weights("googlenet", NUM_CLASSES, 3)
    grads = [
        torch.randn(layout.total, generator=torch.Generator().manual_seed(i)) * 1e-3
        for i in range(3)
    ]

    results = {}
    for name, addresses in (("shared", shared), ("wire", wire)):
        with connected(addresses, layout, shared_memory=True) as client:
            if name == "shared":
                assert client.shared == [True, True] and len(our_segments()) == 1
            else:  # serve --no-shared-memory: the offer is declined, the wire used
                assert client.shared == [False, False] and client.shared_buffers() is None
                assert not our_segments()
            weights = torch.empty(layout.total)
            for g in grads:
                client.pull(weights)
                client.push(g, examples=4)
            assert client.pull(weights) == [3, 3]
            results[name] = weights
            if name == "shared":  # computing in the segment itself: no copy on our side
                shared_weights, shared_grads = client.shared_buffers()
                shared_grads.copy_(grads[0])
                client.push(shared_grads, examples=4)
                assert client.pull(shared_weights) == [4, 4]
                results["in place"] = shared_weights.clone()
        assert not our_segments()  # close() removed it
    with connected(wire, layout) as client:  # the same fourth push over the wire
        client.push(grads[0], examples=4)
        client.pull(results["wire"])
    # the same momentum updates from the same gradients, bit for bit
    assert not torch.equal(results["shared"], initial)
    assert torch.equal(results["in place"], results["wire"])

    text = metrics_text(metrics)
    assert counter(text, "distbelief_shard_pushes_total") == 4
    assert counter(text, "distbelief_shard_pulls_total") == 5
    # 4 pushes and 5 pulls of a 20 MB range moved under 10 KB: only msgpack headers
    assert counter(text, "distbelief_shard_received_bytes_total") < 10_000
    assert counter(text, "distbelief_shard_sent_bytes_total") < 10_000
    assert counter(text, "distbelief_shard_shared_memory_segments") == 1


def test_bad_segment_names_are_refused_and_change_nothing(procs, tmp_path):
    (address,) = procs.serve(1, "--num-classes", str(NUM_CLASSES), *PLAIN_SGD)
    layout, initial = initial_weights("googlenet", NUM_CLASSES, 0)
    fingerprint = layout.fingerprint(1)
    small = shm.Segment.create(layout.total - 64)  # a segment of the wrong size
    try:
        for name, why in [
            ("../../etc/passwd", "is not a distbelief shared-memory segment name"),
            ("distbelief-1-00000000", "not on this host?"),
            (small.name, f"a vector of {layout.total} parameters needs"),
        ]:
            hello = protocol.request("hello", 1, fingerprint=fingerprint, shm=name)
            reply = protocol.decode(raw_request(address, [hello])[0])
            assert reply["ok"] and "shm_token" not in reply and why in reply["shm_error"]
            push = protocol.request(
                "push", 2, worker="w", seq=1, base_version=0, examples=1, dtype="f32", shm=name
            )
            reply = protocol.decode(raw_request(address, [push])[0])
            assert reply["error"] == "bad_field" and why in reply["message"]
            pull = protocol.request("pull", 3, shm=name)
            assert protocol.decode(raw_request(address, [pull])[0])["error"] == "bad_field"
    finally:
        small.close()
    weights = torch.empty(layout.total)
    with connected([address], layout) as client:
        assert client.pull(weights) == [0]
    assert torch.equal(weights, initial)


def test_segments_of_dead_clients_are_removed():
    # a process that made a segment and died with kill -9: its file is left behind
    code = (
        "import os, signal; from distbelief import shm; "
        "s = shm.Segment.create(1024); print(s.name, flush=True); "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    name = done.stdout.strip()
    assert done.returncode == -9 and (Path(shm.SHM_DIR) / name).exists()
    live = shm.Segment.create(1024)  # the next client on the host sweeps it
    try:
        assert not (Path(shm.SHM_DIR) / name).exists()
        assert (Path(shm.SHM_DIR) / live.name).exists()  # its own stays
    finally:
        live.close()
    assert not (Path(shm.SHM_DIR) / live.name).exists()


def test_a_cpu_replica_trains_in_shared_memory(procs, tmp_path):
    metrics = free_ports(2)
    addresses = procs.serve(2, "--num-classes", str(NUM_CLASSES), "--metrics-port", str(metrics))
    flags = ["--servers", ",".join(addresses), "--cpu", "1", "--steps", "6", "--batch-size", "8"]
    flags += ["--num-classes", str(NUM_CLASSES), "--metrics-port", "0", "--json"]
    before = set(os.listdir(shm.SHM_DIR))
    proc = procs.start("work", *flags, "--shared-memory", name="work")
    assert proc.wait(240) == 0, proc.log_path.read_text()[-3000:]
    log = proc.log_path.read_text()
    assert "training in shared memory" in log
    (summary,) = json.loads(log.strip().splitlines()[-1])
    assert summary["step"] == 6 and summary["pushes"] == 6 and summary["pulls"] == 6
    assert summary["loss"] == summary["loss"]  # finite, not NaN
    for shard in range(2):
        text = metrics_text(metrics + shard)
        assert counter(text, "distbelief_shard_pushes_total") == 6
        assert counter(text, "distbelief_shard_received_bytes_total") < 10_000
    assert set(os.listdir(shm.SHM_DIR)) <= before  # the replica removed its segment
