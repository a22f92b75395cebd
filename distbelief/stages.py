"""One replica's model cut into consecutive stages (DistBelief's model parallelism).

GoogLeNet's forward pass is a chain of blocks (:data:`GOOGLENET_BLOCKS`): the stem, each
Inception module (with the max pool that follows it), the two auxiliary classifiers
(right after 4a and 4d, whose output they read and pass on unchanged) and the head. A
:class:`StagePlan` cuts the chain into K consecutive runs, one a stage; a stage holds
its blocks' layers. An auxiliary classifier lives with a stage that holds its input:
the stage that computes 4a (4d), or, when a cut falls right after 4a (4d), the next
one, which receives that output anyway; it computes its loss there (the labels travel
with the activations). A :class:`StagePart` runs one stage's forward pass on one micro-batch;
its input from the previous stage is a leaf whose gradient goes back over the cut.

Exactness. The blocks are the very calls of :meth:`GoogLeNet.forward`, in its order,
so a stage computes what the unsplit model computes there, bit for bit. The loss of a
stage is its terms of :func:`training_loss` (main, or 0.3 × an aux loss), each of
whose gradients is the unsplit loss's (``1`` and ``0.3``, times ``1/m`` over ``m``
micro-batches, as :func:`accumulate` does). Where a tensor feeds two consumers on two
sides of a cut (4a's output feeds aux1 and 4b), autograd adds two gradients: addition
of two floats is commutative, so the order the cut imposes changes nothing. Dropout
draws from the process's random generator in forward order (aux1, aux2, main): each
stage makes the draws of the other stages' dropouts too, on an empty tensor of the
same shape (:meth:`StagePart.forward`), so every stage's generator passes through the
states the unsplit replica's does, and its masks are the unsplit replica's.

Parameters. A stage's parameters are a few ranges of the flat vector (the layout
orders parameters by module registration: the trunk, then ``fc``, then aux1 and
aux2), :meth:`StagePlan.ranges`; the layout's padding goes with the last entry. The
stage keeps them in compact buffers, its ranges end to end (:func:`bind_stage`), and
pushes and pulls only those.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distbelief.layout import Layout
from distbelief.models.googlenet import AUX_LOSS_WEIGHT, GoogLeNet

Forward = Callable[[GoogLeNet, Tensor], Tensor]


@dataclass(frozen=True)
class Block:
    """One link of the chain: ``run(model, x)`` over the layers ``modules``; an
    auxiliary classifier's block (``aux``) passes ``x`` on and adds its loss term."""

    name: str
    modules: tuple[str, ...]
    run: Forward
    aux: bool = False


def _stem1(m: GoogLeNet, x: Tensor) -> Tensor:
    return m.lrn1(m.maxpool1(m.conv1(x)))


def _stem2(m: GoogLeNet, x: Tensor) -> Tensor:
    return m.maxpool2(m.lrn2(m.conv3(m.conv2(x))))


def _head(m: GoogLeNet, x: Tensor) -> Tensor:
    return m.fc(m.dropout(torch.flatten(m.avgpool(x), 1)))


def _inception(name: str, pool: str | None = None) -> Block:
    def run(m: GoogLeNet, x: Tensor) -> Tensor:
        x = getattr(m, f"inception{name}")(x)
        return getattr(m, pool)(x) if pool else x

    return Block(name, (f"inception{name}",), run)


def _aux(name: str) -> Block:
    return Block(name, (name,), lambda m, x: x, aux=True)


# GoogLeNet.forward, link by link (tests/test_stages.py holds them equal bit for bit)
GOOGLENET_BLOCKS: tuple[Block, ...] = (
    Block("conv1", ("conv1",), _stem1),
    Block("conv2", ("conv2", "conv3"), _stem2),
    _inception("3a"),
    _inception("3b", pool="maxpool3"),
    _inception("4a"),
    _aux("aux1"),
    _inception("4b"),
    _inception("4c"),
    _inception("4d"),
    _aux("aux2"),
    _inception("4e", pool="maxpool4"),
    _inception("5a"),
    _inception("5b"),
    Block("head", ("fc",), _head),
)
BLOCK_NAMES = tuple(b.name for b in GOOGLENET_BLOCKS)
DROPOUT_WIDTH = 1024  # the main and both aux dropouts act on (batch, 1024)


