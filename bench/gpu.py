"""GPU figures in one prepared command: a replica's images/s against a plain PyTorch loop.

In one run, on one GPU (or, for a check at tiny sizes, on the CPU), ``--reps`` times
each and interleaved, in f32 and with bf16 autocast (``--precisions``):

a. the baseline: GoogLeNet (aux heads) trained by a plain PyTorch loop in this
   process, ``torch.optim.SGD`` (momentum 0.9, lr 0.005), synthetic data already on
   the device, no sync between steps; images/s after ``WARMUP_STEPS`` steps.
b. one replica through the shards: ``distbelief work --gpu-ids 0 --data synthetic``
   (``--cpu 1`` on the CPU), fetch and push every step, against ``distbelief serve``
   (payloads through shared memory, as ``distbelief up`` on one host; one ``serve``
   for the whole script, fresh replicas for every run); its images/s as a ratio to (a).
c. 2 and 4 replicas sharing the GPU (``--gpu-ids 0,0`` and ``0,0,0,0``; ``--replicas``):
   their images/s summed, as a ratio to (a).
d. one replica fed by the loader from a JPEG folder that ``bench.jpegs`` generates
   (photo-like JPEGs of about 500×375, decoded, cropped and distorted as for
   ImageNet, by ``work``'s loader processes: ``--loader-workers``, default work's
   own): images/s as a ratio to (b) and to (a), and the share of its time it waited
   for data (``data_wait_s`` / ``seconds`` of its summary).
e. as d, with ``work --decode device``: the loader processes only read the files; the
   replica decodes each batch on its device (nvJPEG, batched) and crops it there.
f. one replica split into 2 stage processes sharing the GPU (``work --gpu-ids 0,0
   --stages 2 --micro-batches M``, ``--micro-batches`` here, default 4; cuts balanced on
   the blocks' times measured on the GPU): images/s as a ratio to (b), the same replica
   unsplit. Two processes on one GPU show the mechanics (the pieces, the cuts through
   shared memory, the schedule), not a speed-up: that needs a GPU a stage.

Targets: one replica ≥ 0.9× the local loop's images/s with the loader feeding it
(d or e against a); the replica waits for data < 5% of its time.

The replicas' figures are steady-state figures where the run allows: ``work``'s own
``images_per_s`` counts from the first step, so it includes the first pull, the
CUDA/cuDNN start-up of the first step and the loader's start. This script reads the
replicas' status files (``--status-dir``, rewritten every second) while they run and
counts images, seconds and ``data_wait_s`` from the first one written to the end,
which leaves that start-up out; a run too short for that (under ``MIN_STEADY_STEPS``
steps after the first status) falls back to the whole run and says so. On the CPU,
``--amp`` does nothing in ``work``, so only f32 runs there.

Usage: ``python -m bench.gpu [--device cuda|cpu] [--image-size 224] [--batch-size 128]
[--steps 100] [--reps 1] [--precisions fp32,bf16] [--parts a,b,c,d,e,f] [--replicas 2,4]
[--shards 1] [--loader-workers K] [--jpeg-images 500] [--micro-batches 4] [--budget-s 450]``

On a GPU machine (one H200; about 5 minutes by estimate, not yet measured)::

    mkdir -p bench/out && python -m bench.gpu 2>&1 | tee bench/out/gpu.txt

On the CPU at tiny sizes (what tests/test_bench_gpu.py runs, about 30 s on 2 cores)::

    python -m bench.gpu --device cpu --image-size 32 --batch-size 8 --steps 3 \\
        --reps 1 --replicas 2 --jpeg-images 40
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import signal
import statistics
import subprocess
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import (
    distbelief_cmd,
    machine,
    replica_flags,
    shards,
    throughput_line,
    work_flags,
)
from bench.jpegs import make_jpeg_folder

LR = 0.005
MOMENTUM = 0.9
WARMUP_STEPS = 10  # local loop steps before the clock starts: cuDNN and allocator warm-up
RUN_TIMEOUT_S = 300.0  # one `work` run, start-up included (4 replicas start CUDA at once)
POLL_S = 0.05  # how often the replicas' status files are read while they run
MIN_STEADY_STEPS = 10  # fewer steps after the first status: use the whole run instead
TARGET_ONE_REPLICA = 0.9
TARGET_DATA_WAIT = 0.05
JPEG_DIR = Path(__file__).resolve().parent / "out" / "jpegs"
PARTS = ("a", "b", "c", "d", "e", "f")
# a part's ratios are taken to this part's figure
NEEDS = {"b": "a", "c": "a", "d": "b", "e": "b", "f": "b"}
STAGES = 2  # f: the stages of the split replica


@dataclass(frozen=True)
class WorkRun:
    """What one ``work`` run measured, summed over its replicas."""

    images_per_s: float  # steady state where measurable, else the whole run
    steady: bool
    whole_run_images_per_s: float
    data_wait_share: float | None  # None: this build of `work` does not report it


@dataclass(frozen=True, kw_only=True)
class Run:
    """One ``work`` run: how many replicas, in which precision, on which data."""

    replicas: int
    precision: str  # fp32, or bf16: work --amp bf16
    data: str  # synthetic, or a folder
    loader: tuple[str, ...] = ()  # --loader-workers K, where asked for; --decode device
    stages: int = 1  # f: the replica split into this many stage processes on the device
    micro_batches: int = 1


# -- a. the local loop ---------------------------------------------------------------


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def local_images_per_s(args: argparse.Namespace, precision: str) -> float:
    """Images/s of a plain PyTorch training loop on ``args.device`` (synthetic data there)."""
    rate = _local_loop(args, precision)
    if args.device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()  # leave the loop's memory to the replicas that run next
    return rate


def _local_loop(args: argparse.Namespace, precision: str) -> float:
    from distbelief.models import build_model, training_loss

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model("googlenet", args.num_classes).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    size = args.image_size
    images = torch.randn(args.batch_size, 3, size, size, device=device)
    labels = torch.randint(args.num_classes, (args.batch_size,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, precision):
            loss = training_loss(model(images), labels)
        loss.backward()
        optimizer.step()

    for _ in range(WARMUP_STEPS):
        step()
    _sync(device)
    began = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)  # the loop only queued work on a GPU: wait for it before reading the clock
    return args.steps * args.batch_size / (time.perf_counter() - began)


# -- b, c, d, e. replicas through the shards --------------------------------------------


def device_flags(args: argparse.Namespace, replicas: int, stages: int = 1) -> list[str]:
    """Every replica (and each of its stages) on the one device."""
    split = ["--stages", str(stages)] if stages > 1 else []
    if torch.device(args.device).type == "cpu":
        return ["--cpu", str(replicas), *split]
    return ["--gpu-ids", ",".join([str(args.gpu_id)] * replicas * stages), *split]


def work_command(
    args: argparse.Namespace, servers: list[str], status_dir: str, run: Run
) -> list[str]:
    """``distbelief work`` for ``run``, writing its status files into ``status_dir``."""
    extra = ["--amp", "bf16"] if run.precision == "bf16" else []
    if run.stages > 1:
        extra += ["--micro-batches", str(run.micro_batches)]
    return distbelief_cmd(
        "work",
        "--servers",
        ",".join(servers),
        *device_flags(args, run.replicas, run.stages),
        *replica_flags(args, data=run.data),
        "--metrics-port",
        "0",
        "--max-restarts",
        "0",  # a crash is a failed measurement, not something to retry
        "--log-level",
        "WARNING",
        "--status-dir",
        status_dir,
        "--json",
        *work_flags("shm"),
        *extra,
        *run.loader,
    )


def _first_statuses(status_dir: Path, first: dict[str, dict]) -> None:
    """Keep, per replica, the first status written in mid-run (after its first step)."""
    for path in status_dir.glob("replica-*.json"):
        if path.name in first:
            continue
        with contextlib.suppress(OSError, ValueError):  # replaced while we read: next time
            status = json.loads(path.read_text())
            if (
                status.get("step", 0) >= 1
                and status.get("seconds", 0) > 0
                and not status.get("done")
            ):
                first[path.name] = status


def run_watching(cmd: list[str], status_dir: str) -> tuple[list[dict], list[dict]]:
    """Run ``work`` to its end, reading its status files meanwhile; return its summaries
    and each replica's first mid-run status (missing for a replica that wrote none)."""
    first: dict[str, dict] = {}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"work did not finish in {RUN_TIMEOUT_S:.0f} s")
                _first_statuses(Path(status_dir), first)
                time.sleep(POLL_S)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"work exited with {proc.returncode}: {stderr[-2000:]}")
    summaries = json.loads(stdout.strip().splitlines()[-1])
    if any(s.get("restarts") or s.get("non_finite_pushes") or not s.get("done") for s in summaries):
        # a restart or a dropped push changes what a step costs: the figure would mislead
        raise RuntimeError(f"a replica restarted, dropped pushes or did not finish: {summaries}")
    return summaries, [first.get(f"replica-{s['index']}.json", {}) for s in summaries]


