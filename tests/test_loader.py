"""The input pipeline: the same batches whatever the loader processes, resumable mid-epoch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distbelief.workers.replica import ReplicaConfig, replica_batches
from PIL import Image

from distbelief.cli.options import input_flags
from distbelief.data import (
    DEMO_AUGMENTATION,
    PAPER_AUGMENTATION,
    Augmentation,
    DataError,
    demo_dataset,
    load_dataset,
    sample_draws,
)
from distbelief.loader import Loader, default_loader_workers


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ImageNet-style folder of JPEGs of mixed sizes and shapes."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 12), ("val", 2)):
        for c in ("ant", "bee", "cat"):
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(per_class):
                h, w = (int(v) for v in rng.integers(60, 160, 2))
                ramp = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
                pixels = (ramp + rng.normal(0, 30, (h, w, 3))).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def take(dataset, n: int, **kw) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    with Loader(dataset, **kw) as loader:
        return [next(loader) for _ in range(n)]


def same(a, b) -> bool:
    return all(
        ea == eb and torch.equal(xa, xb) and torch.equal(ya, yb)
        for (ea, xa, ya), (eb, xb, yb) in zip(a, b, strict=True)
    )


def test_folder_batches_are_the_same_with_0_1_2_or_4_loader_workers(photo_folder: Path) -> None:
    train = load_dataset(str(photo_folder), "train", image_size=32)
    assert train.augmentation == PAPER_AUGMENTATION
    kw = dict(batch_size=4, seed=3, rank=1, world=2)  # 18 examples a rank: 4 batches an epoch
    alone = take(train, 10, **kw)  # past the end of the first two epochs
    assert [e for e, _, _ in alone] == [0] * 4 + [1] * 4 + [2] * 2
    assert alone[0][1].shape == (4, 3, 32, 32) and alone[0][1].dtype == torch.float32
    for workers in (1, 2, 4):
        assert same(take(train, 10, workers=workers, **kw), alone), workers
    # mid-epoch, in a new process pool: exactly where the stream was
    assert same(take(train, 5, workers=2, start=5, **kw), alone[5:])
    # another seed draws other crops of the same images in the same order
    other = take(train, 1, batch_size=4, seed=4, rank=1, world=2)
    assert not torch.equal(other[0][1], alone[0][1])


def test_dispatched_chunks_load_the_same_with_0_or_2_workers_and_end_with_the_feed(
    photo_folder: Path,
) -> None:
    """A feed of chunk keys (as the dispatcher's ChunkFeed yields them): the batches and
    their marks do not depend on the worker processes, and the loader stops when the
    feed does; one chunk of the whole epoch in order is the reference trainer's order."""
    train = load_dataset(str(photo_folder), "train", image_size=32)  # 36 examples
    keys = [(3, 0, 7, 0, 4), (3, 0, 7, 4, 8), (3, 1, 9, 8, 12), (3, 1, 9, 12, 14)]

    def run(workers: int) -> tuple[list, list]:
        with Loader(train, batch_size=4, seed=3, workers=workers, feed=keys) as loader:
            batches, marks = [], []
            for batch in loader:
                batches.append(batch)
                marks.append(loader.mark)
        return batches, marks

    alone, marks = run(0)
    assert marks == [(7, 0, 4), (7, 4, 8), (9, 8, 12), (9, 12, 14)]
    assert [e for e, _, _ in alone] == [0, 0, 1, 1] and len(alone[3][2]) == 2  # a short end
    in_workers, marks_there = run(2)
    assert marks_there == marks and same(in_workers, alone)
    # positions [0, 8) of epoch 0 are the first two batches of the one-rank stream
    assert same(take(train, 2, batch_size=4, seed=3), alone[:2])


def test_demo_crops_are_the_same_in_worker_processes_and_resume_mid_epoch() -> None:
    demo = demo_dataset("train", num_train=2000, augmentation=Augmentation())
    kw = dict(batch_size=64, seed=0, rank=2, world=4)
    alone = take(demo, 6, **kw)
    assert same(take(demo, 6, workers=2, **kw), alone)
    assert same(take(demo, 3, start=3, **kw), alone[3:])


def test_a_samples_draws_depend_on_seed_epoch_and_index_only() -> None:
    idx = torch.tensor([7, 3, 11])
    draws = sample_draws(5, 2, idx)
    assert torch.equal(sample_draws(5, 2, torch.tensor([11, 7]))[1], draws[0])
    assert not torch.equal(sample_draws(5, 3, idx), draws)
    assert not torch.equal(sample_draws(6, 2, idx), draws)
    assert float(draws.min()) >= 0 and float(draws.max()) < 1


def test_a_restarted_replica_resumes_mid_epoch_where_it_stopped() -> None:
    demo = demo_dataset("train", num_train=2000, augmentation=DEMO_AUGMENTATION)
    cfg = ReplicaConfig(servers=("tcp://x:1",), index=1, num_replicas=2, batch_size=50)
    per_epoch = len(demo) // 2 // 50
    stop = per_epoch + 7  # the second epoch, 7 steps in
    with replica_batches(cfg, demo) as batches:
        whole = [next(batches) for _ in range(stop + 3)]
    restarted = ReplicaConfig(**{**cfg.__dict__, "start_step": stop, "start_epoch": 1})
    with replica_batches(restarted, demo) as batches:
        again = [next(batches) for _ in range(3)]
    assert same(again, whole[stop:]) and again[0][0] == 1


def test_decoding_on_the_device_gives_the_loaders_crops(photo_folder: Path, tmp_path: Path) -> None:
    """``--decode device`` (here the CPU: the same code, torchvision.io's decoder on
    the replica's device): the loader processes only read the files, the training
    process decodes and crops the batch. At 96 px no crop of these photos (at most 160
    pixels a side) is twice the output, so Pillow's DCT scaling never acts on the
    loader's side and both decode the same libjpeg: the same batches bit for bit, with
    0 or 2 loader processes."""
    kw = dict(batch_size=4, seed=3, rank=1, world=2)
    pillow = load_dataset(str(photo_folder), "train", image_size=96)
    device = load_dataset(str(photo_folder), "train", image_size=96, decode="device")
    in_loader = take(pillow, 5, **kw)
    assert same(take(device, 5, **kw), in_loader)
    assert same(take(device, 5, workers=2, **kw), in_loader)
    item = device.fetch(torch.arange(3), sample_draws(0, 0, torch.arange(3)))[0]
    assert item.data.dtype == torch.uint8 and len(item.ends) == 3  # files, not pixels
    # at 32 px Pillow decodes large crops at a DCT scale; the device the whole image
    small = load_dataset(str(photo_folder), "train", image_size=32)
    small_device = load_dataset(str(photo_folder), "train", image_size=32, decode="device")
    a, b = take(small, 1, **kw)[0][1], take(small_device, 1, **kw)[0][1]
    assert 0 < float((a - b).abs().mean()) < 0.25  # normalised units: under 16 of 255
    # a file that is not a JPEG is named; an in-memory set has nothing to decode
    odd = tmp_path / "odd"
    for c in ("ant", "bee"):
        (odd / "train" / c).mkdir(parents=True)
        Image.new("RGB", (40, 30), (9, 9, 9)).save(odd / "train" / c / "0.jpg", quality=90)
    Image.new("RGB", (40, 30), (9, 9, 9)).save(odd / "train" / "bee" / "1.png")
    png = load_dataset(str(odd), "train", image_size=32, decode="device")
    with pytest.raises(DataError, match=r"cannot decode image .*1\.png .*JPEG files only"):
        take(png, 1, batch_size=3, seed=0)
    with pytest.raises(DataError, match="needs a folder, not demo"):
        load_dataset("demo", "train", image_size=32, decode="device")


def test_data_wait_is_counted(photo_folder: Path) -> None:
    train = load_dataset(str(photo_folder), "train", image_size=32)
    with Loader(train, batch_size=4, seed=0, workers=1) as loader:
        for _ in range(3):
            next(loader)
        assert loader.data_wait_s > 0
    with Loader(train, batch_size=4, seed=0) as loader:  # in process: all of it is waiting
        next(loader)
        assert loader.data_wait_s > 0


def test_an_undecodable_image_names_its_file(photo_folder: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    (broken / "train" / "ant").mkdir(parents=True)
    (broken / "val").mkdir()
    bad = broken / "train" / "ant" / "0.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    train = load_dataset(str(broken), "train", image_size=32)
    with pytest.raises(DataError, match="cannot decode image .*0.jpg"):
        take(train, 1, batch_size=1, seed=0)
    with pytest.raises(DataError, match="0.jpg"):  # from a worker process, the same error
        take(train, 1, batch_size=1, seed=0, workers=1)


def test_default_loader_workers() -> None:
    assert default_loader_workers("demo", device="cuda:0", replicas=1, cores=16) == 0
    assert default_loader_workers("/data", device="cpu", replicas=4, cores=2) == 1
    assert default_loader_workers("/data", device="cuda:0", replicas=2, cores=16) == 7
    assert default_loader_workers("/data", device="cuda:0", replicas=8, cores=8) == 1


def test_up_passes_the_input_flags_it_was_given_on_to_work() -> None:
    given = {"crop_scale": "0.35,1", "crop_ratio": None, "flip": False, "color_jitter": True}
    flags = input_flags(given | {"loader_workers": 2, "decode": "device"})
    assert flags == [
        "--crop-scale",
        "0.35,1",
        "--no-flip",
        "--color-jitter",
        "--loader-workers",
        "2",
        "--decode",
        "device",
    ]
    assert input_flags(dict.fromkeys(given)) == []  # nothing set: work's own defaults


def test_bad_augmentation_flags_are_one_line_errors(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "distbelief", "work", "--servers", "tcp://127.0.0.1:1"]
    for flags, message, code in (
        (["--crop-scale", "0.5,0.1"], "need 0 < MIN ≤ MAX", 2),
        (["--crop-ratio", "wide"], "expected MIN,MAX", 2),
        (["--loader-workers", "-1"], "-1 is not in the range x>=0", 2),
        (["--decode", "gpu"], "'gpu' is not one of 'loader', 'device'", 2),
        # a setting each flag allows, not together: refused as the data are checked
        (["--decode", "device"], "--decode device decodes JPEG files: it needs a folder", 1),
    ):
        proc = subprocess.run(cmd + flags, capture_output=True, text=True, timeout=60)
        assert proc.returncode == code and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    # a config file's setting meets the same check (`up` passes these flags on to `work`)
    config = tmp_path / "cluster.toml"
    config.write_text('[work]\ncrop-scale = "0.5,0.1"\n')
    proc = subprocess.run(
        cmd + ["--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "need 0 < MIN ≤ MAX" in proc.stderr, proc.stderr
    # labels the classifier has no output for: refused before any replica starts
    proc = subprocess.run(
        cmd + ["--data", "demo", "--num-classes", "5"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1 and "has 10 classes but the model's classifier 5" in proc.stderr
