"""Update rules a shard applies to its slice of the flat parameter vector.

Every rule is the torch optimizer it names, stepping one flat float32 parameter (the
shard's slice) with its fused kernel where this torch has one: one pass over
weights, gradient and state per push, no Python loop over parameters, and by
construction exactly what ``torch.optim`` computes.

- ``momentum`` (default): ``g ← g + λ·w; v ← μ·v + g; w ← w − lr·v`` — exactly
  ``torch.optim.SGD(momentum=μ, weight_decay=λ)``.
- ``nesterov``: as above, then ``w ← w − lr·(g + μ·v)`` — ``SGD(nesterov=True)``.
- ``adagrad``: ``g ← g + λ·w; s ← s + g²; w ← w − lr·g / (√s + ε)`` — the per-parameter
  rate γ/√Σg² that Downpour SGD used, as ``torch.optim.Adagrad`` computes it.

The learning rate comes from :class:`Schedule`: ``lr0 · decay^floor(epoch / decay_epochs)``
with ``epoch = examples seen / dataset size`` (the GoogLeNet paper: 4% every 8 epochs),
optionally after a linear warm-up over the first ``warmup_epochs``: the rate rises from
``lr0 / W`` at the first example to ``lr0`` at ``W = warmup_epochs · dataset size``
examples (a factor ``min(1, (examples + 1) / W)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.sgd import sgd as functional_sgd

RULES = ("momentum", "nesterov", "adagrad")
ADAGRAD_EPS = 1e-10  # torch.optim.Adagrad's default


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """Step learning-rate schedule driven by the examples the shard has seen."""

    lr: float
    decay: float = 0.96
    decay_epochs: float = 8.0
    dataset_size: int = 1_281_167  # ImageNet-1k train images
    warmup_epochs: float = 0.0  # linear warm-up of the rate; 0: none

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be a positive number, got {self.lr}")
        if not 0 < self.decay <= 1:
            raise ValueError(f"lr decay must lie in (0, 1], got {self.decay}")
        if self.decay_epochs <= 0:
            raise ValueError(f"lr decay epochs must be positive, got {self.decay_epochs}")
        if self.dataset_size <= 0:
            raise ValueError(f"dataset size must be positive, got {self.dataset_size}")
        if not (self.warmup_epochs >= 0 and math.isfinite(self.warmup_epochs)):
            raise ValueError(f"warm-up epochs must be 0 or more, got {self.warmup_epochs}")

    def epoch(self, examples: int) -> float:
        return examples / self.dataset_size

    def lr_at(self, examples: int) -> float:
        """The learning rate in force once ``examples`` examples have been applied."""
        lr = self.lr * self.decay ** math.floor(self.epoch(examples) / self.decay_epochs)
        warmup = self.warmup_epochs * self.dataset_size
        if examples + 1 < warmup:
            lr *= (examples + 1) / warmup
        return lr


class UpdateRule:
    """A torch optimizer over one flat parameter; ``apply`` is one optimizer step.

    A rule that works element by element (``by_range``) also steps a part of the
    parameter alone (``apply_range``), bit for bit as a whole step would treat it when
    the part starts at a multiple of ``protocol.PART_ALIGN``."""

    name = "base"
    by_range = False

    def __init__(self, weights: torch.Tensor, **hyper: float) -> None:
        self.param = nn.Parameter(weights, requires_grad=True)
        self.optimizer = self._build(self.param, hyper)

    def _build(self, param: nn.Parameter, hyper: dict) -> torch.optim.Optimizer:
        raise NotImplementedError

    @property
    def weights(self) -> torch.Tensor:
        """The slice the rule updates in place (shares memory with what was passed in)."""
        return self.param.data

    def apply(self, grad: torch.Tensor, lr: float) -> None:
        """One step from ``grad`` (float32, same length, read only) at rate ``lr``."""
        self.optimizer.param_groups[0]["lr"] = lr
        self.param.grad = grad
        self.optimizer.step()
        self.param.grad = None  # the gradient buffer belongs to the caller

    def apply_range(self, grad: torch.Tensor, lo: int, hi: int, lr: float) -> None:
        """One step of ``[lo, hi)`` alone from ``grad`` (its gradient, float32)."""
        raise NotImplementedError(f"the {self.name} rule steps the whole slice only")

    def state(self) -> dict[str, torch.Tensor]:
        """The optimizer's per-parameter tensors (for checkpoints), zero before any step."""
        raise NotImplementedError

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError


