"""bench.gpu at tiny sizes on the CPU (so that the GPU command does not rot), and the
JPEG folder generator it reads (bench.jpegs)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from bench.gpu import MIN_STEADY_STEPS, measure
from bench.jpegs import MARKER, class_name, folder_bytes, make_jpeg_folder
from distbelief.data import load_dataset

ROOT = Path(__file__).resolve().parents[1]
RATIO = re.compile(r"ratio (\S+)")


def test_jpeg_folder_layout_sizes_determinism_and_skip(tmp_path):
    kw = dict(classes=3, train_per_class=4, val_per_class=2, size=(200, 150), seed=5)
    root = make_jpeg_folder(tmp_path / "a", **kw, processes=1)
    for split, count in (("train", 4), ("val", 2)):
        folders = sorted(p.name for p in (root / split).iterdir())
        assert folders == [class_name(k) for k in range(3)]
        assert all(len(list((root / split / f).glob("*.jpg"))) == count for f in folders)
    sizes = [Image.open(p).size for p in sorted(root.rglob("*.jpg"))]
    assert all(min(s) >= 120 and max(s) <= 240 for s in sizes), sizes  # ±20% of each side
    assert len(set(sizes)) > len(sizes) // 2, sizes  # sizes vary, as in ImageNet
    count, total = folder_bytes(root)
    assert count == 18 and 3_000 < total / count < 30_000  # photo-like: 8 KB per 200×150
    # the layout `work --data ROOT` reads, with labels from the train classes
    train = load_dataset(str(root), "train", image_size=32)
    assert len(train) == 12 and train.num_classes == 3

    # the same arguments give the same bytes, whatever the number of processes
    other = make_jpeg_folder(tmp_path / "b", **kw, processes=2)
    for path in sorted(root.rglob("*.jpg")):
        assert path.read_bytes() == (other / path.relative_to(root)).read_bytes()
    assert (root / "train" / class_name(0) / "0.jpg").read_bytes() != (
        make_jpeg_folder(tmp_path / "c", **{**kw, "seed": 6}) / "train" / class_name(0) / "0.jpg"
    ).read_bytes()

    # a folder with the same marker is left alone; other arguments rebuild it
    stamp = (root / "train" / class_name(0) / "0.jpg").stat().st_mtime_ns
    make_jpeg_folder(root, **kw)
    assert (root / "train" / class_name(0) / "0.jpg").stat().st_mtime_ns == stamp
    make_jpeg_folder(root, **{**kw, "train_per_class": 1})
    assert folder_bytes(root)[0] == 3 + 6 and (root / MARKER).exists()


def test_jpeg_folder_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "train" / "mine").mkdir(parents=True)
    with pytest.raises(ValueError, match="not a folder bench.jpegs wrote"):
        make_jpeg_folder(tmp_path, classes=1, train_per_class=1, val_per_class=0)
    assert (tmp_path / "train" / "mine").is_dir()


def test_replica_figures_leave_the_start_up_out_when_the_run_allows():
    # 2 replicas of batch 4: 30 steps in 10 s, of which the first status saw 10 in 6 s
    end = dict(step=30, seconds=10.0, images_per_s=12.0, data_wait_s=1.0)
    first = dict(step=10, seconds=6.0, data_wait_s=0.8)
    run = measure([end, end], [first, first], batch_size=4)
    assert run.steady and run.images_per_s == pytest.approx(2 * 20 * 4 / 4.0)
    assert run.whole_run_images_per_s == 24.0 and run.data_wait_share == pytest.approx(0.05)
    # one replica wrote no status in mid-run: every figure is over the whole run
    run = measure([end, end], [first, {}], batch_size=4)
    assert not run.steady and run.images_per_s == 24.0 and run.data_wait_share == 0.1
    # too few steps after the first status; an older build without data_wait_s
    late = dict(step=30 - MIN_STEADY_STEPS + 1, seconds=9.0)
    old = {k: v for k, v in end.items() if k != "data_wait_s"}
    run = measure([old], [late], batch_size=4)
    assert not run.steady and run.data_wait_share is None


@pytest.mark.integration
def test_gpu_bench_runs_on_the_cpu_at_tiny_sizes(tmp_path):
    flags = ["--device", "cpu", "--image-size", "32", "--batch-size", "8", "--steps", "3"]
    flags += ["--reps", "1", "--replicas", "2", "--jpeg-images", "40", "--num-classes", "10"]
    flags += ["--jpeg-dir", str(tmp_path / "jpegs")]
    out = subprocess.run(
        [sys.executable, "-m", "bench.gpu", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    ).stdout
    assert out.startswith("note: bf16 left out on the CPU") and "machine: " in out, out
    lines = [line for line in out.splitlines() if RATIO.search(line)]
    for line in lines:
        ratio = float(RATIO.search(line).group(1))
        assert math.isfinite(ratio) and ratio > 0, line
    starts = [line.split(" ", 1)[0] for line in lines]
    # b: 1 replica; c: 2 replicas; d and e (decoding on the device): against synthetic
    # data and against the local loop; f: the replica in 2 stages against b
    assert starts == ["b.", "c.", "d.", "d.", "e.", "e.", "f."], out
    assert "f. 1 replica in 2 stages on the CPU, 4 micro-batches, fp32" in out, out
    assert re.search(r"^a\. local loop, fp32: \d+\.\d images/s$", out, re.M), out
    for part in "de":
        assert re.search(rf"^{part}\. data wait, fp32: \d+\.\d% of", out, re.M), out
    assert (tmp_path / "jpegs" / MARKER).exists()
