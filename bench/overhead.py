"""The cost of the parameter server for one replica: images/s against the reference trainer.

In one run, on the same cores, batch, image size and data, ``--reps`` times each and
interleaved (so that a change in the machine's load hits every setting alike):

- ``distbelief train`` (the reference trainer: ``torch.optim.SGD`` in one process,
  as many torch threads as the machine has cores), its images/s from ``--json``;
- ``distbelief serve --shards S`` + ``distbelief work --cpu 1`` (the replica gets all
  cores' threads; the shard processes share those cores) with fetch/push every step,
  every 4 steps (f32 and bf16 on the wire), and every step with ``--overlap``;
  images/s from ``work --json``.
  The replica reaches the shards over ``--transport`` (default ``shm``: payloads
  through shared memory, as ``distbelief up`` does on one host; ``ipc`` for Unix
  sockets, ``tcp`` for loopback TCP).

Prints the median images/s of each and the ratio distbelief / reference (targets:
≥ 0.9 every step, ≥ 0.97 every 4 steps or with ``--overlap``).

Usage: ``python -m bench.overhead [--steps 100] [--batch-size 32] [--reps 3]``.
"""

from __future__ import annotations

import argparse
import statistics

from bench.common import (
    TRANSPORTS,
    distbelief_cmd,
    machine,
    replica_flags,
    replica_run,
    run_json,
    throughput_line,
)
from distbelief.tuning import available_cores

RUN_TIMEOUT_S = 900.0
SETTINGS = {  # name (no commas: --settings splits on them) -> (work flags, target)
    "every step": (["--fetch-every", "1", "--push-every", "1"], 0.9),
    "every 4 steps": (["--fetch-every", "4", "--push-every", "4"], 0.97),
    "every 4 steps in bf16": (
        ["--fetch-every", "4", "--push-every", "4", "--wire-dtype", "bf16"],
        0.97,
    ),
    "every step with --overlap": (["--push-every", "1", "--overlap"], 0.97),
}


def reference_images_per_s(args: argparse.Namespace) -> float:
    cores = str(available_cores())
    flags = (*replica_flags(args), "--lr", str(args.lr), "--threads", cores, "--json")
    cmd = distbelief_cmd("train", *flags)
    return float(run_json(cmd, RUN_TIMEOUT_S)["images_per_s"])


def replica_images_per_s(args: argparse.Namespace, flags: list[str]) -> float:
    return float(replica_run(args, flags, RUN_TIMEOUT_S)["images_per_s"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--data", default="demo", help="demo; synthetic has 1000 classes")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument(
        "--transport", default="shm", choices=TRANSPORTS, help="how the replica reaches the shards"
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting {unknown[0]!r}; known: {', '.join(SETTINGS)}")
    print(machine())
    print(
        f"GoogLeNet, {args.num_classes} classes, {args.data} data at {args.image_size} px, "
        f"batch {args.batch_size}, {args.steps} steps, {args.shards} shard(s), "
        f"{available_cores()} threads, median of {args.reps}"
    )
    reference: list[float] = []
    ours: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.reps):
        reference.append(reference_images_per_s(args))
        for name in names:
            ours[name].append(replica_images_per_s(args, SETTINGS[name][0]))
    ref = statistics.median(reference)
    for name in names:
        value = statistics.median(ours[name])
        line = throughput_line(
            f"1 replica, {name}", "reference trainer", ref, "through the shards", value
        )
        print(f"{line} (target ≥ {SETTINGS[name][1]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
