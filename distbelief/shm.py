"""Shared-memory payloads between a client and a server on the same host.

Over TCP or a Unix socket every byte of a push and of a pull is copied by the kernel
twice (into the socket, out of it) and allocated by libzmq once more; for a 41 MB
model that is most of an exchange (bench/RESULTS.md, ``profile_exchange``). When a
replica and its shards share a host they can share memory instead: the replica
creates one segment in ``/dev/shm`` holding its whole flat weight and gradient
vectors, and only the small msgpack headers travel over ZeroMQ. A push names the
segment instead of carrying a payload frame; each shard reads its range of the
gradient there, in place. A pull names it too; each shard writes its range of the
weights there and answers with the header alone. A CPU replica trains on these very
buffers (its parameters are views into them), so neither side copies anything else.

Segment layout (one per client; ``total`` is the layout's length)::

    [TOKEN_BYTES random token][HEADER_BYTES - TOKEN_BYTES unused]
    [weights: total float32][gradients: total float32]

The client proves the shard sees the same memory with the token: ``hello`` with the
segment's name makes the shard map it and answer the token it reads there. A shard on
another host cannot open the name (or reads another token), and that shard is then
spoken to over the wire as usual. A shard maps only names of the form
``distbelief-<pid>-<hex>``, regular files of exactly the expected size, never
following links.

Segments are files of the client's, mode 0600: the client removes its segment when it
closes; a client killed with ``kill -9`` leaves it behind, and the next client on the
host removes every segment whose creator's pid is no longer alive.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import stat
import uuid

import torch

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
TOKEN_BYTES = 16
HEADER_BYTES = 64  # keeps both regions 64-byte aligned
NAME = re.compile(r"^distbelief-(\d{1,10})-[0-9a-f]{8}$")


def available() -> bool:
    """Whether this host has POSIX shared memory where we look for it (Linux)."""
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


def segment_bytes(total: int) -> int:
    return HEADER_BYTES + 2 * 4 * total


class Segment:
    """One mapped segment: ``weights`` and ``grads`` are float32 views of its two regions."""

    def __init__(self, name: str, fd: int, total: int, *, owner: bool) -> None:
        self.name = name
        self.total = total
        self.owner = owner
        try:
            self.map = mmap.mmap(fd, segment_bytes(total))
        finally:
            os.close(fd)
        self.token = bytes(self.map[:TOKEN_BYTES])
        self.weights = torch.frombuffer(
            self.map, dtype=torch.float32, count=total, offset=HEADER_BYTES
        )
        self.grads = torch.frombuffer(
            self.map, dtype=torch.float32, count=total, offset=HEADER_BYTES + 4 * total
        )

    @classmethod
    def create(cls, total: int) -> Segment:
        """A new segment for a flat vector of ``total`` float32 (client side)."""
        remove_orphans()
        name = f"distbelief-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, segment_bytes(total))
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        segment = cls(name, fd, total, owner=True)
        segment.map[:TOKEN_BYTES] = os.urandom(TOKEN_BYTES)
        segment.token = bytes(segment.map[:TOKEN_BYTES])
        return segment

    @classmethod
    def attach(cls, name: str, total: int) -> Segment:
        """Map the client's segment ``name`` (server side). Raises ValueError, naming why not."""
        if not isinstance(name, str) or not NAME.match(name):
            raise ValueError(f"{name[:80]!r} is not a distbelief shared-memory segment name")
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as exc:
            raise ValueError(f"cannot open {path}: {exc.strerror} (not on this host?)") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size != segment_bytes(total):
            os.close(fd)
            raise ValueError(
                f"{path} holds {info.st_size} bytes; a vector of {total} parameters needs "
                f"{segment_bytes(total)}"
            )
        return cls(name, fd, total, owner=False)

    def close(self) -> None:
        """Unmap (and, for the client that made it, remove) the segment."""
        del self.weights, self.grads
        try:
            self.map.close()
        except BufferError:  # a view is still borrowed (a model's parameters): kept mapped
            log.debug("segment %s still borrowed; left mapped", self.name)
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, self.name))


def remove_orphans() -> list[str]:
    """Remove segments whose creating process is gone (a client killed with kill -9)."""
    removed: list[str] = []
    if not os.path.isdir("/proc/self"):  # no way to tell a live creator from a dead one
        return removed
    with contextlib.suppress(OSError):
        for name in os.listdir(SHM_DIR):
            match = NAME.match(name)
            if match and not os.path.exists(f"/proc/{match.group(1)}"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(SHM_DIR, name))
                    removed.append(name)
    if removed:
        log.info("removed %d shared-memory segment(s) of dead clients", len(removed))
    return removed
