"""Data sets, their augmentation, and the order in which replicas read them.

Three sources (``load_dataset``):

- ``"demo"``: a procedurally generated, deterministic set of small RGB images of
  shapes and textures (disk, ring, square, outline square, triangle, plus,
  horizontal bars, vertical bars, diagonal stripes, checker; dots and x-cross when
  ``num_classes`` > 10). Every image draws its position, size, rotation or stripe
  period and phase, foreground and background colours (independent, so the same in
  distribution for every class) and pixel noise, so the class cannot be read from
  colour or position: the mean image of every class is the same, and a linear
  classifier on raw pixels does little better than chance while a small convnet
  learns it. Built in memory in about a second.
- ``"synthetic"``: random tensors for benchmarks, from a small pool, cheap per batch.
- a path: an ImageNet-style folder, ``PATH/train/<class>/*.jpg`` and
  ``PATH/val/<class>/*.jpg``, read with torchvision's ``ImageFolder``.

Every data set answers ``len(ds)``, ``ds.num_classes``, ``ds.image_size`` and
``ds.batch(indices) -> (images, labels)``: float32 images N×3×S×S in normalised
form, ``(x - 0.5) / 0.25`` for pixels ``x`` in [0, 1], and int64 labels.

Augmentation. Folder training data goes through the paper's per-image pipeline
(``crops.train_transform``: 8%-100% area crops with aspect ratio in [3/4, 4/3],
random interpolation, photometric distortions, mirror flips). The demo generator
already randomises position, size and colour, and an 8%-area crop of a 32×32
image would often cut the shape out of the picture, so demo training by default
only mirrors images (batched on tensors, cheap); ``augment=True`` applies the
paper's crop and photometric pipeline to demo batches too (``crops.augment_batch``).

Data order: ``partition_indices`` gives each replica (rank of world) a disjoint
strided share of a seeded permutation per epoch; ``iterate_batches`` walks those
shares forever.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from distbelief.crops import (
    CROP_COUNTS,
    PIXEL_MEAN,
    PIXEL_STD,
    RandomInterpolationResizedCrop,
    augment_batch,
    eval_crops,
    eval_transform,
    evaluate,
    flip_batch,
    normalize,
    predict_crops,
    sample_crop_boxes,
    train_transform,
)

__all__ = [
    "CROP_COUNTS",
    "DEMO_CLASSES",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "ArrayDataset",
    "DataError",
    "FolderDataset",
    "RandomInterpolationResizedCrop",
    "SyntheticDataset",
    "augment_batch",
    "demo_dataset",
    "eval_crops",
    "eval_transform",
    "evaluate",
    "iterate_batches",
    "load_dataset",
    "partition_indices",
    "predict_crops",
    "sample_crop_boxes",
    "synthetic_dataset",
    "train_transform",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
Augment = Literal["none", "flip", "paper"]
SYNTHETIC_SIZES = {"train": 100_000, "val": 1_000}
SYNTHETIC_POOL = 16  # distinct random images a synthetic set cycles through


class DataError(ValueError):
    """A data source that cannot be used: missing or empty folder, bad name or split."""


def _seed_int(*words: int) -> int:
    """A 63-bit seed mixed from non-negative integers (numpy's SeedSequence)."""
    if any(w < 0 for w in words):
        raise ValueError(f"seeds must be non-negative, got {words}")
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0] >> 1)


def _check_split(split: str) -> int:
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    return SPLITS.index(split)


# --------------------------------------------------------------------------- in-memory data


