import math

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distbelief import protocol
from distbelief.protocol import ProtocolError


def test_request_round_trip_and_validation():
    header = protocol.decode(
        protocol.request("push", 7, worker="w", seq=1, base_version=0, examples=8, dtype="bf16")
    )
    assert protocol.validate_request(header) == "push"
    assert header["rid"] == 7


def test_commit_names_a_step_and_may_ask_for_weights():
    header = protocol.decode(
        protocol.request("commit", 3, group="r0", seq=12, pull="bf16", ranges=[[0, 10]])
    )
    assert protocol.validate_request(header) == "commit" and "commit" in protocol.OPS
    assert (
        protocol.validate_request(protocol.decode(protocol.request("commit", 4, group="r0", seq=0)))
        == "commit"
    )


COMMIT = {"v": 1, "op": "commit", "rid": 1, "group": "r0", "seq": 12}


@pytest.mark.parametrize(
    "change,says",
    [
        ({"group": None}, "commit needs field 'group'"),
        ({"seq": None}, "commit needs field 'seq'"),
        ({"group": 3}, "field 'group' must be str"),
        ({"seq": -1}, "field 'seq' = -1 out of range"),
        ({"seq": True}, "field 'seq' must be an integer"),
        ({"pull": "f64"}, "field 'pull' must be one of f32, bf16, f16"),
        ({"ranges": "0-10"}, "field 'ranges' must be list"),
    ],
)
def test_malformed_commits_are_bad_field(change, says):
    header = {k: v for k, v in (COMMIT | change).items() if v is not None}
    with pytest.raises(ProtocolError) as err:
        protocol.validate_request(protocol.decode(msgpack.packb(header)))
    assert err.value.code == "bad_field" and says in err.value.message


@pytest.mark.parametrize(
    "header,code",
    [
        ({"v": 99, "op": "pull", "rid": 1}, "bad_header"),
        ({"v": 1, "rid": 1}, "bad_header"),
        ({"v": 1, "op": "fly", "rid": 1}, "unknown_op"),
        ({"v": 1, "op": "pull", "rid": -1}, "bad_field"),
        ({"v": 1, "op": "pull", "rid": True}, "bad_field"),
        ({"v": 1, "op": "pull", "rid": 1, "dtype": "f64"}, "bad_field"),
        ({"v": 1, "op": "hello", "rid": 1, "shm": 7}, "bad_field"),  # fingerprint optional
        ({"v": 1, "op": "hello", "rid": 1, "fingerprint": 5}, "bad_field"),
        ({"v": 1, "op": "pull", "rid": 1, "ranges": "0-10"}, "bad_field"),  # a list of pairs
        (
            {
                "v": 1,
                "op": "push",
                "rid": 1,
                "worker": "w",
                "seq": 1,
                "base_version": 0,
                "examples": 1,
                "dtype": "f32",
                "ranges": [[0, 10]],
                "group": 3,  # the replica's id: a str
            },
            "bad_field",
        ),
        (
            {
                "v": 1,
                "op": "push",
                "rid": 1,
                "worker": "w",
                "seq": "1",
                "base_version": 0,
                "examples": 1,
                "dtype": "f32",
            },
            "bad_field",
        ),
        (
            {
                "v": 1,
                "op": "push",
                "rid": 1,
                "worker": "w",
                "seq": 2**63 + 5,
                "base_version": 0,
                "examples": 1,
                "dtype": "f32",
            },
            "bad_field",
        ),
    ],
)
def test_invalid_requests_get_stable_codes(header, code):
    with pytest.raises(ProtocolError) as err:
        protocol.validate_request(protocol.decode(msgpack.packb(header)))
    assert err.value.code == code


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"v": 1})[:-1],  # truncated
        b"\xdd\xff\xff\xff\xff",  # array declaring 4 billion elements
        b"\xdb\x7f\xff\xff\xff" + b"x" * 10,  # string declaring 2 GiB
        msgpack.packb({1: 2}),  # non-string keys
        b"x" * (protocol.MAX_HEADER_BYTES + 1),
    ],
)
def test_hostile_headers_are_bad_header(data):
    with pytest.raises(ProtocolError) as err:
        header = protocol.decode(data)
        protocol.validate_request(header)
    assert err.value.code == "bad_header"


def test_error_reply_never_echoes_a_hostile_rid():
    reply = protocol.decode(protocol.error_reply({"x": 1}, "bad_field", "m"))
    assert reply == {"v": 1, "rid": -1, "ok": False, "error": "bad_field", "message": "m"}


@pytest.mark.parametrize("dtype,tol", [("f32", 0.0), ("bf16", 1e-2), ("f16", 1e-3)])
def test_wire_round_trip(dtype, tol):
    values = torch.randn(1001)
    wire = protocol.to_wire(values, dtype)
    assert wire.nbytes == protocol.wire_bytes(dtype, 1001)
    back = protocol.from_wire(memoryview(wire.tobytes()), dtype).float()
    torch.testing.assert_close(back, values, rtol=tol, atol=tol)


def test_f32_to_wire_is_zero_copy():
    values = torch.randn(10)
    assert protocol.to_wire(values, "f32").ctypes.data == values.data_ptr()


def test_describe_is_readable_for_good_and_bad_messages():
    text = protocol.describe([protocol.request("pull", 3, dtype="f16"), b"abcd"])
    assert "op='pull'" in text and "rid=3" in text and "payload 4 B" in text
    assert "undecodable" in protocol.describe([b"\xc1"])
    assert protocol.describe([]) == "<empty message>"
    assert "nan" in protocol.describe([msgpack.packb({"x": math.nan})])


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=30)
    | st.binary(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(data=st.one_of(st.binary(max_size=300), msgpack_values.map(msgpack.packb)))
def test_the_header_decoder_takes_anything_without_crashing(data):
    # any bytes at all: a valid request, or ProtocolError with a stable code; nothing else
    try:
        protocol.validate_request(protocol.decode(data))
    except ProtocolError as exc:
        assert exc.code in protocol.ERRORS and exc.message


@pytest.mark.parametrize(
    "address,dtype",
    [
        ("tcp://127.0.0.1:5570", "f32"),
        ("tcp://127.3.0.9:5570", "f32"),
        ("tcp://localhost:5570", "f32"),
        ("tcp://[::1]:5570", "f32"),
        ("ipc:///tmp/run/shard-0.sock", "f32"),
        ("tcp://10.0.0.2:5570", "bf16"),
        ("tcp://shard-host-1:5570", "bf16"),
    ],
)
def test_auto_wire_type_is_bf16_only_for_shards_on_other_hosts(address, dtype):
    from distbelief.client import ClientConfig, wire_dtype_for

    assert wire_dtype_for("auto", address) == dtype
    assert wire_dtype_for("f16", address) == "f16"  # a type given is kept
    ClientConfig(servers=(address,), wire_dtype="auto")  # accepted
    with pytest.raises(ValueError, match="known: f32, bf16, f16, auto"):
        ClientConfig(servers=(address,), wire_dtype="f8")
