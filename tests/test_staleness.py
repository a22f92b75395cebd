"""Staleness policies (server/staleness.py): exact at staleness 0, and each formula checked
against a direct computation at staleness > 0."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from distbelief.server.rules import Schedule, make_rule
from distbelief.server.staleness import (
    MIN_MOMENTUM,
    POLICIES,
    STABLE_MAX_DELAY,
    StalenessConfig,
    Updater,
    WeightHistory,
    stable_range,
    stable_share,
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


def _replay_against_torch_sgd(policy: str, rate_share) -> torch.Tensor:
    """Push staleness 0, 3, 3, 1, 7, 0 (running mean with decay 0.5) through ``policy``;
    each push's momentum is async-momentum's and its rate ``0.1 · rate_share(mean,
    momentum)``; the weights are torch's SGD stepped with those. Returns w0."""
    torch.manual_seed(0)
    w0 = torch.randn(SIZE)
    up = updater(policy, w0, staleness_decay=0.5)
    ref = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([ref], lr=0.1, momentum=MU, weight_decay=WD)
    mean = 0.0
    for tau, g in zip([0, 3, 3, 1, 7, 0], grads(6), strict=True):
        mean = 0.5 * mean + 0.5 * tau
        momentum = max(MIN_MOMENTUM, MU - mean / (mean + 1))
        applied = up.apply(g, examples_before=0, staleness=tau, base_version=0)
        assert applied.momentum == pytest.approx(momentum)
        assert applied.lr == pytest.approx(0.1 * rate_share(mean, momentum))
        opt.param_groups[0].update(lr=applied.lr, momentum=applied.momentum)
        ref.grad = g.clone()
        opt.step()
    assert torch.allclose(up.weights, ref.detach(), rtol=1e-6, atol=1e-7)
    return w0


def test_async_momentum_lr_also_divides_the_rate_by_the_mean_staleness_plus_one():
    w0 = _replay_against_torch_sgd("async-momentum-lr", lambda mean, _: 1 / (mean + 1))
    g = grads(1)[0]
    root = updater("async-momentum-lr", w0, staleness_decay=0.0, lr_power=0.5)  # the simulator's
    assert root.apply(g, examples_before=0, staleness=3, base_version=0).lr == pytest.approx(0.05)
    with pytest.raises(ValueError, match="async-momentum-lr policy needs --rule momentum"):
        Updater(
            make_rule("adagrad", torch.zeros(8), weight_decay=0.0, momentum=0.0),
            Schedule(lr=0.1),
            StalenessConfig(policy="async-momentum-lr"),
        )


def _grows(a: float, delay: int, momentum: float, steps: int = 20_000) -> bool:
    """Run ``x ← x + μ(x − x₋₁) − a·x₋τ`` from a unit kick: does it blow up?"""
    xs = [0.0] * (delay + 1) + [1.0]
    for _ in range(steps):
        xs.append(xs[-1] + momentum * (xs[-1] - xs[-2]) - a * xs[-1 - delay])
        if abs(xs[-1]) > 1e6:
            return True
    return False  # bounded after 20,000 steps: below the range it decays geometrically


@pytest.mark.parametrize(("delay", "momentum"), [(0, 0.9), (1, 0.9), (3, 0.15), (15, -0.04)])
def test_stable_range_is_where_the_delayed_momentum_recurrence_stops_being_stable(delay, momentum):
    s = stable_range(delay, momentum)
    assert not _grows(0.97 * s, delay, momentum) and _grows(1.03 * s, delay, momentum)


def test_stable_range_known_values_and_its_extrapolation():
    assert stable_range(0, 0.9) == pytest.approx(3.8) and stable_range(0, 0.0) == 2.0
    # the stability table of bench/RESULTS.md
    assert stable_range(1, 0.9) == pytest.approx(0.10, abs=0.005)
    assert stable_range(3, 0.0) == pytest.approx(0.445, abs=0.005)
    assert stable_range(31, 0.15) == pytest.approx(0.042, abs=0.001)
    far = STABLE_MAX_DELAY * 4
    top = stable_range(STABLE_MAX_DELAY, 0.0)
    assert stable_range(far, 0.0) == pytest.approx(top * (STABLE_MAX_DELAY + 1) / (far + 1))
    assert stable_share(0.0, MU, MU) == 1.0  # no delay: the whole rate, exactly


def test_async_momentum_stable_scales_the_rate_to_keep_the_stable_range():
    def share(mean: float, momentum: float) -> float:
        # the sharpest stable curvature at this delay and momentum = the reference's
        lo, frac, m = int(mean), mean - int(mean), round(momentum, 3)
        s = (1 - frac) * stable_range(lo, m) + frac * stable_range(lo + 1, m)
        assert mean == 0 or s / (2 * (1 + MU)) < 1 / (mean + 1)  # below async-momentum-lr's
        return s / (2 * (1 + MU))

    _replay_against_torch_sgd("async-momentum-stable", share)


