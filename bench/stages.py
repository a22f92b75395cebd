"""A replica split into stages (``work --stages K``) against the same replica unsplit.

In one run, on the same cores, shards, batch, image size and data, ``--reps`` times
each and interleaved:

- images/s of ``distbelief work --cpu 1`` (one process, all the cores' threads) and of
  ``work --cpu 1 --stages K --micro-batches m`` for each ``m`` of ``--micro-batches``
  (K processes, the cores shared out: ``--threads`` cores ÷ K each), from ``work
  --json``; the ratio split / unsplit;
- the bubble of each split run: the share of the pipeline's time (from a batch's first
  forward to its last backward at stage 0, ``pipeline_s``, from the second batch on:
  the first builds the kernels for its shapes) in which the busiest stage,
  the one that sets the pace, is idle at its cuts waiting for a neighbour: ``1 −
  max_k(busy_k) / pipeline_s``, where a stage is busy computing or moving its tensors
  over the cuts (as in GPipe's analysis, where a stage's time per micro-batch includes
  its transfers), against fill and drain's ``(K − 1)/(m + K − 1)``, and their ratio
  (target: within 10%). The other stages idle longer by as much as they are lighter:
  that is the imbalance of the cuts, printed beside it (the mean idle share minus the
  busiest stage's).

The cuts are balanced on the blocks' measured times (``work``'s default) unless
``--stage-cuts`` is given. Pushes and pulls go over loopback TCP for both (a stage
pushes its pieces over the wire; ``--transport shm`` gives the unsplit replica shared
memory).

Usage: ``python -m bench.stages [--stages 2] [--micro-batches 1,2,4,8] [--steps 20]
[--batch-size 256] [--reps 3]``.
"""

from __future__ import annotations

import argparse
import statistics

from bench.common import TRANSPORTS, machine, replica_run, throughput_line
from distbelief.tuning import available_cores

RUN_TIMEOUT_S = 900.0


def run(args: argparse.Namespace, flags: list[str]) -> dict:
    """One ``work --cpu 1`` run against fresh shards; its summary."""
    return replica_run(args, flags, RUN_TIMEOUT_S)


def split_flags(args: argparse.Namespace, m: int) -> list[str]:
    threads = max(1, args.threads // args.stages)
    flags = ["--stages", str(args.stages), "--micro-batches", str(m), "--threads", str(threads)]
    return flags + (["--stage-cuts", args.stage_cuts] if args.stage_cuts else [])


def bubble(summary: dict) -> tuple[float, float]:
    """The measured bubble (the busiest stage's idle share of the pipeline's time) and
    the imbalance (how much longer the stages idle on average)."""
    busy = [s["busy_s"] / summary["pipeline_s"] for s in summary["stages"]]
    return 1.0 - max(busy), max(busy) - statistics.mean(busy)


def expected_bubble(stages: int, m: int) -> float:
    return (stages - 1) / (m + stages - 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--micro-batches", default="1,2,4,8", help="comma-separated counts")
    parser.add_argument("--stage-cuts", default=None, help="as work's (default: balanced)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--data", default="demo")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--threads", type=int, default=available_cores())
    parser.add_argument("--transport", default="tcp", choices=TRANSPORTS)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    counts = [int(m) for m in args.micro_batches.split(",") if m.strip()]
    if args.stages < 2 or any(m < 1 or m > args.batch_size for m in counts):
        parser.error("--stages must be at least 2, each micro-batch count in [1, batch]")
    print(machine())
    print(
        f"GoogLeNet, {args.num_classes} classes, {args.data} data at {args.image_size} px, "
        f"batch {args.batch_size}, {args.steps} steps, {args.shards} shard(s) over "
        f"{args.transport}, {args.threads} threads in all, median of {args.reps}"
    )
    whole: list[float] = []
    split: dict[int, list[dict]] = {m: [] for m in counts}
    for _ in range(args.reps):
        whole.append(run(args, ["--threads", str(args.threads)])["images_per_s"])
        for m in counts:
            split[m].append(run(args, split_flags(args, m)))
    base = statistics.median(whole)
    for m in counts:
        rate = statistics.median(s["images_per_s"] for s in split[m])
        blocks = " | ".join(s["blocks"] for s in split[m][0]["stages"])
        measured = statistics.median(bubble(s)[0] for s in split[m])
        imbalance = statistics.median(bubble(s)[1] for s in split[m])
        expected = expected_bubble(args.stages, m)
        name = f"{args.stages} stages ({blocks}), {m} micro-batch(es)"
        print(throughput_line(name, "unsplit replica", base, "split", rate))
        print(
            f"  bubble: measured {measured:.3f}, fill and drain (K-1)/(m+K-1) {expected:.3f}, "
            f"ratio {measured / expected:.2f} (target within 10%); imbalance {imbalance:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
