"""The shard's update rule against memcpy (``copy_``) of the same bytes.

One optimizer step of each rule over a GoogLeNet-sized flat float32 slice, as a shard
applies a push, against copying that many bytes. Prints both times and the ratio
memcpy / rule (target ≥ 0.5: the fused rule reads weights, gradient and state and
writes weights and state once).

Usage: ``python -m bench.update_vs_memcpy [--reps 10] [--num-classes 1000]``.
"""

from __future__ import annotations

import argparse

import torch
from distbelief.server.rules import Schedule, make_rule
from distbelief.server.staleness import StalenessConfig, Updater

from bench.common import googlenet_layout, median_time, ratio_line

RULES = ("momentum", "adagrad")


def update_times(size: int, rule: str, reps: int) -> tuple[float, float]:
    """Median ``copy_`` time and median rule step time over ``size`` float32."""
    src, dst = torch.randn(size), torch.empty(size)
    grad = torch.randn(size) * 1e-6
    r = make_rule(rule, torch.randn(size), weight_decay=2e-4, momentum=0.9)
    copy_s = median_time(lambda: dst.copy_(src), reps)
    apply_s = median_time(lambda: r.apply(grad, 0.01), reps)
    return copy_s, apply_s


def policy_times(size: int, reps: int) -> tuple[float, float]:
    """Median ``copy_`` time and median time of one push through the shard's whole
    update (``Updater``) with up's policy inside its join ramp (staleness 1)."""
    src, dst = torch.randn(size), torch.empty(size)
    grad = torch.randn(size) * 1e-6
    rule = make_rule("momentum", torch.randn(size), weight_decay=2e-4, momentum=0.9)
    cfg = StalenessConfig(policy="async-momentum-lr", join_ramp_epochs=0.2)
    up = Updater(rule, Schedule(lr=0.01, dataset_size=10**9), cfg)  # the ramp never ends
    copy_s = median_time(lambda: dst.copy_(src), reps)
    apply_s = median_time(
        lambda: up.apply(grad, examples_before=32, staleness=1, base_version=0), reps
    )
    return copy_s, apply_s


def run(size: int, reps: int) -> None:
    mb = size * 4 / 1e6
    for rule in RULES:
        copy_s, apply_s = update_times(size, rule, reps)
        print(ratio_line(f"update rule {rule} over {mb:.0f} MB", "memcpy", copy_s, "rule", apply_s))
    copy_s, apply_s = policy_times(size, reps)
    label = f"up's policy (async-momentum-lr in its join ramp) over {mb:.0f} MB"
    print(ratio_line(label, "memcpy", copy_s, "policy + rule", apply_s))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--num-classes", type=int, default=1000)
    args = parser.parse_args(argv)
    layout = googlenet_layout(args.num_classes)
    run(layout.total, args.reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
