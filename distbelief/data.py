"""Data sets, their augmentation, and the order in which replicas read them.

Three sources (``load_dataset``):

- ``"demo"``: a procedurally generated, deterministic set of small RGB images of
  shapes and textures (disk, ring, square, outline square, triangle, plus,
  horizontal bars, vertical bars, diagonal stripes, checker; dots and x-cross when
  ``num_classes`` > 10). Every image draws its position, size, rotation or stripe
  period and phase, foreground and background colours (independent, so the same in
  distribution for every class) and pixel noise, so the class cannot be read from
  colour or position: the expected image of every class is the same. Logistic
  regression on raw pixels reaches about 29% on val (chance 10%) while a 4-layer
  convnet reaches 99% in 4 epochs. 10000 + 2000 images at 32×32 take about half a
  second to build.
- ``"synthetic"``: random tensors for benchmarks, from a small pool, cheap per batch.
- a path: an ImageNet-style folder, ``PATH/train/<class>/*.jpg`` and
  ``PATH/val/<class>/*.jpg``, read with torchvision's ``ImageFolder``.

Every data set answers ``len(ds)``, ``ds.num_classes``, ``ds.image_size``,
``ds.augmentation``, ``ds.fetch(indices, draws)`` (uint8 images, cropped when the
augmentation crops, and labels: the per-image work a loader worker does) and
``ds.batch(indices, draws=None) -> (images, labels)``: float32 images N×3×S×S in
normalised form, ``(x - 0.5) / 0.25`` for pixels ``x`` in [0, 1], and int64 labels.

Augmentation (``crops.Augmentation``, settable with ``--crop-scale``,
``--crop-ratio``, ``--no-flip``, ``--no-color-jitter``): folder training data gets
the paper's recipe by default (8%-100% area crops with aspect ratio in [3/4, 4/3],
random interpolation, photometric distortions, mirror flips); the demo set mirror
flips only (``default_augmentation``). Every random choice for a sample comes from
its row of ``sample_draws(seed, epoch, index)``.

Data order: ``partition_indices`` gives each replica (rank of world) a disjoint
strided share of a seeded permutation per epoch; ``BatchStream`` numbers a rank's
batches across epochs; ``iterate_batches`` walks them in this process,
``distbelief.loader.Loader`` with worker processes.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.datasets import ImageFolder

from distbelief.crops import (
    CROP_COUNTS,
    DRAWS,
    NO_AUGMENTATION,
    PAPER_AUGMENTATION,
    PIXEL_MEAN,
    PIXEL_STD,
    Augmentation,
    EncodedImages,
    crop_batch,
    crop_image,
    decode_crops,
    eval_crops,
    eval_image,
    evaluate,
    finish_batch,
    normalize,
    predict_crops,
    sample_crop_boxes,
)

__all__ = [
    "CROP_COUNTS",
    "DEMO_AUGMENTATION",
    "DEMO_CLASSES",
    "NO_AUGMENTATION",
    "PAPER_AUGMENTATION",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "ArrayDataset",
    "Augmentation",
    "BatchStream",
    "DataError",
    "FolderDataset",
    "SyntheticDataset",
    "default_augmentation",
    "demo_dataset",
    "eval_crops",
    "evaluate",
    "iterate_batches",
    "load_dataset",
    "partition_indices",
    "predict_crops",
    "sample_crop_boxes",
    "sample_draws",
    "synthetic_dataset",
    "training_augmentation",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
DECODE_ON = ("loader", "device")  # where a folder's training JPEGs are decoded
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


class _Batches:
    """``batch``: ``fetch`` then ``finish_batch``, in this process (tests, evaluation)."""

    augmentation: Augmentation

    def batch(self, indices: Tensor, draws: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Normalised float32 images and labels of ``indices``; augmented with ``draws``
        (``sample_draws``), the evaluation view without."""
        _, images, labels = _finish(self, (0, *self.fetch(indices, draws), draws), "cpu")
        return images, labels