def _window(summary: dict, first: dict) -> tuple[int, float, float | None] | None:
    """Steps, seconds and seconds spent waiting for data between a replica's first
    mid-run status and its end; None when that leaves fewer than MIN_STEADY_STEPS."""
    if not first or summary["step"] - first["step"] < MIN_STEADY_STEPS:
        return None
    steps, seconds = summary["step"] - first["step"], summary["seconds"] - first["seconds"]
    waited = None
    if "data_wait_s" in summary:  # the first status holds the start-up's wait: left out
        waited = summary["data_wait_s"] - first.get("data_wait_s", 0.0)
    return (steps, seconds, waited) if seconds > 0 else None


def measure(summaries: list[dict], firsts: list[dict], batch_size: int) -> WorkRun:
    """The replicas' images/s summed, and their data-wait share: over the steady state
    when every replica has one, else over the whole run."""
    whole = sum(float(s["images_per_s"]) for s in summaries)
    windows = [_window(s, f) for s, f in zip(summaries, firsts, strict=True)]
    steady = all(w is not None for w in windows)
    if steady:
        rate = sum(steps * batch_size / seconds for steps, seconds, _ in windows)
        waits = [(waited, seconds) for _, seconds, waited in windows]
    else:
        rate = whole
        waits = [(s.get("data_wait_s"), float(s["seconds"])) for s in summaries]
    share = None
    if all(waited is not None for waited, _ in waits):
        share = sum(w for w, _ in waits) / max(1e-9, sum(s for _, s in waits))
    return WorkRun(rate, steady, whole, share)


