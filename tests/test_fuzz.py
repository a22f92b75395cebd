"""Hostile input against live servers (a shard, the averager): each answers or ignores,
never dies, never changes its weights, and stays within its memory bounds."""

from __future__ import annotations

import math
import re
import socket
import struct
import time
import urllib.request
from pathlib import Path

import msgpack
import pytest
import torch
import zmq
from distbelief.server.shard import initial_weights
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distbelief import protocol
from distbelief.client import ClientConfig, ParameterClient

from .conftest import LOOPBACK, Processes, free_port, free_ports

NUM_CLASSES = 10
REPLY_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def live_shard(tmp_path_factory):
    procs = Processes(tmp_path_factory.mktemp("fuzz"))
    try:
        (address,) = procs.serve(1, "--num-classes", str(NUM_CLASSES), "--lr", "1")
        yield address, procs
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def live_averager(tmp_path_factory):
    """A shard that nobody trains and an averager averaging it, with metrics on."""
    procs = Processes(tmp_path_factory.mktemp("fuzz-averager"))
    try:
        (shard,) = procs.serve(1, "--num-classes", str(NUM_CLASSES))
        metrics_port = free_port()
        proc, address = procs.average(
            shard,
            "--metrics-port",
            str(metrics_port),
            "--every-s",
            "3600",  # one snapshot at the start; no background pulls to blur memory readings
        )
        yield address, metrics_port, proc
    finally:
        procs.stop_all()


def open_dealer(address: str) -> tuple[zmq.Context, zmq.Socket]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return ctx, sock


@pytest.fixture(scope="module")
def dealer(live_shard):
    ctx, sock = open_dealer(live_shard[0])
    yield sock
    sock.close(linger=0)
    ctx.term()


@pytest.fixture(scope="module")
def averager_dealer(live_averager):
    ctx, sock = open_dealer(live_averager[0])
    yield sock
    sock.close(linger=0)
    ctx.term()


LAYOUT, INITIAL = initial_weights("googlenet", NUM_CLASSES, 0)
SIZE = LAYOUT.total

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=20),
)
field_values = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.text(max_size=5), scalars, max_size=3),
)


@st.composite
def hostile_headers(draw) -> bytes:
    """Mostly well-formed maps with one or more fields wrong; sometimes raw junk."""
    kind = draw(st.sampled_from(["junk", "truncated", "fields", "push", "commit"]))
    if kind == "junk":
        return draw(st.binary(max_size=200))
    base = {"v": 1, "op": draw(st.sampled_from([*protocol.OPS, "nope", ""])), "rid": 1}
    if kind == "push":
        base.update(
            op="push",
            worker="fuzz",
            seq=draw(st.integers(0, 10)),
            base_version=0,
            examples=1,
            dtype=draw(st.sampled_from(["f32", "bf16", "f16", "f64"])),
        )
    if kind == "commit":  # of a step never held here: refused, whatever else it says
        base.update(op="commit", group=draw(st.sampled_from(["r0", "fuzz"])), seq=1)
    keys = [*protocol.REQUEST_FIELDS["push"], *protocol.REQUEST_FIELDS["commit"]]
    keys += ["v", "op", "rid", "fingerprint", "dtype"]
    for key in draw(st.lists(st.sampled_from(keys), max_size=3)):
        base[key] = draw(field_values)
    data = msgpack.packb(base, use_bin_type=True)
    if kind == "truncated":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    return data


@st.composite
def payloads(draw, size: int = SIZE) -> list[bytes]:
    """Payload frames; ``size`` is the element count a correct gradient would have."""
    kind = draw(st.sampled_from(["none", "random", "wrong_size", "nan", "two"]))
    if kind == "none":
        return []
    if kind == "random":
        return [draw(st.binary(max_size=64))]
    if kind == "wrong_size":
        return [b"\x00" * (4 * size + draw(st.sampled_from([-4, -1, 1, 4])))]
    if kind == "nan":
        bad = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        grad = torch.zeros(size)
        grad[draw(st.integers(0, size - 1))] = bad
        return [grad.numpy().tobytes()]
    return [b"a", b"b"]