class ArrayDataset(_Batches):
    """Images held in memory: ``images`` uint8 N×3×S×S, ``labels`` int64 N.

    ``augmentation`` is what training batches get (``fetch`` with draws crops them
    when it asks for crops; ``crops.finish_batch`` does the rest).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        num_classes: int,
        augmentation: Augmentation = NO_AUGMENTATION,
        classes: Sequence[str] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 N×3×S×S, got {images.dtype} {images.shape}")
        if images.shape[2] != images.shape[3] or labels.shape != images.shape[:1]:
            raise ValueError(f"need square images and one label each: {images.shape}")
        self.images, self.labels = images, labels.long()
        self.num_classes, self.augmentation = num_classes, augmentation
        self.classes = tuple(classes) if classes else tuple(str(i) for i in range(num_classes))

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def fetch(self, indices: Tensor, draws: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """uint8 images of ``indices`` (their crops when the augmentation crops and
        ``draws`` are given) and their labels."""
        images = self.images[indices]
        if draws is not None and self.augmentation.crop_scale is not None:
            images = crop_batch(images.float().div_(255.0), draws, augmentation=self.augmentation)
        return images, self.labels[indices]

    def eval_images(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Full normalised images and labels of ``indices`` (input of ``crops.eval_crops``)."""
        return self.batch(indices)


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
    augmentation: Augmentation = NO_AUGMENTATION,
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
    key = (seed, which, image_size, num_classes, n)
    cached = _demo_cache_read(split, key)
    if cached is not None:
        images, labels = cached
    else:
        start = time.perf_counter()
        rng = np.random.default_rng(np.random.SeedSequence([seed, which, image_size, num_classes]))
        numbers = rng.permutation(np.arange(n) % num_classes)
        images = torch.from_numpy(_render_demo(rng, numbers, image_size))
        labels = torch.from_numpy(numbers.astype(np.int64))
        seconds = time.perf_counter() - start
        logger.debug("built demo %s set: %d images in %.2f s", split, n, seconds)
        _demo_cache_write(split, key, images, labels)
    return ArrayDataset(
        images,
        labels,
        num_classes=num_classes,
        augmentation=augmentation,
        classes=DEMO_CLASSES[:num_classes],
    )


DEMO_CACHE_ENV = "DISTBELIEF_CACHE_DIR"


def demo_cache_dir() -> Path | None:
    """Where built demo sets are kept: ``$DISTBELIEF_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/distbelief`` or ``~/.cache/distbelief``; None when the variable
    is ``off`` or empty (nothing kept)."""
    value = os.environ.get(DEMO_CACHE_ENV)
    if value is not None:
        return None if value.strip() in ("", "off") else Path(value).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distbelief"


def _demo_cache_path(split: str, key: tuple[int, ...]) -> tuple[Path, str] | None:
    """The file of one demo set and its name's stem without the digest. The digest
    covers this module's source and numpy's version, so a change to how the set is
    drawn never reads an old file."""
    folder = demo_cache_dir()
    if folder is None:
        return None
    seed, _, size, classes, n = key
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(f"{np.__version__}|{key}".encode())
    stem = f"demo-{split}-{n}x{size}px-{classes}c-seed{seed}-"
    return folder / f"{stem}{h.hexdigest()[:16]}.safetensors", stem


def _demo_cache_read(split: str, key: tuple[int, ...]) -> tuple[Tensor, Tensor] | None:
    from distbelief.checkpoint import CheckpointError, load_checkpoint

    found = _demo_cache_path(split, key)
    if found is None or not found[0].is_file():
        return None
    try:
        tensors = load_checkpoint(found[0]).tensors  # sha256-verified
        images, labels = tensors["images"], tensors["labels"]
    except (CheckpointError, KeyError) as exc:
        logger.warning("demo cache %s unusable (%s); building the set again", found[0], exc)
        return None
    _, _, size, _, n = key
    if images.dtype != torch.uint8 or tuple(images.shape) != (n, 3, size, size):
        logger.warning("demo cache %s holds the wrong shape; building the set again", found[0])
        return None
    return images, labels


