"""The gradient noise scale of the demo's training run: the batch past which more examples
per update stop buying fewer updates (McCandlish et al. 2018, "An empirical model of
large-batch training").

Four replicas of batch 32 take four gradients where the reference takes one; in
lockstep that is one update of batch 128, and asynchronously four stale ones. Either
way, per example they can learn as much as the reference only while 128 is well below
the *critical batch*, which the simple noise scale ``B = tr(Σ) / |G|²`` estimates
(``Σ``: the per-example gradients' covariance, ``G``: the true gradient). Examples
needed to reach a loss grow as ``E_min · (1 + B_batch / B_noise)``, so the examples a
batch of 128 needs over those of a batch of 32 are about ``(1 + 128/B) / (1 + 32/B)``.

The run: the reference trainer's model, data order and update (``torch.optim.SGD`` on
the flat vector, lr 0.005, momentum 0.9, weight decay 0.0002, batch 32, the demo set
at 32 px); at each of ``--at`` examples, ``--batches`` batches of ``--batch-size``
drawn from a stream of their own (seed 99: the training data order is untouched; the
dropout draws after the first estimate are not the reference's) give
``|G_small|²`` (the mean over the batches of each batch's squared gradient norm) and
``|G_big|²`` (the squared norm of their mean, one batch of ``batches × batch-size``),
and the unbiased estimates::

    |G|²   = (b_big·|G_big|² − b_small·|G_small|²) / (b_big − b_small)
    tr(Σ)  = (|G_small|² − |G_big|²) / (1/b_small − 1/b_big)

Gradients with dropout and the flips on, as training computes them.

Usage: ``python -m bench.noise_scale [--at 0,6400,12800,25600,51200] [--batches 32]``
(about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import machine
from distbelief.data import iterate_batches, load_dataset
from distbelief.models import build_model
from distbelief.train import flat_sgd, forward_backward

PROBE_SEED = 99  # the stream the probes draw from, apart from the training order


def noise_scale(model, grads: torch.Tensor, probes, count: int) -> tuple[float, float, float]:
    """``(|G|², tr(Σ), B_simple)`` from ``count`` batches of ``probes`` at the model's
    weights; ``grads`` is left zeroed."""
    small, total, size = 0.0, torch.zeros_like(grads), 0
    for _ in range(count):
        _, images, labels = next(probes)
        grads.zero_()
        forward_backward(model, images, labels)
        small += float(grads.square().sum())
        total += grads
        size = len(labels)
    grads.zero_()
    small /= count
    big = float((total / count).square().sum())
    b_small, b_big = size, size * count
    g2 = (b_big * big - b_small * small) / (b_big - b_small)
    trace = (small - big) / (1 / b_small - 1 / b_big)
    return g2, trace, trace / g2 if g2 > 0 else float("inf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--at", default="0,6400,12800,25600,51200", help="examples, ascending")
    parser.add_argument("--batches", type=int, default=32, help="probe batches per estimate")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args(argv)
    points = sorted(int(a) for a in args.at.split(",") if a.strip())
    if args.batches < 2 or not points or points[0] < 0:
        parser.error("need --batches ≥ 2 and --at examples ≥ 0")
    print(machine())
    began = time.perf_counter()
    train_set = load_dataset("demo", "train", image_size=args.image_size, seed=args.seed)
    torch.manual_seed(args.seed)
    model = build_model("googlenet", train_set.num_classes)
    optimizer, grads = flat_sgd(model, "googlenet", lr=args.lr, momentum=0.9, weight_decay=0.0002)
    batches = iterate_batches(train_set, batch_size=args.batch_size, seed=args.seed)
    probes = iterate_batches(train_set, batch_size=args.batch_size, seed=PROBE_SEED)
    model.train()
    print(
        f"demo set, GoogLeNet, batch {args.batch_size}, lr {args.lr}; each estimate from "
        f"{args.batches} batches ({args.batches * args.batch_size} examples)"
    )
    print(
        "| examples | loss (mean of the last 50 steps) | |G|² | tr(Σ) | B_noise | "
        "examples at batch 128 / at batch 32 |"
    )
    print("|---|---|---|---|---|---|")
    examples, losses = 0, []
    for point in points:
        while examples < point:
            _, images, labels = next(batches)
            grads.zero_()
            losses = [*losses[-49:], forward_backward(model, images, labels)]
            optimizer.step()
            examples += len(labels)
        g2, trace, scale = noise_scale(model, grads, probes, args.batches)
        cost = (1 + 128 / scale) / (1 + 32 / scale) if scale > 0 else float("nan")
        loss = f"{sum(losses) / len(losses):.3f}" if losses else "—"
        print(
            f"| {examples} | {loss} | {g2:.3g} | {trace:.3g} | {scale:.0f} | {cost:.2f} |",
            flush=True,
        )
    print(f"done in {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
