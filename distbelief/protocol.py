"""The wire protocol between workers, shards and the averager.

Frame layout (ZeroMQ multipart; servers bind ROUTER, clients connect DEALER)::

    request:  [header, payload?]        reply:  [header, payload?]
    (a ROUTER sees the peer identity as an extra first frame; no empty delimiter)

``header`` is a msgpack map of at most ``MAX_HEADER_BYTES``:

    v      int   protocol version (``PROTOCOL_VERSION``)
    op     str   hello | pull | push | commit | stats | save | chunk
    rid    int   request id, echoed in the reply so late replies can be told apart
    ...          per-op fields (``REQUEST_FIELDS``)

Replies carry ``ok`` (bool) and, when not ok, ``error`` (one of ``ERRORS``, stable)
and ``message`` (for people). ``payload`` is one frame of raw little-endian tensor
bytes whose element type the header's ``dtype`` names (``f32``, ``bf16``, ``f16``);
servers always keep and update float32, the narrower types only save wire bytes.
``shm`` names a shared-memory segment of a client on the server's host
(:mod:`distbelief.shm`); such a push or pull carries no payload frame.

- ``hello``  {fingerprint?, shm?} -> {fingerprint, index, start, stop, total, version,
             hparams, model, num_classes, num_shards, arrival, parts,
             shm_token? | shm_error?}
             (``arrival``: how many clients connected before; a client starts its
             staggered pushes at that position)
             (without ``fingerprint``: nothing is checked; a client that does not know
             the model yet learns it here)
- ``pull``   {dtype?, shm?, ranges?} -> {version, dtype} + weights of the server's range
             (with ``shm``: written into that shared-memory segment, no payload; with
             ``ranges``: the weights over those ranges only, concatenated)
- ``push``   {worker, seq, base_version, examples, dtype, shm?, progress?, pull?,
             ranges?, group?, part?, parts?} + gradient of the range (with ``shm``:
             read from that segment, no payload)
             -> {version, applied, staleness, revoked?, generation?, pull?, held?,
             complete?}; a
             repeated (worker, seq) changes nothing. With ``pull`` (a dtype) the reply also
             carries the weights after the update, as a ``pull`` would (one round trip
             instead of two; with ``shm``: written into the segment, no payload).
             ``progress`` ([[chunk, from, upto], ...]) is read by shard 0's data
             dispatcher once the push is applied; ``revoked`` lists the chunks named
             there that are no longer the worker's, ``generation`` the dispatcher's
             (``distbelief.server.dispatch``)

A push with ``part`` and ``parts`` (``0 <= part < parts``) carries only the part-th
part of the server's range, cut by :func:`part_range` (``parts`` parts of equal size,
each a multiple of ``PART_ALIGN`` elements but the last). The server applies each part
as it arrives, with the rate and momentum the push's first arriving part fixed (its
staleness), and answers it at once, with ``pull`` the weights of that part after the
update: the link then uploads the next parts while the first ones come back, to every
shard at once. The push counts once (version, examples, ``progress``, which must come
with part 0 if at all) when its last part is applied; that part's reply says
``complete: true``. A repeated part changes nothing. Parts of a push that never
completes (its replica died between them) stay applied and are counted as a
``partial_push``. Only to a server whose ``hello`` said ``parts: true`` (an update
rule that works element by element: not with dc-asgd or gap-aware, nor adagrad); not
with ``shm`` or ``ranges``.

``ranges`` ([[lo, hi], ...], at most ``MAX_RANGES``): absolute positions ``[lo, hi)`` of
the flat vector, each inside the server's ``[start, stop)``, sorted ascending and not
overlapping; the payload (of a push) or the reply's payload (of a pull, or of a commit
with ``pull``) is the concatenation of the values over those ranges, in order. Not
with ``shm``. A push with ``ranges`` is a *piece* of the step ``(group, seq)``: one
replica split into stages (model parallelism), each stage with its own ``worker``,
pushes the gradient of its own layers, all numbering their pushes alike. A piece is
only *held*, never applied by itself, and answered at once
{version, applied: false, staleness: 0, held: true} (no ``pull`` on a piece:
``bad_field``; a retry while its step is held is answered the same, a piece of a step
applied already as a duplicate). ``examples`` must agree, ``base_version`` is the
smallest, ``progress`` comes with at most one piece. A held step is dropped, nothing
of it applied, when no ``commit`` of it comes within the shard's ``piece_timeout_s``
of its first piece.
- ``commit`` {group, seq, pull?, ranges?} -> {version, applied, staleness, revoked?,
             generation?, pull?}: apply the held step ``(group, seq)`` of a replica split
             into stages, once, as one push (the second phase: the replica commits only
             when every stage's pieces are held on every shard, so the step is applied
             on every shard or on none). ``applied`` false: applied already (by another
             stage's commit, or this one's before a retry), with that commit's
             ``staleness`` and ``revoked`` (from the ``progress`` of one of the step's
             pieces, on shard 0). ``pull`` (a dtype) brings the weights after
             the step back, over ``ranges`` only when given (``ranges`` only with
             ``pull``). Refused ``incomplete`` when the step's pieces do not cover the
             shard's range (the step is dropped) or no piece of it is held (expired, or
             the shard restarted); ``non_finite`` when its gradient is not finite (the
             step is dropped): nothing applied either way.
- ``chunk``  {worker, batch_size, until?, warm_examples?, release?, want?} (shard 0 only)
             -> {chunk, epoch, lo, hi, seed, size, left, replicas, warm_until}
             | {wait, ...} | {end}
             | {released}: the next piece of the data to train
- ``stats``  {} -> {stats}
- ``save``   {} -> {path}

Nothing here uses pickle: headers are msgpack with size limits, payloads raw bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import torch

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
# msgpack decoding limits: a header is a small flat map; anything bigger is hostile.
_MAX_STR = 4096
_MAX_CONTAINER = 256
MAX_RANGES = 64  # [lo, hi] pairs in one push's or pull's ``ranges`` (a stage's layers)
# a push's parts start at multiples of this many elements: the fused update's vector
# loop then meets every element as it would over the whole range (bit for bit)
PART_ALIGN = 1024
MAX_PARTS = 4096  # parts of one push to one server

OPS = ("hello", "pull", "push", "commit", "stats", "save", "chunk")
ERRORS = (
    "bad_header",  # not msgpack, not a map, too large, wrong version
    "bad_field",  # a field is missing or has the wrong type or value
    "unknown_op",
    "bad_size",  # payload frame count or byte size does not match the range and dtype
    "non_finite",  # gradient holds NaN or Inf
    # a commit of a step split into pieces (pushes with ranges) whose pieces do not cover
    # the shard (a stage died), or of which none is held (expired, the shard restarted):
    # nothing of it applied
    "incomplete",
    "layout_mismatch",  # fingerprint differs: another model, class count or shard count
    "not_available",  # the server cannot do this (no checkpoint directory, ...)
    "internal",
)

# wire name -> (torch dtype, numpy dtype with the same byte size used to move raw bytes)
DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "f32": (torch.float32, np.dtype("<f4")),
    "bf16": (torch.bfloat16, np.dtype("<i2")),
    "f16": (torch.float16, np.dtype("<f2")),
}


class ProtocolError(Exception):
    """A request the server refuses; ``code`` is one of ``ERRORS``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Field:
    kind: type | tuple[type, ...]
    required: bool = True
    minimum: int | None = None
    choices: tuple[str, ...] | None = None


