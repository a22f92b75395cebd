"""The flat parameter layout and its partition into shards.

All trainable parameters, in ``model.named_parameters()`` order, lie end to end
in one float32 vector, padded with zeros to a multiple of ``SHARD_ALIGN`` elements
(the padding has no parameter, no gradient and stays zero under every update rule).
A :class:`Layout` records where each one lives; a :class:`ShardPlan` cuts
``[0, total)`` into contiguous, size-balanced ranges, one per shard (a key-range
partition, as ps-lite does).

A worker keeps its parameters *and* their gradients as views into two flat
buffers (:func:`flatten_into`), so a pull is one copy into a slice of the
weight buffer and a push is one slice of the gradient buffer per shard.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

SHARD_ALIGN = 64  # elements; shard boundaries and the padded total are multiples of this


@dataclass(frozen=True, kw_only=True)
class Entry:
    """One parameter in the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int
    size: int


@dataclass(frozen=True, kw_only=True)
class Layout:
    """Where every trainable parameter of a model lies in the flat vector.

    ``parameters`` counts the model's parameters; ``total``, the length of the flat
    vector, rounds that up to a multiple of ``SHARD_ALIGN``. Without a ragged tail
    every element of every shard takes the same vectorised path of the update kernel
    as a single-process optimizer stepping the whole vector, fused or not, with any
    thread count: the last few elements would otherwise go through a scalar loop
    whose rounding differs in the last ulp, which training amplifies.
    """

    model_name: str
    entries: tuple[Entry, ...]
    parameters: int
    total: int

    @classmethod
    def of(cls, model: nn.Module, model_name: str) -> Layout:
        """The layout of ``model``'s trainable parameters, in ``named_parameters()`` order."""
        entries = []
        offset = 0
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            entries.append(
                Entry(name=name, shape=tuple(param.shape), offset=offset, size=param.numel())
            )
            offset += param.numel()
        total = -(-offset // SHARD_ALIGN) * SHARD_ALIGN
        return cls(model_name=model_name, entries=tuple(entries), parameters=offset, total=total)

    def state_dict(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``flat`` named and shaped as the model's parameters."""
        return {e.name: flat[e.offset : e.offset + e.size].view(e.shape) for e in self.entries}

    def from_state_dict(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """A new flat float32 vector (zero padding included) from named parameters."""
        flat = torch.zeros(self.total, dtype=torch.float32)
        for e in self.entries:
            flat[e.offset : e.offset + e.size].copy_(tensors[e.name].reshape(-1))
        return flat

    def fingerprint(self, num_shards: int) -> str:
        """A short hash of model name, parameter names and shapes, and the shard count.

        Two processes agree on the fingerprint exactly when they cut the same flat
        vector the same way; ``hello`` refuses a peer whose fingerprint differs.
        """
        h = hashlib.sha256()
        h.update(f"{self.model_name}|{num_shards}|{self.total}".encode())
        for e in self.entries:
            h.update(f"|{e.name}:{'x'.join(map(str, e.shape))}".encode())
        return h.hexdigest()[:16]


@dataclass(frozen=True, kw_only=True)
class ShardPlan:
    """Contiguous, size-balanced ranges ``[start, stop)`` of the flat vector, one per shard.

    Every boundary but the last is a multiple of ``SHARD_ALIGN`` elements (and so is
    the last, for a :class:`Layout`'s padded total). Besides
    cache-line alignment this makes a shard's vectorised update kernels see the same
    lanes as a single-process optimizer over the whole vector, so a run through the
    shards reproduces ``torch.optim`` bit for bit instead of to the last ulp (which
    training can amplify: a ReLU or max-pool that flips on an ulp changes gradients).
    """

    total: int
    num_shards: int

    def __post_init__(self) -> None:
        if self.num_shards < 1:
            raise ValueError(f"num_shards must be at least 1, got {self.num_shards}")
        if self.total < self.num_shards * SHARD_ALIGN:
            raise ValueError(
                f"cannot cut {self.total} parameters into {self.num_shards} shards of at least "
                f"{SHARD_ALIGN}"
            )

    def range(self, index: int) -> tuple[int, int]:
        """The range of shard ``index``; sizes differ by at most ``SHARD_ALIGN`` elements."""
        if not 0 <= index < self.num_shards:
            raise ValueError(f"shard index {index} out of range for {self.num_shards} shards")
        blocks = self.total // SHARD_ALIGN
        base, extra = divmod(blocks, self.num_shards)
        start = (index * base + min(index, extra)) * SHARD_ALIGN
        stop = start + (base + (1 if index < extra else 0)) * SHARD_ALIGN
        return start, self.total if index == self.num_shards - 1 else stop

    def ranges(self) -> list[tuple[int, int]]:
        return [self.range(i) for i in range(self.num_shards)]


def flatten_into(
    model: nn.Module,
    layout: Layout,
    buffers: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Make ``model``'s parameters and gradients views into two flat float32 buffers.

    Returns ``(weights, grads)``. The current parameter values are copied into
    ``weights``; afterwards writing a slice of ``weights`` changes the model and
    ``backward()`` accumulates into ``grads`` (which starts at zero). The buffers live
    on the device of the model's first parameter, or are ``buffers`` when given (two
    float32 vectors of ``layout.total`` on that device, such as shared memory).
    """
    params = dict(model.named_parameters())
    if not layout.entries:
        raise ValueError("model has no trainable parameters")
    device = params[layout.entries[0].name].device
    if buffers is None:
        weights = torch.zeros(layout.total, dtype=torch.float32, device=device)
        grads = torch.zeros(layout.total, dtype=torch.float32, device=device)
    else:
        weights, grads = buffers
        if any(b.shape != (layout.total,) or b.dtype != torch.float32 for b in buffers):
            raise ValueError(f"buffers must be two float32 vectors of {layout.total}")
        weights.zero_()  # the padding; parameters are copied in below
        grads.zero_()
    for e in layout.entries:
        p = params[e.name]
        if tuple(p.shape) != e.shape:
            raise ValueError(
                f"parameter {e.name} has shape {tuple(p.shape)}, layout says {e.shape}"
            )
        w_view = weights[e.offset : e.offset + e.size].view(e.shape)
        w_view.copy_(p.detach())
        p.data = w_view
        p.grad = grads[e.offset : e.offset + e.size].view(e.shape)
    return weights, grads


def flat_weights(model: nn.Module, layout: Layout) -> torch.Tensor:
    """A new flat float32 CPU vector holding ``model``'s parameters in layout order."""
    return layout.from_state_dict({k: p.detach() for k, p in model.named_parameters()})
