"""The client side of the protocol: one DEALER per server, every request to all at once.

Contract:

- :class:`ParameterClient` is **not thread-safe**: one thread at a time uses it (the
  replica's loop, or its background communication thread with ``--overlap``).
- Every public call **blocks** until each server involved has answered, sending to
  all servers first and collecting the replies after, so the servers work in parallel.
- ``push(grads)`` sends slices of ``grads`` **zero-copy** (for ``f32``): the caller
  must not modify ``grads`` until ``push`` returns; after it returns the buffer is the
  caller's again (every server has received its slice).
- ``pull(weights)`` writes each server's range into ``weights`` (a 1-D float32 CPU
  tensor the caller owns); nothing is allocated per call at model size.
- ``push(grads, examples, pull_into=weights)`` is both in one round trip: each server
  answers the push with its weights after the update (what a pull sent right after
  would read). Its slices go out one server after the other: the next slice is
  handed to the socket once the previous one has left it, so the link uploads to one
  shard while the first ones already answer (download), instead of every upload
  finishing at once and every answer following. The order takes the servers host by
  host in turn (one shard of each host, then a second of each...), starting at the
  position shard 0 numbered this client at ``connect()`` (``arrival``), so replicas
  that connect one after the other upload to different hosts at the same moment.
  Requests without payload (through shared memory) go to all servers at once.
  With a server on another host (``wire_parts``, ``"auto"``) whose ``hello`` said it
  takes parts, the push-and-pull goes instead in parts of at most ``part_bytes``
  (``protocol.part_range``), every part to every such server at once, each its own
  request: the server applies each as it arrives and answers with its weights, so
  the upload of the later parts and the download of the earlier ones share the link,
  and replicas pushing together share every shard host's link (server/parts.py).
  A timed-out request reopens its server's socket and sends every request still
  waiting on it again (its parts included); the server answers repeats without
  applying them again.
- A server that does not answer within ``timeout_s`` is retried (Lazy Pirate): the
  socket is closed and reopened and the same request sent again after a back-off that
  doubles from ``backoff_s`` up to ``max_backoff_s``. A push keeps its ``(worker, seq)``
  across retries, so a server that did receive the first copy applies it only once.
  After ``retries`` retries :class:`ServerUnavailable` is raised.
- With ``curve`` (a key folder, see :mod:`distbelief.curve`) every socket speaks CURVE;
  a server that does not admit our key never answers, which ends the same way.
- With ``shared_memory`` the client offers every server one segment in ``/dev/shm``
  holding the whole flat weights and gradients (:mod:`distbelief.shm`) at
  ``connect()``; a server on this host that maps it gets pushes and answers pulls
  through it, and only headers cross the socket. Others (another host, ``serve
  --no-shared-memory``, the averager) are spoken to over the wire as before. Pushes
  through shared memory are f32 whatever ``wire_dtype`` says. ``wire_dtype="auto"``
  (``work``'s default) is bf16 with servers on other hosts and f32 with the ones on
  this host (loopback, ``ipc://``): :func:`wire_dtype_for`. ``shared_buffers()``
  hands out the segment's two vectors: a caller that computes in them (passes them to
  ``push``/``pull`` as ``grads``/``weights``) saves the last copy on each side.
  A pull retried after a timeout may, rarely, find the shard's two answers written
  one over the other: weights of two adjacent versions, as async SGD reads anyway.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq

from distbelief import protocol, shm
from distbelief.curve import LOOPBACK, Curve
from distbelief.layout import Layout
from distbelief.protocol import ProtocolError

log = logging.getLogger(__name__)

# The kernel's send buffer of a TCP socket to a server (Linux doubles it), which bounds
# what the socket has in flight: 256 KiB, small enough that the slices of a push leave
# one after the other; and 64 KiB to a server on another host that takes pushes in
# parts, so that a push's packets do not stand in the link's queue (at 1 Gbit/s,
# 256 KiB made a 4 x 4-host exchange 3% slower and the 2 x 2 one 0.7%: bench/RESULTS.md,
# wire), yet enough for 10 Gbit/s over a 100 us round trip on each connection (parts
# keep the connections to every shard busy at once). Not for whole slices: one
# connection at a time then, whose acknowledgements wait behind the last slice's
# answer in the link's other direction (a 1 x 1-host exchange: 504 -> 555 ms).
SEND_BUFFER_BYTES = 256 * 1024
LINK_SEND_BUFFER_BYTES = 64 * 1024
# A push-and-pull to a server on another host goes in parts of at most this many bytes
# (ClientConfig.wire_parts): small enough that the last parts' answers, which follow
# the whole upload, take a few percent of it; large enough that the per-part work
# (a header, an update call, a reply) stays small beside the bytes (bench/wire.py)
PART_BYTES = 256 * 1024
WIRE_PARTS = ("auto", "on", "off")
# A push's next slice leaves beside the last one when that one, to another host, has
# taken SLOW_SLICE times as long as at the fastest rate seen (ParameterClient._may_leave);
# at most MAX_LEAVING at once. Slices under MIN_TIMED_BYTES leave through the kernel's
# buffer too fast to time the link by.
SLOW_SLICE = 1.25
MAX_LEAVING = 2
MIN_TIMED_BYTES = 4 * SEND_BUFFER_BYTES


def default_worker_id() -> str:
    """Unique per process: host, pid and a random suffix (a restarted replica is new)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def wire_dtype_for(setting: str, address: str) -> str:
    """The element type on the wire with the server at ``address``: ``setting``, or for
    ``"auto"`` bf16 with a server on another host (where the link is the limit, and
    bf16 converged as well as f32 in the staleness simulator: bench/RESULTS.md) and f32
    with one on this host (loopback or ``ipc://``, where the cores are the limit)."""
    if setting != "auto":
        return setting
    return "f32" if on_this_host(address) else "bf16"


