"""The input pipeline of a replica: batches decoded by worker processes, finished on the device.

A ``Loader`` gives the batches of a :class:`distbelief.data.BatchStream` from any
batch number on, as ``(epoch, images, labels)`` on the replica's device:

- ``workers`` = 0: every batch is made in this process when it is asked for (the
  in-memory demo and synthetic sets cost a gather; nothing to hide).
- ``workers`` = K ≥ 1: K persistent worker processes of
  ``torch.utils.data.DataLoader`` each make whole batches (read, decode, crop: the
  per-image work) ``prefetch`` batches ahead of the training loop, and hand them over
  as uint8 (a quarter of float32's bytes through shared memory), pinned when the
  device is a GPU. The colour distortion, the flips and the normalisation run on the
  whole batch on the device (``crops.finish_batch``), after a non-blocking copy. On a
  CPU that is about 0.16 ms an image at 224 px (0.44 with the colour distortion), under
  1% of a CPU replica's step, on huge pages (``distbelief/__init__.py``; four times
  that without); finishing in the loader processes instead would send float32 through
  shared memory, four times the bytes (``bench/RESULTS.md``).

The batches are the same bit for bit whatever K is: which batch comes next is fixed by
the stream, and every random choice for a sample by (seed, epoch, index)
(``data.sample_draws``), never by the process that decodes it. So a replica restarted
at batch ``start`` continues exactly where it stopped, mid-epoch included.

``default_loader_workers`` picks K from the data source, the device and this host's
cores and replicas.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from distbelief.data import BatchStream, ChunkStream, Dataset

log = logging.getLogger(__name__)

IN_MEMORY = ("demo", "synthetic")
FORK = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
MAX_GPU_LOADER_WORKERS = 16  # past this a GPU replica gains little; the host's cores run out


def default_loader_workers(source: str, *, device: str, replicas: int, cores: int) -> int:
    """Loader processes per replica unless the user says: none for the in-memory sets;
    for a folder, one per CPU replica (a core decodes a few hundred photos a second,
    a CPU replica trains tens), and for a GPU replica the host's cores shared among
    its GPU replicas, less the one each replica's own process uses."""
    if source in IN_MEMORY:
        return 0
    if not device.startswith("cuda"):
        return 1
    return max(1, min(MAX_GPU_LOADER_WORKERS, cores // max(1, replicas) - 1))


class _Feed(Sampler):
    """A sampler over the keys an iterable (the dispatcher's feed) yields, once."""

    def __init__(self, keys: Iterable[Any]) -> None:
        self.keys = keys

    def __iter__(self) -> Iterator[Any]:
        return iter(self.keys)


class Loader:
    """``(epoch, images, labels)`` batches of a rank's stream, from batch ``start`` on;
    or, given ``feed``, the batches of the dispatched chunks it yields keys of
    (``data.ChunkStream``), until it ends.

    ``data_wait_s`` adds up the seconds ``next`` blocked: the time the training loop
    waited for data (with 0 workers, all the time spent making batches). ``mark`` is the
    last batch's ``(chunk, from, upto)`` with a feed, else None. Use as an iterator; ``close``
    (or ``with``) stops the worker processes.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        start: int = 0,
        workers: int = 0,
        prefetch: int = 2,
        device: torch.device | str = "cpu",
        feed: Iterable[tuple[int, int, int, int, int]] | None = None,
    ) -> None:
        if workers < 0 or prefetch < 1 or start < 0:
            raise ValueError(f"need workers ≥ 0, prefetch ≥ 1, start ≥ 0: {workers}, {prefetch}")
        if feed is None:
            self.stream: BatchStream | ChunkStream = BatchStream(
                dataset, batch_size=batch_size, seed=seed, rank=rank, world=world
            )
            keys: Iterable[Any] = itertools.count(start)
        else:
            self.stream, keys = ChunkStream(dataset), feed
        self.device = torch.device(device)
        self.data_wait_s = 0.0
        self.mark: tuple[int, int, int] | None = None
        self._keys = iter(keys) if not workers else None
        self._loader: DataLoader | None = None
        self._it: Iterator[Any] | None = None
        if workers:
            self._loader = DataLoader(
                self.stream,  # type: ignore[arg-type]  (map-style: __getitem__ only)
                batch_size=None,  # the stream's items are whole batches already
                sampler=_Feed(keys),
                num_workers=workers,
                persistent_workers=True,
                prefetch_factor=prefetch,
                # fork where there is fork: the workers share the data set and the
                # imports. A replica runs under its supervisor's `forkserver` method,
                # whose children would otherwise use it too; with `spawn`, a fresh
                # interpreter imported torch before the first batch (about 2 s of
                # waiting in a 20 s run).
                multiprocessing_context=FORK,
                pin_memory=self.device.type == "cuda",
            )
            self._it = iter(self._loader)  # the workers start now, before any sockets
            log.info("loader: %d worker processes, %d batches ahead each", workers, prefetch)

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        began = time.perf_counter()
        item = next(self._it) if self._it is not None else self.stream[next(self._keys)]
        if len(item) > 4:
            self.mark = tuple(item[4])  # (a DataLoader hands tuples back as lists)
        batch = self.stream.finish(item, self.device)
        self.data_wait_s += time.perf_counter() - began
        return batch

    def close(self) -> None:
        """Stop the worker processes (a no-op without them; safe to call twice)."""
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._it = self._loader = None

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
