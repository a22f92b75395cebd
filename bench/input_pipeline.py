"""The input pipeline against pytorch/examples' ImageNet loader, and a replica fed from JPEGs.

In one run, on a generated ImageNet-like JPEG folder (``bench/jpegs.py``: photo-sized
images, about 500×375, built once and kept):

0. **Decoders**, one process, per image: Pillow decoding the whole JPEG, Pillow with
   ``draft`` at the scale our training crop allows, torchvision.io's ``decode_jpeg``
   and simplejpeg's (both libjpeg-turbo, as Pillow) of the file's bytes; ``draft`` at
   ``--image-size`` and at a quarter of it, where it has room to act. Then decode and
   crop together: Pillow's ``resize`` with a box (bilinear, as ``RandomResizedCrop``
   on a PIL image) against ours (``crops.crop_image``: simplejpeg at the DCT scale
   ``draft`` would pick, the crop resized by torch's uint8 kernels, random
   interpolation).
1. **Loader alone**, ``--image-size`` (224) training batches ready for the model in
   this process, ``--reps`` times each, interleaved, for each worker count:
   - the baseline, pytorch/examples' ``imagenet/main.py``: ``ImageFolder`` with
     ``RandomResizedCrop``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` and
     ``DataLoader(shuffle=True, num_workers=K)``;
   - ours, ``distbelief.loader.Loader`` with K loader processes, the same recipe
     (``--no-color-jitter``: crops of 8-100% of the area, flips);
   - and the paper's recipe with the colour distortion: the baseline with
     torchvision's ``ColorJitter(0.4, 0.4, 0.4, 0.1)`` per image in its workers, ours
     with the distortion batched in this process (where a GPU replica runs it on the
     device).
   Images/s over ``--batches`` batches after the first (the pool starting is left
   out). This process, the consumer, runs torch on one thread, as a GPU replica's
   process does (``work`` gives those 1 thread); here it also finishes our batches on
   the CPU, which a GPU replica does on the device. Target: ours ≥ 1.3× the baseline
   at the same worker count.
2. **A CPU replica at 224 px**: ``distbelief serve`` + ``distbelief work --cpu 1``
   reading the JPEG folder (default loader processes) against the same replica on
   ``--data synthetic`` (already decoded); images/s from ``work --json`` and the share
   of the replica's time spent waiting for data. Targets: ≥ 0.95× synthetic; data
   wait < 5%.

Usage: ``python -m bench.input_pipeline [--folder DIR] [--workers 1,2] [--reps 3]
[--parts decode,loader,replica]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from bench.common import (
    machine,
    median_time,
    one_cpu_replica,
    shards,
    throughput_line,
)
from bench.jpegs import folder_bytes, make_jpeg_folder
from distbelief.crops import BRIGHTNESS, CONTRAST, HUE, PIXEL_MEAN, PIXEL_STD, SATURATION
from distbelief.data import load_dataset, training_augmentation
from distbelief.loader import Loader
from distbelief.tuning import available_cores

RUN_TIMEOUT_S = 1800.0
RECIPES = ("examples", "paper")  # pytorch/examples' crop + flip; the paper's, with colour


def baseline_loader(folder: Path, size: int, batch: int, workers: int, recipe: str):
    """pytorch/examples imagenet main.py's training loader (plus ColorJitter for "paper")."""
    steps = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
    if recipe == "paper":
        steps.append(transforms.ColorJitter(BRIGHTNESS, CONTRAST, SATURATION, HUE))
    steps += [transforms.ToTensor(), transforms.Normalize([PIXEL_MEAN] * 3, [PIXEL_STD] * 3)]
    dataset = datasets.ImageFolder(str(folder / "train"), transforms.Compose(steps))
    return DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=True
    )


def our_loader(folder: Path, size: int, batch: int, workers: int, recipe: str) -> Loader:
    augmentation = training_augmentation(str(folder), color=recipe == "paper")
    train = load_dataset(str(folder), "train", image_size=size, augmentation=augmentation)
    return Loader(train, batch_size=batch, seed=0, workers=workers)


def images_per_s(batches, count: int) -> float:
    """Images/s of ``count`` batches after the first (workers started, pipes full)."""
    it = iter(batches)
    next(it)
    began, images = time.perf_counter(), 0
    for _ in range(count):
        item = next(it)
        images += len(item[-1] if isinstance(item, list) else item[2])
    return images / (time.perf_counter() - began)


