"""Staleness policies (server/staleness.py): exact at staleness 0, and each formula checked
against a direct computation at staleness > 0."""

from __future__ import annotations

import pytest
import torch
from distbelief.server.rules import Schedule, make_rule
from distbelief.server.staleness import (
    MIN_MOMENTUM,
    POLICIES,
    StalenessConfig,
    Updater,
    WeightHistory,
)

SIZE = 1000
MU, WD = 0.9, 2e-4


def updater(policy: str, w0: torch.Tensor, **kw) -> Updater:
    rule = make_rule("momentum", w0.clone(), weight_decay=WD, momentum=MU)
    return Updater(rule, Schedule(lr=0.1, dataset_size=100), StalenessConfig(policy=policy, **kw))


def grads(n: int) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [torch.randn(SIZE) for _ in range(n)]


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_is_plain_momentum_sgd_at_staleness_zero(policy):
    torch.manual_seed(0)
    w0 = torch.randn(SIZE)
    up = updater(policy, w0)
    ref = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([ref], lr=0.1, momentum=MU, weight_decay=WD)
    schedule = Schedule(lr=0.1, dataset_size=100)
    for version, g in enumerate(grads(20)):
        up.pulled(version)
        applied = up.apply(g, examples_before=8 * version, staleness=0, base_version=version)
        opt.param_groups[0]["lr"] = schedule.lr_at(8 * version)
        ref.grad = g.clone()
        opt.step()
        assert applied.correction == 0.0 and applied.momentum == MU
    assert torch.equal(up.weights, ref.detach())


def test_async_momentum_subtracts_the_implicit_momentum_of_the_mean_staleness():
    up = updater("async-momentum", torch.zeros(SIZE), staleness_decay=0.0)  # mean = last
    for tau, expected in [(1, MU - 0.5), (3, MU - 0.75), (31, MU - 31 / 32), (0, MU)]:
        applied = up.apply(grads(1)[0], examples_before=0, staleness=tau, base_version=0)
        assert applied.momentum == pytest.approx(expected)
        assert up.rule.optimizer.param_groups[0]["momentum"] == applied.momentum
    low = Updater(
        make_rule("momentum", torch.zeros(SIZE), weight_decay=0.0, momentum=0.2),
        Schedule(lr=0.1),
        StalenessConfig(policy="async-momentum", staleness_decay=0.0),
    )
    assert low.apply(grads(1)[0], examples_before=0, staleness=99, base_version=0).momentum == (
        MIN_MOMENTUM
    )
    slow = updater("async-momentum", torch.zeros(SIZE), staleness_decay=0.5)
    for _ in range(30):
        slow.apply(grads(1)[0], examples_before=0, staleness=3, base_version=0)
    assert slow.mean_staleness == pytest.approx(3.0)


def test_lr_scale_divides_the_rate_by_the_staleness():
    up = updater("lr-scale", torch.zeros(SIZE))
    assert up.apply(grads(1)[0], examples_before=0, staleness=4, base_version=0).lr == 0.025
    assert up.apply(grads(1)[0], examples_before=0, staleness=1, base_version=0).lr == 0.1


def test_dc_asgd_adds_the_adaptive_delay_compensation():
    torch.manual_seed(0)
    w0 = torch.randn(SIZE)
    up = updater("dc-asgd", w0, dc_lambda=0.5, dc_decay=0.9)
    g1, g2 = grads(2)
    up.pulled(0)  # a replica reads version 0 ...
    up.apply(g1, examples_before=0, staleness=0, base_version=0)  # ... another pushes
    w_base, w_now = w0, up.weights.clone()
    ms = 0.1 * 0.9 * g1 * g1 + 0.1 * g2 * g2  # MeanSquare after both pushes
    expected_g = g2 + 0.5 * g2 * g2 * (w_now - w_base) / torch.sqrt(ms + 1e-7)
    ref = make_rule("momentum", w_now.clone(), weight_decay=WD, momentum=MU)
    ref.load_state({"momentum": up.rule.state()["momentum"]})
    applied = up.apply(g2, examples_before=8, staleness=1, base_version=0)
    ref.apply(expected_g, 0.1)
    assert torch.allclose(up.weights, ref.weights, rtol=1e-6, atol=1e-7)
    correction = (expected_g - g2).norm() / g2.norm()
    assert applied.correction == pytest.approx(float(correction), rel=1e-5)
    assert applied.correction > 0


def test_gap_aware_divides_by_the_gap_in_units_of_the_mean_step():
    torch.manual_seed(0)
    w0 = torch.randn(SIZE)
    up = updater("gap-aware", w0, gap_decay=0.0)  # C = the last update's size
    g1, g2 = grads(2)
    up.pulled(0)
    up.apply(g1, examples_before=0, staleness=0, base_version=0)
    step = (up.weights - w0).abs()
    gap = ((up.weights - w0).abs() / (step + 1e-12)).clamp(min=1.0)  # about 1 everywhere
    assert torch.allclose(gap, torch.ones(SIZE), atol=1e-3)
    up.pulled(1)
    up.apply(g1, examples_before=8, staleness=0, base_version=1)
    step = up.mean_step.clone()
    w_now = up.weights.clone()
    gap = ((w_now - w0).abs() / (step + 1e-12)).clamp(min=1.0)  # two steps behind
    assert float(gap.mean()) > 1.5
    ref = make_rule("momentum", w_now.clone(), weight_decay=WD, momentum=MU)
    ref.load_state({"momentum": up.rule.state()["momentum"]})
    up.apply(g2, examples_before=16, staleness=2, base_version=0)
    ref.apply(g2 / gap, 0.1)
    assert torch.allclose(up.weights, ref.weights, rtol=1e-6, atol=1e-7)


def test_history_is_bounded_and_a_lost_base_is_applied_plain_and_counted():
    history = WeightHistory(SIZE, capacity=3)
    w = torch.zeros(SIZE)
    for version in range(10):
        history.remember(version, w.fill_(version))
    assert sorted(history.copies) == [7, 8, 9] and history.bytes == 3 * SIZE * 4
    assert float(history.get(8)[0]) == 8 and history.get(2) is None and history.misses == 1
    up = updater("dc-asgd", torch.zeros(SIZE), history=2)
    for version in range(3):
        up.pulled(version)
    applied = up.apply(grads(1)[0], examples_before=0, staleness=3, base_version=0)
    assert applied.correction == 0.0 and up.history.misses == 1


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown staleness policy"):
        StalenessConfig(policy="bogus")
    with pytest.raises(ValueError, match="at least 1"):
        StalenessConfig(history=0)
    rule = make_rule("adagrad", torch.zeros(8), weight_decay=0.0, momentum=0.0)
    with pytest.raises(ValueError, match="needs --rule momentum"):
        Updater(rule, Schedule(lr=0.1), StalenessConfig(policy="async-momentum"))


def test_linear_warmup_reaches_the_base_rate_and_then_steps_as_before():
    s = Schedule(lr=0.1, dataset_size=100, warmup_epochs=0.5, decay_epochs=1.0)
    assert s.lr_at(0) == pytest.approx(0.1 / 50)
    assert s.lr_at(24) == pytest.approx(0.1 * 25 / 50)
    assert s.lr_at(49) == 0.1 and s.lr_at(99) == 0.1
    assert s.lr_at(100) == pytest.approx(0.1 * 0.96)
    assert Schedule(lr=0.1, dataset_size=100).lr_at(0) == 0.1