def _with_fused(factory, param: nn.Parameter, **kwargs) -> torch.optim.Optimizer:
    """The fused (single-kernel) variant where this torch has it for the device."""
    try:
        return factory([param], fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # older torch: no fused CPU kernel
        return factory([param], foreach=False, **kwargs)


class Momentum(UpdateRule):
    name = "momentum"
    nesterov = False
    by_range = True

    def _build(self, param: nn.Parameter, hyper: dict) -> torch.optim.Optimizer:
        momentum = hyper["momentum"]
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        if self.nesterov and momentum == 0:
            raise ValueError("nesterov needs a momentum above 0")
        optimizer = _with_fused(
            torch.optim.SGD,
            param,
            lr=1.0,
            momentum=momentum,
            weight_decay=hyper["weight_decay"],
            nesterov=self.nesterov,
        )
        if momentum:  # zeros, not absent: a part's step and a whole step share one buffer
            optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param.data)
        return optimizer

    def apply_range(self, grad: torch.Tensor, lo: int, hi: int, lr: float) -> None:
        # torch's functional SGD, the very function the optimizer's step calls, over
        # views of the part: no optimizer object per part
        group = self.optimizer.param_groups[0]
        momentum = group["momentum"]
        buffers = [self.optimizer.state[self.param]["momentum_buffer"][lo:hi] if momentum else None]
        functional_sgd(
            [self.param.data[lo:hi]],
            [grad],
            buffers,
            fused=group["fused"],
            foreach=group["foreach"],
            weight_decay=group["weight_decay"],
            momentum=momentum,
            lr=lr,
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )

    def state(self) -> dict[str, torch.Tensor]:
        buf = self.optimizer.state[self.param].get("momentum_buffer")
        return {"momentum": buf if buf is not None else torch.zeros_like(self.param.data)}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.optimizer.state[self.param]["momentum_buffer"] = tensors["momentum"].clone()


class Nesterov(Momentum):
    name = "nesterov"
    nesterov = True


class Adagrad(UpdateRule):
    name = "adagrad"

    def _build(self, param: nn.Parameter, hyper: dict) -> torch.optim.Optimizer:
        return _with_fused(
            torch.optim.Adagrad,
            param,
            lr=1.0,
            eps=ADAGRAD_EPS,
            weight_decay=hyper["weight_decay"],
        )

    def state(self) -> dict[str, torch.Tensor]:
        st = self.optimizer.state[self.param]
        return {
            "sum_squares": st["sum"],
            "steps": torch.as_tensor([float(st["step"])], dtype=torch.float32),
        }

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        st = self.optimizer.state[self.param]
        st["sum"].copy_(tensors["sum_squares"])
        st["step"] = torch.tensor(float(tensors["steps"][0]))


def make_rule(
    name: str, weights: torch.Tensor, *, weight_decay: float, momentum: float
) -> UpdateRule:
    """The rule called ``name``, updating ``weights`` (1-D float32) in place."""
    if weight_decay < 0:
        raise ValueError(f"weight decay must be non-negative, got {weight_decay}")
    classes = {"momentum": Momentum, "nesterov": Nesterov, "adagrad": Adagrad}
    if name not in classes:
        raise ValueError(f"unknown update rule {name!r}; known: {', '.join(RULES)}")
    return classes[name](weights, weight_decay=weight_decay, momentum=momentum)
