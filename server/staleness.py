"""Staleness policies: how a shard adjusts a push for the updates it missed.

A push's gradient was computed on the weights of ``base_version``; by the time it
arrives the shard is at ``version``, ``staleness = version − base_version`` updates
later. A policy sits between the push and the update rule (:mod:`.rules`): it may
change the gradient, the learning rate or the rule's momentum for this one step, and
then lets the rule step as usual. Every policy reduces to the plain rule at
staleness 0, bit for bit, so one replica through the shards still reproduces
``torch.optim.SGD``.

- ``none``: plain Downpour SGD, the gradient as it came.
- ``async-momentum``: asynchrony-aware momentum (Mitliagkas et al. 2016, "Asynchrony
  begets momentum"). N replicas pushing in turn act like an implicit momentum of about
  ``1 − 1/N``, with ``N − 1`` the mean staleness. The rule's explicit momentum is set
  to ``μ − τ̄/(τ̄ + 1)`` (``τ̄``: running mean staleness on this shard), so explicit
  plus implicit stays at the configured ``μ``; it goes below 0 for large N, as the
  paper suggests, down to ``MIN_MOMENTUM``.
- ``async-momentum-lr``: the same momentum, and the rate divided by ``τ̄ + 1`` (about
  N: each of N replicas pushing in turn moves the weights by ``lr / N``). A constant
  delay τ shrinks the range of curvature that momentum SGD keeps stable about τ-fold
  (``bench/RESULTS.md``, the stability table); lowering the momentum alone does not
  win it back, the rate does. The simulator's winner, ``up``'s default.
- ``async-momentum-stable``: the same momentum, and the rate scaled so that the
  sharpest curvature momentum SGD keeps stable under the mean delay is the same as the
  reference's at staleness 0: ``lr · S(τ̄, μ_e) / S(0, μ)``, where ``S(τ, μ)`` is the
  largest ``lr·λ`` for which ``x ← x + μ(x − x₋₁) − lr·λ·x₋τ`` is stable (the roots of
  its characteristic polynomial inside the unit circle; :func:`stable_range`). About
  ``lr / (2.2 N)`` for N replicas in turn, where ``async-momentum-lr`` gives ``lr / N``.
- ``lr-scale``: the learning rate divided by ``max(1, τ)`` (Zhang et al. 2016).
- ``dc-asgd``: delay compensation, DC-ASGD-a (Zheng et al., ICML 2017):
  ``g + λ_t ⊙ g ⊙ g ⊙ (w_now − w_base)`` with ``λ_t = λ0 / √(MeanSquare_t + ε)`` and
  ``MeanSquare_t = m·MeanSquare_{t−1} + (1 − m)·g²``.
- ``gap-aware``: Barkai et al. (ICLR 2020): the gradient divided, element by element,
  by ``max(1, |w_now − w_base| / C)``, with ``C`` the running mean of the size of one
  update of that element.

``dc-asgd`` and ``gap-aware`` need ``w_base``: the shard keeps a copy of its slice at
every version a replica pulled (:class:`WeightHistory`), the most recent
``history`` of them (memory: ``history × slice bytes``, exported as a metric). A push
whose base version is no longer kept is applied uncompensated and counted.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from .rules import Momentum, Schedule, UpdateRule

POLICIES = (
    "none",
    "async-momentum",
    "async-momentum-lr",
    "async-momentum-stable",
    "lr-scale",
    "dc-asgd",
    "gap-aware",
)
# they set the rule's momentum
MOMENTUM_POLICIES = ("async-momentum", "async-momentum-lr", "async-momentum-stable")
STABLE_MAX_DELAY = 64  # stable_range solves up to this delay, and scales as 1/(τ+1) past it
MIN_MOMENTUM = -0.5  # floor of the asynchrony-aware momentum (32 replicas ask for −0.07)
DC_EPS = 1e-7  # ε under DC-ASGD-a's square root (the paper's reference code)
GAP_EPS = 1e-12  # keeps an element that never moved from dividing by zero


@dataclass(frozen=True, kw_only=True)
class StalenessConfig:
    """The staleness policy a shard applies, and its knobs."""

    policy: str = "none"
    staleness_decay: float = 0.9  # running mean staleness: weight of the past per push
    lr_power: float = 1.0  # async-momentum-lr: the rate divided by (τ̄ + 1) ** lr_power
    # async-momentum-lr: over this share of an epoch after the first stale push, the rate
    # rises from async-momentum-stable's to its own (0: no ramp, its own rate at once)
    join_ramp_epochs: float = 0.0
    dc_lambda: float = 2.0  # DC-ASGD-a's λ0 (the paper's choice for CIFAR-10)
    dc_decay: float = 0.95  # DC-ASGD-a's m, the MeanSquare decay
    gap_decay: float = 0.99  # gap-aware: decay of the running mean update size C
    history: int = 64  # weight copies kept for dc-asgd and gap-aware

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(
                f"unknown staleness policy {self.policy!r}; known: {', '.join(POLICIES)}"
            )
        if not self.join_ramp_epochs >= 0:
            raise ValueError(f"join ramp epochs must be 0 or more, got {self.join_ramp_epochs}")
        for name in ("staleness_decay", "dc_decay", "gap_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', ' ')} must lie in [0, 1)")
        if self.dc_lambda < 0:
            raise ValueError(f"DC-ASGD lambda must be non-negative, got {self.dc_lambda}")
        if self.history < 1:
            raise ValueError(f"the weight history must keep at least 1 copy, got {self.history}")

    @property
    def keeps_history(self) -> bool:
        return self.policy in ("dc-asgd", "gap-aware")


class WeightHistory:
    """Copies of the shard's slice at the versions replicas pulled, the newest kept."""

    def __init__(self, size: int, capacity: int) -> None:
        self.size = size
        self.capacity = capacity
        self.copies: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.misses = 0

    def remember(self, version: int, weights: torch.Tensor) -> None:
        if version in self.copies:
            self.copies.move_to_end(version)
            return
        # the oldest copy's memory is reused: the history never allocates past capacity
        spare = self.copies.popitem(last=False)[1] if len(self.copies) >= self.capacity else None
        self.copies[version] = weights.clone() if spare is None else spare.copy_(weights)

    def get(self, version: int) -> torch.Tensor | None:
        found = self.copies.get(version)
        self.misses += found is None
        return found

    @property
    def bytes(self) -> int:
        return len(self.copies) * self.size * 4


