"""Update rules a shard applies to its slice of the flat parameter vector.

Every rule works in place on float32 1-D tensors with a few fused torch ops and
preallocated scratch space: no Python loop over parameters, no allocation per push.

- ``momentum`` (default): ``g ← g + λ·w; v ← μ·v + g; w ← w − lr·v`` — exactly
  ``torch.optim.SGD(momentum=μ, weight_decay=λ)``.
- ``nesterov``: as above, then ``w ← w − lr·(g + μ·v)`` — ``SGD(nesterov=True)``.
- ``adagrad``: ``g ← g + λ·w; s ← s + g²; w ← w − lr·g / (√s + ε)`` — the per-parameter
  rate γ/√Σg² that Downpour SGD used, as ``torch.optim.Adagrad`` computes it.

The learning rate comes from :class:`Schedule`: ``lr0 · decay^floor(epoch / decay_epochs)``
with ``epoch = examples seen / dataset size`` (the GoogLeNet paper: 4% every 8 epochs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RULES = ("momentum", "nesterov", "adagrad")
ADAGRAD_EPS = 1e-10  # torch.optim.Adagrad's default


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """Step learning-rate schedule driven by the examples the shard has seen."""

    lr: float
    decay: float = 0.96
    decay_epochs: float = 8.0
    dataset_size: int = 1_281_167  # ImageNet-1k train images

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be a positive number, got {self.lr}")
        if not 0 < self.decay <= 1:
            raise ValueError(f"lr decay must lie in (0, 1], got {self.decay}")
        if self.decay_epochs <= 0:
            raise ValueError(f"lr decay epochs must be positive, got {self.decay_epochs}")
        if self.dataset_size <= 0:
            raise ValueError(f"dataset size must be positive, got {self.dataset_size}")

    def epoch(self, examples: int) -> float:
        return examples / self.dataset_size

    def lr_at(self, examples: int) -> float:
        """The learning rate in force once ``examples`` examples have been applied."""
        return self.lr * self.decay ** math.floor(self.epoch(examples) / self.decay_epochs)


class UpdateRule:
    """Base class: holds named optimizer-state tensors (saved in checkpoints)."""

    name = "base"

    def __init__(self, size: int, *, weight_decay: float) -> None:
        if weight_decay < 0:
            raise ValueError(f"weight decay must be non-negative, got {weight_decay}")
        self.weight_decay = weight_decay
        self.scratch = torch.empty(size, dtype=torch.float32)
        self.state: dict[str, torch.Tensor] = {}

    def apply(self, weights: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        """Update ``weights`` in place from ``grad`` (read only) at rate ``lr``."""
        raise NotImplementedError

    def _decayed(self, weights: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """``grad + λ·weights`` in the scratch buffer (or ``grad`` itself when λ = 0)."""
        if self.weight_decay == 0:
            return grad
        return torch.add(grad, weights, alpha=self.weight_decay, out=self.scratch)


class Momentum(UpdateRule):
    name = "momentum"

    def __init__(self, size: int, *, weight_decay: float, momentum: float) -> None:
        super().__init__(size, weight_decay=weight_decay)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        self.momentum = momentum
        self.state["momentum"] = torch.zeros(size, dtype=torch.float32)

    def apply(self, weights: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        d = self._decayed(weights, grad)
        v = self.state["momentum"]
        v.mul_(self.momentum).add_(d)
        weights.add_(v, alpha=-lr)


class Nesterov(Momentum):
    name = "nesterov"

    def apply(self, weights: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        d = self._decayed(weights, grad)
        v = self.state["momentum"]
        v.mul_(self.momentum).add_(d)
        # d may alias grad (read only); the scratch buffer takes g + μ·v either way
        step = torch.add(d, v, alpha=self.momentum, out=self.scratch)
        weights.add_(step, alpha=-lr)


class Adagrad(UpdateRule):
    name = "adagrad"

    def __init__(self, size: int, *, weight_decay: float) -> None:
        super().__init__(size, weight_decay=weight_decay)
        self.state["sum_squares"] = torch.zeros(size, dtype=torch.float32)
        self.denominator = torch.empty(size, dtype=torch.float32)

    def apply(self, weights: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        d = self._decayed(weights, grad)
        s = self.state["sum_squares"]
        s.addcmul_(d, d, value=1)
        torch.sqrt(s, out=self.denominator).add_(ADAGRAD_EPS)
        weights.addcdiv_(d, self.denominator, value=-lr)


def make_rule(name: str, size: int, *, weight_decay: float, momentum: float) -> UpdateRule:
    """Build the rule called ``name`` for a slice of ``size`` floats."""
    if name == "momentum":
        return Momentum(size, weight_decay=weight_decay, momentum=momentum)
    if name == "nesterov":
        return Nesterov(size, weight_decay=weight_decay, momentum=momentum)
    if name == "adagrad":
        return Adagrad(size, weight_decay=weight_decay)
    raise ValueError(f"unknown update rule {name!r}; known: {', '.join(RULES)}")