def work_images_per_s(args: argparse.Namespace, servers: list[str], run: Run) -> WorkRun:
    """One ``work`` run (fresh replicas) against the shards, to its end; what it measured."""
    with tempfile.TemporaryDirectory(prefix="db-bench-gpu-") as status_dir:
        cmd = work_command(args, servers, status_dir, run)
        summaries, firsts = run_watching(cmd, status_dir)
    return measure(summaries, firsts, args.batch_size)


def loader_flags(args: argparse.Namespace) -> list[str]:
    """``--loader-workers K`` when asked for and this build of ``work`` has it."""
    if args.loader_workers is None:
        return []
    help_text = subprocess.run(
        distbelief_cmd("work", "--help"), capture_output=True, text=True, timeout=60
    ).stdout
    if "--loader-workers" not in help_text:
        print("note: this build of work has no --loader-workers; d runs without it")
        return []
    return ["--loader-workers", str(args.loader_workers)]


# -- the run ---------------------------------------------------------------------------


def plan(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """The measurements of one repetition, in order: (part, precision, replicas)."""
    runs = []
    for part in args.parts:
        counts = args.replicas if part == "c" else (1,)
        runs += [(part, p, n) for n in counts for p in args.precisions]
    return runs


@dataclass(frozen=True)
class Setup:
    """What the runs of b, c and d share: the shards, and d's folder and loader flags."""

    servers: list[str]
    jpegs: str = ""
    loader: tuple[str, ...] = ()


def measure_once(args: argparse.Namespace, setup: Setup, part: str, precision: str, n: int):
    """One measurement: images/s of the local loop (a), or what a `work` run measured."""
    if part == "a":
        return local_images_per_s(args, precision)
    if part in ("d", "e"):
        decode = ("--decode", "device") if part == "e" else ()
        run = Run(replicas=n, precision=precision, data=setup.jpegs, loader=setup.loader + decode)
    elif part == "f":
        m = args.micro_batches
        run = Run(replicas=n, precision=precision, data="synthetic", stages=STAGES, micro_batches=m)
    else:
        run = Run(replicas=n, precision=precision, data="synthetic")
    return work_images_per_s(args, setup.servers, run)


def run_all(args: argparse.Namespace, setup: Setup) -> dict[tuple[str, str, int], list]:
    """Every measurement ``--reps`` times, interleaved; stops early past ``--budget-s``."""
    results: dict[tuple[str, str, int], list] = defaultdict(list)
    began = time.monotonic()
    for rep in range(args.reps):
        rep_began = time.monotonic()
        for key in plan(args):
            t0 = time.monotonic()
            value = measure_once(args, setup, *key)
            results[key].append(value)
            print(
                f"  rep {rep + 1} {key}: {describe(value)}, {time.monotonic() - t0:.0f} s",
                flush=True,
            )
        spent, per_rep = time.monotonic() - began, time.monotonic() - rep_began
        if rep + 1 < args.reps and spent + per_rep > args.budget_s:
            print(f"stopped after {rep + 1} of {args.reps} reps: --budget-s {args.budget_s:.0f}")
            break
    return results


def describe(value: float | WorkRun) -> str:
    """One measurement in words, for the progress lines."""
    if isinstance(value, float):
        return f"{value:.1f} images/s"
    wait = "" if value.data_wait_share is None else f", data wait {value.data_wait_share:.1%}"
    if value.steady:
        whole = value.whole_run_images_per_s
        return f"{value.images_per_s:.1f} images/s steady, {whole:.1f} over the whole run{wait}"
    return f"{value.images_per_s:.1f} images/s over the whole run{wait}"


def _median(values: list) -> float:
    return statistics.median(v if isinstance(v, float) else v.images_per_s for v in values)


def _versus(
    name: str, baseline: str, base: float, ours: str, runs: list[WorkRun], target: float = 0
) -> str:
    """A ratio line for ``runs`` (their median) against ``base``, with how they were timed."""
    how = "steady state" if all(r.steady for r in runs) else "whole run, start-up included"
    notes = ([f"target ≥ {target}"] if target else []) + [how]
    return f"{throughput_line(name, baseline, base, ours, _median(runs))} ({'; '.join(notes)})"


def report(args: argparse.Namespace, results: dict) -> list[str]:
    """The result lines of every part, per precision (medians over the reps)."""
    lines, on, first = [], "one GPU" if args.device != "cpu" else "the CPU", args.precisions[0]
    for p in args.precisions:
        local = _median(results[("a", p, 1)])
        lines.append(f"a. local loop, {p}: {local:.1f} images/s")
        if p != first:
            base = _median(results[("a", first, 1)])
            lines.append(throughput_line(f"a. local loop, {p} vs {first}", first, base, p, local))
        if "b" in args.parts:
            name = f"b. 1 replica through the shards, {p}"
            runs = results[("b", p, 1)]
            lines.append(
                _versus(name, "local loop", local, "through the shards", runs, TARGET_ONE_REPLICA)
            )
        for n in args.replicas if "c" in args.parts else ():
            name, runs = f"c. {n} replicas sharing {on}, {p}", results[("c", p, n)]
            lines.append(_versus(name, "local loop", local, f"{n} replicas in all", runs))
        for part in ("d", "e"):
            if part in args.parts:
                synthetic = results[("b", p, 1)]
                lines += report_loader(part, p, local, synthetic, results[(part, p, 1)])
        if "f" in args.parts:
            name = (
                f"f. 1 replica in {STAGES} stages on {on}, {args.micro_batches} micro-batches, {p}"
            )
            unsplit = _median(results[("b", p, 1)])
            lines.append(_versus(name, "unsplit (b)", unsplit, "split", results[("f", p, 1)]))
    return lines


def report_loader(
    part: str, precision: str, local: float, synthetic: list, runs: list
) -> list[str]:
    """Parts d and e: the loader's images/s against synthetic data and the local loop;
    the replica's wait for data."""
    where = "decoded by the loader" if part == "d" else "decoded on the device"
    name = f"{part}. 1 replica fed by the loader (JPEGs {where}), {precision}"
    lines = [
        _versus(name, "synthetic data", _median(synthetic), "JPEG folder", runs),
        _versus(name, "local loop", local, "JPEG folder", runs, TARGET_ONE_REPLICA),
    ]
    shares = [r.data_wait_share for r in runs]
    if any(s is None for s in shares):
        lines.append(f"{part}. data wait, {precision}: n/a (this build does not report it)")
    else:
        lines.append(
            f"{part}. data wait, {precision}: {statistics.median(shares):.1%} of the replica's "
            f"seconds (target < {TARGET_DATA_WAIT:.0%})"
        )
    return lines


def with_shards(args: argparse.Namespace, body):
    """``body(args, setup)`` with the shards up (stopped after, whatever happens).

    One ``serve`` for the whole script: every ``work`` run starts fresh replicas
    against it, as replicas come and go against long-lived shards; it saves the
    shards' start-up per run (seconds on 2 cores)."""
    reads = {"d", "e"} & set(args.parts)
    jpegs = jpeg_folder(args) if reads else ""
    loader = tuple(loader_flags(args)) if reads else ()
    serve_flags = ("--num-classes", str(args.num_classes), "--lr", str(LR))
    with shards(args.shards, *serve_flags, transport="shm") as servers:
        return body(args, Setup(servers, jpegs, loader))


def jpeg_folder(args: argparse.Namespace) -> str:
    """The JPEG folder parts d and e read, built (or found) now; prints what it holds."""
    classes = min(10, args.num_classes)
    per_class = math.ceil(args.jpeg_images / classes)
    began = time.perf_counter()
    root = make_jpeg_folder(
        Path(args.jpeg_dir), classes=classes, train_per_class=per_class, val_per_class=2
    )
    print(
        f"JPEG folder {root}: {classes} classes × {per_class} train images, "
        f"ready in {time.perf_counter() - began:.1f} s"
    )
    return str(root)


def _parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if cuda else "cpu")
    parser.add_argument("--gpu-id", type=int, default=0, help="the GPU every replica shares")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 (GPU), 16")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--replicas", default="2,4", help="c: replicas sharing the device")
    parser.add_argument("--loader-workers", type=int, default=None, help="work's, for d and e")
    parser.add_argument("--jpeg-dir", default=str(JPEG_DIR), help="kept; rebuilt on change")
    parser.add_argument("--jpeg-images", type=int, default=500, help="train images for d, e")
    parser.add_argument("--micro-batches", type=int, default=4, help="f: work's --micro-batches")
    parser.add_argument("--budget-s", type=float, default=450.0, help="no new rep after this")
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The flags, checked, with the defaults that depend on the device filled in."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch finds no GPU (use --device cpu)")
    args.batch_size = args.batch_size or (128 if args.device == "cuda" else 16)
    args.device = f"cuda:{args.gpu_id}" if args.device == "cuda" else "cpu"
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not args.precisions or set(args.precisions) - {"fp32", "bf16"}:
        parser.error(f"--precisions: choose from fp32, bf16, got {args.precisions}")
    if args.device == "cpu" and "bf16" in args.precisions:
        print("note: bf16 left out on the CPU (work --amp autocasts on CUDA only)")
        args.precisions = [p for p in args.precisions if p != "bf16"] or ["fp32"]
    asked = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not asked or asked - set(PARTS):
        parser.error(f"--parts: choose from {', '.join(PARTS)}, got {args.parts!r}")
    for part in ("f", "e", "d", "c", "b"):  # d, e and f need b, which needs a
        if part in asked:
            asked.add(NEEDS[part])
    args.parts = [p for p in PARTS if p in asked]
    try:
        args.replicas = [int(n) for n in args.replicas.split(",") if n.strip()]
    except ValueError:
        parser.error(f"--replicas: comma-separated counts, got {args.replicas!r}")
    if "c" in args.parts and (not args.replicas or min(args.replicas) < 1):
        parser.error("--replicas: give at least one count ≥ 1")
    if {"d", "e"} & set(args.parts) and args.jpeg_images < args.batch_size:
        parser.error("--jpeg-images must hold at least one batch")
    if "f" in args.parts and not 1 <= args.micro_batches <= args.batch_size:
        parser.error("--micro-batches must lie between 1 and the batch size")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    began = time.monotonic()
    print(machine())
    if args.device.startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name(args.device)}")
    print(
        f"GoogLeNet, {args.num_classes} classes, {args.image_size} px, batch "
        f"{args.batch_size}, {args.steps} steps, {args.shards} shard(s), on {args.device}, "
        f"parts {','.join(args.parts)}, {'/'.join(args.precisions)}, median of {args.reps}",
        flush=True,
    )
    results = with_shards(args, run_all) if set(args.parts) - {"a"} else run_all(args, Setup([]))
    for line in report(args, results):
        print(line)
    print(f"took {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