def in_parts_for(setting: str, address: str) -> bool:
    """Whether a push-and-pull to the server at ``address`` goes in parts: ``setting``
    ``"on"``, or ``"auto"`` with a server on another host (where the link is the limit
    and the parts let its two directions work at once)."""
    return setting == "on" or (setting == "auto" and not on_this_host(address))


def on_this_host(address: str) -> bool:
    """Whether ``address`` is on this host: ``ipc://``, ``inproc://`` or loopback TCP."""
    if not address.startswith("tcp://"):
        return True
    host = address[len("tcp://") :].rsplit(":", 1)[0]
    return host in LOOPBACK or host.startswith("127.")


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    servers: tuple[str, ...]
    worker: str = field(default_factory=default_worker_id)
    timeout_s: float = 30.0  # a 50 MB push to a busy shard on a loaded 2-core host can take seconds
    retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 32.0
    wire_dtype: str = "f32"
    curve: str | None = None  # a key folder: CURVE on every socket
    shared_memory: bool = False  # payloads through /dev/shm with servers on this host
    # a stage of a split replica: only these ranges [lo, hi) of the flat vector, held
    # end to end in the caller's buffers, pushed as pieces of the replica ``group``'s step
    ranges: tuple[tuple[int, int], ...] | None = None
    group: str | None = None
    # a push-and-pull over the wire in parts of at most part_bytes, each applied and
    # answered as it arrives: "auto" with servers on other hosts, "on" with every
    # server reached over the wire, "off" never (server/parts.py)
    wire_parts: str = "auto"
    part_bytes: int = PART_BYTES

    def __post_init__(self) -> None:
        if self.ranges is not None and (not self.ranges or not self.group):
            raise ValueError("a client of some ranges needs at least one range and a group")
        if not self.servers:
            raise ValueError("no servers given (expected tcp://host:port,...)")
        for address in self.servers:
            if not address.startswith(("tcp://", "ipc://", "inproc://")):
                raise ValueError(f"server address {address!r} must look like tcp://host:port")
        known = (*protocol.DTYPES, "auto")
        if self.wire_dtype not in known:
            raise ValueError(f"unknown wire dtype {self.wire_dtype!r}; known: {', '.join(known)}")
        if self.timeout_s <= 0 or self.retries < 0:
            raise ValueError("timeout_s must be positive and retries non-negative")
        if self.wire_parts not in WIRE_PARTS:
            raise ValueError(
                f"unknown wire parts setting {self.wire_parts!r}; known: {', '.join(WIRE_PARTS)}"
            )
        if self.part_bytes < 4 * protocol.PART_ALIGN:
            raise ValueError(f"part_bytes must be at least {4 * protocol.PART_ALIGN}")


class ServerUnavailable(ConnectionError):
    """A server did not answer after every retry."""


class ServerRefused(RuntimeError):
    """A server answered with an error; ``code`` is the protocol's stable error code."""

    def __init__(self, index: int, address: str, code: str, message: str) -> None:
        super().__init__(f"server {index} ({address}) refused: {code}: {message}")
        self.index = index
        self.code = code


@dataclass(frozen=True, kw_only=True)
class ServerInfo:
    index: int
    address: str
    start: int
    stop: int
    total: int
    version: int
    hparams: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class PushResult:
    version: int
    applied: bool
    staleness: int
    revoked: tuple[int, ...] = ()  # shard 0: data chunks named in progress no longer ours
    generation: int = 0  # shard 0's dispatcher generation, with ``revoked``


@dataclass
class _Leaving:
    """A staggered payload on its way out of its socket."""

    server: int
    tracker: zmq.MessageTracker
    started: float
    nbytes: int


def _nbytes(frame: Any) -> int:
    return frame.nbytes if hasattr(frame, "nbytes") else len(frame)


@dataclass
class _Pending:
    server: int
    rid: int
    header: bytes
    payload: list[Any]
    deadline: float
    resend_at: float | None = None
    attempts: int = 0


# a request's key in an exchange: a server's index, or (server, part) for a push in parts
Key = int | tuple[int, int]


class _Waiting:
    """An exchange's requests still waiting for their replies, by key and by request
    id (a reply is matched in constant time: a push in parts has hundreds out), with
    ``due``, the earliest moment one of them times out or is to be sent again (never
    later than that; earlier after replies came, when a look finds nothing to do), and
    ``listening``, the servers that may answer (a superset until the next look)."""

    def __init__(self) -> None:
        self.by_key: dict[Key, _Pending] = {}
        self.by_rid: dict[int, Key] = {}
        self.due = math.inf
        self.listening: set[int] = set()

    def __bool__(self) -> bool:
        return bool(self.by_key)

    def add(self, key: Key, p: _Pending) -> None:
        self.by_key[key] = p
        self.by_rid[p.rid] = key
        self.due = min(self.due, p.deadline)
        self.listening.add(p.server)

    def answered(self, server: int, rid: Any) -> Key | None:
        """The key of our request ``rid`` to ``server``, no longer waiting; None for a
        reply we do not wait for (a late one to a request retried since)."""
        key = self.by_rid.get(rid) if isinstance(rid, int) else None
        if key is None or self.by_key[key].server != server:
            return None
        del self.by_rid[rid], self.by_key[key]
        return key

    def look(self) -> None:
        """``due`` and ``listening`` as they are now."""
        waits = self.by_key.values()
        self.due = min(
            (p.deadline if p.resend_at is None else p.resend_at for p in waits), default=math.inf
        )
        self.listening = {p.server for p in waits if p.resend_at is None}