@dataclass
class Applied:
    """What one push did: the rate and momentum used, and the relative correction."""

    lr: float
    momentum: float | None
    correction: float = 0.0  # ‖adjusted − original gradient‖ / ‖original gradient‖


class Updater:
    """The shard's update of its slice: staleness policy, schedule and rule together.

    ``pulled(version)`` is called when a replica reads the weights of ``version``;
    ``apply(grad, examples_before, staleness, base_version)`` applies one push.
    Not thread-safe: the shard's one thread owns it.
    """

    def __init__(self, rule: UpdateRule, schedule: Schedule, cfg: StalenessConfig) -> None:
        if cfg.policy in MOMENTUM_POLICIES and not isinstance(rule, Momentum):
            raise ValueError(f"the {cfg.policy} policy needs --rule momentum or nesterov")
        self.rule = rule
        self.schedule = schedule
        self.cfg = cfg
        self.weights = rule.weights
        size = self.weights.numel()
        self.base_momentum = rule.optimizer.param_groups[0].get("momentum")
        self.mean_staleness = 0.0
        self.history = WeightHistory(size, cfg.history) if cfg.keeps_history else None
        self.mean_square = torch.zeros(size) if cfg.policy == "dc-asgd" else None
        self.mean_step = torch.zeros(size) if cfg.policy == "gap-aware" else None
        # two slice-sized work buffers for the compensating policies: no allocation per push
        self.scratch = torch.empty(size) if cfg.keeps_history else None
        self.work = torch.empty(size) if cfg.keeps_history else None
        self.previous = torch.empty(size) if cfg.policy == "gap-aware" else None
        self.last = Applied(lr=schedule.lr_at(0), momentum=self.base_momentum)
        self.joined_at: int | None = None  # examples when the first stale push came

    def pulled(self, version: int) -> None:
        if self.history is not None:
            self.history.remember(version, self.weights)

    def apply(
        self, grad: torch.Tensor, *, examples_before: int, staleness: int, base_version: int
    ) -> Applied:
        """One push: adjust for its staleness, step the rule. ``grad`` is read only."""
        applied = self.begin(examples_before=examples_before, staleness=staleness)
        policy = self.cfg.policy
        if policy == "dc-asgd":
            grad = self._dc_asgd(grad, staleness, base_version, applied)
        elif policy == "gap-aware":
            grad = self._gap_aware(grad, staleness, base_version, applied)
        if self.previous is not None:
            self.previous.copy_(self.weights)
        self.rule.apply(grad, applied.lr)
        if self.previous is not None:  # gap-aware's C: running mean size of one update
            g = self.cfg.gap_decay
            step = self.previous.sub_(self.weights).abs_()
            self.mean_step.mul_(g).add_(step, alpha=1 - g)
        return applied

    @property
    def by_range(self) -> bool:
        """Whether a push may be applied part by part (:meth:`begin`, :meth:`step`): the
        rule works element by element and the policy changes only the rate and momentum
        (not dc-asgd or gap-aware, which read the whole slice's history)."""
        return self.rule.by_range and self.history is None

    def begin(self, *, examples_before: int, staleness: int) -> Applied:
        """The rate and momentum of one push, from its staleness (the running mean
        staleness moves once per push); :meth:`step` or the whole :meth:`apply` uses
        them."""
        d = self.cfg.staleness_decay
        self.mean_staleness = d * self.mean_staleness + (1 - d) * staleness
        lr = self.schedule.lr_at(examples_before)
        applied = Applied(lr=lr, momentum=self.base_momentum)
        policy = self.cfg.policy
        if policy in MOMENTUM_POLICIES:
            applied.momentum = self._async_momentum()
            self.rule.optimizer.param_groups[0]["momentum"] = applied.momentum
            if policy == "async-momentum-lr":
                applied.lr = lr * self._lr_share(examples_before, staleness, applied.momentum)
            elif policy == "async-momentum-stable" and self.mean_staleness > 0:
                applied.lr = lr * stable_share(
                    self.mean_staleness, applied.momentum, self.base_momentum
                )
        elif policy == "lr-scale":
            applied.lr = lr / max(1, staleness)
        self.last = applied
        return applied

    def step(self, grad: torch.Tensor, applied: Applied, lo: int, hi: int) -> None:
        """Apply the part ``[lo, hi)`` of a push begun with :meth:`begin` (``grad``: its
        gradient), with that push's rate and momentum: the parts of pushes from several
        replicas may arrive interleaved. Only when :attr:`by_range`."""
        if applied.momentum is not None:
            self.rule.optimizer.param_groups[0]["momentum"] = applied.momentum
        self.rule.apply_range(grad, lo, hi, applied.lr)

    def _lr_share(self, examples: int, staleness: int, momentum: float) -> float:
        """async-momentum-lr's share of the rate, ramped from the stable share after
        the others join (``join_ramp_epochs``)."""
        share = 1.0 / (self.mean_staleness + 1.0) ** self.cfg.lr_power
        if self.joined_at is None and staleness > 0:
            self.joined_at = examples
        if self.cfg.join_ramp_epochs <= 0 or self.joined_at is None:
            return share
        ramp = self.cfg.join_ramp_epochs * self.schedule.dataset_size
        progress = (examples - self.joined_at) / ramp
        if progress >= 1 or self.mean_staleness == 0:
            return share
        stable = stable_share(self.mean_staleness, momentum, self.base_momentum)
        return stable + (share - stable) * max(0.0, progress)

    def _async_momentum(self) -> float:
        implicit = self.mean_staleness / (self.mean_staleness + 1.0)
        return max(MIN_MOMENTUM, self.base_momentum - implicit)

    def _base(self, staleness: int, base_version: int) -> torch.Tensor | None:
        """``w_now − w_base`` in the scratch buffer; None when fresh or not kept."""
        if staleness == 0:
            return None  # w_base is w_now: nothing to compensate, the plain rule exactly
        base = self.history.get(base_version)
        if base is None:
            return None
        return torch.sub(self.weights, base, out=self.scratch)

    def _dc_asgd(
        self, grad: torch.Tensor, staleness: int, base_version: int, applied: Applied
    ) -> torch.Tensor:
        m = self.cfg.dc_decay
        self.mean_square.mul_(m).addcmul_(grad, grad, value=1 - m)
        delta = self._base(staleness, base_version)
        if delta is None:
            return grad
        # correction = λ0 · g ⊙ g ⊙ (w_now − w_base) / √(MeanSquare + ε), in scratch
        delta.mul_(grad).mul_(grad).div_(torch.add(self.mean_square, DC_EPS, out=self.work).sqrt_())
        delta.mul_(self.cfg.dc_lambda)
        applied.correction = _relative(delta, grad)
        return delta.add_(grad)

    def _gap_aware(
        self, grad: torch.Tensor, staleness: int, base_version: int, applied: Applied
    ) -> torch.Tensor:
        delta = self._base(staleness, base_version)
        if delta is None:
            return grad
        step = torch.add(self.mean_step, GAP_EPS, out=self.work)
        gap = delta.abs_().div_(step).clamp_(min=1.0)
        adjusted = torch.div(grad, gap, out=self.work)
        applied.correction = _relative(torch.sub(adjusted, grad, out=self.scratch), grad)
        return adjusted

    def state(self) -> dict[str, torch.Tensor]:
        """The policy's running statistics, for checkpoints (empty for stateless ones)."""
        out = {"mean_staleness": torch.tensor([self.mean_staleness], dtype=torch.float64)}
        if self.joined_at is not None:
            out["joined_at"] = torch.tensor([self.joined_at], dtype=torch.float64)
        if self.mean_square is not None:
            out["dc_mean_square"] = self.mean_square
        if self.mean_step is not None:
            out["gap_mean_step"] = self.mean_step
        return out

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if "mean_staleness" in tensors:
            self.mean_staleness = float(tensors["mean_staleness"][0])
        if "joined_at" in tensors:
            self.joined_at = int(tensors["joined_at"][0])
        for name, buf in (("dc_mean_square", self.mean_square), ("gap_mean_step", self.mean_step)):
            if buf is not None and name in tensors:
                buf.copy_(tensors[name])


