"""What every server (shard, averager) shares: request dispatch and the poll loop.

A :class:`Service` answers one request at a time: ``handle(frames)`` decodes and
validates the header, calls ``_on_<op>`` and returns the reply frames; refusals are
answered with a stable error code and counted. Every request is answered at once,
by its own reply. A :class:`ServiceLoop` binds the ROUTER socket and runs the
single-threaded poll loop that owns the service's state, calling ``service.tick()``
between requests for periodic work (checkpoints, pulls, expiry).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from typing import Any

import numpy as np
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from distbelief import protocol
from distbelief.curve import Curve, warn_if_exposed
from distbelief.protocol import ProtocolError
from distbelief.tuning import release_freed_memory

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.2  # how often the loop wakes to notice a stop request or a tick
IDLE_RELEASE_S = 2.0  # give freed message memory back after this long without a request
MAX_IPC_PATH = 100  # bytes; the kernel's limit for a Unix socket path is 107
# handshakes libzmq refused, by the reason its socket monitor gives
HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth",  # CURVE: a key the server does not admit
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol",  # no CURVE, or not ZMTP at all
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "other",
}


class Service:
    """Base request handler. Subclasses set ``self.metrics`` (with ``rejected``,
    ``received_bytes`` and ``sent_bytes``) and define ``_on_<op>`` methods."""

    metrics: Any

    def __init__(self) -> None:
        self.rejected = dict.fromkeys(protocol.ERRORS, 0)

    def handle(self, frames: list[Any]) -> list[Any]:
        """Answer one request (frames without the ROUTER identity). Never raises."""
        self.metrics.received_bytes.inc(sum(len(frame_bytes(f)) for f in frames))
        rid: Any = None
        try:
            if not frames:
                raise ProtocolError("bad_header", "empty message")
            header = protocol.decode(frame_bytes(frames[0]))
            rid = header.get("rid")
            op = protocol.validate_request(header)
            handler = getattr(self, "_on_" + op, None)
            if handler is None:
                raise ProtocolError("not_available", f"this server does not answer {op}")
            out = handler(header, frames[1:])
        except ProtocolError as exc:
            self._reject(exc.code)
            log.warning("refused %s: %s", protocol.describe(frames[:1]), exc)
            out = [protocol.error_reply(rid, exc.code, exc.message)]
        except Exception as exc:  # a bug must not take the server down
            log.exception("internal error on %s", protocol.describe(frames[:1]))
            self._reject("internal")
            out = [protocol.error_reply(rid, "internal", f"{type(exc).__name__}: {exc}")]
        self.metrics.sent_bytes.inc(sum(frame_size(f) for f in out))
        return out

    def _reject(self, code: str) -> None:
        self.rejected[code] += 1
        self.metrics.rejected.labels(reason=code).inc()

    def tick(self) -> None:
        """Periodic work between requests; nothing by default."""


class ServiceLoop:
    """Binds a ROUTER socket for ``service`` and runs the poll loop until stopped.

    With ``curve`` the socket speaks CURVE and a ZAP authenticator thread admits only
    the listed client keys. Handshakes libzmq refuses (a key not admitted, a peer
    without CURVE, a malformed ZMTP greeting) are read off the socket's monitor and
    counted in the service's ``refused_handshakes`` metric by reason; accepted TCP
    connections are counted too (a peer that does not speak ZeroMQ at all is dropped
    by libzmq at the greeting with no handshake event: it shows only there).
    """

    def __init__(
        self,
        service: Service,
        *,
        name: str,
        bind: str,
        port: int,
        max_bytes: int,
        curve: Curve | None = None,
        ipc_path: str | None = None,
    ):
        self.service = service
        self.ipc_path: str | None = None  # set once bound: close() removes the file
        self.running = True
        self.context = zmq.Context()
        self.auth = curve.authenticator(self.context) if curve else None
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        # libzmq drops a peer that sends more than this, before allocating it
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_bytes)
        if curve:
            curve.secure_server(self.socket)
        self.monitor = self.socket.get_monitor_socket(sum(HANDSHAKE_FAILURES) | zmq.EVENT_ACCEPTED)
        self.address = f"tcp://{bind}:{port}"
        try:
            self.socket.bind(self.address)
        except zmq.ZMQError as exc:
            self.close()
            hint = " (port in use? choose another --port)" if exc.errno == zmq.EADDRINUSE else ""
            raise OSError(f"{name} cannot listen on {bind}:{port}: {exc.strerror}{hint}") from None
        if ipc_path:
            try:
                self._bind_ipc(ipc_path, name)
            except OSError:
                self.close()
                raise
        warn_if_exposed(bind, curve, name)

    def _bind_ipc(self, path: str, name: str) -> None:
        """Also listen on the Unix socket ``path``, for clients on this host.

        libzmq would silently take the path over from a live server, so a path that
        answers a connection is refused here, like a port in use; a stale file from a
        server that died is replaced.
        """
        if len(os.fsencode(path)) > MAX_IPC_PATH:
            raise OSError(
                f"{name} cannot listen on ipc://{path}: the path is longer than "
                f"{MAX_IPC_PATH} bytes (Unix sockets allow 107); choose a shorter --ipc-dir"
            )
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except OSError:
                pass  # nothing listening: free, or a stale file libzmq replaces
            else:
                raise OSError(f"{name} cannot listen on ipc://{path}: another server uses it")
        try:
            self.socket.bind(f"ipc://{path}")
        except zmq.ZMQError as exc:
            raise OSError(f"{name} cannot listen on ipc://{path}: {exc.strerror}") from None
        self.ipc_path = path

    def stop(self, *_: Any) -> None:
        self.running = False

    def run(self, deadline_s: float | None = None) -> None:
        """Serve requests until :meth:`stop` (SIGINT/SIGTERM) or the deadline."""
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        end = None if deadline_s is None else time.monotonic() + deadline_s
        last_request, released = time.monotonic(), True
        while self.running and (end is None or time.monotonic() < end):
            self.service.tick()
            ready = dict(poller.poll(POLL_INTERVAL_S * 1000))
            if self.monitor in ready:
                self._count_handshakes()
            if self.socket not in ready:
                if not released and time.monotonic() - last_request >= IDLE_RELEASE_S:
                    # freed message buffers are kept for reuse while busy (tuning.py);
                    # idle, they go back, so a paused cluster does not hold its peak
                    release_freed_memory()
                    released = True
                continue
            last_request, released = time.monotonic(), False
            frames = self.socket.recv_multipart(copy=False)
            if len(frames) < 2:
                continue  # an identity with nothing after it: nothing to answer
            reply = self.service.handle(frames[1:])
            self.socket.send_multipart([frames[0], *reply], copy=False)

    def _count_handshakes(self) -> None:
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            if event["event"] == zmq.EVENT_ACCEPTED:
                self.service.metrics.accepted_connections.inc()
                continue
            reason = HANDSHAKE_FAILURES.get(event["event"])
            if reason:
                self.service.metrics.refused_handshakes.labels(reason=reason).inc()
                log.warning(
                    "refused a connection from %s: handshake failed (%s)",
                    event["endpoint"].decode(errors="replace"),
                    reason,
                )

    def close(self) -> None:
        self.socket.disable_monitor()
        self.monitor.close(linger=0)
        self.socket.close(linger=0)
        if self.auth:
            self.auth.stop()
        self.context.term()
        if self.ipc_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.ipc_path)


class SnapshotPool:
    """Preallocated buffers for pull replies, reused once libzmq has sent them.

    A pull reply is sent zero-copy, so its buffer must stay unchanged until the send
    completes; a MessageTracker per buffer says when. Allocating a fresh model-sized
    buffer per pull costs more than the copy itself (page faults), hence the pool.
    """

    def __init__(self, size: int, max_buffers: int = 4) -> None:
        self.size = size
        self.max_buffers = max_buffers
        self.slots: dict[str, list[tuple[torch.Tensor, Any]]] = {}

    def frame(self, weights: torch.Tensor, dtype: str) -> zmq.Frame:
        """A tracked frame holding ``weights`` encoded as ``dtype``."""
        slots = self.slots.setdefault(dtype, [])
        for i, (buffer, tracker) in enumerate(slots):
            if tracker.done:
                return self._fill(slots, i, buffer, weights, dtype)
        buffer = torch.empty(self.size, dtype=protocol.DTYPES[dtype][0])
        if len(slots) < self.max_buffers:
            slots.append((buffer, None))
            return self._fill(slots, len(slots) - 1, buffer, weights, dtype)
        # every buffer is still queued to slow peers: a one-off buffer, not pooled
        return zmq.Frame(protocol.to_wire(weights, dtype, buffer), copy=False)

    @staticmethod
    def gathered(weights: torch.Tensor, ranges: list[tuple[int, int]], dtype: str) -> zmq.Frame:
        """A frame of ``weights`` over ``ranges`` (``[lo, hi)`` positions in ``weights``),
        concatenated, as ``dtype``: a fresh copy, not pooled (pieces come in many sizes)."""
        values = torch.cat([weights[lo:hi] for lo, hi in ranges])
        return zmq.Frame(protocol.to_wire(values, dtype), copy=False)

    def _fill(self, slots, i, buffer, weights, dtype) -> zmq.Frame:
        data = protocol.to_wire(weights, dtype, buffer) if dtype != "f32" else None
        if data is None:
            buffer.copy_(weights)
            data = buffer.numpy()
        frame = zmq.Frame(data, copy=False, track=True)
        slots[i] = (buffer, frame.tracker)
        return frame


def frame_bytes(frame: Any) -> memoryview | bytes:
    return frame.buffer if isinstance(frame, zmq.Frame) else frame


def frame_size(frame: Any) -> int:
    if isinstance(frame, zmq.Frame):
        return len(frame.buffer)
    return frame.nbytes if isinstance(frame, np.ndarray) else len(frame)


def expect_payload(payload: list, count: int) -> None:
    if len(payload) != count:
        raise ProtocolError("bad_size", f"expected {count} payload frame(s), got {len(payload)}")