_INT_MAX = 2**62
REQUEST_FIELDS: dict[str, dict[str, Field]] = {
    "hello": {"fingerprint": Field(str, required=False), "shm": Field(str, required=False)},
    "pull": {
        "dtype": Field(str, required=False, choices=tuple(DTYPES)),
        "shm": Field(str, required=False),
        "ranges": Field(list, required=False),
    },
    "push": {
        "worker": Field(str),
        "seq": Field(int, minimum=0),
        "base_version": Field(int, minimum=0),
        "examples": Field(int, minimum=0),
        "dtype": Field(str, choices=tuple(DTYPES)),
        "shm": Field(str, required=False),
        "progress": Field(list, required=False),
        "pull": Field(str, required=False, choices=tuple(DTYPES)),
        "ranges": Field(list, required=False),
        "group": Field(str, required=False),  # required with ranges (the shard checks)
        "part": Field(int, required=False, minimum=0),  # with parts (the shard checks)
        "parts": Field(int, required=False, minimum=1),
    },
    "commit": {
        "group": Field(str),
        "seq": Field(int, minimum=0),
        "pull": Field(str, required=False, choices=tuple(DTYPES)),
        "ranges": Field(list, required=False),  # only with pull (the shard checks)
    },
    "stats": {},
    "save": {},
    "chunk": {
        "worker": Field(str),
        "batch_size": Field(int, minimum=1),
        "until": Field(int, required=False, minimum=0),
        "warm_examples": Field(int, required=False, minimum=0),
        "release": Field(list, required=False),
        "want": Field(bool, required=False),
    },
}