@dataclass(frozen=True)
class StagePlan:
    """Where a replica is cut: ``starts`` names the block each stage after the first
    begins with, in order (``("4b",)``: two stages, the second from 4b on)."""

    starts: tuple[str, ...]

    def __post_init__(self) -> None:
        unknown = [s for s in self.starts if s not in BLOCK_NAMES]
        if unknown:
            raise ValueError(
                f"unknown block {unknown[0]!r} in the stage cuts; blocks: {', '.join(BLOCK_NAMES)}"
            )
        positions = [BLOCK_NAMES.index(s) for s in self.starts]
        if positions != sorted(set(positions)) or (positions and positions[0] == 0):
            raise ValueError(
                "stage cuts must name blocks after conv1, each later than the one before "
                f"(got {', '.join(self.starts)}; order: {', '.join(BLOCK_NAMES)})"
            )

    @property
    def num_stages(self) -> int:
        return len(self.starts) + 1

    def blocks(self, stage: int) -> tuple[Block, ...]:
        """The blocks of ``stage``, in forward order."""
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage {stage} out of range for {self.num_stages} stages")
        edges = [0, *(BLOCK_NAMES.index(s) for s in self.starts), len(BLOCK_NAMES)]
        return GOOGLENET_BLOCKS[edges[stage] : edges[stage + 1]]

    def modules(self, stage: int) -> tuple[str, ...]:
        """The names of the layers ``stage`` holds."""
        return tuple(n for b in self.blocks(stage) for n in b.modules)

    def ranges(self, layout: Layout, stage: int) -> tuple[tuple[int, int], ...]:
        """The ranges ``[lo, hi)`` of the flat vector holding ``stage``'s parameters,
        merged where they touch; the padding at the end goes with the last entry."""
        mine = self.modules(stage)
        spans = []
        for e in layout.entries:
            if e.name.split(".", 1)[0] in mine:
                hi = layout.total if e is layout.entries[-1] else e.offset + e.size
                spans.append((e.offset, hi))
        merged: list[tuple[int, int]] = []
        for lo, hi in spans:
            if merged and merged[-1][1] == lo:
                merged[-1] = (merged[-1][0], hi)
            else:
                merged.append((lo, hi))
        return tuple(merged)

    def describe_stage(self, stage: int) -> str:
        """``stage``'s first and last block: ``4b-head``."""
        blocks = self.blocks(stage)
        return blocks[0].name if len(blocks) == 1 else f"{blocks[0].name}-{blocks[-1].name}"

    def describe(self) -> str:
        return " | ".join(self.describe_stage(k) for k in range(self.num_stages))


class StagePart:
    """The forward pass of one stage of ``model`` (the whole GoogLeNet, of which only
    this stage's layers are used), on one micro-batch."""

    def __init__(self, model: GoogLeNet, plan: StagePlan, stage: int) -> None:
        self.model = model
        self.plan = plan
        self.stage = stage
        self.mine = {b.name for b in plan.blocks(stage)}
        self.last = stage == plan.num_stages - 1

    def forward(
        self, x: Tensor, labels: Tensor, scale: float = 1.0
    ) -> tuple[Tensor, Tensor | None]:
        """Run this stage's blocks on ``x``; return the output (the logits on the last
        stage) and this stage's share of the training loss (None: it has none), times
        ``scale`` (``1/m`` with ``m`` micro-batches).

        The dropouts of the other stages draw their masks here too (thrown away), in
        forward order, so the random generator stays in step with the unsplit model's.
        """
        m, terms = self.model, []
        for block in GOOGLENET_BLOCKS:
            if block.name not in self.mine:
                self._draw_for(block, len(labels), x)
                continue
            if block.aux:
                head = getattr(m, block.name)
                terms.append(AUX_LOSS_WEIGHT * F.cross_entropy(head(x), labels))
            else:
                x = block.run(m, x)
        if self.last:
            terms.insert(0, F.cross_entropy(x, labels))
        if not terms:
            return x, None
        loss = terms[0]
        for term in terms[1:]:  # each keeps the gradient it has in the unsplit loss
            loss = loss + term
        return x, loss if scale == 1.0 else loss * scale

    def _draw_for(self, block: Block, batch: int, like: Tensor) -> None:
        """The dropout draws ``block`` makes in the unsplit model (none for most)."""
        dropouts = [getattr(self.model, block.name).dropout] if block.aux else []
        dropouts += [self.model.dropout] if block.name == "head" else []
        for dropout in dropouts:
            dtype = torch.get_autocast_dtype(like.device.type) if _autocast(like) else None
            empty = torch.empty(batch, DROPOUT_WIDTH, device=like.device, dtype=dtype)
            F.dropout(empty, dropout.p, training=True)