# a request's payload frames, or what makes them as the request leaves (a part's wire type)
Payload = list[Any] | Callable[[], list[Any]]
# called with each reply as it arrives (key, header, payload frames); what it returns is
# kept as the reply's payload (a push in parts takes each part's weights at once)
Arrived = Callable[[Key, dict[str, Any], list[zmq.Frame]], Any]


def _server(key: Key) -> int:
    return key if isinstance(key, int) else key[0]


class ParameterClient:
    """Pull and push the flat parameter vector across every server at once."""

    def __init__(self, cfg: ClientConfig, layout: Layout | None = None) -> None:
        self.cfg = cfg
        self.layout = layout
        self.curve = Curve.load(cfg.curve, server=False) if cfg.curve else None
        self.context = zmq.Context()
        # push-and-pull in parts (wire_parts): as the setting says until connect(), then
        # with the servers whose hello said they can
        self.in_parts = [
            cfg.ranges is None and in_parts_for(cfg.wire_parts, a) for a in cfg.servers
        ]
        self.sockets: list[zmq.Socket] = [self._open(i) for i in range(len(cfg.servers))]
        self.info: list[ServerInfo] = []
        self.versions = [0] * len(cfg.servers)  # version of each server at our last pull
        self.seq = 0
        self.rid = 0
        self.retries_total = 0
        # a server went back to an older version (restarted from a checkpoint) since our
        # last pull: our weights are ahead of it, and the caller should pull again
        self.must_pull = False
        self._scratch: list[torch.Tensor | None] = [None] * len(cfg.servers)
        self.segment: shm.Segment | None = None  # shared with the servers in self.shared
        self.send_order = list(range(len(cfg.servers)))  # of a push's slices (connect())
        self.hosts = [host_of(a) for a in cfg.servers]
        self.fastest_bytes_per_s = 0.0  # of a staggered slice leaving its socket
        self.shared = [False] * len(cfg.servers)
        self.dtypes = [wire_dtype_for(cfg.wire_dtype, a) for a in cfg.servers]
        self.part_counts = [1] * len(cfg.servers)  # of the last push in parts, per server
        # with cfg.ranges: server -> its pieces (lo, hi, where they lie in our buffers)
        self.pieces: dict[int, list[tuple[int, int, int]]] = {}

    # -- public verbs ----------------------------------------------------------------

    def connect(self) -> list[ServerInfo]:
        """``hello`` every server; check fingerprints and that the ranges tile the vector."""
        if self.layout is None:
            raise ValueError("connect() needs the model layout")
        fingerprint = self.layout.fingerprint(len(self.cfg.servers))
        replies = self._exchange(
            {i: ("hello", {"fingerprint": fingerprint}, []) for i in self._all}
        )
        self.info = [
            ServerInfo(
                index=i,
                address=self.cfg.servers[i],
                start=h["start"],
                stop=h["stop"],
                total=h["total"],
                version=h["version"],
                hparams=h.get("hparams", {}),
            )
            for i, (h, _) in sorted(replies.items())
        ]
        edges = [0] + [s.stop for s in self.info]
        if [s.start for s in self.info] != edges[:-1] or edges[-1] != self.layout.total:
            ranges = ", ".join(f"[{s.start}, {s.stop})" for s in self.info)
            raise ValueError(
                f"servers' ranges {ranges} do not tile [0, {self.layout.total}): "
                "list the servers in shard order"
            )
        self.versions = [s.version for s in self.info]
        self.send_order = staggered_order(self.cfg.servers, replies[0][0].get("arrival", 0))
        guessed, self.in_parts = (
            self.in_parts,
            [self.in_parts[i] and bool(h.get("parts")) for i, (h, _) in sorted(replies.items())],
        )
        for i in (i for i in self._all if self.in_parts[i] != guessed[i]):
            self._reopen(i)  # whole slices: its send buffer as on this host
        if self.cfg.ranges is not None:
            self.pieces = cut_ranges(self.cfg.ranges, [(s.start, s.stop) for s in self.info])
            return self.info  # pieces travel over the wire only
        if self.cfg.shared_memory and shm.available():
            self._offer_segments(fingerprint)
        return self.info

    def hello_all(self) -> dict[int, tuple[dict[str, Any], list[zmq.Frame]]]:
        """``hello`` without a fingerprint to every server: what each holds, unchecked."""
        return self._exchange({i: ("hello", {}, []) for i in self._all})

    def _offer_segments(self, fingerprint: str) -> None:
        """Offer every server our segment; use it with those that prove to see it."""
        if self.segment is None:
            self.segment = shm.Segment.create(self.layout.total)
        fields = {"fingerprint": fingerprint, "shm": self.segment.name}
        replies = self._exchange({i: ("hello", fields, []) for i in self._all})
        for i, (header, _) in sorted(replies.items()):
            self.shared[i] = header.get("shm_token") == self.segment.token.hex()
            if not self.shared[i]:
                log.info(
                    "server %d (%s) does not share memory with us (%s); using the wire",
                    i,
                    self.cfg.servers[i],
                    header.get("shm_error", "another token"),
                )
        if any(self.shared):
            log.info("shared memory with %d of %d server(s)", sum(self.shared), len(self.shared))
        else:
            self._close_segment()

    def shared_buffers(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(weights, grads)`` in shared memory, when some server shares it; else None.

        ``pull(weights)`` and ``push(grads)`` with exactly these tensors copy nothing on
        our side: the shards write and read them in place.
        """
        if self.segment is None:
            return None
        return self.segment.weights, self.segment.grads

    def _close_segment(self) -> None:
        if self.segment is not None:
            self.segment.close()
            self.segment = None
            self.shared = [False] * len(self.shared)

    def pull(self, weights: torch.Tensor) -> list[int]:
        """Fill ``weights`` from every server; return their versions. Blocks."""
        self._need_info()
        requests = {}
        for i in self._targets:
            fields = {"shm": self.segment.name} if self.shared[i] else {"dtype": self.dtypes[i]}
            requests[i] = ("pull", fields | self._ranges_of(i), [])
        replies = self._exchange(requests)
        for i, (header, payload) in replies.items():
            self._take_weights(i, header.get("dtype"), payload, weights)
            self._note_version(i, header["version"])
        self.must_pull = False
        return list(self.versions)

    def _take_weights(self, i: int, dtype: Any, payload: list, weights: torch.Tensor) -> None:
        """Server ``i``'s range of ``weights`` from its answer (or from our segment)."""
        info = self.info[i]
        if self.shared[i]:
            if not _same_buffer(weights, self.segment.weights):
                weights[info.start : info.stop].copy_(self.segment.weights[info.start : info.stop])
            return
        body = payload[0].buffer if len(payload) == 1 else b""
        pieces = self.pieces.get(i, [(info.start, info.stop, info.start)])
        if dtype not in protocol.DTYPES or len(body) != protocol.wire_bytes(
            dtype, sum(hi - lo for lo, hi, _ in pieces)
        ):
            raise ServerRefused(
                i, info.address, "bad_size", "weights in the reply have the wrong size"
            )
        values, seen = protocol.from_wire(body, dtype), 0
        for lo, hi, at in pieces:
            weights[at : at + hi - lo].copy_(values[seen : seen + hi - lo])
            seen += hi - lo

    def _note_version(self, i: int, version: int) -> None:
        if version < self.versions[i]:
            self._went_back(i, version)
        self.versions[i] = version

    def push(
        self,
        grads: torch.Tensor,
        examples: int,
        progress: list[list[int]] | None = None,
        pull_into: torch.Tensor | None = None,
    ) -> list[PushResult]:
        """Send every server its slice of ``grads`` (computed at the last pulled versions).

        ``progress`` (``[[chunk, from, upto], ...]``) goes to shard 0, whose data
        dispatcher credits those positions once it has applied the push. With
        ``pull_into`` the servers answer with their weights after the update, written
        there as ``pull`` would (one round trip instead of two). Blocks until every
        server has answered; ``grads`` is the caller's again after.

        A stage's client (with ``ranges``) pushes pieces: the shards hold them, answer
        at once (``applied`` false) and apply the step at :meth:`commit`, which also
        brings the weights back (no ``pull_into`` here).
        """
        self._need_info()
        if self.cfg.ranges is not None and pull_into is not None:
            raise ValueError("a stage's pieces are held until commit(): pull with commit()")
        self.seq += 1
        requests = {}
        for i in self._targets:
            info, dtype = self.info[i], self.dtypes[i]
            fields = {
                "worker": self.cfg.worker,
                "seq": self.seq,
                "base_version": self.versions[i],
                "examples": examples,
                "dtype": dtype,
            }
            if progress and i == 0:
                fields["progress"] = progress
            if pull_into is not None:
                fields["pull"] = "f32" if self.shared[i] else dtype
            if i in self.pieces:  # held by the shard until commit()
                fields |= self._ranges_of(i) | {"group": self.cfg.group}
                requests[i] = ("push", fields, [self._encode(i, self._gather(i, grads))])
                continue
            values = grads[info.start : info.stop]
            if not self.shared[i] and pull_into is not None and self.in_parts[i]:
                requests |= self._parts(i, fields, values)
                continue
            if not self.shared[i]:
                requests[i] = ("push", fields, [self._encode(i, values)])
                continue
            if not _same_buffer(grads, self.segment.grads):  # the shard reads it in place
                self.segment.grads[info.start : info.stop].copy_(values)
            requests[i] = ("push", fields | {"dtype": "f32", "shm": self.segment.name}, [])
        arrived = None
        if pull_into is not None and any(not isinstance(k, int) for k in requests):
            # parts' weights are taken as they arrive: a push that fails half-way leaves
            # them half taken, to be pulled again
            self.must_pull = True
            arrived = self._part_arrived(pull_into)
        return self._results(self._exchange(requests, stagger=True, arrived=arrived), pull_into)

    def _parts(
        self, i: int, fields: dict[str, Any], values: torch.Tensor
    ) -> dict[Key, tuple[str, dict[str, Any], Payload]]:
        """Server ``i``'s push (``values``: its slice) as parts of at most
        ``part_bytes`` in its wire type, each its own request, encoded as it leaves;
        ``progress`` with part 0 only."""
        size = self.info[i].stop - self.info[i].start
        nbytes = protocol.wire_bytes(self.dtypes[i], size)
        n = self.part_counts[i] = protocol.parts_for(size, nbytes, self.cfg.part_bytes)
        rest = {k: v for k, v in fields.items() if k != "progress"}
        requests: dict[Key, tuple[str, dict[str, Any], Payload]] = {}
        for k in range(n):
            lo, hi = protocol.part_range(size, n, k)
            more = {"part": k, "parts": n}
            wire = functools.partial(self._encoded_part, i, values, lo, hi)
            requests[(i, k)] = ("push", (fields if k == 0 else rest) | more, wire)
        return requests

    def _encoded_part(self, i: int, values: torch.Tensor, lo: int, hi: int) -> list[Any]:
        return [self._encode(i, values, lo, hi)]

    def _part_arrived(self, weights: torch.Tensor) -> Arrived:
        """What takes each part's weights into ``weights`` as its reply arrives (the
        copy done while later parts are still on the wire); whole replies kept."""

        def take(key: Key, header: dict[str, Any], payload: list[zmq.Frame]) -> Any:
            if isinstance(key, int):
                return payload
            self._take_part(*key, header, payload, weights)
            return None

        return take

    def commit(
        self, pull_into: torch.Tensor | None = None, everywhere: bool = False
    ) -> list[PushResult]:
        """Have the shards apply the step of our last ``push`` (pieces, held until now),
        with every stage's pieces: the shards holding some of our ranges, or with
        ``everywhere`` every shard (stage 0 commits for the whole replica, so that a
        stage dying now cannot leave the step applied on some shards only). With
        ``pull_into``, our ranges' weights after the update come back into it. A shard
        that applied the step already (another stage's commit came first) answers
        ``applied`` false, with the weights all the same. Blocks."""
        self._need_info()
        if self.cfg.ranges is None:
            raise ValueError("commit() is for a stage's pieces (a client with ranges)")
        requests = {}
        for i in self._all if everywhere else self._targets:
            fields: dict[str, Any] = {"group": self.cfg.group, "seq": self.seq}
            if pull_into is not None and i in self.pieces:
                fields |= {"pull": self.dtypes[i]} | self._ranges_of(i)
            requests[i] = ("commit", fields, [])
        return self._results(self._exchange(requests), pull_into, only=self.pieces)

    def _results(
        self,
        replies: dict[int, tuple[dict[str, Any], list[zmq.Frame]]],
        pull_into: torch.Tensor | None,
        only: dict | None = None,
    ) -> list[PushResult]:
        """What the servers answered a push (or a commit): weights taken into
        ``pull_into`` (from the servers in ``only``, when given), versions noted."""
        results = []
        replies = self._fold_parts(replies)
        for i, (h, payload) in sorted(replies.items()):
            # our push came after our pull: applied, it leaves the version above what we
            # pulled; unless the server has lost versions since (a held piece: not yet)
            if h["version"] < self.versions[i] + (1 if h["applied"] else 0):
                self._went_back(i, h["version"])
            if pull_into is not None and (only is None or i in only):
                if payload is not None:  # None: in parts, taken already
                    self._take_weights(i, h.get("pull"), payload, pull_into)
                self.versions[i] = h["version"]
            results.append(
                PushResult(
                    version=h["version"],
                    applied=h["applied"],
                    staleness=h["staleness"],
                    revoked=tuple(h.get("revoked", ())),
                    generation=h.get("generation", 0),
                )
            )
        if pull_into is not None:
            self.must_pull = False
        return results

    def _fold_parts(
        self, replies: dict[Key, tuple[dict[str, Any], list]]
    ) -> dict[int, tuple[dict[str, Any], list | None]]:
        """The answers to a push in parts, one per server as a whole push's would be
        (each part's weights were taken as it arrived): the server's version after its
        last part, applied when a part completed the push (its ``revoked`` with it)."""
        folded: dict[int, tuple[dict[str, Any], list | None]] = {}
        for key, (h, payload) in replies.items():
            if isinstance(key, int):
                folded[key] = (h, payload)
                continue
            i = key[0]
            seen = folded.get(i, ({"version": 0, "applied": False, "staleness": 0}, None))[0]
            merged = seen | {"version": max(seen["version"], h["version"])}
            merged["staleness"] = max(seen["staleness"], h["staleness"])
            if h.get("complete"):
                merged |= {k: h[k] for k in ("revoked", "generation") if k in h}
                merged["applied"] = True
            folded[i] = (merged, None)
        return folded

    def _take_part(
        self, i: int, part: int, h: dict[str, Any], payload: list, weights: torch.Tensor
    ) -> None:
        """A part's weights (server ``i``'s answer to part ``part``) into ``weights``."""
        info = self.info[i]
        lo, hi = protocol.part_range(info.stop - info.start, self.part_counts[i], part)
        body = payload[0].buffer if len(payload) == 1 else b""
        dtype = h.get("pull")
        if dtype not in protocol.DTYPES or len(body) != protocol.wire_bytes(dtype, hi - lo):
            raise ServerRefused(
                i, info.address, "bad_size", f"weights of part {part} have the wrong size"
            )
        weights[info.start + lo : info.start + hi].copy_(protocol.from_wire(body, dtype))

    def chunk(self, **fields: Any) -> dict[str, Any]:
        """Ask shard 0's data dispatcher (the ``chunk`` op) and return its reply header."""
        ((header, _),) = self._exchange({0: ("chunk", fields, [])}).values()
        return header

    def stats(self) -> list[dict[str, Any]]:
        """Each server's counters and hyper-parameters."""
        replies = self._exchange({i: ("stats", {}, []) for i in self._all})
        return [h["stats"] for _, (h, _) in sorted(replies.items())]

    def save(self) -> list[str]:
        """Ask every server to write a checkpoint now; return the paths."""
        replies = self._exchange({i: ("save", {}, []) for i in self._all})
        return [h["path"] for _, (h, _) in sorted(replies.items())]

    def close(self) -> None:
        for s in self.sockets:
            s.close(linger=0)
        self.context.term()
        self._close_segment()

    def __enter__(self) -> ParameterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- machinery -------------------------------------------------------------------

    def _went_back(self, i: int, version: int) -> None:
        log.warning(
            "server %d went back from version %d to %d (restarted from a checkpoint?); "
            "pulling again",
            i,
            self.versions[i],
            version,
        )
        self.must_pull = True

    @property
    def _all(self) -> range:
        return range(len(self.cfg.servers))

    @property
    def _targets(self) -> list[int]:
        """The servers pushes and pulls go to: those holding some of our ranges."""
        return sorted(self.pieces) if self.cfg.ranges is not None else list(self._all)

    def _ranges_of(self, i: int) -> dict[str, Any]:
        if i not in self.pieces:
            return {}
        return {"ranges": [[lo, hi] for lo, hi, _ in self.pieces[i]]}

    def _gather(self, i: int, buffer: torch.Tensor) -> torch.Tensor:
        """Server ``i``'s pieces of ``buffer`` end to end (a view when there is one)."""
        parts = [buffer[at : at + hi - lo] for lo, hi, at in self.pieces[i]]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _need_info(self) -> None:
        if not self.info:
            raise RuntimeError("call connect() first")

    def _encode(self, i: int, values: torch.Tensor, lo: int = 0, hi: int | None = None) -> Any:
        """``values[lo:hi]`` (server ``i``'s slice) in its wire type: a view for f32,
        else converted into the same place of that server's scratch buffer."""
        dtype = self.dtypes[i]
        hi = values.numel() if hi is None else hi
        if dtype == "f32":
            return protocol.to_wire(values[lo:hi], dtype)
        if self._scratch[i] is None:
            self._scratch[i] = torch.empty(values.numel(), dtype=protocol.DTYPES[dtype][0])
        return protocol.to_wire(values[lo:hi], dtype, self._scratch[i][lo:hi])

    def _open(self, i: int) -> zmq.Socket:
        """A socket to server ``i``: with a small send buffer when its pushes go in parts
        to another host (``LINK_SEND_BUFFER_BYTES``)."""
        address = self.cfg.servers[i]
        small = self.in_parts[i] and not on_this_host(address)
        buffer = LINK_SEND_BUFFER_BYTES if small else SEND_BUFFER_BYTES
        return open_dealer(self.context, address, self.curve, buffer)

    def _reopen(self, i: int) -> None:
        self.sockets[i].close(linger=0)
        self.sockets[i] = self._open(i)

    def _exchange(
        self,
        requests: dict[Key, tuple[str, dict[str, Any], Payload]],
        stagger: bool = False,
        arrived: Arrived | None = None,
    ) -> dict[Key, tuple[dict[str, Any], Any]]:
        """Send each request to its server, then collect every reply (with retries).

        A request's key is its server's index, or ``(server, part)`` for the parts of a
        push in parts (several requests to one server at once). Requests go to all
        servers at once; with ``stagger``, whole pushes with a payload go one after the
        other in ``send_order``, each once the previous one's payload has left its
        socket (parts go at once: each is small, and every server answers them as they
        arrive). Each request is made as it leaves (its header, and its payload when
        that is a function: the first part is on the wire while the last is encoded);
        ``arrived`` sees each reply as it comes (while later ones are on the wire).
        """
        whole = [k for k in requests if isinstance(k, int)]
        parts = sorted((k for k in requests if not isinstance(k, int)), key=lambda k: (k[1], k[0]))
        queued = parts + ([i for i in self.send_order if i in whole] if stagger else sorted(whole))
        queued.reverse()  # popped from the end
        waiting = _Waiting()
        done: dict[Key, tuple[dict[str, Any], Any]] = {}
        leaving: list[_Leaving] = []  # staggered payloads not yet out of their sockets
        while queued or waiting:
            while queued and self._may_leave(leaving, _server(queued[-1])):
                key = queued.pop()
                op, fields, payload = requests[key]
                self.rid += 1
                header = protocol.request(op, self.rid, **fields)
                payload = payload() if callable(payload) else payload
                p = _Pending(_server(key), self.rid, header, payload, 0.0)
                now = time.monotonic()
                track = stagger and isinstance(key, int) and bool(p.payload)
                tracker = self._send(p, now, track=track)
                waiting.add(key, p)
                if tracker is not None and queued:
                    leaving.append(_Leaving(p.server, tracker, now, sum(map(_nbytes, p.payload))))
            if waiting:
                self._poll_once(waiting, done, arrived, max_wait_s=0.001 if queued else None)
            elif queued:
                time.sleep(0.001)
        return done

    def _may_leave(self, leaving: list[_Leaving], following: int) -> bool:
        """Whether the next staggered slice (to server ``following``) may leave: once
        the last one has left its socket; or beside it, when that one has taken
        ``SLOW_SLICE`` times as long as at the fastest rate seen and goes to another
        host: its host's link is shared with another replica's upload, and ours has
        room for a second one (two replicas' uploads would otherwise move from host to
        host together at half the rate: bench/RESULTS.md, wire). Never more than
        ``MAX_LEAVING`` at once."""
        now = time.monotonic()
        for item in [x for x in leaving if x.tracker.done]:
            leaving.remove(item)
            if item.nbytes >= MIN_TIMED_BYTES:
                rate = item.nbytes / max(now - item.started, 1e-6)
                self.fastest_bytes_per_s = max(self.fastest_bytes_per_s, rate)
        if not leaving:
            return True
        last = leaving[-1]
        return beside_slow_slice(
            in_flight=len(leaving),
            same_host=self.hosts[last.server] == self.hosts[following],
            elapsed_s=now - last.started,
            nbytes=last.nbytes,
            fastest_bytes_per_s=self.fastest_bytes_per_s,
        )

    def _send(self, p: _Pending, now: float, track: bool = False) -> zmq.MessageTracker | None:
        # Never block here: a DEALER has no pipe to queue on while its connection is
        # down (a refused CURVE handshake tears it down at once), and a blocking send
        # would then wait forever. A request that could not be queued times out and is
        # retried like one whose reply was lost.
        tracker = None
        try:
            tracker = self.sockets[p.server].send_multipart(
                [p.header, *p.payload], flags=zmq.NOBLOCK, copy=False, track=track
            )
        except zmq.Again:
            address = self.cfg.servers[p.server]
            log.debug(
                "server %d (%s) not connected; request %d not queued", p.server, address, p.rid
            )
        p.deadline = now + self.cfg.timeout_s
        p.resend_at = None
        return tracker if track else None

    def _poll_once(
        self,
        waiting: _Waiting,
        done: dict,
        arrived: Arrived | None,
        max_wait_s: float | None = None,
    ) -> None:
        now = time.monotonic()
        wake = waiting.due if max_wait_s is None else min(waiting.due, now + max_wait_s)
        listening = waiting.listening
        poller = zmq.Poller()
        for i in listening:
            poller.register(self.sockets[i], zmq.POLLIN)
        ready = dict(poller.poll(max(0.0, wake - now) * 1000)) if listening else {}
        if not listening:
            time.sleep(max(0.0, wake - now))
        for i in listening:
            if self.sockets[i] in ready:
                self._receive(i, waiting, done, arrived)
        now = time.monotonic()
        if now < waiting.due:
            return
        for p in list(waiting.by_key.values()):
            if p.resend_at is not None and now >= p.resend_at:
                self._send(p, now)
            elif p.resend_at is None and now >= p.deadline:
                self._retry_later(p.server, waiting.by_key, now)
        waiting.look()

    def _receive(self, i: int, waiting: _Waiting, done: dict, arrived: Arrived | None) -> None:
        """Every reply waiting on server ``i``'s socket, matched to its request (and
        handed to ``arrived``)."""
        while True:
            try:
                frames = self.sockets[i].recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                header = protocol.decode(frames[0].buffer)
            except ProtocolError as exc:
                log.warning("dropping undecodable reply from server %d: %s", i, exc)
                continue
            key = waiting.answered(i, header.get("rid"))
            if key is None:
                continue  # a late reply to a request we already retried
            if not header.get("ok"):
                raise ServerRefused(
                    i, self.cfg.servers[i], str(header.get("error")), str(header.get("message"))
                )
            done[key] = (header, arrived(key, header, frames[1:]) if arrived else frames[1:])

    def _retry_later(self, i: int, pending: dict[Key, _Pending], now: float) -> None:
        """Server ``i`` did not answer in time: reopen its socket (which drops what was
        queued on it) and send every request still waiting on it again after a back-off."""
        waiting = [p for p in pending.values() if p.server == i and p.resend_at is None]
        attempts = max(p.attempts for p in waiting) + 1
        if attempts > self.cfg.retries:
            raise ServerUnavailable(
                f"no answer from server {i} ({self.cfg.servers[i]}) after {attempts} tries "
                f"of {self.cfg.timeout_s:g} s: unreachable or not authorised"
            )
        self.retries_total += 1
        backoff = min(self.cfg.max_backoff_s, self.cfg.backoff_s * 2 ** (attempts - 1))
        log.warning(
            "server %d (%s) did not answer in %g s; reconnecting, retry %d/%d in %g s",
            i,
            self.cfg.servers[i],
            self.cfg.timeout_s,
            attempts,
            self.cfg.retries,
            backoff,
        )
        self._reopen(i)
        for p in [p for p in pending.values() if p.server == i]:
            p.attempts = attempts
            p.resend_at = now + backoff


def cut_ranges(
    ranges: tuple[tuple[int, int], ...], servers: list[tuple[int, int]]
) -> dict[int, list[tuple[int, int, int]]]:
    """Each server's share of ``ranges`` (laid end to end in a compact buffer): server
    index -> ``[(lo, hi, offset in the compact buffer), ...]``, servers holding none
    left out."""
    pieces: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    at = 0
    for lo, hi in ranges:
        for i, (start, stop) in enumerate(servers):
            a, b = max(lo, start), min(hi, stop)
            if a < b:
                pieces[i].append((a, b, at + a - lo))
        at += hi - lo
    return dict(pieces)


def staggered_order(servers: tuple[str, ...], arrival: int) -> list[int]:
    """The order of a push's slices: servers host by host in turn (the first shard of
    each host, then the second of each...), rotated by ``arrival``. Replicas numbered
    one after the other then start their uploads on different hosts."""
    by_host: dict[str, list[int]] = defaultdict(list)
    for i, address in enumerate(servers):
        by_host[host_of(address)].append(i)
    rounds = max(len(group) for group in by_host.values())
    order = [g[r] for r in range(rounds) for g in by_host.values() if r < len(g)]
    first = arrival % len(order)
    return order[first:] + order[:first]


def beside_slow_slice(
    *, in_flight: int, same_host: bool, elapsed_s: float, nbytes: int, fastest_bytes_per_s: float
) -> bool:
    """Whether the next slice of a push leaves beside ``in_flight`` ones still leaving,
    the last of which has taken ``elapsed_s`` for its ``nbytes``: only to another host,
    only once that one has taken ``SLOW_SLICE`` times as long as at the fastest rate
    seen (none seen yet: no), and never past ``MAX_LEAVING``."""
    if in_flight >= MAX_LEAVING or same_host or fastest_bytes_per_s <= 0:
        return False  # on the same host a second upload would only share its link
    return elapsed_s > SLOW_SLICE * nbytes / fastest_bytes_per_s


def host_of(address: str) -> str:
    """The host part of a server's address (``local`` for ipc and in-process ones)."""
    return address.rsplit(":", 1)[0] if address.startswith("tcp://") else "local"


def _same_buffer(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.numel() == b.numel()


def open_dealer(
    context: zmq.Context,
    address: str,
    curve: Curve | None,
    send_buffer: int = SEND_BUFFER_BYTES,
) -> zmq.Socket:
    """A DEALER connected to ``address`` (speaking CURVE with ``curve``; over TCP with
    a kernel send buffer of ``send_buffer`` bytes)."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if address.startswith("tcp://"):
        # a push's next slice starts once the last has left ZeroMQ for the kernel; with
        # Linux's autotuned buffer (up to 4 MB) several would share the link at once
        sock.setsockopt(zmq.SNDBUF, send_buffer)
    if curve:
        curve.secure_client(sock)
    sock.connect(address)
    return sock


@dataclass(frozen=True)
class ClusterModel:
    """What every server of a cluster says it holds (``hello`` without a fingerprint)."""

    model: str
    num_classes: int
    num_shards: int


def describe_servers(
    servers: tuple[str, ...], *, timeout_s: float, retries: int, curve: str | None = None
) -> ClusterModel:
    """Ask every server which model it holds, with how many classes, cut into how many
    shards; check that they agree with each other and with the number of ``servers``.

    Raises :class:`ServerUnavailable` when one does not answer after ``retries``
    retries, ``ValueError`` (one line) when the answers disagree.
    """
    cfg = ClientConfig(servers=servers, timeout_s=timeout_s, retries=retries, curve=curve)
    with ParameterClient(cfg) as client:
        replies = client.hello_all()
    answers = []
    for i, (header, _) in sorted(replies.items()):
        if not {"model", "num_classes", "num_shards"} <= header.keys():
            raise ValueError(
                f"server {servers[i]} does not say which model it holds (an older "
                "distbelief?): give --model and --num-classes"
            )
        answers.append(ClusterModel(header["model"], header["num_classes"], header["num_shards"]))
    if len(set(answers)) > 1:
        pairs = zip(servers, answers, strict=True)
        held = "; ".join(f"{a}: {m.model} with {m.num_classes} classes" for a, m in pairs)
        raise ValueError(f"the servers hold different models ({held})")
    found = answers[0]
    if found.num_shards != len(servers):
        raise ValueError(
            f"{len(servers)} server(s) given but the shards are {found.num_shards}: "
            "list every shard, in shard order"
        )
    return found


def resolve_model(
    servers: tuple[str, ...],
    model: str | None,
    num_classes: int | None,
    *,
    timeout_s: float,
    retries: int,
    curve: str | None = None,
    where: str = "the shards",
) -> tuple[str, int]:
    """``model`` and ``num_classes`` as given; what ``servers`` hold
    (:func:`describe_servers`) where one is left out. Both given: nothing is asked (the
    fingerprint check at ``connect()`` refuses a contradiction then). A given value that
    differs from the servers' is a ``ValueError`` naming both; ``where`` names them."""
    if model is not None and num_classes is not None:
        return model, num_classes
    held = describe_servers(servers, timeout_s=timeout_s, retries=retries, curve=curve)
    where = f"{where} at {servers[0]}"
    for flag, given, found in (
        ("--model", model, held.model),
        ("--num-classes", num_classes, held.num_classes),
    ):
        if given is not None and given != found:
            raise ValueError(
                f"{flag} {given} contradicts {where}, which hold(s) {held.model} with "
                f"{held.num_classes} classes"
            )
    return held.model, held.num_classes


def probe_stats(
    addresses: list[str], timeout_s: float = 2.0, curve: str | None = None
) -> list[dict[str, Any] | None]:
    """Ask every server for ``stats`` at once; ``None`` for each one that does not answer
    (or does not admit our CURVE key, with ``curve``).

    Never raises for an unreachable server: for status displays, not for training.
    """
    keys = Curve.load(curve, server=False) if curve else None
    context = zmq.Context()
    sockets = []
    try:
        for rid, address in enumerate(addresses):
            sock = open_dealer(context, address, keys)
            sockets.append(sock)
            with contextlib.suppress(zmq.Again):  # not connected: counts as not answering
                sock.send(protocol.request("stats", rid), flags=zmq.NOBLOCK)
        results: list[dict[str, Any] | None] = [None] * len(addresses)
        poller = zmq.Poller()
        for sock in sockets:
            poller.register(sock, zmq.POLLIN)
        deadline = time.monotonic() + timeout_s
        while any(r is None for r in results) and time.monotonic() < deadline:
            ready = dict(poller.poll(max(0.0, deadline - time.monotonic()) * 1000))
            for i, sock in enumerate(sockets):
                if sock in ready:
                    results[i] = _stats_of(sock.recv_multipart())
                    poller.unregister(sock)
        return results
    finally:
        for sock in sockets:
            sock.close(linger=0)
        context.term()


def _stats_of(frames: list[bytes]) -> dict[str, Any] | None:
    try:
        header = protocol.decode(frames[0])
    except ProtocolError:
        return None
    stats = header.get("stats") if header.get("ok") else None
    return stats if isinstance(stats, dict) else None