def exchange(sock: zmq.Socket, frames: list[bytes]) -> list[bytes] | None:
    sock.send_multipart(frames)
    if sock.poll(REPLY_TIMEOUT_S * 1000):
        return sock.recv_multipart()
    return None


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(header=hostile_headers(), payload=payloads())
def test_hostile_messages_are_refused_and_change_nothing(live_shard, dealer, header, payload):
    reply = exchange(dealer, [header, *payload])
    assert reply is not None, "the shard stopped answering"
    decoded = protocol.decode(reply[0])
    if decoded.get("ok"):
        # only a request that is valid in every respect may succeed; a push must not
        # have been sent here with a valid f32 gradient of the right size
        assert decoded.get("applied") in (None, False)
    else:
        assert decoded["error"] in protocol.ERRORS and decoded["message"]


# the averager takes no pushes, so its size limit is a header's: model-sized frames are
# dropped by libzmq unanswered (test_a_flood_... checks that); these stay under it
@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(header=hostile_headers(), payload=payloads(size=1024))
def test_hostile_messages_to_the_averager_are_refused(
    live_averager, averager_dealer, header, payload
):
    reply = exchange(averager_dealer, [header, *payload])
    assert reply is not None, "the averager stopped answering"
    decoded = protocol.decode(reply[0])
    if not decoded.get("ok"):
        assert decoded["error"] in protocol.ERRORS and decoded["message"]
    else:  # hello, pull, stats or save: the averager takes no pushes
        assert decoded.get("applied") is None


def test_after_the_fuzzing_the_average_is_untouched(live_averager, averager_dealer):
    address, metrics_port, _ = live_averager
    push = protocol.request("push", 1, worker="x", seq=1, base_version=0, examples=1, dtype="f32")
    reply = protocol.decode(exchange(averager_dealer, [push, b"\x00" * 4096])[0])
    assert reply["error"] == "not_available"  # the average cannot be pushed to
    # a header that is not msgpack at all: bad_header, whatever the fuzzing drew before
    assert (
        protocol.decode(exchange(averager_dealer, [b"\xc1not msgpack"])[0])["error"] == "bad_header"
    )
    weights = torch.empty(SIZE)
    with ParameterClient(ClientConfig(servers=(address,), timeout_s=20), LAYOUT) as c:
        c.connect()
        c.pull(weights)
    torch.testing.assert_close(weights, INITIAL, rtol=0, atol=1e-7)  # still the mean of INITIAL
    text = metrics_text(metrics_port)
    assert counter(text, "distbelief_averager_rejected_messages_total", reason="not_available") >= 1
    assert counter(text, "distbelief_averager_rejected_messages_total", reason="bad_header") >= 1


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def counter(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(rf"^{name}{{{want}}} (\S+)$" if labels else rf"^{name} (\S+)$", text, re.M)
    assert found, f"{name} {labels} not exported"
    return float(found.group(1))


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) * 1024


def settled_rss(pid: int, timeout_s: float = 60.0) -> int:
    """Resident memory once warm-up is over (two readings 2 s apart within 1%)."""
    last, deadline = rss_bytes(pid), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(2.0)
        now = rss_bytes(pid)
        if abs(now - last) <= 0.01 * last:
            return now
        last = now
    pytest.fail(f"resident memory of {pid} still changing after {timeout_s:g} s")


def test_a_flood_of_connections_and_huge_declared_lengths_are_survived(live_averager):
    address, metrics_port, proc = live_averager
    port = int(address.rsplit(":", 1)[1])
    before = settled_rss(proc.pid)
    # 300 ZeroMQ peers at once, each sending a header that declares a huge object
    huge = [b"\xc6\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff"]
    ctx = zmq.Context()
    socks = []
    try:
        for i in range(300):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(address)
            sock.send(huge[i % len(huge)])
            socks.append(sock)
        answered = sum(bool(s.poll(20_000)) for s in socks)
    finally:
        for sock in socks:
            sock.close(linger=0)
        ctx.term()
    assert answered == 300  # each one refused with bad_header, none crashed it
    # a model-sized message: over the averager's size limit, dropped before allocation
    ctx, sock = open_dealer(address)
    try:
        sock.send_multipart([protocol.request("stats", 1), b"\x00" * 4 * SIZE])
        assert not sock.poll(2000)
    finally:
        sock.close(linger=0)
        ctx.term()
    accepted = counter(metrics_text(metrics_port), "distbelief_averager_accepted_connections_total")
    # 50 TCP peers that do not speak ZeroMQ at all, 50 with a broken ZMTP greeting
    bad_greeting = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x02" * 60
    for i in range(100):
        with socket.create_connection((LOOPBACK, port), timeout=5) as raw:
            raw.sendall(b"GET / HTTP/1.0\r\n\r\n" if i % 2 else bad_greeting)
            time.sleep(0.02)
    time.sleep(1.0)
    grown = rss_bytes(proc.pid) - before
    text = metrics_text(metrics_port)
    assert counter(text, "distbelief_averager_rejected_messages_total", reason="bad_header") >= 300
    assert counter(text, "distbelief_averager_refused_handshakes_total", reason="protocol") >= 50
    assert counter(text, "distbelief_averager_accepted_connections_total") >= accepted + 100
    weights = torch.empty(SIZE)
    with ParameterClient(ClientConfig(servers=(address,), timeout_s=20), LAYOUT) as c:
        c.connect()
        c.pull(weights)
    torch.testing.assert_close(weights, INITIAL, rtol=0, atol=1e-7)
    # the declared lengths (4 GiB each) were never allocated: 400 peers cost a few MB
    assert grown < 32 * 2**20


