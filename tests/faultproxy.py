"""A TCP proxy that makes the network bad on purpose (the kernels here have no netem).

``FaultProxy(upstream_port, ...)`` listens on a free loopback port and relays every
connection to ``127.0.0.1:upstream_port``, with, as asked:

- ``latency_s``: every chunk is delivered this much later (a delay line, so latency
  does not cap throughput);
- ``bandwidth``: bytes per second per direction of each connection;
- ``cut_mean_bytes``: each connection is cut (both sides closed) after a random,
  exponentially distributed amount of traffic with this mean (bytes, not seconds,
  so that a client idling in its back-off does not find every new connection
  already doomed);
- ``lose_replies``: the first N times the server answers after a large request
  (more than ``big_request_bytes`` went up since the last answer), the answer is
  dropped and the connection cut: the server did the work, the client never hears.

Counters (``connections``, ``cuts``, ``lost_replies``, ``bytes_up``, ``bytes_down``)
tell a test what the proxy did. Everything runs in daemon threads with bounded
waits, and :meth:`close` stops them.
"""

from __future__ import annotations

import contextlib
import queue
import random
import select
import socket
import threading
import time

CHUNK = 64 * 1024
WAIT_S = 0.2  # every wait wakes this often to notice a stop
SEND_TIMEOUT_S = 30.0  # a peer that reads nothing for this long loses its connection


class FaultProxy:
    def __init__(
        self,
        upstream_port: int,
        *,
        latency_s: float = 0.0,
        bandwidth: float | None = None,
        cut_mean_bytes: float | None = None,
        lose_replies: int = 0,
        big_request_bytes: int = 1 << 20,
        seed: int = 0,
    ) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.latency_s = latency_s
        self.bandwidth = bandwidth
        self.cut_mean_bytes = cut_mean_bytes
        self.lose_replies = lose_replies
        self.big_request_bytes = big_request_bytes
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.connections = self.cuts = self.lost_replies = 0
        self.bytes_up = self.bytes_down = 0
        self.running = True
        self.links: list[_Link] = []
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(WAIT_S)
        self.port = self.listener.getsockname()[1]
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        self.listener.close()
        for link in list(self.links):
            link.cut()

    def _accept(self) -> None:
        while self.running:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()  # the server is down: the client sees a dropped connection
                continue
            with self.lock:
                self.connections += 1
                budget = self.cut_mean_bytes
                cut_after = self.random.expovariate(1 / budget) if budget else None
            self.links.append(_Link(self, client, server, cut_after))

    def _count(self, direction: str, n: int) -> None:
        with self.lock:
            if direction == "up":
                self.bytes_up += n
            else:
                self.bytes_down += n

    def _take_lost_reply(self) -> bool:
        with self.lock:
            if self.lose_replies <= 0:
                return False
            self.lose_replies -= 1
            self.lost_replies += 1
            return True


class _Link:
    """One relayed connection: a reader and a delayed writer per direction."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, server: socket.socket, cut_after):
        self.proxy = proxy
        self.sockets = (client, server)
        for s in self.sockets:
            s.settimeout(SEND_TIMEOUT_S)
        self.alive = True
        self.budget = cut_after  # bytes (both ways) before this connection is cut
        self.up_since_reply = 0
        self.cut_lock = threading.Lock()
        for source, sink, direction in ((client, server, "up"), (server, client, "down")):
            line: queue.Queue = queue.Queue()
            threading.Thread(target=self._read, args=(source, line, direction), daemon=True).start()
            threading.Thread(target=self._write, args=(sink, line, direction), daemon=True).start()

    def cut(self, counted: bool = False) -> None:
        with self.cut_lock:
            if not self.alive:
                return
            self.alive = False
        if counted:
            with self.proxy.lock:
                self.proxy.cuts += 1
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        with contextlib.suppress(ValueError):
            self.proxy.links.remove(self)

    def _read(self, source: socket.socket, line: queue.Queue, direction: str) -> None:
        while self.alive and self.proxy.running:
            try:
                if not select.select([source], [], [], WAIT_S)[0]:
                    continue
                data = source.recv(CHUNK)
            except (OSError, ValueError):  # closed under us by a cut
                break
            if not data:
                break
            if self.budget is not None:
                self.budget -= len(data)
                if self.budget < 0:
                    self.cut(counted=True)
                    return
            if direction == "up":
                self.up_since_reply += len(data)
            else:
                big = self.up_since_reply >= self.proxy.big_request_bytes
                self.up_since_reply = 0
                if big and self.proxy._take_lost_reply():
                    self.cut()  # the answer is lost with the connection
                    return
            line.put((time.monotonic() + self.proxy.latency_s, data))
        line.put(None)

    def _write(self, sink: socket.socket, line: queue.Queue, direction: str) -> None:
        while self.alive and self.proxy.running:
            try:
                item = line.get(timeout=WAIT_S)
            except queue.Empty:
                continue
            if item is None:
                break
            due, data = item
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                sink.sendall(data)
            except OSError:
                break
            self.proxy._count(direction, len(data))
            if self.proxy.bandwidth:
                time.sleep(len(data) / self.proxy.bandwidth)
        self.cut()
