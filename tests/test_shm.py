"""Pushes and pulls through shared memory with shards on this host (work --shared-memory)."""

from __future__ import annotations

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
                assert all(s is not None for s in client.segments)
                assert len(our_segments()) == 2
            else:  # serve --no-shared-memory: the offer is declined, the wire used
                assert client.segments == [None, None]
            weights = torch.empty(layout.total)
            for g in grads:
                client.pull(weights)
                client.push(g, examples=4)
            assert client.pull(weights) == [3, 3]
            results[name] = weights
        assert not our_segments()  # close() removed them
    # the same momentum updates from the same gradients, bit for bit
    assert torch.equal(results["shared"], results["wire"])
    assert not torch.equal(results["shared"], initial)

    text = metrics_text(metrics)
    assert counter(text, "distbelief_shard_pushes_total") == 3
    assert counter(text, "distbelief_shard_pulls_total") == 4
    # 3 pushes and 4 pulls of a 20 MB range moved under 10 KB: only msgpack headers
    assert counter(text, "distbelief_shard_received_bytes_total") < 10_000
    assert counter(text, "distbelief_shard_sent_bytes_total") < 10_000
    assert counter(text, "distbelief_shard_shared_memory_segments") == 1


def test_bad_segment_names_are_refused_and_change_nothing(procs, tmp_path):
    (address,) = procs.serve(1, "--num-classes", str(NUM_CLASSES), *PLAIN_SGD)
    layout, initial = initial_weights("googlenet", NUM_CLASSES, 0)
    fingerprint = layout.fingerprint(1)
    with connected([address], layout) as client:  # a segment of the wrong size
        size = client.info[0].stop - client.info[0].start
    small = shm.Segment.create(0, size - 64)
    try:
        for name, why in [
            ("../../etc/passwd", "is not a distbelief shared-memory segment name"),
            ("distbelief-1-00000000-0", "not on this host?"),
            (small.name, f"{size} parameters need"),
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
        "s = shm.Segment.create(0, 1024); print(s.name, flush=True); "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    name = done.stdout.strip()
    assert done.returncode == -9 and (Path(shm.SHM_DIR) / name).exists()
    live = shm.Segment.create(1, 1024)  # the next client on the host sweeps it
    try:
        assert not (Path(shm.SHM_DIR) / name).exists()
        assert (Path(shm.SHM_DIR) / live.name).exists()  # its own stays
    finally:
        live.close()
    assert not (Path(shm.SHM_DIR) / live.name).exists()