def encode(header: dict[str, Any]) -> bytes:
    """Pack a header map. Raises ValueError when it exceeds ``MAX_HEADER_BYTES``."""
    data = msgpack.packb(header, use_bin_type=True)
    if len(data) > MAX_HEADER_BYTES:
        raise ValueError(f"header of {len(data)} bytes exceeds {MAX_HEADER_BYTES}")
    return data


def request(op: str, rid: int, **fields: Any) -> bytes:
    return encode({"v": PROTOCOL_VERSION, "op": op, "rid": rid, **fields})


def decode(data: bytes | memoryview) -> dict[str, Any]:
    """Unpack a header with strict limits. Raises ProtocolError("bad_header")."""
    if len(data) > MAX_HEADER_BYTES:
        raise ProtocolError("bad_header", f"header of {len(data)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=_MAX_STR,
            max_bin_len=_MAX_STR,
            max_array_len=_MAX_CONTAINER,
            max_map_len=_MAX_CONTAINER,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types for hostile bytes
        raise ProtocolError("bad_header", f"header is not valid msgpack ({exc})") from None
    if not isinstance(header, dict):
        raise ProtocolError("bad_header", "header is not a msgpack map")
    return header


def validate_request(header: dict[str, Any]) -> str:
    """Check version, op, rid and the op's fields; return the op. Raises ProtocolError."""
    if header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            "bad_header", f"protocol version {header.get('v')!r}, expected {PROTOCOL_VERSION}"
        )
    op = header.get("op")
    if not isinstance(op, str):
        raise ProtocolError("bad_header", "header has no string 'op'")
    if op not in REQUEST_FIELDS:
        raise ProtocolError("unknown_op", f"unknown op {op[:40]!r}; known: {', '.join(OPS)}")
    _check_int(header, "rid", Field(int, minimum=0))
    for name, spec in REQUEST_FIELDS[op].items():
        if name not in header:
            if spec.required:
                raise ProtocolError("bad_field", f"{op} needs field '{name}'")
            continue
        if spec.kind is int:
            _check_int(header, name, spec)
        elif not isinstance(header[name], spec.kind):
            kinds = spec.kind if isinstance(spec.kind, tuple) else (spec.kind,)
            names = " or ".join(k.__name__ for k in kinds)
            raise ProtocolError("bad_field", f"field '{name}' must be {names}")
        if spec.choices is not None and header[name] not in spec.choices:
            raise ProtocolError(
                "bad_field", f"field '{name}' must be one of {', '.join(spec.choices)}"
            )
    return op


def _check_int(header: dict[str, Any], name: str, spec: Field) -> None:
    value = header.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError("bad_field", f"field '{name}' must be an integer")
    lo = spec.minimum if spec.minimum is not None else -_INT_MAX
    if not lo <= value <= _INT_MAX:
        raise ProtocolError("bad_field", f"field '{name}' = {value} out of range")


