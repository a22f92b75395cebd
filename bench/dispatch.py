"""What the data dispatcher costs: replicas' images/s with dispatched chunks vs static shares.

In one run, ``--reps`` times each and interleaved: ``distbelief serve --shards S
--dataset-size N`` (N the data set's size, so that ``work`` may dispatch) and
``distbelief work --cpu K --steps T``, once with ``--data-order static`` (each
replica reads its fixed share, no request but pushes and pulls) and once with
``--data-order dispatch`` (each replica asks shard 0 for a chunk of
``--chunk-batches`` batches and reports its progress in every push). The figure is the
replicas' summed images/s from ``work --json``; the ratio is dispatched / static
(target ≥ 0.98).

Usage: ``python -m bench.dispatch [--replicas 2] [--steps 100] [--reps 3]``.
"""

from __future__ import annotations

import argparse
import statistics

from bench.common import distbelief_cmd, machine, run_json, shards, throughput_line, work_flags
from distbelief.data import load_dataset

RUN_TIMEOUT_S = 900.0
TARGET = 0.98


def images_per_s(args: argparse.Namespace, order: str, dataset_size: int) -> float:
    serve_flags = ["--num-classes", str(args.num_classes), "--dataset-size", str(dataset_size)]
    serve_flags += ["--chunk-batches", str(args.chunk_batches)]
    with shards(args.shards, *serve_flags, transport=args.transport) as servers:
        cmd = distbelief_cmd(
            "work",
            *("--servers", ",".join(servers), "--cpu", str(args.replicas)),
            *("--data", args.data, "--num-classes", str(args.num_classes)),
            *("--batch-size", str(args.batch_size), "--steps", str(args.steps)),
            *("--data-order", order, "--metrics-port", "0", "--log-level", "WARNING", "--json"),
            *work_flags(args.transport),
        )
        summaries = run_json(cmd, RUN_TIMEOUT_S)
    assert len(summaries) == args.replicas and all(s["step"] == args.steps for s in summaries)
    assert {s["data_order"] for s in summaries} == {order}, summaries
    return sum(s["images_per_s"] for s in summaries)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunk-batches", type=int, default=8)
    parser.add_argument("--data", default="demo")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--transport", default="shm", choices=("tcp", "ipc", "shm"))
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    size = len(load_dataset(args.data, "train", image_size=32, num_classes=args.num_classes))
    print(machine())
    print(
        f"GoogLeNet, {args.num_classes} classes, {args.data} ({size} images) at 32 px, "
        f"{args.replicas} CPU replica(s), batch {args.batch_size}, {args.steps} steps each, "
        f"{args.shards} shard(s) over {args.transport}, chunks of {args.chunk_batches} "
        f"batches, median of {args.reps}"
    )
    runs: dict[str, list[float]] = {"static": [], "dispatch": []}
    for _ in range(args.reps):
        for order in runs:
            runs[order].append(images_per_s(args, order, size))
    static, dispatched = (statistics.median(runs[o]) for o in ("static", "dispatch"))
    name = f"{args.replicas} replica(s), data dispatched by shard 0"
    line = throughput_line(name, "static shares", static, "dispatched chunks", dispatched)
    each = "; ".join(f"{o} " + ", ".join(f"{v:.1f}" for v in runs[o]) for o in runs)
    print(f"{line} (target ≥ {TARGET}; each run: {each})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