def test_after_the_fuzzing_weights_are_untouched_and_rejections_counted(live_shard, dealer):
    # a few known-bad messages, so this test stands alone as well
    for frames in (
        [b"\xc1"],
        [
            protocol.request("push", 1, worker="x", seq=1, base_version=0, examples=1, dtype="f32"),
            b"\x00" * 8,
        ],
    ):
        assert exchange(dealer, frames) is not None
    # a commit of a step no piece of which is held: nothing to apply
    commit = protocol.request("commit", 3, group="fuzz", seq=1, pull="f32")
    assert protocol.decode(exchange(dealer, [commit])[0])["error"] == "incomplete"
    nan_grad = torch.full((SIZE,), math.nan).numpy().tobytes()
    push = protocol.request("push", 2, worker="x", seq=2, base_version=0, examples=1, dtype="f32")
    assert protocol.decode(exchange(dealer, [push, nan_grad])[0])["error"] == "non_finite"
    # identities with nothing after them and empty frames are ignored, not fatal
    dealer.send(b"")
    weights = torch.empty(SIZE)
    with ParameterClient(ClientConfig(servers=(live_shard[0],), timeout_s=20), LAYOUT) as c:
        c.connect()
        versions = c.pull(weights)
        stats = c.stats()[0]
    assert versions == [0]
    assert torch.equal(weights, INITIAL)
    assert stats["rejected"]["bad_header"] >= 1
    assert stats["rejected"]["bad_size"] >= 1
    assert stats["rejected"]["non_finite"] >= 1
    assert stats["rejected"]["incomplete"] >= 1 and stats["open_steps"] == 0


def test_oversized_message_is_dropped_by_the_size_limit(live_shard):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(live_shard[0])
    try:
        # bigger than ZMQ_MAXMSGSIZE: libzmq drops the connection before we allocate it
        sock.send_multipart([protocol.request("pull", 1), b"\x00" * (4 * SIZE + 2**20)])
        assert not sock.poll(2000)
    finally:
        sock.close(linger=0)
        ctx.term()
    weights = torch.empty(SIZE)
    with ParameterClient(ClientConfig(servers=(live_shard[0],), timeout_s=20), LAYOUT) as c:
        c.connect()
        assert c.pull(weights) == [0]


def test_rejections_show_in_the_metrics_endpoint(tmp_path):
    procs = Processes(tmp_path)
    base = free_ports(2)
    try:
        proc = procs.start(
            "serve",
            "--port",
            str(base),
            "--metrics-port",
            str(base + 1),
            "--num-classes",
            str(NUM_CLASSES),
            name="metrics",
        )
        from .conftest import wait_until_serving

        address = f"tcp://{LOOPBACK}:{base}"
        wait_until_serving(address, proc, proc.log_path)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        for junk in (b"\xc1", struct.pack("<Q", 7), msgpack.packb({"v": 1, "op": "x", "rid": 1})):
            assert exchange(sock, [junk]) is not None
        sock.close(linger=0)
        ctx.term()
        with urllib.request.urlopen(f"http://{LOOPBACK}:{base + 1}/metrics", timeout=10) as r:
            text = r.read().decode()
    finally:
        procs.stop_all()
    assert 'distbelief_shard_rejected_messages_total{reason="bad_header"} 2.0' in text
    assert 'distbelief_shard_rejected_messages_total{reason="unknown_op"} 1.0' in text