def _autocast(like: Tensor) -> bool:
    return like.device.type == "cuda" and torch.is_autocast_enabled("cuda")


def bind_stage(
    model: nn.Module,
    layout: Layout,
    plan: StagePlan,
    stage: int,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move ``stage``'s layers to ``device`` and make their parameters and gradients
    views into two compact flat buffers: the stage's ranges (:meth:`StagePlan.ranges`)
    end to end. The other layers' parameters are released (the stage never runs them).
    Returns ``(weights, grads)``."""
    ranges = plan.ranges(layout, stage)
    size = sum(hi - lo for lo, hi in ranges)
    weights = torch.zeros(size, dtype=torch.float32, device=device)
    grads = torch.zeros(size, dtype=torch.float32, device=device)
    params = dict(model.named_parameters())
    mine = set(plan.modules(stage))
    for e in layout.entries:
        p = params[e.name]
        if e.name.split(".", 1)[0] not in mine:
            p.data = torch.empty(0)  # another stage's: never used here
            continue
        at = compact_offset(ranges, e.offset)
        view = weights[at : at + e.size].view(e.shape)
        view.copy_(p.detach())
        p.data, p.grad = view, grads[at : at + e.size].view(e.shape)
    return weights, grads


def compact_offset(ranges: Sequence[tuple[int, int]], offset: int) -> int:
    """Where the flat vector's ``offset`` lies in the ranges laid end to end."""
    seen = 0
    for lo, hi in ranges:
        if lo <= offset < hi:
            return seen + offset - lo
        seen += hi - lo
    raise ValueError(f"offset {offset} lies in none of the ranges {list(ranges)}")


def accumulate(model: nn.Module, images: Tensor, labels: Tensor, micro_batches: int) -> float:
    """Gradient accumulation over ``micro_batches`` equal slices of the batch, each
    loss scaled by ``1/m`` (none for one): what a staged replica's gradient equals.
    Returns the batch's loss (the mean of the slices')."""
    from distbelief.models import training_loss

    scale = 1.0 / micro_batches
    total = 0.0
    for x, y in zip(images.chunk(micro_batches), labels.chunk(micro_batches), strict=True):
        loss = training_loss(model(x), y)
        (loss if micro_batches == 1 else loss * scale).backward()
        total += float(loss.detach()) * scale
    return total


# -- choosing the cuts ----------------------------------------------------------------


def balance(costs: Sequence[float], num_stages: int) -> StagePlan:
    """The cuts of the chain whose costs (one per block) make the slowest stage as fast
    as it can be: a pipeline runs at the pace of its slowest stage."""
    n = len(costs)
    if not 1 <= num_stages <= n:
        raise ValueError(f"cannot cut {n} blocks into {num_stages} stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # best[k][i]: the slowest stage's cost when blocks [0, i) form k stages
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, num_stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                worst = max(best[k - 1][j], prefix[i] - prefix[j])
                if worst < best[k][i]:
                    best[k][i], cut[k][i] = worst, j
    starts, i = [], n
    for k in range(num_stages, 1, -1):
        i = cut[k][i]
        starts.append(BLOCK_NAMES[i])
    return StagePlan(tuple(reversed(starts)))


def measure_blocks(
    model: GoogLeNet,
    image_size: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    repeats: int = 3,
) -> list[float]:
    """Seconds of forward plus backward of each block (an auxiliary classifier's: its
    head and loss) on a batch of random images: the median of ``repeats`` after one
    warm-up pass."""
    device = torch.device(device)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    labels = torch.zeros(batch_size, dtype=torch.long, device=device)
    model = model.to(device).train()
    inputs = [x]
    with torch.no_grad():
        for block in GOOGLENET_BLOCKS[:-1]:
            inputs.append(block.run(model, inputs[-1]))
    times = []
    for block, x_in in zip(GOOGLENET_BLOCKS, inputs, strict=True):
        runs = []
        for _ in range(repeats + 1):
            leaf = x_in.detach().requires_grad_(block.name != "conv1")
            began = time.perf_counter()
            if block.aux:
                loss = F.cross_entropy(getattr(model, block.name)(leaf), labels)
            else:
                loss = block.run(model, leaf).float().mean()
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            runs.append(time.perf_counter() - began)
        model.zero_grad(set_to_none=True)
        times.append(sorted(runs[1:])[len(runs[1:]) // 2])
    return times