def test_async_momentum_lr_ramps_up_from_the_stable_rate_after_the_join():
    up = updater("async-momentum-lr", torch.zeros(SIZE), staleness_decay=0.0, join_ramp_epochs=0.5)
    g = grads(1)[0]
    assert up.apply(g, examples_before=0, staleness=0, base_version=0).lr == 0.1
    assert up.apply(g, examples_before=30, staleness=0, base_version=0).lr == 0.1
    momentum = MU - 3 / 4
    stable = 0.1 * stable_share(3.0, momentum, MU)
    # the first stale push at 40 examples: the ramp (0.5 × 100 examples) starts there
    assert up.apply(g, examples_before=40, staleness=3, base_version=0).lr == pytest.approx(stable)
    halfway = up.apply(g, examples_before=65, staleness=3, base_version=0).lr
    assert halfway == pytest.approx((stable + 0.1 / 4) / 2)
    assert up.apply(g, examples_before=90, staleness=3, base_version=0).lr == pytest.approx(0.1 / 4)
    assert up.state()["joined_at"].item() == 40  # kept in checkpoints
    again = updater(
        "async-momentum-lr", torch.zeros(SIZE), staleness_decay=0.0, join_ramp_epochs=0.5
    )
    again.load_state(up.state())
    assert again.apply(g, examples_before=65, staleness=3, base_version=0).lr == pytest.approx(
        halfway
    )


def test_the_cli_offers_every_policy():
    from distbelief.cli.options import STALENESS_SPECS

    # the CLI keeps its own list so that `--help` does not import torch; it must match
    choice = dict(STALENESS_SPECS)["--staleness-policy"]["type"]
    assert tuple(choice.choices) == POLICIES


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
    from distbelief.server.shard import ShardConfig

    with pytest.raises(ValueError, match="needs --rule momentum"):  # serve: before any start
        ShardConfig(rule="adagrad", staleness=StalenessConfig(policy="async-momentum"))


def test_linear_warmup_reaches_the_base_rate_and_then_steps_as_before():
    s = Schedule(lr=0.1, dataset_size=100, warmup_epochs=0.5, decay_epochs=1.0)
    assert s.lr_at(0) == pytest.approx(0.1 / 50)
    assert s.lr_at(24) == pytest.approx(0.1 * 25 / 50)
    assert s.lr_at(49) == 0.1 and s.lr_at(99) == 0.1
    assert s.lr_at(100) == pytest.approx(0.1 * 0.96)
    assert Schedule(lr=0.1, dataset_size=100).lr_at(0) == 0.1


# -- real processes ----------------------------------------------------------------


def _two_clients_at_version_0(servers, value: float):
    """Clients "a" and "b" of the 10-class GoogLeNet on ``servers``, both having pulled
    version 0, with a weights buffer and a gradient of ``value`` everywhere."""
    from distbelief.client import ClientConfig, ParameterClient
    from distbelief.layout import Layout
    from distbelief.models import build_model

    layout = Layout.of(build_model("googlenet", 10), "googlenet")
    cfg = dict(servers=tuple(servers), timeout_s=20, retries=1)
    a = ParameterClient(ClientConfig(worker="a", **cfg), layout)
    b = ParameterClient(ClientConfig(worker="b", **cfg), layout)
    weights, grad = torch.empty(layout.total), torch.full((layout.total,), value)
    for c in (a, b):
        c.connect()
        c.pull(weights)
    return a, b, weights, grad


def test_dc_asgd_shard_compensates_a_stale_push_and_exports_it(procs):
    import urllib.request

    from distbelief.client import probe_stats

    from .conftest import free_port

    metrics_port = free_port()
    addresses = procs.serve(
        2, "--num-classes", "10", "--staleness-policy", "dc-asgd", "--weight-history", "4"
    )
    # serve in the fixture turns metrics off: a second, single shard exports them
    metric_addr = procs.serve(
        1, "--num-classes", "10", "--staleness-policy", "dc-asgd", "--weight-history", "4",
        "--metrics-port", str(metrics_port), name="serve-metrics",
    )  # fmt: skip
    for servers in (addresses, metric_addr):
        a, b, weights, grad = _two_clients_at_version_0(servers, 1e-3)
        assert [r.staleness for r in b.push(grad, examples=8)] == [0] * len(servers)
        assert [r.staleness for r in a.push(grad, examples=8)] == [1] * len(servers)
        a.close()
        b.close()
    stats = probe_stats(addresses, 10)
    for s in stats:
        assert s["staleness_policy"] == "dc-asgd" and s["hparams"]["staleness_policy"] == "dc-asgd"
        assert s["correction"] > 0 and s["history_misses"] == 0  # a's base version was kept
        assert s["effective_momentum"] == 0.9 and s["staleness_mean"] > 0
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
    values = dict(
        line.rsplit(" ", 1) for line in text.decode().splitlines() if not line.startswith("#")
    )
    assert float(values["distbelief_shard_staleness_correction_ratio"]) > 0
    assert float(values["distbelief_shard_weight_history_bytes"]) > 0
    assert float(values["distbelief_shard_effective_learning_rate"]) == 0.01
    assert float(values["distbelief_shard_weight_history_misses_total"]) == 0