class ArrayDataset:
    """Images held in memory: ``images`` uint8 N×3×S×S, ``labels`` int64 N.

    ``augment``: "none", "flip" (random mirror) or "paper" (``crops.augment_batch``),
    applied by ``batch`` unless its ``augment`` argument says otherwise.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        num_classes: int,
        augment: Augment = "none",
        classes: Sequence[str] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 N×3×S×S, got {images.dtype} {images.shape}")
        if images.shape[2] != images.shape[3] or labels.shape != images.shape[:1]:
            raise ValueError(f"need square images and one label each: {images.shape}")
        if augment not in ("none", "flip", "paper"):
            raise ValueError(f"augment must be none, flip or paper, got {augment!r}")
        self.images, self.labels = images, labels.long()
        self.num_classes, self.augment = num_classes, augment
        self.classes = tuple(classes) if classes else tuple(str(i) for i in range(num_classes))

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batch(
        self,
        indices: Tensor,
        *,
        generator: torch.Generator | None = None,
        augment: bool | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Normalised float32 images and labels of ``indices``, augmented as configured.

        ``augment=False`` forces the plain images (evaluation); ``generator`` drives the
        augmentation (torch's global generator when None).
        """
        x = self.images[indices].float() / 255.0
        mode = self.augment if augment is not False else "none"
        if mode == "flip":
            x = flip_batch(x, generator=generator)
        elif mode == "paper":
            x = augment_batch(x, generator=generator)
        return normalize(x), self.labels[indices]

    def eval_images(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Full normalised images and labels of ``indices`` (input of ``crops.eval_crops``)."""
        return self.batch(indices, augment=False)


DEMO_CLASSES = (
    "disk",
    "ring",
    "square",
    "outline_square",
    "triangle",
    "plus",
    "horizontal_bars",
    "vertical_bars",
    "diagonal_stripes",
    "checker",
    "dots",
    "x_cross",
)
DEMO_NOISE = 0.06  # std of the Gaussian pixel noise, pixels in [0, 1]
DEMO_MIN_CONTRAST = 0.4  # least RGB distance between foreground and background colours


def _uniform(rng: np.random.Generator, k: int, low: float, high: float) -> np.ndarray:
    return rng.uniform(low, high, size=(k, 1, 1)).astype(np.float32)


def _soft(sdf: np.ndarray) -> np.ndarray:
    """Coverage in [0, 1] from a signed distance in pixels (anti-aliased over one pixel)."""
    return np.clip(0.5 - sdf, 0.0, 1.0)


def _frame(rng, k, size, ys, xs, extent, angle_deg):
    """Random radius, centre (shape fits inside) and rotation: local coordinates u, v and r."""
    r = _uniform(rng, k, 0.17, 0.36) * size
    margin = extent * r + 0.5
    cx = margin + _uniform(rng, k, 0, 1) * (size - 2 * margin)
    cy = margin + _uniform(rng, k, 0, 1) * (size - 2 * margin)
    a = np.deg2rad(_uniform(rng, k, *angle_deg))
    dx, dy = xs - cx, ys - cy
    return np.cos(a) * dx + np.sin(a) * dy, -np.sin(a) * dx + np.cos(a) * dy, r


def _stripes(coord: np.ndarray, period: np.ndarray, duty: np.ndarray, phase: np.ndarray):
    """Signed distance to periodic bars of width duty·period along ``coord``."""
    half = duty * period / 2
    # Distance (with wrap-around) from the centre of the nearest bar, minus its half width.
    offset = np.mod(coord + phase - half + period / 2, period) - period / 2
    return np.abs(offset) - half


def _paint(name: str, rng: np.random.Generator, k: int, size: int, ys, xs) -> np.ndarray:
    """Coverage masks (k×size×size) of ``k`` random instances of demo class ``name``."""
    if name in ("disk", "ring"):
        u, v, r = _frame(rng, k, size, ys, xs, 1.0, (0, 0))
        d = np.sqrt(u * u + v * v)
        t = np.maximum(0.2 * r, 1.0)
        return _soft(d - r if name == "disk" else np.abs(d - (r - t)) - t)
    if name in ("square", "outline_square"):
        u, v, r = _frame(rng, k, size, ys, xs, 1.0, (-15, 15))
        h = 0.82 * r
        d = np.maximum(np.abs(u), np.abs(v))
        t = np.maximum(0.18 * r, 1.0)
        return _soft(d - h if name == "square" else np.abs(d - (h - t)) - t)
    if name == "triangle":
        u, v, r = _frame(rng, k, size, ys, xs, 1.0, (0, 360))
        normals = [(math.cos(a), math.sin(a)) for a in (np.pi / 2, np.pi * 7 / 6, np.pi * 11 / 6)]
        d = np.max([u * nx + v * ny for nx, ny in normals], axis=0)
        return _soft(d - r / 2)
    if name in ("plus", "x_cross"):
        angle = (-15, 15) if name == "plus" else (30, 60)
        u, v, r = _frame(rng, k, size, ys, xs, 1.0, angle)
        t = np.maximum(0.22 * r, 1.0)
        au, av = np.abs(u), np.abs(v)
        return _soft(np.minimum(np.maximum(au - r, av - t), np.maximum(au - t, av - r)))
    # Textures fill the image: random period, bar width, phase (and direction for stripes).
    period = _uniform(rng, k, 0.14, 0.25) * size
    phase = _uniform(rng, k, 0, 1) * period
    duty = _uniform(rng, k, 0.35, 0.65)
    if name == "horizontal_bars":
        return _soft(_stripes(ys, period, duty, phase))
    if name == "vertical_bars":
        return _soft(_stripes(xs, period, duty, phase))
    if name == "diagonal_stripes":
        sign = np.where(rng.random((k, 1, 1)) < 0.5, -1.0, 1.0).astype(np.float32)
        return _soft(_stripes((xs + sign * ys) / math.sqrt(2), period, duty, phase))
    period = period * 1.6  # checker and dots need larger cells to read at 32 pixels
    phase2 = _uniform(rng, k, 0, 1) * period
    if name == "checker":
        half = np.float32(0.5)
        mx = _soft(_stripes(xs, period, half, phase))
        my = _soft(_stripes(ys, period, half, phase2))
        return mx * (1 - my) + (1 - mx) * my
    if name == "dots":
        dx = np.mod(xs + phase, period) - period / 2
        dy = np.mod(ys + phase2, period) - period / 2
        return _soft(np.sqrt(dx * dx + dy * dy) - duty * 0.6 * period)
    raise ValueError(f"unknown demo class {name!r}")


def _colour_pairs(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent uniform RGB foreground/background pairs at least DEMO_MIN_CONTRAST apart."""
    fg, bg = rng.random((n, 3), dtype=np.float32), rng.random((n, 3), dtype=np.float32)
    while True:
        close = np.linalg.norm(fg - bg, axis=1) < DEMO_MIN_CONTRAST
        if not close.any():
            return fg, bg
        k = int(close.sum())
        fg[close], bg[close] = (
            rng.random((k, 3), dtype=np.float32),
            rng.random((k, 3), dtype=np.float32),
        )


def _render_demo(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    """uint8 N×3×size×size images of the demo classes ``labels``."""
    n, chunk = len(labels), 1024  # chunks keep the float buffers small (fewer page faults)
    ys = (np.arange(size, dtype=np.float32) + 0.5).reshape(1, size, 1)
    xs = (np.arange(size, dtype=np.float32) + 0.5).reshape(1, 1, size)
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    fg, bg = _colour_pairs(rng, n)
    for start in range(0, n, chunk):
        part = labels[start : start + chunk]
        k = len(part)
        mask = np.empty((k, size, size), dtype=np.float32)
        for cls in np.unique(part):
            sel = np.flatnonzero(part == cls)
            mask[sel] = _paint(DEMO_CLASSES[cls], rng, len(sel), size, ys, xs)
        img = rng.standard_normal((k, 3, size, size), dtype=np.float32)
        img *= DEMO_NOISE
        img += bg[start : start + k, :, None, None]
        img += (fg - bg)[start : start + k, :, None, None] * mask[:, None]
        img *= 255.0
        img += 0.5  # round to nearest when cast below
        out[start : start + k] = np.clip(img, 0, 255, out=img)
    return out


def demo_dataset(
    split: str,
    *,
    image_size: int = 32,
    num_classes: int = 10,
    num_train: int = 10000,
    num_val: int = 2000,
    seed: int = 0,
    augment: Augment = "none",
) -> ArrayDataset:
    """The demo set's ``split`` ("train" or "val"): deterministic for (seed, split, sizes).

    Classes are the first ``num_classes`` of ``DEMO_CLASSES`` (2 to 12), equally many
    examples of each (in shuffled order). Train and val come from disjoint seeds.
    """
    which = _check_split(split)
    if not 2 <= num_classes <= len(DEMO_CLASSES):
        raise DataError(f"demo num_classes must be 2..{len(DEMO_CLASSES)}, got {num_classes}")
    if image_size < 16:
        raise DataError(f"demo image_size must be at least 16, got {image_size}")
    n = num_train if split == "train" else num_val
    if n < 1:
        raise DataError(f"demo {split} set needs at least one example, got {n}")
    start = time.perf_counter()
    rng = np.random.default_rng(np.random.SeedSequence([seed, which, image_size, num_classes]))
    labels = rng.permutation(np.arange(n) % num_classes)
    images = _render_demo(rng, labels, image_size)
    logger.debug("built demo %s set: %d images in %.2f s", split, n, time.perf_counter() - start)
    return ArrayDataset(
        torch.from_numpy(images),
        torch.from_numpy(labels.astype(np.int64)),
        num_classes=num_classes,
        augment=augment,
        classes=DEMO_CLASSES[:num_classes],
    )
