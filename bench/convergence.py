"""Held-out accuracy against wall-clock time: reference trainer, async replicas, Polyak.

In one run, on the demo set, each for ``--seconds`` of training on the same machine:

- the reference trainer (``torch.optim.SGD`` in this process, all cores' threads);
- ``distbelief serve --shards 2`` + ``distbelief average`` + ``distbelief work --cpu N``
  (real subprocesses) for each N in ``--replicas`` and each staleness policy in
  ``--policies`` (``none`` is plain Downpour; ``+warm`` adds ``work --warm-start`` and
  ``serve --lr-warmup-epochs --join-ramp-epochs``, as in ``bench.staleness``); the
  averager keeps the Polyak average of the iterates from ``--polyak-from`` of the run
  on (estimated in epochs from the reference trainer's speed).

Every ``--snapshot-every-s`` the weights (the shards', the averager's) are copied;
after all runs every snapshot is evaluated on ``--eval-examples`` held-out images,
so evaluation costs no training time. Writes ``convergence.csv`` and
``convergence.png`` (top-1 against seconds and against images seen) to ``--out``
and prints each run's final top-1 with two ratios to the reference trainer: at the same
wall-clock time, and at the same number of images seen (the reference's curve
interpolated at the run's images; learning per image, what staleness costs), and when
the run first reached ``--target`` top-1 (the demo's 90%).

Usage: ``python -m bench.convergence [--seconds 150] [--replicas 2,4] [--out bench/out]``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from distbelief.server.rules import Schedule

from bench.common import (
    distbelief_cmd,
    machine,
    process,
    random_port_start,
    serve,
    stderr_tail,
)
from bench.staleness import policy_flags
from distbelief.cli import (
    DEMO_JOIN_RAMP_EPOCHS,
    DEMO_LR_WARMUP_EPOCHS,
    DEMO_POLICY_SPEC,
    DEMO_WARM_START,
)
from distbelief.client import ClientConfig, ParameterClient, ServerRefused, probe_stats
from distbelief.data import evaluate, iterate_batches, load_dataset
from distbelief.launcher import free_port_run
from distbelief.layout import Layout, flatten_into
from distbelief.models import build_model
from distbelief.train import flat_sgd, forward_backward
from distbelief.tuning import available_cores

START_TIMEOUT_S = 180.0  # replicas import torch and build the demo set before step 1
MODEL = "googlenet"


@dataclass
class Run:
    name: str
    snapshots: list[tuple[float, int, torch.Tensor]] = field(default_factory=list)
    top1: list[float] = field(default_factory=list)


def reference_run(args: argparse.Namespace) -> Run:
    """Train in this process for ``args.seconds``, copying the weights at intervals.

    Also sets ``args.dataset_size`` (the shards' schedule uses it too)."""
    torch.set_num_threads(available_cores())
    train_set = load_dataset(
        args.data, "train", image_size=args.image_size, seed=args.seed, num_classes=args.num_classes
    )
    args.dataset_size = len(train_set)
    torch.manual_seed(args.seed)
    model = build_model(MODEL, args.num_classes)
    optimizer, grads = flat_sgd(
        model, MODEL, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )
    (flat,) = optimizer.param_groups[0]["params"]
    schedule = Schedule(lr=args.lr, dataset_size=len(train_set))
    batches = iterate_batches(train_set, batch_size=args.batch_size, seed=args.seed)
    run, examples, next_snapshot = Run("reference"), 0, args.snapshot_every_s
    model.train()
    began = time.perf_counter()
    while (elapsed := time.perf_counter() - began) < args.seconds:
        if elapsed >= next_snapshot:
            run.snapshots.append((elapsed, examples, flat.detach().clone()))
            next_snapshot += args.snapshot_every_s
        _, images, labels = next(batches)
        optimizer.param_groups[0]["lr"] = schedule.lr_at(examples)
        grads.zero_()
        forward_backward(model, images, labels)
        optimizer.step()
        examples += len(labels)
    run.snapshots.append((time.perf_counter() - began, examples, flat.detach().clone()))
    return run


def _first_status(status_dir: Path, proc, deadline: float) -> float:
    """Wait for a replica's first status file; return when its training clock started."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"work exited with {proc.returncode}: {stderr_tail(proc)}")
        for path in status_dir.glob("replica-*.json"):
            try:
                return time.monotonic() - json.loads(path.read_text())["seconds"]
            except (OSError, ValueError, KeyError):
                pass
        time.sleep(0.2)
    raise RuntimeError(f"no replica reported within {START_TIMEOUT_S:g} s")


def _pull(address: list[str], layout: Layout) -> torch.Tensor | None:
    weights = torch.empty(layout.total)
    try:
        with ParameterClient(ClientConfig(servers=tuple(address), timeout_s=60), layout) as c:
            c.connect()
            c.pull(weights)
    except ServerRefused:  # the averager has nothing averaged yet
        return None
    return weights


def async_run(
    args: argparse.Namespace, replicas: int, policy: str, start_epoch: float
) -> tuple[Run, Run]:
    """Shards + averager + N replicas; snapshots of the shards' and the averaged weights."""
    layout = Layout.of(build_model(MODEL, args.num_classes), MODEL)
    hyper = ["--lr", str(args.lr), "--momentum", str(args.momentum)]
    hyper += ["--weight-decay", str(args.weight_decay), "--seed", str(args.seed)]
    serve_flags, work_flags = policy_flags(
        policy, args.warm_start, args.lr_warmup_epochs, args.join_ramp_epochs
    )
    name = f"{replicas} replicas, {policy}"
    shards_run, polyak_run = Run(f"async, {name}"), Run(f"Polyak, {name}")
    classes = ["--num-classes", str(args.num_classes)]
    with (
        tempfile.TemporaryDirectory() as tmp,
        serve(2, *classes, *hyper, *serve_flags, "--dataset-size", str(args.dataset_size)) as (
            servers,
            _,
        ),
    ):
        averager = f"tcp://127.0.0.1:{free_port_run(1, random_port_start())}"
        average = distbelief_cmd(
            "average", "--servers", ",".join(servers), "--port", averager.rsplit(":", 1)[1],
            "--metrics-port", "0", "--model", MODEL, *classes, "--every-s", "2",
            "--eval-every-s", "0", "--output", f"{tmp}/averager",
            "--start-epoch", f"{start_epoch:.4f}", "--log-level", "WARNING",
        )  # fmt: skip
        work = distbelief_cmd(
            "work", "--servers", ",".join(servers), "--cpu", str(replicas), "--steps", "1000000",
            "--data", args.data, "--image-size", str(args.image_size),
            "--batch-size", str(args.batch_size), *classes, "--seed", str(args.seed),
            "--metrics-port", "0", "--status-dir", tmp, "--log-level", "WARNING",
            "--shared-memory",  # as distbelief up runs its replicas
            *work_flags,
        )  # fmt: skip
        with process(average), process(work) as proc:
            t0 = _first_status(Path(tmp), proc, time.monotonic() + START_TIMEOUT_S)
            for k in range(1, int(args.seconds // args.snapshot_every_s) + 2):
                at = min(k * args.snapshot_every_s, args.seconds)
                time.sleep(max(0.0, t0 + at - time.monotonic()))
                elapsed = time.monotonic() - t0
                (stats,) = probe_stats(servers[:1], 30.0)
                examples = stats["examples"] if stats else 0
                shards_run.snapshots.append((elapsed, examples, _pull(servers, layout)))
                averaged = _pull([averager], Layout.of(build_model(MODEL, args.num_classes), MODEL))
                if averaged is not None:
                    polyak_run.snapshots.append((elapsed, examples, averaged))
                if at >= args.seconds:
                    break
    return shards_run, polyak_run


def evaluate_runs(args: argparse.Namespace, runs: list[Run]) -> None:
    val = load_dataset(
        args.data, "val", image_size=args.image_size, seed=args.seed, num_classes=args.num_classes
    )
    model = build_model(MODEL, args.num_classes)
    weights, _ = flatten_into(model, Layout.of(model, MODEL))
    for run in runs:
        for _, _, snapshot in run.snapshots:
            with torch.no_grad():
                weights.copy_(snapshot)
            scores = evaluate(model, val, crops=1, max_examples=args.eval_examples)
            run.top1.append(float(scores["top1"]))


def reference_at(reference: Run, examples: int) -> float | None:
    """The reference trainer's top-1 after ``examples`` images (linear between its
    snapshots); None beyond its last snapshot."""
    points = [(e, t) for (_, e, _), t in zip(reference.snapshots, reference.top1, strict=True)]
    for (e0, t0), (e1, t1) in itertools.pairwise(points):
        if e0 <= examples <= e1:
            return t0 if e1 == e0 else t0 + (t1 - t0) * (examples - e0) / (e1 - e0)
    return None


def equal_images(reference: Run, run: Run) -> str:
    """The run against the reference at the same images: at the run's last snapshot
    that the reference's images cover (the reference interpolated there)."""
    for (_, examples, _), top1 in reversed(list(zip(run.snapshots, run.top1, strict=True))):
        ref = reference_at(reference, examples)
        if ref is not None:
            ratio = top1 / max(ref, 1e-9)
            return f"{top1:.1%} vs reference {ref:.1%} at {examples} images, ratio {ratio:.2f}"
    return "no snapshot within the reference's images"


def time_to(run: Run, target: float) -> str:
    """When the run first reached ``target`` top-1: seconds and images, or 'not reached'."""
    for (seconds, examples, _), top1 in zip(run.snapshots, run.top1, strict=True):
        if top1 >= target:
            return f"{seconds:.0f} s ({examples} images)"
    return "not reached"


def write_outputs(runs: list[Run], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "convergence.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "seconds", "examples", "top1"])
        for run in runs:
            for (seconds, examples, _), top1 in zip(run.snapshots, run.top1, strict=True):
                writer.writerow([run.name, f"{seconds:.1f}", examples, f"{top1:.4f}"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for run in runs:
        for ax, x in zip(axes, (0, 1), strict=True):
            ax.plot([s[x] for s in run.snapshots], run.top1, marker="o", label=run.name)
    axes[0].set_xlabel("wall-clock seconds of training")
    axes[1].set_xlabel("images seen")
    axes[0].set_ylabel("held-out top-1")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("GoogLeNet on the demo set")
    fig.tight_layout()
    fig.savefig(out / "convergence.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=150.0, help="training time per run")
    parser.add_argument("--snapshot-every-s", type=float, default=15.0)
    parser.add_argument("--replicas", default="2,4")
    parser.add_argument(
        "--policies",
        default=f"none,{DEMO_POLICY_SPEC}",
        help="staleness policies of the async runs (+warm: warm start and lr warm-up)",
    )
    parser.add_argument("--warm-start", type=float, default=DEMO_WARM_START)
    parser.add_argument("--lr-warmup-epochs", type=float, default=DEMO_LR_WARMUP_EPOCHS)
    parser.add_argument("--join-ramp-epochs", type=float, default=DEMO_JOIN_RAMP_EPOCHS)
    parser.add_argument("--polyak-from", type=float, default=0.5, help="fraction of the run")
    parser.add_argument("--eval-examples", type=int, default=1000)
    parser.add_argument("--data", default="demo", help="demo; synthetic has 1000 classes")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=0.0002)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=0.9, help="top-1 to time (the demo's)")
    parser.add_argument("--out", default="bench/out")
    args = parser.parse_args(argv)
    print(machine())
    reference = reference_run(args)
    start_epoch = args.polyak_from * reference.snapshots[-1][1] / args.dataset_size
    runs = [reference]
    for replicas in [int(x) for x in args.replicas.split(",")]:
        for policy in args.policies.split(","):
            runs += async_run(args, replicas, policy, start_epoch)
    evaluate_runs(args, runs)
    write_outputs(runs, Path(args.out))
    ref_top1 = reference.top1[-1]
    print(f"reference trainer: {reference.snapshots[-1][1]} images in {args.seconds:g} s")
    for run in runs:
        if not run.top1:
            print(f"{run.name}: nothing averaged yet (start epoch {start_epoch:.3f} not reached)")
            continue
        seconds, examples, _ = run.snapshots[-1]
        same_images = equal_images(reference, run)
        print(
            f"held-out top-1 after {seconds:.0f} s: reference trainer {ref_top1:.1%}, "
            f"{run.name} {run.top1[-1]:.1%} ({examples} images), "
            f"ratio {run.top1[-1] / max(ref_top1, 1e-9):.2f}; at equal images: {same_images}; "
            f"{args.target:.0%} reached at {time_to(run, args.target)}"
        )
    print(f"wrote {args.out}/convergence.csv and {args.out}/convergence.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
