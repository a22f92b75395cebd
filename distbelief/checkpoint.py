"""Checkpoints: safetensors files written atomically, verified by a sha256 on load.

A checkpoint is one ``.safetensors`` file: named float32 tensors plus string metadata.
The metadata carries ``sha256``, the hash of every tensor's name, shape, dtype and
bytes in name order, so a truncated or corrupted file is recognised on load even
where the safetensors header still parses. Writing goes to a temporary file in the
same folder, which is flushed and fsynced, renamed over the final name, and the
folder fsynced: a crash leaves either the old file or the new one, never half of one.
No pickle: safetensors holds raw tensors and a JSON header only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, does not verify, or does not fit."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    def meta_json(self, key: str, default: Any = None) -> Any:
        """A metadata entry that was stored as JSON."""
        return json.loads(self.metadata[key]) if key in self.metadata else default


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes, dtypes and bytes of ``tensors``, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write ``tensors`` and ``metadata`` (each value JSON-encoded) to ``path``."""
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    meta["sha256"] = digest(tensors)
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomic(Path(path), save(contiguous, metadata=meta))
    return Path(path)


def load_checkpoint(path: Path, *, require_digest: bool = True) -> Checkpoint:
    """Read and verify ``path``. Raises CheckpointError naming the file.

    With ``require_digest=False`` a file without a sha256 (a state_dict saved by other
    tools) is accepted unverified; one that has a sha256 is still checked.
    """
    path = Path(path)
    try:
        tensors = load_file(str(path))
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
    except (OSError, SafetensorError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from None
    metadata = header.get("__metadata__") or {}
    expected = metadata.get("sha256")
    if expected is None and not require_digest:
        log.info("%s has no sha256; loading it unverified", path)
        return Checkpoint(path, tensors, metadata)
    if expected is None:
        raise CheckpointError(f"checkpoint {path} has no sha256 in its metadata")
    if digest(tensors) != expected:
        raise CheckpointError(f"checkpoint {path} does not match its sha256 (corrupted)")
    return Checkpoint(path, tensors, metadata)


def checkpoint_path(directory: Path, version: int) -> Path:
    return Path(directory) / f"v{version:012d}{SUFFIX}"


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files in ``directory``, newest (highest version) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(
        (p for p in directory.iterdir() if p.name.startswith("v") and p.suffix == ".safetensors"),
        reverse=True,
    )


def latest_valid(directory: Path) -> Checkpoint | None:
    """The newest checkpoint in ``directory`` that verifies; bad ones are skipped with a
    warning naming them."""
    for path in list_checkpoints(directory):
        try:
            return load_checkpoint(path)
        except CheckpointError as exc:
            log.warning("skipping %s", exc)
    return None


def prune(directory: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints in ``directory``."""
    for old in list_checkpoints(directory)[keep:]:
        old.unlink(missing_ok=True)
