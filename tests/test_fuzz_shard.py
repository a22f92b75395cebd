"""Hostile input against a live shard process: it answers or ignores, never dies or changes."""

from __future__ import annotations

import math
import struct
import urllib.request

import msgpack
import pytest
import torch
import zmq
from distbelief.server.shard import initial_weights
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distbelief import protocol
from distbelief.client import ClientConfig, ParameterClient

from .conftest import LOOPBACK, Processes, free_ports

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
def dealer(live_shard):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(live_shard[0])
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
    kind = draw(st.sampled_from(["junk", "truncated", "fields", "push"]))
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
    keys = list(protocol.REQUEST_FIELDS["push"]) + ["v", "op", "rid", "fingerprint", "dtype"]
    for key in draw(st.lists(st.sampled_from(keys), max_size=3)):
        base[key] = draw(field_values)
    data = msgpack.packb(base, use_bin_type=True)
    if kind == "truncated":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    return data


@st.composite
def payloads(draw) -> list[bytes]:
    kind = draw(st.sampled_from(["none", "random", "wrong_size", "nan", "two"]))
    if kind == "none":
        return []
    if kind == "random":
        return [draw(st.binary(max_size=64))]
    if kind == "wrong_size":
        return [b"\x00" * (4 * SIZE + draw(st.sampled_from([-4, -1, 1, 4])))]
    if kind == "nan":
        bad = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        grad = torch.zeros(SIZE)
        grad[draw(st.integers(0, SIZE - 1))] = bad
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
