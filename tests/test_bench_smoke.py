"""Every benchmark runs at tiny sizes so none of them rots (this checks output, not timing).

Each script must print its baseline, its figure and ``ratio X.XX``. The sizes are the
smallest that still exercise every code path: GoogLeNet with 10 classes (the shards
always hold a whole model), one or two repetitions, a few steps or seconds.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from bench import (
    convergence,
    dispatch,
    input_pipeline,
    noise_scale,
    overhead,
    profile_exchange,
    ps_vs_ddp,
    ps_vs_zmq,
    scaling,
    stages,
    update_vs_memcpy,
)

ROOT = Path(__file__).resolve().parents[1]
RATIO = re.compile(r"ratio (\d+\.\d+)")


def ratios(out: str, positive: bool = True) -> list[float]:
    found = [float(r) for r in RATIO.findall(out)]
    assert found and all(r > 0 or not positive for r in found), out
    return found


def test_ps_throughput_command_runs_and_prints_ratios():
    out = subprocess.run(
        [sys.executable, "-m", "bench.ps_throughput", "--num-classes", "10", "--reps", "1"]
        + ["--transports", "ipc"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    ).stdout
    # 1 and 2 shards × two echo baselines, two rules, up's policy
    assert len(ratios(out)) == 7, out
    assert "raw zmq echo over ipc (plain malloc)" in out and "memcpy" in out
    assert "up's policy (async-momentum-lr in its join ramp)" in out


def test_ps_vs_zmq_and_update_vs_memcpy(capsys):
    flags = ["--num-classes", "10", "--reps", "1", "--shards", "4", "--transports", "tcp,shm"]
    assert ps_vs_zmq.main(flags) == 0
    assert update_vs_memcpy.main(["--num-classes", "10", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert len(ratios(out)) == 7, out  # 2 transports × 2 echoes, 2 rules, up's policy
    assert "pull+push, 4 shard(s), f32, tcp" in out and "update rule adagrad" in out
    assert "up's policy (async-momentum-lr in its join ramp)" in out
    # shared memory has no ZeroMQ counterpart: it is held against the TCP echo
    assert "pull+push, 4 shard(s), f32, shm: raw zmq echo over tcp" in out


def test_ps_vs_ddp(capsys):
    assert ps_vs_ddp.main(["--reps", "1", "--dtypes", "bf16", "--transports", "shm"]) == 0
    out = capsys.readouterr().out
    assert len(ratios(out)) == 1 and "DDP all_reduce (gloo, bf16)" in out, out
    assert "push+pull over shm" in out


def test_profile_exchange(capsys):
    assert profile_exchange.main(["--reps", "1", "--dtypes", "bf16"]) == 0
    out = capsys.readouterr().out
    assert len(ratios(out)) == 6 and "bf16 through 2 shards over tcp, 1 client: push" in out
    assert "bf16 through 2 shards over ipc, 1 client: push" in out, out
    assert "bf16 through 2 shards over shm, 1 client: push" in out, out


def test_overhead(capsys):
    flags = ["--data", "synthetic", "--num-classes", "1000", "--steps", "3", "--batch-size", "4"]
    flags += ["--reps", "1"]
    assert overhead.main([*flags, "--settings", "every 4 steps"]) == 0
    out = capsys.readouterr().out
    assert len(ratios(out)) == 1 and "reference trainer" in out and "images/s" in out, out


def test_dispatch(capsys):
    flags = ["--replicas", "1", "--steps", "3", "--batch-size", "4", "--reps", "1"]
    assert dispatch.main([*flags, "--shards", "1", "--chunk-batches", "2"]) == 0
    out = capsys.readouterr().out
    assert len(ratios(out)) == 1 and "static shares" in out and "dispatched chunks" in out, out


def test_input_pipeline(capsys, tmp_path):
    flags = ["--folder", str(tmp_path / "jpegs"), "--images", "24", "--classes", "3"]
    flags += ["--image-size", "32", "--batch-size", "4", "--batches", "2", "--reps", "1"]
    flags += ["--workers", "1", "--decode-images", "8", "--steps", "2"]
    flags += ["--replica-batch-size", "2"]
    assert input_pipeline.main(flags) == 0
    out = capsys.readouterr().out
    assert len(ratios(out)) == 3 and "pytorch/examples" in out and "synthetic data" in out, out
    assert re.search(r"decode, Pillow draft for crops to 8 px: \d+\.\d+ ms/image", out), out
    assert re.search(r"data wait \d+\.\d%", out), out


def test_scaling(capsys):
    flags = ["--shards", "2", "--clients", "1,2", "--seconds", "0.3", "--num-classes", "10"]
    assert scaling.main([*flags, "--transport", "shm"]) == 0
    out = capsys.readouterr().out
    assert len(ratios(out)) == 2 and "2 shard(s):" in out and "over shm" in out, out


def test_convergence(capsys, tmp_path):
    flags = ["--data", "synthetic", "--num-classes", "1000", "--seconds", "2"]
    flags += ["--snapshot-every-s", "1", "--replicas", "1"]
    flags += ["--eval-examples", "32", "--batch-size", "8", "--out", str(tmp_path)]
    flags += ["--policies", "async-momentum-lr+warm"]  # the policy path with the most flags
    assert convergence.main([*flags, "--target", "0"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"0% reached at \d+ s \(\d+ images\)", out), out  # every run reaches 0%
    # an untrained 1000-class model may score 0 on 32 images (ratio 0); Polyak may be empty
    assert len(ratios(out, positive=False)) >= 2 and "async, 1 replicas" in out, out
    rows = (tmp_path / "convergence.csv").read_text().splitlines()
    assert rows[0] == "run,seconds,examples,top1" and len(rows) >= 4
    assert (tmp_path / "convergence.png").stat().st_size > 0


def test_wire_on_the_network_test_bed():
    """bench.wire's every part at tiny size on the namespaces test bed (root, iproute2)."""
    flags = ["--num-classes", "10", "--reps", "1", "--shards", "2", "--shard-hosts", "2"]
    flags += ["--worker-hosts", "2", "--rate-mbit", "2000", "--replica-steps", "4"]
    flags += ["--replica-variants", "overlap-bf16"]  # the path with the most flags
    out = subprocess.run(
        [sys.executable, "-m", "bench.wire", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    cell = r"(\d+) ms \| [\d.]+ \| [\d.]+"  # a mode's time, /bound, all hosts /bound
    rows = re.findall(
        rf"^\| 2 \| 2 \| (\d+) ms \| {cell} \| {cell} \| {cell} \| 0 \|", out.stdout, re.M
    )
    assert len(rows) == 1, out.stdout  # one exchange row, three modes, no retries
    bound, *modes = map(int, rows[0])
    assert all(t >= 0.9 * bound for t in modes), out.stdout  # the links' limit held
    gloo = re.findall(
        r"^\| 2 \| (f32|bf16) \| \d+ ms \| \d+ ms \| \d+ ms \| [\d.]+ \|$", out.stdout, re.M
    )
    assert gloo == ["f32", "bf16"], out.stdout
    assert len(ratios(out.stdout)) == 1 and "on loopback" in out.stdout


def test_noise_scale(capsys):
    flags = ["--at", "0,64", "--batches", "3", "--batch-size", "8"]
    assert noise_scale.main(flags) == 0
    out = capsys.readouterr().out
    rows = [line.split("|") for line in out.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [r[1].strip() for r in rows] == ["0", "64"], out
    assert all(float(r[4]) > 0 for r in rows), out  # tr(Σ): the batches' gradients differ


def test_stages(capsys):
    flags = ["--steps", "2", "--batch-size", "8", "--reps", "1", "--micro-batches", "1,2"]
    assert stages.main([*flags, "--stage-cuts", "4c"]) == 0
    out = capsys.readouterr().out
    assert len(ratios(out)) == 4 and "unsplit replica" in out and "conv1-4b | 4c-head" in out, out
    bubbles = [float(b) for b in re.findall(r"bubble: measured (\d+\.\d+)", out)]
    assert len(bubbles) == 2 and all(0 < b < 1 for b in bubbles), out