def reply(rid: Any, **fields: Any) -> bytes:
    """An ok reply header."""
    return encode({"v": PROTOCOL_VERSION, "rid": rid, "ok": True, **fields})


def error_reply(rid: Any, code: str, message: str) -> bytes:
    """A refusal header; ``rid`` is echoed only when it was a valid integer."""
    if isinstance(rid, bool) or not isinstance(rid, int) or not 0 <= rid <= _INT_MAX:
        rid = -1
    return encode(
        {"v": PROTOCOL_VERSION, "rid": rid, "ok": False, "error": code, "message": message[:1000]}
    )


def part_range(size: int, parts: int, part: int) -> tuple[int, int]:
    """``[lo, hi)`` of the ``part``-th of ``parts`` parts of a range of ``size``
    elements: equal parts rounded up to ``PART_ALIGN`` elements, the last one shorter
    (empty when ``parts`` exceeds what the range needs)."""
    step = _part_step(size, parts)
    return min(size, part * step), min(size, (part + 1) * step)


def parts_for(size: int, nbytes: int, part_bytes: int) -> int:
    """How many parts a push of ``size`` elements taking ``nbytes`` on the wire needs
    so that none is over ``part_bytes`` (and none empty)."""
    wanted = max(1, min(MAX_PARTS, _ceil_div(nbytes, part_bytes)))
    return max(1, _ceil_div(size, _part_step(size, wanted)))


def _part_step(size: int, parts: int) -> int:
    return _ceil_div(_ceil_div(size, parts), PART_ALIGN) * PART_ALIGN


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def wire_bytes(dtype: str, count: int) -> int:
    """Bytes that ``count`` elements take on the wire in ``dtype``."""
    return DTYPES[dtype][1].itemsize * count


def to_wire(values: torch.Tensor, dtype: str, scratch: torch.Tensor | None = None) -> np.ndarray:
    """A numpy view of ``values`` (1-D float32, CPU) encoded as ``dtype``, for a zero-copy send.

    For ``f32`` this is a view of ``values`` itself: the caller must keep it unchanged
    until the send has completed. For ``bf16``/``f16`` the values are converted into
    ``scratch`` (same length, that dtype) when given, else into a new tensor.
    """
    torch_dtype, np_dtype = DTYPES[dtype]
    if torch_dtype is torch.float32:
        return values.numpy()
    if scratch is None:
        scratch = torch.empty(values.numel(), dtype=torch_dtype)
    scratch.copy_(values)
    if torch_dtype is torch.bfloat16:
        return scratch.view(torch.int16).numpy()
    return scratch.numpy()


def from_wire(buffer: memoryview | bytes, dtype: str) -> torch.Tensor:
    """A read-only tensor view of payload bytes in ``dtype`` (no copy).

    The tensor borrows ``buffer``: copy it (or convert it with ``.float()``) before
    the buffer is released. Do not write to it.
    """
    torch_dtype, np_dtype = DTYPES[dtype]
    array = np.frombuffer(buffer, dtype=np_dtype)
    tensor = _borrow(array)
    if torch_dtype is torch.bfloat16:
        return tensor.view(torch.bfloat16)
    return tensor


def _borrow(array: np.ndarray) -> torch.Tensor:
    # torch warns once per process about non-writable numpy arrays; our views are
    # read only by contract, so the warning would only be noise.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def describe(frames: list[Any]) -> str:
    """A one-line, human-readable account of a message, for logs."""
    if not frames:
        return "<empty message>"
    first = _frame_bytes(frames[0])
    try:
        header = decode(first)
        text = " ".join(f"{k}={_short(v)}" for k, v in header.items())
    except ProtocolError as exc:
        text = f"<undecodable header {len(first)} B: {exc.message[:80]}>"
    sizes = [len(_frame_bytes(f)) for f in frames[1:]]
    return f"[{text}]" + (f" + payload {'+'.join(map(str, sizes))} B" if sizes else "")


def _frame_bytes(frame: Any) -> memoryview | bytes:
    return frame.buffer if hasattr(frame, "buffer") else frame


def _short(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