@functools.lru_cache(maxsize=4096)
def stable_range(delay: int, momentum: float) -> float:
    """The largest ``a = lr·λ`` for which ``x ← x + μ(x − x₋₁) − a·x₋τ`` is stable.

    Stable means every root of the characteristic polynomial ``z^{τ+1} − (1+μ)z^τ +
    μz^{τ−1} + a`` (``z² − (1+μ−a)z + μ`` at τ = 0) lies inside the unit circle; found by
    bisection on ``a`` (the roots leave the circle once, as ``a`` grows from 0). At τ = 0
    it is ``2(1 + μ)``, the textbook bound of heavy-ball momentum. Past
    ``STABLE_MAX_DELAY`` it scales as ``1/(τ + 1)``, as it does well before that.
    """
    if delay > STABLE_MAX_DELAY:
        return stable_range(STABLE_MAX_DELAY, momentum) * (STABLE_MAX_DELAY + 1) / (delay + 1)
    if delay == 0:
        return 2.0 * (1.0 + momentum)
    coeffs = np.zeros(delay + 2)
    coeffs[0], coeffs[1], coeffs[2] = 1.0, -(1.0 + momentum), momentum

    def stable(a: float) -> bool:
        coeffs[-1] = a + (momentum if delay == 1 else 0.0)
        return float(np.abs(np.roots(coeffs)).max()) < 1.0

    low, high = 0.0, 2.0 * (1.0 + abs(momentum))
    for _ in range(40):  # 2^-40 of the bracket: far below what a rate needs
        middle = (low + high) / 2
        low, high = (middle, high) if stable(middle) else (low, middle)
    return low


def stable_share(mean_delay: float, momentum: float, base_momentum: float) -> float:
    """``S(τ̄, μ_e) / S(0, μ)``: the rate's share that keeps the stable range of the
    reference; ``τ̄`` fractional, linear between the delays on either side. ``μ_e`` is
    rounded to 1e-3 so that the solved ranges are cached."""
    momentum = round(momentum, 3)
    below = math.floor(mean_delay)
    frac = mean_delay - below
    s = (1 - frac) * stable_range(below, momentum) + frac * stable_range(below + 1, momentum)
    return s / stable_range(0, base_momentum)


def _relative(change: torch.Tensor, grad: torch.Tensor) -> float:
    norm = float(grad.norm())
    return float(change.norm()) / norm if norm > 0 else 0.0
