"""An ImageNet-like JPEG folder for benchmarks and tests, generated here (nothing downloaded).

``make_jpeg_folder(root)`` writes ``root/train/<class>/<i>.jpg`` and
``root/val/<class>/<i>.jpg``, the layout ``distbelief work --data ROOT`` reads
(torchvision's ``ImageFolder``). What matters for a benchmark is that reading the
folder costs what reading ImageNet costs, so the images look like photos to the JPEG
codec: a smooth background of colour gradients, a few soft-edged shapes, grain at
several scales, and fine sensor noise. At 500×375 and quality 90 a file holds about
50 KB (ImageNet's mean is about 110 KB at larger sizes); sizes vary ±20% around
``size`` per side and one image in five is portrait, as in ImageNet.

Every image is a function of (seed, split, class, index) only: the same arguments give
the same bytes. A marker file (``.jpegs.json``) holds the arguments; a folder that
already has the same marker is left as it is, so a benchmark pays for the folder once.
On 2 cores, 2,000 images at 500×375 (97 MB) take about 19 s.

Usage: ``python -m bench.jpegs ROOT [--classes 10] [--train-per-class 200]
[--val-per-class 20] [--size 500x375] [--quality 90] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

MARKER = ".jpegs.json"
VERSION = 1  # bump when the images change, so that old folders are rebuilt
SPLITS = {"train": 0, "val": 1}  # split -> the number mixed into each image's seed
PORTRAIT_SHARE = 0.2  # ImageNet: about one image in five is taller than wide
SIZE_JITTER = 0.2  # each side drawn in [1 - j, 1 + j] times the asked size
SHAPES_PER_IMAGE = (3, 8)  # low, high (exclusive)
GRAIN = ((16, 14.0), (4, 8.0), (2, 5.0))  # (downscale, amplitude in 0-255 levels)
NOISE = 7  # per-pixel noise: uniform in [-NOISE, NOISE] levels of 0-255


def class_name(k: int) -> str:
    """The folder of class ``k``: ImageNet-style WordNet-like ids, sorted in class order."""
    return f"n{k:08d}"


def image_size(rng: np.random.Generator, size: tuple[int, int]) -> tuple[int, int]:
    """Width and height of one image: ``size`` jittered per side, sometimes portrait."""
    width, height = (round(s * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)) for s in size)
    if rng.random() < PORTRAIT_SHARE:
        width, height = height, width
    return max(8, width), max(8, height)


def _upsampled(rng: np.random.Generator, shape: tuple[int, int], width: int, height: int):
    """Random values on a coarse grid, smoothly resized (bicubic) to width × height."""
    small = rng.standard_normal(shape, dtype=np.float32)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))


def _background(rng: np.random.Generator, k: int, width: int, height: int) -> np.ndarray:
    """Smooth colour gradients around a class hue: float32 H×W×3 in 0-255."""
    hue = np.array([np.cos(k), np.cos(k + 2.1), np.cos(k + 4.2)], np.float32)
    base = 128 + 50 * hue + rng.uniform(-30, 30, 3).astype(np.float32)
    grid = (int(rng.integers(2, 5)), int(rng.integers(2, 5)))
    planes = [_upsampled(rng, grid, width, height) for _ in range(3)]
    return base + 45 * np.stack(planes, axis=-1)


def _shapes(rng: np.random.Generator, pixels: np.ndarray) -> None:
    """Paint soft-edged ellipses and rotated rectangles over ``pixels`` in place."""
    height, width, _ = pixels.shape
    for _ in range(int(rng.integers(*SHAPES_PER_IMAGE))):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(0.05, 0.35) * height, rng.uniform(0.05, 0.35) * width
        angle, round_shape = rng.uniform(0, np.pi), rng.random() < 0.5
        edge = rng.uniform(0.02, 0.2)  # soft edges, as out of focus or anti-aliased
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        reach = 1.5 * max(rx, ry)  # the shape lies inside this box: paint only there
        top, bottom = max(0, int(cy - reach)), min(height, int(cy + reach) + 1)
        left, right = max(0, int(cx - reach)), min(width, int(cx + reach) + 1)
        if top >= bottom or left >= right:
            continue
        ys = np.arange(top, bottom, dtype=np.float32)[:, None] - np.float32(cy)
        xs = np.arange(left, right, dtype=np.float32)[None, :] - np.float32(cx)
        cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        u = (xs * cos + ys * sin) / np.float32(rx)
        v = (ys * cos - xs * sin) / np.float32(ry)
        dist = np.sqrt(u * u + v * v) if round_shape else np.maximum(np.abs(u), np.abs(v))
        alpha = np.clip((1 - dist) / np.float32(edge), 0, 1)[..., None]
        shade = 1 + np.float32(0.3) * v[..., None]  # lit from one side
        box = pixels[top:bottom, left:right]
        box += alpha * (colour * shade - box)


def render(seed: int, split: str, k: int, i: int, size: tuple[int, int]) -> np.ndarray:
    """The uint8 H×W×3 pixels of image ``i`` of class ``k`` in ``split``; deterministic."""
    rng = np.random.default_rng([seed, SPLITS[split], k, i, VERSION])
    width, height = image_size(rng, size)
    pixels = _background(rng, k, width, height)
    _shapes(rng, pixels)
    grain = np.zeros((height, width), np.float32)  # texture at a few scales, all channels
    for scale, amplitude in GRAIN:
        grid = (max(2, height // scale), max(2, width // scale))
        grain += amplitude * _upsampled(rng, grid, width, height)
    pixels += grain[..., None]
    # sensor noise per pixel and channel: uniform integers (std 4.3 levels) cost less
    # to draw than normal floats, and the codec cannot tell them apart
    pixels += rng.integers(-NOISE, NOISE + 1, pixels.shape, dtype=np.int8)
    return np.clip(pixels, 0, 255, out=pixels).astype(np.uint8)


def _write_class(
    root: str, split: str, k: int, count: int, size: tuple[int, int], quality: int, seed: int
) -> int:
    """Write ``count`` images of class ``k``; return their total bytes."""
    folder = Path(root) / split / class_name(k)
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(count):
        path = folder / f"{i}.jpg"
        Image.fromarray(render(seed, split, k, i, size)).save(path, quality=quality)
        total += path.stat().st_size
    return total


def make_jpeg_folder(
    root: str | Path,
    *,
    classes: int = 10,
    train_per_class: int = 100,
    val_per_class: int = 10,
    size: tuple[int, int] = (500, 375),
    quality: int = 90,
    seed: int = 0,
    processes: int | None = None,
) -> Path:
    """Write an ImageNet-like JPEG folder at ``root`` (see the module docstring); return it.

    Returns at once when ``root`` already holds this set (same marker). A folder this
    function wrote with other arguments is replaced; a ``root`` holding ``train`` or
    ``val`` that it did not write raises ValueError (nothing of someone else's is
    deleted). ``processes`` (default: the cores) render classes in parallel; the bytes
    do not depend on it.
    """
    if classes < 1 or train_per_class < 0 or val_per_class < 0 or min(size) < 8:
        raise ValueError(
            f"need classes ≥ 1, counts ≥ 0 and sides ≥ 8, got classes={classes}, "
            f"train_per_class={train_per_class}, val_per_class={val_per_class}, size={size}"
        )
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must lie in [1, 100], got {quality}")
    root = Path(root)
    wanted = {
        "version": VERSION,
        "classes": classes,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "size": list(size),
        "quality": quality,
        "seed": seed,
    }
    marker = root / MARKER
    found = _read_marker(marker)
    if found == wanted:
        return root
    _clear(root, ours=found is not None)
    root.mkdir(parents=True, exist_ok=True)
    counts = {"train": train_per_class, "val": val_per_class}
    jobs = [(split, k) for split in SPLITS for k in range(classes) if counts[split]]
    workers = min(len(jobs), processes or os.cpu_count() or 1)
    if workers <= 1:
        for s, k in jobs:
            _write_class(str(root), s, k, counts[s], tuple(size), quality, seed)
    else:  # spawned, not forked: the caller may hold threads (torch's) that fork would copy
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=spawn) as pool:
            futures = [
                pool.submit(_write_class, str(root), s, k, counts[s], tuple(size), quality, seed)
                for s, k in jobs
            ]
            for future in futures:
                future.result()
    marker.write_text(json.dumps(wanted))  # last: an interrupted build is redone
    return root


def _read_marker(marker: Path) -> dict | None:
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def _clear(root: Path, *, ours: bool) -> None:
    """Remove the splits of a folder this module wrote; refuse to touch anyone else's."""
    splits = [root / split for split in SPLITS if (root / split).exists()]
    if splits and not ours:
        raise ValueError(
            f"{root} holds {', '.join(s.name for s in splits)} but no {MARKER}: not a folder "
            "bench.jpegs wrote; give an empty or new folder"
        )
    (root / MARKER).unlink(missing_ok=True)
    for split in splits:
        shutil.rmtree(split)


def folder_bytes(root: str | Path) -> tuple[int, int]:
    """Number and total bytes of the ``.jpg`` files under ``root``."""
    sizes = [p.stat().st_size for p in Path(root).rglob("*.jpg")]
    return len(sizes), sum(sizes)


def _size(value: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {value!r}") from None
    return width, height


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--val-per-class", type=int, default=20)
    parser.add_argument("--size", type=_size, default=(500, 375), help="WIDTHxHEIGHT")
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, default=None, help="default: the cores")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    try:
        make_jpeg_folder(
            args.root,
            classes=args.classes,
            train_per_class=args.train_per_class,
            val_per_class=args.val_per_class,
            size=args.size,
            quality=args.quality,
            seed=args.seed,
            processes=args.processes,
        )
    except ValueError as exc:
        parser.error(str(exc))
    count, total = folder_bytes(args.root)
    print(
        f"{args.root}: {count} JPEGs, {total / 1e6:.1f} MB, {total / max(1, count) / 1e3:.0f} KB "
        f"each on average, ready in {time.perf_counter() - began:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
