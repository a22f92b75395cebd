"""The shards are the one source of truth for the model: ``hello`` without a fingerprint
says what they hold, and ``work``, ``average`` and ``evaluate --averager`` default to
it; a flag that contradicts it is a one-line error naming both values (issue 15, part 3).
"""

from __future__ import annotations

import json
import time

from distbelief import protocol
from distbelief.client import probe_stats

from .conftest import LOOPBACK, free_port, raw_request, wait_until_serving

STEPS = 2
WORK = ["--cpu", "1", "--batch-size", "8", "--metrics-port", "0", "--max-restarts", "2"]


def hello(address: str) -> dict:
    reply = raw_request(address, [protocol.request("hello", 1)], 10.0)
    assert reply is not None, f"no answer from {address}"
    return protocol.decode(reply[0])


def finish(proc, timeout_s: float = 240.0) -> tuple[int, str]:
    code = proc.wait(timeout_s)
    return code, proc.log_path.read_text()


def test_work_and_average_take_the_model_from_the_shards(procs, tmp_path):
    addresses = procs.serve(2, "--num-classes", "10")
    servers = ",".join(addresses)
    for index, address in enumerate(addresses):
        header = hello(address)  # no fingerprint: nothing checked, the model told
        assert header["ok"], header
        assert (header["model"], header["num_classes"], header["num_shards"]) == (
            "googlenet",
            10,
            2,
        )
        assert header["index"] == index

    # no --model, no --num-classes: the replica builds the shards' 10-class GoogLeNet
    status_dir = tmp_path / "status"
    proc = procs.start(
        "work", "--servers", servers, *WORK, "--steps", str(STEPS),
        "--status-dir", str(status_dir), name="work",
    )  # fmt: skip
    code, log = finish(proc)
    assert code == 0, log[-3000:]
    status = json.loads((status_dir / "replica-0.json").read_text())
    assert status["step"] == STEPS and status["restarts"] == 0
    assert [s["version"] for s in probe_stats(addresses, 10)] == [STEPS, STEPS]

    # one flag that contradicts the shards: refused before any replica starts
    began = time.monotonic()
    proc = procs.start("work", "--servers", servers, *WORK, "--num-classes", "20", name="bad")
    code, log = finish(proc, 60)
    lines = log.strip().splitlines()
    assert code != 0 and "Traceback" not in log, log
    assert lines[-1] == (
        f"Error: --num-classes 20 contradicts the shards at {addresses[0]}, which hold(s) "
        "googlenet with 10 classes"
    ), log
    # a share of the shards only
    proc = procs.start("work", "--servers", addresses[0], *WORK, name="half")
    code, log = finish(proc, 60)
    assert code != 0 and "Traceback" not in log, log
    assert log.strip().splitlines()[-1] == (
        "Error: 1 server(s) given but the shards are 2: list every shard, in shard order"
    ), log
    # shares smaller than a batch: 50,000 demo images over 10,000 replicas
    proc = procs.start(
        "work", "--servers", servers, *WORK, "--total-replicas", "10000", name="empty",
    )  # fmt: skip
    code, log = finish(proc, 60)
    assert code != 0 and "Traceback" not in log, log
    assert log.strip().splitlines()[-1] == (
        "Error: the data set demo has 50000 training examples: 10000 replicas get 5 each, "
        "fewer than one batch of 8"
    ), log
    assert time.monotonic() - began < 90

    # both flags given: nothing asked up front; the shard refuses the fingerprint, the
    # replica names both sides and is not restarted (its settings would fail again)
    proc = procs.start(
        "work", "--servers", servers, *WORK, "--model", "googlenet", "--num-classes", "20",
        "--status-dir", str(tmp_path / "status-bad"), name="both",
    )  # fmt: skip
    code, log = finish(proc, 120)
    assert code != 0 and "Traceback" not in log, log
    assert "layout_mismatch" in log and "holds googlenet with 10 classes" in log, log
    assert "this replica: googlenet with 20 classes, 2 server(s)" in log, log
    assert "restart 1/2" not in log, log
    # nothing was pushed by the refused replicas
    assert [s["version"] for s in probe_stats(addresses, 10)] == [STEPS, STEPS]

    # the averager, too, takes the shards' model (no --num-classes): its hello says 10
    port = free_port()
    proc = procs.start(
        "average", "--servers", servers, "--port", str(port), "--metrics-port", "0",
        name="average",
    )  # fmt: skip
    address = f"tcp://{LOOPBACK}:{port}"
    wait_until_serving(address, proc, proc.log_path)
    header = hello(address)
    assert (header["model"], header["num_classes"], header["num_shards"]) == (
        "googlenet",
        10,
        1,
    )