def test_a_shard_ramps_async_momentum_lr_up_from_the_stable_rate_after_the_join(procs):
    from distbelief.client import probe_stats

    lr, examples, dataset = 0.01, 8, 64
    addresses = procs.serve(
        2, "--num-classes", "10", "--staleness-policy", "async-momentum-lr", "--lr", str(lr),
        "--join-ramp-epochs", "0.5", "--dataset-size", str(dataset),
    )  # fmt: skip
    a, b, weights, grad = _two_clients_at_version_0(addresses, 1e-4)
    taus, rates = [], []
    for c in (b, a, b, a, b, a, b, a, b):  # b first (fresh), then a stale push: the join
        taus.append(c.push(grad, examples=examples)[0].staleness)
        rates.append(probe_stats(addresses, 10)[0]["effective_lr"])
        c.pull(weights)
    a.close()
    b.close()

    def replay(ramp: float) -> list[float]:
        """The same pushes through the shard's own Updater, in this process."""
        rule = make_rule("momentum", torch.zeros(4), weight_decay=0.0, momentum=0.9)
        cfg = StalenessConfig(policy="async-momentum-lr", join_ramp_epochs=ramp)
        up = Updater(rule, Schedule(lr=lr, dataset_size=dataset), cfg)
        return [
            up.apply(torch.zeros(4), examples_before=examples * i, staleness=t, base_version=0).lr
            for i, t in enumerate(taus)
        ]

    assert taus[0] == 0 and all(t > 0 for t in taus[1:]), taus
    assert rates == pytest.approx(replay(0.5), rel=1e-9)
    plain = replay(0.0)
    # the ramp (32 examples from the join at 8) holds the rate below async-momentum-lr's
    # and meets it at 40 examples: the sixth push on
    assert rates[0] == plain[0] == lr
    assert all(r < p for r, p in zip(rates[1:5], plain[1:5], strict=True)), (rates, plain)
    assert rates[5:] == pytest.approx(plain[5:], rel=1e-9)


def test_warm_start_holds_the_other_replicas_back_until_replica_0_has_trained(procs, tmp_path):
    import json

    from distbelief.client import probe_stats

    dataset_size, batch, steps = 160, 8, 12  # warm start 0.1: the first 16 examples alone
    addresses = procs.serve(1, "--num-classes", "10", "--dataset-size", str(dataset_size))
    status_dir = tmp_path / "status"
    proc = procs.start(
        "work", "--servers", addresses[0], "--cpu", "2", "--steps", str(steps),
        "--warm-start", "0.1", "--num-classes", "10", "--batch-size", str(batch),
        "--metrics-port", "0", "--status-dir", str(status_dir), name="work",
    )  # fmt: skip
    assert proc.wait(240) == 0, proc.log_path.read_text()[-3000:]
    first, second = (json.loads((status_dir / f"replica-{i}.json").read_text()) for i in (0, 1))
    assert first["warm_start_examples"] == 0  # replica 0 never waits
    assert second["warm_start_examples"] >= 0.1 * dataset_size  # the others start after it
    assert first["step"] == second["step"] == steps
    (stats,) = probe_stats(addresses, 10)
    assert stats["examples"] == 2 * steps * batch and stats["pushes"] == 2 * steps


def test_warm_start_steps_move_to_replica_0_and_the_total_stays():
    from distbelief.workers.replica import ReplicaConfig, replica_steps

    def steps(index: int, warm: float) -> int:
        cfg = ReplicaConfig(
            servers=("tcp://x:1",), index=index, num_replicas=4, batch_size=10,
            epochs=2.0, warm_start=warm,
        )  # fmt: skip
        return replica_steps(cfg, 1000)

    assert [steps(i, 0.0) for i in range(4)] == [50] * 4
    assert [steps(i, 0.2) for i in range(4)] == [65, 45, 45, 45]  # 20 warm steps, 5 each
    assert sum(steps(i, 0.2) for i in range(4)) == 200


def test_a_run_shorter_than_an_epoch_warms_up_on_a_share_of_the_run():
    from distbelief.workers.replica import ReplicaConfig, warm_start_examples

    def warm(**run) -> float:
        cfg = ReplicaConfig(servers=("tcp://x:1",), num_replicas=2, batch_size=16, **run)
        return warm_start_examples(replace(cfg, warm_start=0.2), 50_000)

    assert warm(epochs=2.0) == warm(epochs=1.0) == 0.2 * 50_000  # a share of the first epoch
    assert warm(epochs=0.5) == 0.2 * 25_000
    assert warm(steps=30) == 0.2 * 30 * 16 * 2  # `up --steps 30`: 960 examples in all
    assert warm(steps=10_000) == 0.2 * 50_000
