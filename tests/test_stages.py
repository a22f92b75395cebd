"""The stage partition of a replica (distbelief/stages.py): equal to the unsplit model.

Each stage below runs as a stage process does: its own copy of the model from the
replica's seed, its own random generator (saved and restored around its passes, as a
separate process would keep it), its layers bound to compact buffers; activations and
gradients cross the cut as detached tensors. The gradients, put back at their places
in the flat vector, are compared with the unsplit replica's.
"""

from __future__ import annotations

import pytest
import torch
from distbelief.workers.pipeline import backward

from distbelief.layout import Layout, flatten_into
from distbelief.models import build_model
from distbelief.stages import (
    BLOCK_NAMES,
    StagePart,
    StagePlan,
    accumulate,
    balance,
    bind_stage,
    measure_blocks,
)
from distbelief.train import forward_backward

SEED = 7
CLASSES = 10


def unsplit(images, labels, micro_batches=1):
    torch.manual_seed(SEED)
    model = build_model("googlenet", CLASSES).train()
    _, grads = flatten_into(model, Layout.of(model, "googlenet"))
    if micro_batches == 1:
        loss = forward_backward(model, images, labels)
    else:
        loss = accumulate(model, images, labels, micro_batches)
    return grads, loss


class Stage:
    """One stage as its process holds it: model, compact buffers, generator state."""

    def __init__(self, plan: StagePlan, k: int) -> None:
        torch.manual_seed(SEED)
        model = build_model("googlenet", CLASSES).train()
        self.layout = Layout.of(model, "googlenet")
        self.ranges = plan.ranges(self.layout, k)
        self.weights, self.grads = bind_stage(model, self.layout, plan, k)
        self.part = StagePart(model, plan, k)
        self.rng = torch.get_rng_state()

    def forward(self, x, y, scale):
        torch.set_rng_state(self.rng)
        out = self.part.forward(x, y, scale)
        self.rng = torch.get_rng_state()
        return out


def split(plan: StagePlan, images, labels, micro_batches=1):
    """Fill and drain through the stages of ``plan``; the flat gradient and the loss."""
    stages = [Stage(plan, k) for k in range(plan.num_stages)]
    chunks = list(zip(images.chunk(micro_batches), labels.chunk(micro_batches), strict=True))
    scale = 1.0 if micro_batches == 1 else 1.0 / micro_batches
    held = [[] for _ in stages]  # per stage: (input leaf, output, loss) per micro-batch
    for x, y in chunks:
        for k, stage in enumerate(stages):
            leaf = x.detach().requires_grad_(k > 0)
            out, loss = stage.forward(leaf, y, scale)
            held[k].append((leaf, out, loss))
            x = out
    total = 0.0
    for j in range(len(chunks)):
        grad = None
        for k in reversed(range(len(stages))):
            leaf, out, loss = held[k][j]
            backward(out, grad, loss)
            total += float(loss.detach()) if loss is not None else 0.0
            grad = leaf.grad
    flat = torch.zeros(stages[0].layout.total)
    for stage in stages:
        at = 0
        for lo, hi in stage.ranges:
            flat[lo:hi] = stage.grads[at : at + hi - lo]
            at += hi - lo
    return flat, total


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 32, 32, generator=gen), torch.randint(CLASSES, (8,), generator=gen)


@pytest.mark.parametrize(
    "starts", [(), ("4b",), ("4a",), ("aux1",), ("3b", "4e"), ("4d", "head"), ("aux2", "5a")]
)
def test_stages_compute_the_unsplit_gradients_bit_for_bit(batch, starts):
    images, labels = batch
    expected, loss = unsplit(images, labels)
    got, got_loss = split(StagePlan(starts), images, labels)
    assert torch.equal(got, expected)
    assert got_loss == pytest.approx(loss, rel=1e-6)  # the terms summed in another order


@pytest.mark.parametrize("micro_batches", [2, 4])
def test_micro_batches_equal_gradient_accumulation(batch, micro_batches):
    images, labels = batch
    expected, loss = unsplit(images, labels, micro_batches)
    got, got_loss = split(StagePlan(("4c",)), images, labels, micro_batches)
    assert torch.equal(got, expected)
    assert got_loss == pytest.approx(loss, rel=1e-6)


def test_every_parameter_belongs_to_exactly_one_stage():
    model = build_model("googlenet", CLASSES)
    layout = Layout.of(model, "googlenet")
    plan = StagePlan(("3b", "4c", "5a"))
    cover = torch.zeros(layout.total, dtype=torch.int32)
    for k in range(plan.num_stages):
        for lo, hi in plan.ranges(layout, k):
            cover[lo:hi] += 1
    assert bool((cover == 1).all())
    # aux1 reads 4a's output: it lives with 4a's stage (1), aux2 with 4d's (2)
    assert "aux1" in plan.modules(1) and "aux2" in plan.modules(2)
    assert plan.modules(0) == ("conv1", "conv2", "conv3", "inception3a")
    # a cut right after 4a: aux1 may begin the next stage, which receives 4a's output
    assert "aux1" in StagePlan(("aux1",)).modules(1)


@pytest.mark.parametrize(
    "starts, message",
    [(("4x",), "unknown block"), (("conv1",), "after conv1"), (("4c", "4b"), "later than")],
)
def test_bad_cuts_are_refused_with_the_block_names(starts, message):
    with pytest.raises(ValueError, match=message):
        StagePlan(starts)


def test_balance_minimises_the_slowest_stage():
    costs = [1.0] * len(BLOCK_NAMES)
    costs[0] = 14.0  # the stem outweighs the other 13 blocks: it stands alone
    plan = balance(costs, 2)
    assert plan.starts == ("conv2",)
    even = balance([1.0] * len(BLOCK_NAMES), 3)  # 14 blocks: 5, 5, 4 in some order
    sizes = [len(even.blocks(k)) for k in range(3)]
    assert sorted(sizes) == [4, 5, 5]
    with pytest.raises(ValueError):
        balance([1.0] * len(BLOCK_NAMES), len(BLOCK_NAMES) + 1)


def test_measured_block_times_are_positive_and_cut_into_stages():
    torch.manual_seed(0)
    costs = measure_blocks(build_model("googlenet", CLASSES), 32, 4, repeats=1)
    assert len(costs) == len(BLOCK_NAMES) and all(c > 0 for c in costs)
    assert balance(costs, 2).num_stages == 2