def decoders(args: argparse.Namespace, folder: Path) -> None:
    """ms per image of each way to decode, one thread, as in a loader process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _decoders(args, folder)
    finally:
        torch.set_num_threads(threads)


def _decoders(args: argparse.Namespace, folder: Path) -> None:
    import simplejpeg
    from PIL import Image
    from torchvision.io import decode_jpeg, read_file

    from distbelief.crops import PAPER_AUGMENTATION, crop_box, crop_image
    from distbelief.data import sample_draws

    files = sorted((folder / "train").rglob("*.jpg"))[: args.decode_images]
    rows = sample_draws(0, 0, torch.arange(len(files)))

    def pil() -> None:
        for path in files:
            with Image.open(path) as image:
                image.convert("RGB")

    def draft(size: int):
        def run() -> None:
            for path, row in zip(files, rows, strict=True):
                with Image.open(path) as image:
                    width, height = image.size
                    _, _, h, w = crop_box(height, width, row.tolist())
                    image.draft("RGB", (int(width * size / w) + 1, int(height * size / h) + 1))
                    image.convert("RGB")

        return run

    def turbo() -> None:
        for path in files:
            decode_jpeg(read_file(str(path)))

    def simple() -> None:
        for path in files:
            simplejpeg.decode_jpeg(path.read_bytes(), colorspace="RGB")

    def pil_crop() -> None:  # what pytorch/examples' RandomResizedCrop does to a photo
        for path, row in zip(files, rows, strict=True):
            with Image.open(path) as image:
                image = image.convert("RGB")
                width, height = image.size
                top, left, h, w = crop_box(height, width, row.tolist())
                image.resize(
                    (size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h)
                )

    def our_crop() -> None:
        for path, row in zip(files, rows, strict=True):
            crop_image(path.read_bytes(), row, size=size, augmentation=PAPER_AUGMENTATION)

    def ms(run) -> float:
        return median_time(run, args.reps) * 1e3 / len(files)

    size = args.image_size
    pillow = ms(pil_crop)
    print(f"decode + crop to {size} px, Pillow (decode, resize with a box): {pillow:.2f} ms/image")
    ours = ms(our_crop)
    print(
        f"decode + crop to {size} px, ours (simplejpeg decode, torch uint8 resize): "
        f"{ours:.2f} ms/image, {pillow / ours:.2f}× Pillow's speed"
    )

    base = ms(pil)
    print(f"decode, Pillow, whole image: {base:.2f} ms/image")
    for name, run in (
        ("torchvision.io decode_jpeg, whole image", turbo),
        ("simplejpeg, whole image (what ours uses)", simple),
        (f"Pillow draft for crops to {args.image_size} px", draft(args.image_size)),
        (f"Pillow draft for crops to {args.image_size // 4} px", draft(args.image_size // 4)),
    ):
        value = ms(run)
        print(f"decode, {name}: {value:.2f} ms/image, {base / value:.2f}× Pillow's speed")


def loader_alone(args: argparse.Namespace, folder: Path) -> None:
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    for recipe in RECIPES:
        for k in workers:
            base, ours = [], []
            for _ in range(args.reps):
                loader = baseline_loader(folder, args.image_size, args.batch_size, k, recipe)
                base.append(images_per_s(loader, args.batches))
                del loader  # its workers stop
                with our_loader(folder, args.image_size, args.batch_size, k, recipe) as mine:
                    ours.append(images_per_s(mine, args.batches))
            line = throughput_line(
                f"loader alone, {recipe} recipe, {k} worker(s)",
                "pytorch/examples",
                statistics.median(base),
                "distbelief",
                statistics.median(ours),
            )
            print(f"{line} (target ≥ 1.3)", flush=True)


def replica(args: argparse.Namespace, data: str, num_classes: int) -> dict:
    serve_flags = ("--num-classes", str(num_classes), "--lr", "0.005")
    with shards(1, *serve_flags, transport="shm") as servers:
        return one_cpu_replica(
            servers,
            "shm",
            *("--data", data, "--image-size", str(args.image_size)),
            *("--batch-size", str(args.replica_batch_size), "--steps", str(args.steps)),
            *("--num-classes", str(num_classes)),
            timeout_s=RUN_TIMEOUT_S,
        )


def replica_from_jpegs(args: argparse.Namespace, folder: Path, num_classes: int) -> None:
    synthetic, jpegs = [], []
    wait = []
    for _ in range(args.reps):
        synthetic.append(float(replica(args, "synthetic", num_classes)["images_per_s"]))
        summary = replica(args, str(folder), num_classes)
        jpegs.append(float(summary["images_per_s"]))
        wait.append(summary["data_wait_s"] / summary["seconds"])
    line = throughput_line(
        f"CPU replica at {args.image_size} px",
        "synthetic data",
        statistics.median(synthetic),
        "JPEG folder",
        statistics.median(jpegs),
    )
    print(f"{line} (target ≥ 0.95)")
    print(f"CPU replica from JPEGs: data wait {statistics.median(wait):.1%} (target < 5%)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default=None, help="where the JPEG folder is kept")
    parser.add_argument("--images", type=int, default=3000, help="training images to build")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64, help="loader-alone batches")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per loader run")
    workers = "1,2,4" if available_cores() >= 4 else "1,2"
    parser.add_argument("--workers", default=workers, help="worker counts to compare")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="replica steps per run")
    parser.add_argument("--replica-batch-size", type=int, default=16)
    parser.add_argument("--decode-images", type=int, default=200, help="images per decode run")
    parser.add_argument("--parts", default="decode,loader,replica", help="decode, loader, replica")
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if (args.batches + 1) * args.batch_size > args.images:
        parser.error(  # the baseline's DataLoader gives one epoch
            f"--batches {args.batches} + 1 of {args.batch_size} need --images ≥ "
            f"{(args.batches + 1) * args.batch_size}, got {args.images}"
        )
    if not parts <= {"decode", "loader", "replica"}:
        parser.error(f"--parts: choose from decode, loader, replica; got {args.parts!r}")
    torch.set_num_threads(1)  # the consumer as in a GPU replica (`work` gives those 1 thread)
    print(machine())
    with tempfile.TemporaryDirectory(prefix="db-jpegs-") as scratch:
        folder = Path(args.folder or scratch)
        began = time.perf_counter()
        make_jpeg_folder(
            folder,
            classes=args.classes,
            train_per_class=max(1, args.images // args.classes),
            val_per_class=2,
        )
        count, size = folder_bytes(folder)
        print(
            f"JPEG folder: {count} images, {size / count / 1e3:.0f} KB each on average, "
            f"ready in {time.perf_counter() - began:.1f} s; batches of {args.batch_size} at "
            f"{args.image_size} px, median of {args.reps}"
        )
        if "decode" in parts:
            decoders(args, folder)
        if "loader" in parts:
            loader_alone(args, folder)
        if "replica" in parts:
            replica_from_jpegs(args, folder, args.classes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
