"""The link between two neighbouring stages of a split replica.

Stage k sends its output (activations, with the labels) forward to stage k + 1 and
gets the gradient of that output back; control messages (push this step, the end)
go forward the same way. One ZeroMQ PAIR socket pair per cut: the later stage binds,
the earlier one connects. A message is a msgpack header and, for a tensor, one
payload:

    header: {kind, step, mb, shape?, dtype?, shm?, ...}   kind: act | grad | push | end

``transport="shm"`` (stages on one host): the payload is written into a file in
``/dev/shm`` of the sender's (one per micro-batch slot and direction, grown when a
tensor outgrows it) and only the header crosses the socket, naming it; the receiver
copies the tensor out at once. A slot is written again only a step later, after the
receiver has answered every micro-batch of the step, so it has been read by then.
``transport="wire"``: the payload is a frame over the socket (TCP between hosts).

Nothing here uses pickle. A receive waits as long as it must (a replica may wait for
the warm start), but every ``CHECK_S`` it asks ``alive()`` whether the neighbours are
still there, and raises :class:`StageLost` when they are not. :meth:`Cut.lost` tells
whether the peer's connection went away after it had come: the socket's monitor sees
the disconnection at once when the peer's process ends (its kernel closes the
connection), and ZeroMQ's heartbeats (``HEARTBEAT_IVL_MS``, ``HEARTBEAT_TIMEOUT_MS``)
end a connection whose peer stopped answering (a host gone, a link cut). A header that
does not decode is a :class:`StageLost` too (the cut is not authenticated: on a
network, keep it on a private one).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from distbelief import shm

CHECK_S = 0.5  # how often a waiting stage looks whether its neighbours are alive
HEARTBEAT_IVL_MS = 1000  # ZMTP pings on an idle cut
HEARTBEAT_TIMEOUT_MS = 10_000  # no answer this long: the connection is dropped (peer lost)
_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
TRANSPORTS = ("shm", "wire")
_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16, "i64": torch.int64}
_NAMES = {v: k for k, v in _DTYPES.items()}


class StageLost(RuntimeError):
    """A neighbouring stage (or the replica process) is gone."""


class Cut:
    """One end of the link between stage k and k + 1 (``bind`` on the later one)."""

    def __init__(self, address: str, *, bind: bool, transport: str = "shm") -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown stage transport {transport!r}; known: shm, wire")
        self.transport = transport if shm.available() else "wire"
        self.slots: dict[tuple[str, int], tuple[str, mmap.mmap, int]] = {}  # ours
        self.mapped: dict[str, mmap.mmap] = {}  # the peer's
        self.sent_bytes = 0
        self.received_bytes = 0
        self.wait_s = 0.0  # seconds spent waiting for the peer
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.PAIR)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        self.monitor = self.socket.get_monitor_socket(_EVENTS)
        self.connected = False
        self.disconnected = False
        try:
            (self.socket.bind if bind else self.socket.connect)(address)
        except zmq.ZMQError as exc:
            self.close()
            verb = "listen on" if bind else "connect to"
            raise StageLost(f"cannot {verb} {address} for the stages: {exc.strerror}") from None

    def send(self, kind: str, step: int, tensor: torch.Tensor | None = None, **fields: Any) -> None:
        header = {"kind": kind, "step": step, **fields}
        frames: list[Any] = []
        if tensor is not None:
            data = tensor.detach().contiguous()
            if data.device.type != "cpu":
                data = data.cpu()  # blocks until the device is done
            header |= {"shape": list(data.shape), "dtype": _NAMES[data.dtype]}
            raw = data.view(torch.uint8).reshape(-1).numpy() if data.numel() else b""
            if self.transport == "shm":
                header["shm"], header["bytes"] = self._write(kind, fields.get("mb", 0), raw)
            else:
                frames.append(raw)
            self.sent_bytes += data.numel() * data.element_size()
        self.socket.send_multipart([msgpack.packb(header), *frames], copy=False)

    def lost(self) -> bool:
        """Whether the peer's connection has gone away since it came (sticky)."""
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if event in (zmq.EVENT_CONNECTED, zmq.EVENT_ACCEPTED):
                self.connected = True
            elif event == zmq.EVENT_DISCONNECTED and self.connected:
                self.disconnected = True
        return self.disconnected

    def recv(self, alive: Callable[[], bool]) -> tuple[dict[str, Any], torch.Tensor | None]:
        """The next message: its header and its tensor (None for control messages)."""
        began = time.perf_counter()
        while not self.socket.poll(CHECK_S * 1000):
            if not alive():
                raise StageLost("a neighbouring stage of this replica is gone")
        self.wait_s += time.perf_counter() - began
        frames = self.socket.recv_multipart(copy=False)
        try:
            header = msgpack.unpackb(frames[0].buffer)
            if not isinstance(header, dict) or not isinstance(header.get("kind"), str):
                raise ValueError("not a map with a kind")
        except Exception as exc:  # msgpack raises many types for hostile bytes
            raise StageLost(f"a message at the cut does not decode ({exc})") from None
        if "shape" not in header:
            return header, None
        dtype, shape = _DTYPES[header["dtype"]], header["shape"]
        if "shm" in header:
            buffer: Any = self._read(header["shm"], header["bytes"])
        else:
            buffer = frames[1].buffer
        count = int(np.prod(shape)) if shape else 1
        tensor = torch.frombuffer(bytearray(buffer), dtype=dtype, count=count).reshape(shape)
        self.received_bytes += tensor.numel() * tensor.element_size()
        return header, tensor

    def _write(self, kind: str, mb: int, raw: Any) -> tuple[str, int]:
        """Copy ``raw`` into our slot for (kind, micro-batch), growing it if needed."""
        nbytes = len(raw) if isinstance(raw, bytes) else raw.nbytes
        slot = self.slots.get((kind, mb))
        if slot is None or slot[2] < nbytes:
            if slot is not None:
                _unlink(slot[0], slot[1])
            slot = (*_create(max(nbytes, 1)), max(nbytes, 1))
            self.slots[(kind, mb)] = slot
        name, region, _ = slot
        region[:nbytes] = memoryview(raw).cast("B") if nbytes else b""
        return name, nbytes

    def _read(self, name: str, nbytes: int) -> memoryview:
        region = self.mapped.get(name)
        if region is None or len(region) < nbytes:
            region = _attach(name)
            self.mapped[name] = region
        return memoryview(region)[:nbytes]

    def close(self) -> None:
        for name, region, _ in self.slots.values():
            _unlink(name, region)
        for region in self.mapped.values():
            with contextlib.suppress(BufferError):
                region.close()
        self.slots.clear()
        self.mapped.clear()
        self.socket.disable_monitor()
        self.monitor.close(linger=0)
        self.socket.close(linger=0)
        self.context.term()


def _create(nbytes: int) -> tuple[str, mmap.mmap]:
    """A new file of ``nbytes`` in /dev/shm, named so that shm.remove_orphans() cleans
    it up after a process killed with kill -9."""
    shm.remove_orphans()
    name = f"distbelief-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    fd = os.open(os.path.join(shm.SHM_DIR, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, nbytes)
        return name, mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)


def _attach(name: str) -> mmap.mmap:
    if not shm.NAME.match(name):
        raise ValueError(f"{name[:80]!r} is not a distbelief shared-memory name")
    fd = os.open(os.path.join(shm.SHM_DIR, name), os.O_RDWR | os.O_NOFOLLOW)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _unlink(name: str, region: mmap.mmap) -> None:
    with contextlib.suppress(BufferError):
        region.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(shm.SHM_DIR, name))