def _demo_cache_write(split: str, key: tuple[int, ...], images: Tensor, labels: Tensor) -> None:
    """Keep the set for the next process (atomically: concurrent writers are harmless);
    drop files of the same set drawn by an older version of the code."""
    from distbelief.checkpoint import save_checkpoint

    found = _demo_cache_path(split, key)
    if found is None:
        return
    path, stem = found
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, {"images": images, "labels": labels}, {"what": "demo set"})
        for old in path.parent.glob(f"{stem}*.safetensors"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError as exc:  # a read-only or full disk costs the next process time, nothing else
        logger.warning("demo cache not written to %s: %s", path.parent, exc)


# --------------------------------------------------------------------------- synthetic data


class SyntheticDataset(_Batches):
    """Random data for benchmarks: ``num_examples`` examples, none of them stored.

    Images are uniform random pixels from a pool of a few random images, so a batch
    costs one gather; labels are uniform random per example. Same interface as
    ``ArrayDataset``; never augmented, nothing to learn from it.
    """

    def __init__(self, *, num_examples: int, image_size: int, num_classes: int, seed: int = 0):
        if num_examples < 1 or image_size < 1 or num_classes < 1:
            raise DataError(
                f"synthetic data needs num_examples, image_size and num_classes ≥ 1, got "
                f"{num_examples}, {image_size}, {num_classes}"
            )
        gen = torch.Generator().manual_seed(_seed_int(seed, 2))
        self.num_classes, self.augmentation, self._size = num_classes, NO_AUGMENTATION, image_size
        self.classes = tuple(str(i) for i in range(num_classes))
        self.labels = torch.randint(num_classes, (num_examples,), generator=gen)
        shape = (SYNTHETIC_POOL, 3, image_size, image_size)
        self._pool = torch.randint(256, shape, generator=gen, dtype=torch.uint8)

    @property
    def image_size(self) -> int:
        return self._size

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def fetch(self, indices: Tensor, draws: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """uint8 images and labels of ``indices`` (the same every time)."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        return self._pool[indices % SYNTHETIC_POOL], self.labels[indices]

    def eval_images(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Same as ``batch``: the images are already at ``image_size``."""
        return self.batch(indices)


def synthetic_dataset(
    *, num_examples: int, image_size: int, num_classes: int, seed: int = 0
) -> SyntheticDataset:
    """Random tensors for benchmarks (see ``SyntheticDataset``)."""
    return SyntheticDataset(
        num_examples=num_examples, image_size=image_size, num_classes=num_classes, seed=seed
    )


# --------------------------------------------------------------------------- folder data


class _FixedClassesFolder(ImageFolder):
    """ImageFolder whose class list is given (the train split's), so labels agree across splits."""

    def __init__(self, root: Path, classes: Sequence[str]) -> None:
        self._fixed = list(classes)
        super().__init__(str(root), allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._fixed, {name: i for i, name in enumerate(self._fixed)}


def _class_folders(path: Path) -> list[str]:
    return sorted(entry.name for entry in path.iterdir() if entry.is_dir())


def _check_folder(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DataError(f"data folder {path} does not exist (expected {what})")


class FolderDataset(_Batches):
    """An ImageNet-style split folder (``ROOT/<split>/<class>/*.jpg``) read with ImageFolder.

    ``fetch`` decodes the images: with draws, the training crop of each
    (``crops.crop_image``, under ``augmentation``); without, the evaluation view
    (``crops.eval_image``); uint8 either way. With ``decode="device"`` it leaves
    training images undecoded (``crops.EncodedImages``, the files' bytes) and
    ``decode`` turns them into the same crops on the device that trains
    (``crops.decode_crops``). Classes are the sub-folders of ``ROOT/train`` when it
    exists (else of the split), in sorted order. Raises DataError for a missing folder
    or one without images, and for an image that cannot be decoded (naming the file).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        image_size: int,
        augmentation: Augmentation,
        decode: str = "loader",
    ) -> None:
        _check_split(split)
        if decode not in DECODE_ON:
            raise DataError(f"decode must be one of {', '.join(DECODE_ON)}, got {decode!r}")
        self.decode_on = decode
        root = Path(root)
        layout = f"{root}/{split}/<class>/*.jpg"
        _check_folder(root, f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg")
        folder = root / split
        _check_folder(folder, layout)
        train = root / "train"
        classes = _class_folders(train if train.is_dir() else folder)
        if not classes:
            raise DataError(
                f"data folder {train if train.is_dir() else folder} has no class "
                f"folders (expected {layout})"
            )
        self.folder = _FixedClassesFolder(folder, classes)
        if len(self.folder) == 0:
            raise DataError(f"data folder {folder} holds no images (expected {layout})")
        self.classes = tuple(classes)
        self.num_classes, self.image_size = len(classes), image_size
        self.augmentation = augmentation
        self.labels = torch.tensor(self.folder.targets, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.folder)

    def fetch(
        self, indices: Tensor, draws: Tensor | None = None
    ) -> tuple[Tensor | EncodedImages, Tensor]:
        """Decoded uint8 N×3×S×S images of ``indices`` and their labels (training
        images with ``decode="device"``: their files, for ``decode``)."""
        idx = torch.as_tensor(indices, dtype=torch.long).view(-1)
        if draws is not None and self.decode_on == "device":
            files = []
            for i in idx.tolist():
                path = self.folder.samples[i][0]
                try:
                    files.append(Path(path).read_bytes())
                except OSError as exc:
                    raise DataError(f"cannot read image {path}: {exc}") from exc
            return EncodedImages.of(files, idx), self.labels[idx]
        size = self.image_size
        images = torch.empty(len(idx), 3, size, size, dtype=torch.uint8)
        for k, i in enumerate(idx.tolist()):
            path = self.folder.samples[i][0]
            try:
                data = Path(path).read_bytes()
                if draws is None:
                    with Image.open(io.BytesIO(data)) as image:
                        images[k] = eval_image(image, size=size)
                else:
                    images[k] = crop_image(
                        data, draws[k], size=size, augmentation=self.augmentation
                    )
            except (OSError, SyntaxError, ValueError, RuntimeError) as exc:  # bad files
                raise DataError(f"cannot decode image {path}: {exc}") from exc
        return images, self.labels[idx]

    def decode(self, encoded: EncodedImages, draws: Tensor, device: torch.device | str) -> Tensor:
        """Training crops (uint8, on ``device``) of the files ``fetch`` left undecoded."""
        kw: dict[str, Any] = dict(size=self.image_size, augmentation=self.augmentation)
        try:
            return decode_crops(encoded, draws, device=device, **kw)
        except RuntimeError as exc:  # find the file, to name it
            files = encoded.files()
            for k, i in enumerate(encoded.indices.tolist()):
                one = EncodedImages.of([files[k].numpy().tobytes()], encoded.indices[k : k + 1])
                try:
                    decode_crops(one, draws[k : k + 1], device=device, **kw)
                except RuntimeError as bad:
                    path = self.folder.samples[i][0]
                    raise DataError(
                        f"cannot decode image {path} on {device} (--decode device reads "
                        f"JPEG files only): {bad}"
                    ) from bad
            raise DataError(f"cannot decode a batch on {device}: {exc}") from exc

    def eval_images(self, indices: Tensor) -> tuple[list[Tensor], Tensor]:
        """Whole decoded images (normalised 3×H×W, sizes vary) and labels, for ``eval_crops``."""
        idx = torch.as_tensor(indices, dtype=torch.long).view(-1)
        images = []
        for i in idx.tolist():
            with self.folder.loader(self.folder.samples[i][0]) as image:
                pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
            images.append(normalize(pixels.permute(2, 0, 1).float() / 255.0))
        return images, self.labels[idx]


# --------------------------------------------------------------------------- choosing a source

Dataset = ArrayDataset | SyntheticDataset | FolderDataset


# the `--data demo` training split: large enough that GoogLeNet learns the shapes rather
# than the images in the few passes a 2-core demo has time for
DEMO_TRAIN_SIZE = 50_000


DEMO_AUGMENTATION = Augmentation(crop_scale=None, color=False)  # mirror flips only


def default_augmentation(source: str) -> Augmentation:
    """A source's training augmentation unless the user says otherwise: the paper's
    recipe for folders, mirror flips only for the demo set (its generator already
    varies position, size and colour, and an 8%-area crop of a 32-pixel image often
    cuts the shape out), none for synthetic data."""
    if source == "demo":
        return DEMO_AUGMENTATION
    if source == "synthetic":
        return NO_AUGMENTATION
    return PAPER_AUGMENTATION


def training_augmentation(
    source: str,
    *,
    crop_scale: tuple[float, float] | None | str = "default",
    crop_ratio: tuple[float, float] | None = None,
    flip: bool | None = None,
    color: bool | None = None,
) -> Augmentation:
    """``default_augmentation(source)`` with what the user set (None, "default": keep).

    ``crop_scale`` None turns the crop off. Synthetic data is random: it takes none.
    """
    base = default_augmentation(source)
    if source == "synthetic":
        return base
    changes: dict = {}
    if crop_scale != "default":
        changes["crop_scale"] = crop_scale
    for name, value in (("crop_ratio", crop_ratio), ("flip", flip), ("color", color)):
        if value is not None:
            changes[name] = value
    return replace(base, **changes)


def load_dataset(
    source: str,
    split: str,
    *,
    image_size: int,
    num_classes: int | None = None,
    augmentation: Augmentation | None = None,
    seed: int = 0,
    decode: str = "loader",
) -> Dataset:
    """The ``split`` ("train" or "val") of ``source``: "demo", "synthetic" or a folder path.

    ``num_classes`` defaults to 10 (demo), 1000 (synthetic) or the folder's class
    count (and must match it when given). ``augmentation`` is what training batches
    get: by default ``default_augmentation(source)`` for train, none for val.
    Synthetic data is never augmented; its train split has 100000 examples, val
    1000. ``seed`` seeds the demo and synthetic generators. ``decode``: where a
    folder's training JPEGs are decoded, "loader" (its processes) or "device"
    (``FolderDataset``). Raises DataError for a bad source, split or decode.
    """
    _check_split(split)
    if image_size < 1:
        raise DataError(f"image_size must be positive, got {image_size}")
    if decode != "loader" and source in ("demo", "synthetic"):
        raise DataError(f"--decode {decode} decodes JPEG files: it needs a folder, not {source}")
    if augmentation is None:
        augmentation = default_augmentation(source) if split == "train" else NO_AUGMENTATION
    if source == "demo":
        return demo_dataset(
            split,
            image_size=image_size,
            num_classes=10 if num_classes is None else num_classes,
            seed=seed,
            augmentation=augmentation,
            num_train=DEMO_TRAIN_SIZE,
        )
    if source == "synthetic":
        return synthetic_dataset(
            num_examples=SYNTHETIC_SIZES[split],
            image_size=image_size,
            num_classes=1000 if num_classes is None else num_classes,
            seed=seed,
        )
    if not source:
        raise DataError("data source is empty (expected demo, synthetic or a folder path)")
    dataset = FolderDataset(
        Path(source).expanduser(),
        split,
        image_size=image_size,
        augmentation=augmentation,
        decode=decode,
    )
    if num_classes is not None and num_classes != dataset.num_classes:
        raise DataError(
            f"data folder {dataset.folder.root} has {dataset.num_classes} classes, "
            f"but num_classes is {num_classes}"
        )
    return dataset


# --------------------------------------------------------------------------- data order


def partition_indices(n: int, *, rank: int, world: int, epoch: int, seed: int) -> Tensor:
    """Indices (int64) of ``rank``'s share of a data set of ``n`` examples in ``epoch``.

    A permutation of range(n) seeded by (seed, epoch), then every ``world``-th entry
    from position ``rank``: the shares of ranks 0..world-1 are disjoint and together
    cover range(n) in every epoch. Deterministic in (n, rank, world, epoch, seed).
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    if n < 0 or epoch < 0 or seed < 0:
        raise ValueError(f"n, epoch and seed must be non-negative, got {n}, {epoch}, {seed}")
    gen = torch.Generator().manual_seed(_seed_int(seed, epoch, 3))
    return torch.randperm(n, generator=gen)[rank::world]


_MASK64 = (1 << 64) - 1


def _mix64(*words: int) -> int:
    """A 63-bit seed from non-negative integers (splitmix64's finaliser over each word):
    cheap enough to seed every sample of every batch."""
    h = 0x9E3779B97F4A7C15
    for w in words:
        h = ((h ^ w) + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


def sample_draws(seed: int, epoch: int, indices: Tensor) -> Tensor:
    """The augmentation's random numbers for each sample (len(indices)×DRAWS float64).

    Row k depends only on (seed, epoch, indices[k]): not on the batch, the replica,
    or the loader process that decodes it, so the same batches come out bit for bit
    whatever the number of loader workers, and a resumed replica repeats nothing.
    """
    rows = torch.empty(len(indices), DRAWS, dtype=torch.float64)
    gen = torch.Generator()
    for k, i in enumerate(torch.as_tensor(indices).tolist()):
        gen.manual_seed(_mix64(seed, epoch, i, 5))
        torch.rand(DRAWS, generator=gen, dtype=torch.float64, out=rows[k])
    return rows


class BatchStream:
    """One rank's stream of batches: batch ``b`` is its ``b``-th batch since epoch 0.

    Epoch ``e`` walks ``partition_indices(len(dataset), ...)`` in batches of
    ``batch_size`` (the last, short one dropped when ``drop_last``), so batch ``b`` is
    batch ``b % per_epoch`` of epoch ``b // per_epoch``. ``stream[b]`` is what a
    loader worker makes: ``(epoch, images, labels, draws)`` with the images fetched
    (decoded and cropped), ``draws`` None when the data set is not augmented;
    ``finish`` turns it into the model's input on a device. Map-style, so
    ``torch.utils.data.DataLoader`` can hand batches to worker processes.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
        n = len(dataset)
        share = n // world + (rank < n % world)
        if share == 0 or (drop_last and share < batch_size):
            raise ValueError(
                f"rank {rank} of {world} gets {share} of {n} examples per epoch, "
                f"fewer than one batch of {batch_size}"
            )
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world = rank, world
        self.per_epoch = share // batch_size if drop_last else -(-share // batch_size)
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def indices(self, b: int) -> tuple[int, Tensor]:
        """The epoch of batch ``b`` and its example indices."""
        epoch, k = divmod(b, self.per_epoch)
        if epoch != self._epoch:  # one permutation per epoch, kept
            n = len(self.dataset)
            self._order = partition_indices(
                n, rank=self.rank, world=self.world, epoch=epoch, seed=self.seed
            )
            self._epoch = epoch
        return epoch, self._order[k * self.batch_size : (k + 1) * self.batch_size]

    def __getitem__(self, b: int) -> tuple[int, Tensor, Tensor, Tensor | None]:
        epoch, idx = self.indices(b)
        random = self.dataset.augmentation.random
        draws = sample_draws(self.seed, epoch, idx) if random else None
        images, labels = self.dataset.fetch(idx, draws)
        return epoch, images, labels, draws

    def finish(
        self, item: tuple[int, Tensor, Tensor, Tensor | None], device: torch.device | str = "cpu"
    ) -> tuple[int, Tensor, Tensor]:
        """``(epoch, images, labels)``: normalised float32 images and labels on ``device``."""
        return _finish(self.dataset, item, device)


class ChunkStream:
    """Batches of dispatched chunks (``distbelief.server.dispatch``), for a ``Loader``.

    A key ``(seed, epoch, chunk, lo, hi)`` names positions ``[lo, hi)`` of epoch
    ``epoch``'s order, the permutation every replica and the reference trainer share
    (``partition_indices`` with one rank); ``stream[key]`` is what a loader worker
    makes, as ``BatchStream``'s items, plus ``(chunk, lo, hi)``: the positions of the
    chunk this batch's gradient covers.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._order_of: tuple[int, int] = (-1, -1)
        self._order = torch.empty(0, dtype=torch.long)

    def order(self, seed: int, epoch: int) -> Tensor:
        if self._order_of != (seed, epoch):  # one permutation per epoch, kept
            n = len(self.dataset)
            self._order = partition_indices(n, rank=0, world=1, epoch=epoch, seed=seed)
            self._order_of = (seed, epoch)
        return self._order

    def __getitem__(self, key: tuple[int, int, int, int, int]):
        seed, epoch, chunk, lo, hi = key
        idx = self.order(seed, epoch)[lo:hi]
        draws = sample_draws(seed, epoch, idx) if self.dataset.augmentation.random else None
        images, labels = self.dataset.fetch(idx, draws)
        return epoch, images, labels, draws, (chunk, lo, hi)

    def finish(self, item, device: torch.device | str = "cpu") -> tuple[int, Tensor, Tensor]:
        """``(epoch, images, labels)`` on ``device``, as ``BatchStream.finish``."""
        return _finish(self.dataset, item[:4], device)


def _finish(dataset: Dataset, item, device: torch.device | str) -> tuple[int, Tensor, Tensor]:
    epoch, images, labels, draws = item
    if isinstance(images, EncodedImages):  # a folder's files, to be decoded on the device
        images = dataset.decode(images, draws, device)  # type: ignore[union-attr]
    x = finish_batch(images, draws, dataset.augmentation, device)
    return epoch, x, labels.to(device, non_blocking=True)


def iterate_batches(
    dataset: Dataset,
    *,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
    start_epoch: int = 0,
    start_batch: int = 0,
    drop_last: bool = True,
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Yield ``(epoch, images, labels)`` forever, in this process: ``BatchStream``'s
    batches from the start of ``start_epoch`` plus ``start_batch`` batches (the stream
    ``distbelief.loader.Loader`` gives with worker processes, bit for bit)."""
    stream = BatchStream(
        dataset, batch_size=batch_size, seed=seed, rank=rank, world=world, drop_last=drop_last
    )
    b = start_epoch * stream.per_epoch + start_batch
    while True:
        yield stream.finish(stream[b])
        b += 1
