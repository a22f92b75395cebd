"""Tests for distbelief.data and distbelief.crops: data sets, crops, evaluation, data order."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from distbelief.crops import (
    DRAW_INTERPOLATION,
    DRAWS,
    crop_batch,
    crop_image,
    eval_image,
    finish_batch,
    nearest_indices,
    photometric_batch,
)
from distbelief.data import (
    DEMO_AUGMENTATION,
    DEMO_CLASSES,
    NO_AUGMENTATION,
    PAPER_AUGMENTATION,
    ArrayDataset,
    Augmentation,
    DataError,
    FolderDataset,
    demo_dataset,
    eval_crops,
    evaluate,
    iterate_batches,
    load_dataset,
    partition_indices,
    predict_crops,
    sample_crop_boxes,
    sample_draws,
    synthetic_dataset,
    training_augmentation,
)


@pytest.fixture(scope="module")
def demo_train() -> ArrayDataset:
    return demo_dataset("train")


@pytest.fixture(scope="module")
def demo_val() -> ArrayDataset:
    return demo_dataset("val")


# --------------------------------------------------------------------------- demo data


def test_demo_is_deterministic_balanced_rgb(demo_train: ArrayDataset) -> None:
    start = time.perf_counter()
    again = demo_dataset("train")
    assert time.perf_counter() - start < 5.0  # about 0.5 s on 2 cores
    assert torch.equal(again.images, demo_train.images)
    assert torch.equal(again.labels, demo_train.labels)
    n, channels, height, width = demo_train.images.shape
    assert (n, channels) == (10000, 3) and height == width >= 32
    assert demo_train.images.dtype == torch.uint8 and demo_train.labels.dtype == torch.int64
    assert demo_train.num_classes >= 10 and demo_train.image_size == 32
    counts = torch.bincount(demo_train.labels, minlength=demo_train.num_classes)
    assert counts.min() >= 0.9 * counts.max()
    assert len(demo_dataset("val", num_classes=12, num_val=120).classes) == len(DEMO_CLASSES)


def test_demo_train_and_val_differ(demo_train: ArrayDataset, demo_val: ArrayDataset) -> None:
    assert len(demo_val) == 2000
    train_rows = {bytes(row) for row in demo_train.images.flatten(1).numpy()}
    assert not any(bytes(row) in train_rows for row in demo_val.images.flatten(1).numpy())
    assert not torch.equal(demo_dataset("train", seed=1).images, demo_train.images)


def test_demo_class_is_not_in_the_colours(demo_train: ArrayDataset) -> None:
    # Foreground and background colours are drawn alike for every class, so every
    # class has the same mean colour (1000 images a class: sd of the mean ≈ 0.01).
    pixels = demo_train.images.float().div(255).mean(dim=(2, 3))  # N×3
    for c in range(demo_train.num_classes):
        mean = pixels[demo_train.labels == c].mean(dim=0)
        assert torch.allclose(mean, torch.full((3,), 0.5), atol=0.04), (c, mean)


def test_demo_batch_normalised_and_flipped(demo_train: ArrayDataset) -> None:
    idx = torch.arange(256)
    plain, labels = demo_train.batch(idx)
    assert plain.dtype == torch.float32 and plain.shape == (256, 3, 32, 32)
    assert torch.equal(labels, demo_train.labels[:256])
    assert torch.allclose(plain * 0.25 + 0.5, demo_train.images[:256].float() / 255)
    assert abs(float(plain.mean())) < 0.1 and float(plain.abs().max()) <= 2.0
    flipping = ArrayDataset(
        demo_train.images, demo_train.labels, num_classes=10, augmentation=DEMO_AUGMENTATION
    )
    a, _ = flipping.batch(idx, sample_draws(5, 0, idx))
    b, _ = flipping.batch(idx, sample_draws(5, 0, idx))
    assert torch.equal(a, b) and torch.equal(flipping.batch(idx)[0], plain)
    same = (a == plain).flatten(1).all(1)
    mirrored = (a == plain.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 0 < int(mirrored.sum()) < 256


def test_linear_classifier_on_pixels_stays_far_below_convnet() -> None:
    # Multinomial logistic regression on raw pixels (L-BFGS, L2 penalty). By hand on
    # the full set (10000 train, 2000 val, 200 iterations) val accuracy is 0.26-0.29
    # for penalties 1.0-0.1 (0.14 without one, with train at 0.95: it overfits);
    # chance is 0.10. Here a smaller run to stay fast (4000 train, 60 iterations): 0.24.
    torch.manual_seed(0)
    train, val = demo_dataset("train", num_train=4000), demo_dataset("val", num_val=1000)
    x, y = train.batch(torch.arange(len(train)))
    xv, yv = val.batch(torch.arange(len(val)))
    x, xv = x.flatten(1), xv.flatten(1)
    linear = nn.Linear(x.shape[1], train.num_classes)
    opt = torch.optim.LBFGS(
        linear.parameters(), max_iter=60, history_size=10, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(linear(x), y) + 0.1 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        accuracy = float((linear(xv).argmax(1) == yv).float().mean())
    assert accuracy <= 0.6


def _tiny_cnn(num_classes: int, width: int = 16) -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, width), nn.MaxPool2d(2),
        *block(width, 2 * width), nn.MaxPool2d(2),
        *block(2 * width, 4 * width), nn.MaxPool2d(2),
        *block(4 * width, 4 * width), nn.AdaptiveMaxPool2d(1),
        nn.Flatten(), nn.Linear(4 * width, num_classes),
    )  # fmt: skip


@pytest.mark.slow
def test_tiny_convnet_learns_demo(demo_train: ArrayDataset, demo_val: ArrayDataset) -> None:
    # By hand: 4 epochs → 0.997 val. Here 2 epochs (about 10 s on 2 idle cores) → 0.96.
    torch.manual_seed(0)
    train = ArrayDataset(
        demo_train.images, demo_train.labels, num_classes=10, augmentation=DEMO_AUGMENTATION
    )
    net, batch_size, epochs = _tiny_cnn(train.num_classes), 128, 2
    steps = epochs * (len(train) // batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    batches = iterate_batches(train, batch_size=batch_size, seed=0)
    net.train()
    for _ in range(steps):
        _, x, y = next(batches)
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    result = evaluate(net, demo_val, batch_size=500)
    assert result["top1"] >= 0.9, result


# --------------------------------------------------------------------------- other sources


def test_synthetic_dataset() -> None:
    ds = synthetic_dataset(num_examples=1000, image_size=48, num_classes=7, seed=3)
    assert len(ds) == 1000 and ds.num_classes == 7 and ds.image_size == 48
    x, y = ds.batch(torch.tensor([0, 5, 999]))
    assert x.shape == (3, 3, 48, 48) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) < 7
    x2, y2 = ds.batch(torch.tensor([0, 5, 999]))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert len(torch.unique(ds.labels)) == 7
    train = load_dataset("synthetic", "train", image_size=32)
    val = load_dataset("synthetic", "val", image_size=32, num_classes=10)
    assert (len(train), train.num_classes, len(val), val.num_classes) == (100000, 1000, 1000, 10)


def _write_jpegs(folder: Path, sizes: list[tuple[int, int]], seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (width, height) in enumerate(sizes):
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.jpg")


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    root = tmp_path / "imagenet"
    for c, name in enumerate(["cat", "dog", "eel"]):
        _write_jpegs(root / "train" / name, [(40, 30), (30, 50), (64, 64)], seed=c)
        if name != "dog":  # val lacks a class: labels must still follow train's classes
            _write_jpegs(root / "val" / name, [(50, 40)], seed=10 + c)
    return root


def test_folder_dataset_loads(image_tree: Path) -> None:
    train = load_dataset(str(image_tree), "train", image_size=24, num_classes=3)
    assert isinstance(train, FolderDataset) and train.augmentation == PAPER_AUGMENTATION
    assert len(train) == 9 and train.num_classes == 3 and train.classes == ("cat", "dog", "eel")
    draws = sample_draws(0, 0, torch.arange(9))
    x, y = train.batch(torch.arange(9), draws)
    assert x.shape == (9, 3, 24, 24) and x.dtype == torch.float32
    assert y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    again, _ = train.batch(torch.arange(9), draws)
    assert torch.equal(x, again)
    assert not torch.equal(x, train.batch(torch.arange(9), sample_draws(0, 1, torch.arange(9)))[0])
    val = load_dataset(str(image_tree), "val", image_size=24)
    assert val.augmentation == NO_AUGMENTATION and len(val) == 2 and val.num_classes == 3
    xv, yv = val.batch(torch.arange(2))
    assert xv.shape == (2, 3, 24, 24) and yv.tolist() == [0, 2]
    images, labels = val.eval_images(torch.arange(2))
    assert [tuple(im.shape) for im in images] == [(3, 40, 50)] * 2 and labels.tolist() == [0, 2]
    result = evaluate(_tiny_cnn(3, width=4), val, crops=10)
    assert result["examples"] == 2 and result["top5"] == 1.0  # top-5 of 3 classes


def test_folder_errors_name_the_path(tmp_path: Path, image_tree: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        load_dataset(str(missing), "train", image_size=24)
    no_train = tmp_path / "no_train"
    (no_train / "val" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match=re.escape(f"{no_train}/train does not exist")):
        load_dataset(str(no_train), "train", image_size=24)
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=re.escape(f"{empty}/train has no class folders")):
        load_dataset(str(empty), "train", image_size=24)
    (empty / "train" / "cat").mkdir()
    with pytest.raises(DataError, match=re.escape(f"{empty}/train holds no images")):
        load_dataset(str(empty), "train", image_size=24)
    with pytest.raises(DataError, match="3 classes"):
        load_dataset(str(image_tree), "train", image_size=24, num_classes=1000)
    with pytest.raises(DataError, match="split"):
        load_dataset("demo", "test", image_size=32)
    with pytest.raises(ValueError):
        load_dataset("", "train", image_size=32)


def test_load_dataset_augmentation_defaults_and_settings() -> None:
    assert load_dataset("demo", "train", image_size=32).augmentation == DEMO_AUGMENTATION
    assert load_dataset("demo", "val", image_size=32).augmentation == NO_AUGMENTATION
    assert training_augmentation("imagenet") == PAPER_AUGMENTATION
    assert training_augmentation("synthetic", flip=True) == NO_AUGMENTATION  # random data
    lighter = training_augmentation("imagenet", crop_scale=(0.35, 1), flip=False)
    assert lighter.crop_scale == (0.35, 1) and not lighter.flip and lighter.color
    assert training_augmentation("imagenet", crop_scale=None).crop_scale is None
    assert training_augmentation("demo", color=True).color
    assert "crops of 0.35-1" in lighter.describe() and NO_AUGMENTATION.describe() == "none"
    with pytest.raises(ValueError, match="crop scale"):
        Augmentation(crop_scale=(0.5, 0.2))
    paper = load_dataset("demo", "train", image_size=32, augmentation=PAPER_AUGMENTATION)
    idx = torch.arange(16)
    x, _ = paper.batch(idx, sample_draws(0, 0, idx))
    assert x.shape == (16, 3, 32, 32) and float(x.abs().max()) <= 2.0
    assert not torch.equal(x, paper.batch(idx)[0])


# --------------------------------------------------------------------------- training crops


@pytest.mark.parametrize("shape", [(32, 32), (100, 300), (300, 120), (7, 9)])
def test_crop_boxes_area_and_ratio(shape: tuple[int, int]) -> None:
    height, width = shape
    boxes = sample_crop_boxes(20000, height, width, generator=torch.Generator().manual_seed(0))
    top, left, h, w = boxes.double().unbind(1)
    area, ratio = h * w / (height * width), w / h
    eps = 1e-5
    assert float(area.min()) >= 0.08 - eps and float(area.max()) <= 1 + eps
    assert float(ratio.min()) >= 3 / 4 - eps and float(ratio.max()) <= 4 / 3 + eps
    assert float(top.min()) >= 0 and float((top + h).max()) <= height + eps
    assert float(left.min()) >= 0 and float((left + w).max()) <= width + eps
    assert float(area.min()) < 0.1  # the whole range is used
    if height == width:
        assert float(area.max()) > 0.95 and 0.4 < float(area.mean()) < 0.6


def test_crop_image_follows_its_draws_and_decodes_large_crops_smaller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ramp = np.linspace(0, 255, 400)[None, :, None] * np.ones((300, 1, 3))
    noise = np.random.default_rng(0).normal(0, 20, (300, 400, 3))
    Image.fromarray((ramp + noise).clip(0, 255).astype(np.uint8)).save(tmp_path / "a.jpg")
    data = (tmp_path / "a.jpg").read_bytes()
    rows = sample_draws(1, 0, torch.arange(40))
    first = crop_image(data, rows[0], size=32, augmentation=PAPER_AUGMENTATION)
    again = crop_image(data, rows[0], size=32, augmentation=PAPER_AUGMENTATION)
    assert first.shape == (3, 32, 32) and first.dtype == torch.uint8 and torch.equal(first, again)
    assert not torch.equal(
        first, crop_image(data, rows[1], size=32, augmentation=PAPER_AUGMENTATION)
    )
    # A whole-image "crop" of 400×300 to 32 px decodes at 1/8 scale (at least 32×32
    # for the whole image: 50×38); a full decode then the same resize gives nearly the
    # same picture.
    from PIL.JpegImagePlugin import JpegImageFile

    import distbelief.crops as crops

    whole = Augmentation(crop_scale=None, flip=False, color=False)
    decoded = crops._decode_jpeg(data, 32, rows[0].tolist(), whole)
    assert decoded is not None and decoded[0].shape == (38, 50, 3)
    small = crop_image(data, rows[0], size=32, augmentation=whole)
    monkeypatch.setattr(crops, "_decode_jpeg", lambda *a: None)  # Pillow, no draft:
    monkeypatch.setattr(JpegImageFile, "draft", lambda self, mode, size: None)
    full = crop_image(data, rows[0], size=32, augmentation=whole)  # decoded whole
    monkeypatch.undo()
    assert (small.float() - full.float()).abs().mean() < 12
    with Image.open(tmp_path / "a.jpg") as image:
        assert eval_image(image, size=24).shape == (3, 24, 24)
    modes = {int(float(r[DRAW_INTERPOLATION]) * 3) for r in rows}
    assert modes == {0, 1, 2}  # bilinear, bicubic and nearest all drawn


@pytest.mark.parametrize("length", [1, 17, 31, 32, 33, 64, 100, 224, 333, 375, 448, 500])
@pytest.mark.parametrize("size", [8, 32, 224])
def test_nearest_crops_pick_the_pixels_interpolate_picks(length: int, size: int) -> None:
    """``crop_image`` cuts nearest-neighbour crops by indexing; the same pixels as
    ``F.interpolate(mode="nearest")``, which it used before and still uses for the rest."""
    pixels = torch.randint(0, 256, (1, 3, length, length + 7), dtype=torch.uint8)
    ours = pixels[0].index_select(1, nearest_indices(length, size))
    ours = ours.index_select(2, nearest_indices(length + 7, size))
    resized = torch.nn.functional.interpolate(pixels, size=(size, size), mode="nearest")[0]
    assert torch.equal(ours, resized)


def test_simplejpeg_crops_are_pillows_crops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JPEGs are decoded by simplejpeg at the DCT scale Pillow's ``draft`` would pick:
    the same pixels as Pillow's decoder, so the same crops, at every scale (1/1 to 1/8
    at 16 and 64 px from photos up to 600 pixels a side); grey JPEGs too. CMYK JPEGs and other
    formats go through Pillow."""
    import distbelief.crops as crops

    rng = np.random.default_rng(3)
    files = []
    for k, (h, w) in enumerate([(375, 500), (600, 410), (90, 140), (260, 260), (33, 47)]):
        ramp = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
        pixels = (ramp + rng.normal(0, 25, (h, w, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{k}.jpg", quality=85)
        files.append(tmp_path / f"{k}.jpg")
    Image.fromarray(pixels[..., 0]).save(tmp_path / "grey.jpg")
    Image.fromarray(pixels).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(pixels).save(tmp_path / "plain.png")
    files += [tmp_path / "grey.jpg", tmp_path / "cmyk.jpg", tmp_path / "plain.png"]
    rows = sample_draws(5, 0, torch.arange(12))
    scales = set()
    for path in files:
        data = path.read_bytes()
        for size in (16, 64):
            ours = [crop_image(data, r, size=size, augmentation=PAPER_AUGMENTATION) for r in rows]
            for r in rows:
                decoded = crops._decode_jpeg(data, size, r.tolist(), PAPER_AUGMENTATION)
                assert (decoded is None) == (path.stem in ("plain", "cmyk")), path
                if decoded is not None:
                    height, rows_out = decoded[1][0], decoded[0].shape[0]
                    scales.add(next(s for s in (1, 2, 4, 8) if -(-height // s) == rows_out))
            with monkeypatch.context() as m:  # Pillow for every file
                m.setattr(crops, "_decode_jpeg", lambda *a: None)
                pillow = [
                    crop_image(data, r, size=size, augmentation=PAPER_AUGMENTATION) for r in rows
                ]
            assert all(torch.equal(a, b) for a, b in zip(ours, pillow, strict=True)), path
    assert scales == {1, 2, 4, 8}, scales


def test_the_colour_twist_is_colorjitters_steps_where_none_leaves_the_range() -> None:
    from torchvision.transforms.v2 import functional as TF

    from distbelief.crops import DRAW_COLOR

    x = 0.45 + 0.1 * torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    # mid-range: no step below clamps
    draws = sample_draws(2, 0, torch.arange(8))
    draws[:, DRAW_COLOR + 3] = 0.5  # no hue turn: torchvision turns hue in HSV, we in YIQ
    ours = photometric_batch(x, draws)
    for k in range(8):
        b, c, s = (1 + 0.4 * (2 * float(draws[k, DRAW_COLOR + i]) - 1) for i in range(3))
        ref = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x[k], b), c), s)
        assert torch.allclose(ours[k], ref, atol=2e-3), k  # grey weights 0.2989 vs 0.299
    turned = photometric_batch(x, sample_draws(2, 0, torch.arange(8)))
    gray = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    # a hue turn keeps each pixel's luma (Y of YIQ) where brightness and contrast set it
    assert torch.allclose((turned * gray).sum(1), (ours * gray).sum(1), atol=1e-5)
    assert not torch.allclose(turned, ours, atol=1e-3)


def test_crop_batch_and_finish_batch_are_set_by_the_draws() -> None:
    x = torch.rand(16, 3, 32, 32)
    draws = sample_draws(1, 0, torch.arange(16))
    a = crop_batch(x, draws, augmentation=PAPER_AUGMENTATION)
    b = crop_batch(x, draws, augmentation=PAPER_AUGMENTATION)
    assert a.shape == (16, 3, 32, 32) and torch.equal(a, b)
    assert a.dtype == torch.uint8 and 0 < float(a.float().mean()) < 255
    assert crop_batch(x, draws, size=20, augmentation=PAPER_AUGMENTATION).shape == (16, 3, 20, 20)
    grey = torch.full((4, 3, 8, 8), 0.5)
    assert torch.allclose(
        photometric_batch(grey, draws[:4]).std(dim=1), torch.zeros(4, 8, 8), atol=1e-5
    )
    images = (x * 255).to(torch.uint8)
    kept = images.clone()
    plain = finish_batch(images, None, PAPER_AUGMENTATION)
    assert torch.allclose(plain, (images.float() / 255 - 0.5) / 0.25, atol=1e-6)
    flips_only = finish_batch(images, draws, DEMO_AUGMENTATION)
    mirrored = (flips_only == plain.flip(-1)).flatten(1).all(1)
    assert bool((mirrored | (flips_only == plain).flatten(1).all(1)).all())
    assert 0 < int(mirrored.sum()) < 16
    assert not torch.equal(finish_batch(images, draws, PAPER_AUGMENTATION), flips_only)
    assert torch.equal(images, kept)  # the flips went into a new batch
    with pytest.raises(ValueError, match=f"{DRAWS}"):
        sample_crop_boxes(3, 10, 10, draws=torch.rand(3, 5))


# --------------------------------------------------------------------------- test crops


@pytest.mark.parametrize("crops", [1, 10, 144])
@pytest.mark.parametrize("shape", [(40, 60), (60, 40), (32, 32)])
def test_eval_crop_counts_and_mirrors(crops: int, shape: tuple[int, int]) -> None:
    image = torch.rand(3, *shape)
    out = eval_crops(image, image_size=28, crops=crops)
    assert out.shape == (crops, 3, 28, 28)
    if crops > 1:
        half = crops // 2
        assert torch.equal(out[half:], out[:half].flip(-1))


def test_eval_crop_single_is_centre_crop() -> None:
    image = torch.rand(3, 32, 48)  # shorter side already 28·256/224 = 32
    out = eval_crops(image, image_size=28, crops=1)
    assert torch.equal(out[0], image[:, 2:30, 10:38])
    corners = eval_crops(image, image_size=28, crops=10)
    assert torch.equal(corners[0], image[:, :28, :28])
    assert torch.equal(corners[3], image[:, 4:, 20:])
    assert torch.equal(corners[4], out[0])


@pytest.mark.parametrize("portrait", [True, False])
def test_144_crops_take_three_squares_along_the_long_side(portrait: bool) -> None:
    # Halves of value +1 and -1 along the long side: the first square (top / left)
    # sees +1, the last (bottom / right) −1, the centre square both.
    image = torch.ones(3, 96, 48) if portrait else torch.ones(3, 48, 96)
    if portrait:
        image[:, 48:] = -1
    else:
        image[:, :, 48:] = -1
    out = eval_crops(image, image_size=28, crops=144)[:72].view(4, 3, 6, 3, 28, 28)
    whole = out[:, :, 5].mean(dim=(2, 3, 4))  # the square resized to 28, per scale × square
    # (resizing blurs the step between the halves a little)
    assert torch.allclose(whole[:, 0], torch.ones(4), atol=0.05)
    assert torch.allclose(whole[:, 1], torch.zeros(4), atol=0.05)
    assert torch.allclose(whole[:, 2], -torch.ones(4), atol=0.05)
    centre_square = out[:, 1, 5, 0]  # 4×28×28; split along the long axis only
    rows_differ = (centre_square[:, 0] - centre_square[:, -1]).abs().max() > 0.5
    assert bool(rows_differ) == portrait


def test_eval_crops_rejects_bad_counts() -> None:
    with pytest.raises(ValueError):
        eval_crops(torch.rand(3, 32, 32), image_size=28, crops=5)


# --------------------------------------------------------------------------- evaluation


class LookupModel(nn.Module):
    """Cheats: the label is written in the image as its constant pixel value."""

    def __init__(self, num_classes: int, offset: int = 0) -> None:
        super().__init__()
        self.num_classes, self.offset = num_classes, offset
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        label = ((x.mean(dim=(1, 2, 3)) * 0.25 + 0.5) * 255 / 10).round().long()
        classes = torch.arange(self.num_classes)
        # Scores fall with the distance from label + offset: the label is in the top 5.
        logits = -(classes[None, :] - label[:, None] - self.offset).abs().float()
        return logits * self.scale, torch.zeros(len(x))  # a tuple, like a training GoogLeNet


def _labelled_constant_images(num_classes: int, n: int) -> ArrayDataset:
    labels = torch.arange(n) % num_classes
    images = (labels * 10).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 24, 24).contiguous()
    return ArrayDataset(images, labels, num_classes=num_classes)


@pytest.mark.parametrize("crops", [1, 10, 144])
def test_evaluate_counts_top1_and_top5(crops: int) -> None:
    ds = _labelled_constant_images(num_classes=12, n=30)
    model = LookupModel(12).train()
    result = evaluate(model, ds, batch_size=7, crops=crops)
    assert result == {"top1": 1.0, "top5": 1.0, "examples": 30}
    assert model.training  # mode restored
    shifted = evaluate(LookupModel(12, offset=1), ds, crops=crops)
    assert shifted["top1"] < 0.1 and shifted["top5"] == 1.0
    assert evaluate(model, ds, max_examples=5)["examples"] == 5


def test_predict_crops_averages_probabilities() -> None:
    ds = _labelled_constant_images(num_classes=12, n=4)
    probs = predict_crops(LookupModel(12), ds.images, crops=10, chunk_size=3)
    assert probs.shape == (4, 12)
    assert torch.allclose(probs.sum(dim=1), torch.ones(4))
    assert probs.argmax(dim=1).tolist() == ds.labels.tolist()


# --------------------------------------------------------------------------- data order


def test_partition_indices_cover_disjointly() -> None:
    n, world = 1003, 4
    shares = [partition_indices(n, rank=r, world=world, epoch=2, seed=7) for r in range(world)]
    every = torch.cat(shares)
    assert len(every) == n and torch.equal(every.sort().values, torch.arange(n))
    assert max(len(s) for s in shares) - min(len(s) for s in shares) <= 1
    assert torch.equal(shares[1], partition_indices(n, rank=1, world=world, epoch=2, seed=7))
    assert not torch.equal(shares[1], partition_indices(n, rank=1, world=world, epoch=3, seed=7))
    assert not torch.equal(shares[1], partition_indices(n, rank=1, world=world, epoch=2, seed=8))
    for rank, world in [(4, 4), (-1, 4), (0, 0)]:
        with pytest.raises(ValueError):
            partition_indices(n, rank=rank, world=world, epoch=0, seed=0)


def test_iterate_batches_deterministic_and_continuing() -> None:
    ds = _labelled_constant_images(num_classes=10, n=50)
    ds.augmentation = DEMO_AUGMENTATION

    def take(k: int, **kw: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        it = iterate_batches(ds, batch_size=8, seed=3, **kw)
        return [next(it) for _ in range(k)]

    first, second = take(9, rank=1, world=2), take(9, rank=1, world=2)
    assert [e for e, _, _ in first] == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # 25 examples: 3 batches
    for (_, xa, ya), (_, xb, yb) in zip(first, second, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.shape == (8, 3, 24, 24)
    resumed = take(3, rank=1, world=2, start_epoch=1)
    for (ea, xa, ya), (eb, xb, yb) in zip(resumed, first[3:6], strict=True):
        assert ea == eb == 1 and torch.equal(xa, xb) and torch.equal(ya, yb)
    mid_epoch = take(3, rank=1, world=2, start_epoch=1, start_batch=2)
    for (ea, xa, ya), (eb, xb, yb) in zip(mid_epoch, first[5:8], strict=True):
        assert ea == eb and torch.equal(xa, xb) and torch.equal(ya, yb)
    other = take(3, rank=0, world=2)
    assert not all(torch.equal(a[2], b[2]) for a, b in zip(other, first[:3], strict=True))
    with pytest.raises(ValueError):
        next(iterate_batches(ds, batch_size=8, seed=0, rank=2, world=2))
    with pytest.raises(ValueError):
        next(iterate_batches(ds, batch_size=64, seed=0))


def test_a_built_demo_set_is_kept_verified_and_rebuilt_when_damaged(tmp_path, monkeypatch):
    import distbelief.data as data

    monkeypatch.setenv(data.DEMO_CACHE_ENV, str(tmp_path))
    built = data.demo_dataset("train", num_train=300, image_size=16, num_classes=4, seed=5)
    (path,) = tmp_path.glob("demo-train-300x16px-4c-seed5-*.safetensors")
    render = data._render_demo
    monkeypatch.setattr(data, "_render_demo", None)  # a second build would fail: read back
    again = data.demo_dataset("train", num_train=300, image_size=16, num_classes=4, seed=5)
    assert torch.equal(again.images, built.images) and torch.equal(again.labels, built.labels)
    blob = bytearray(path.read_bytes())
    blob[-100] ^= 0xFF  # one flipped byte in the images: the sha256 no longer matches
    path.write_bytes(bytes(blob))
    monkeypatch.setattr(data, "_render_demo", render)
    rebuilt = data.demo_dataset("train", num_train=300, image_size=16, num_classes=4, seed=5)
    assert torch.equal(rebuilt.images, built.images)
    from distbelief.checkpoint import load_checkpoint

    assert torch.equal(load_checkpoint(path).tensors["images"], built.images)  # written anew
    other = data.demo_dataset("train", num_train=300, image_size=16, num_classes=4, seed=6)
    assert not torch.equal(other.images, built.images)  # the seed is in the key
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    monkeypatch.setenv(data.DEMO_CACHE_ENV, "off")
    assert data.demo_cache_dir() is None
