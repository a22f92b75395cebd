import pytest
import torch
from distbelief.server.rules import Schedule, make_rule


def run_rule(name: str, steps: int = 12, **kw):
    torch.manual_seed(0)
    w0 = torch.randn(257)
    grads = [torch.randn(257) for _ in range(steps)]
    lrs = [0.1 * 0.9**i for i in range(steps)]
    ours = w0.clone()
    rule = make_rule(
        name, ours, weight_decay=kw.get("weight_decay", 0.0), momentum=kw.get("momentum", 0.0)
    )
    for g, lr in zip(grads, lrs, strict=True):
        g_before = g.clone()
        rule.apply(g, lr)
        assert torch.equal(g, g_before), "a rule must not write to the gradient"
    assert rule.weights.data_ptr() == ours.data_ptr(), "the rule updates the slice in place"
    ref = torch.nn.Parameter(w0.clone())
    if name == "adagrad":
        opt = torch.optim.Adagrad([ref], lr=lrs[0], weight_decay=kw.get("weight_decay", 0.0))
    else:
        opt = torch.optim.SGD([ref], lr=lrs[0], nesterov=name == "nesterov", **kw)
    for g, lr in zip(grads, lrs, strict=True):
        opt.param_groups[0]["lr"] = lr
        ref.grad = g.clone()
        opt.step()
    return ours, ref.detach()


@pytest.mark.parametrize(
    "name,kw",
    [
        ("momentum", {"momentum": 0.9, "weight_decay": 2e-4}),
        ("momentum", {"momentum": 0.0, "weight_decay": 0.0}),
        ("nesterov", {"momentum": 0.9, "weight_decay": 1e-3}),
        ("adagrad", {"weight_decay": 0.0}),
        ("adagrad", {"weight_decay": 1e-2}),
    ],
)
def test_rules_match_torch_optimizers(name, kw):
    ours, ref = run_rule(name, **kw)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


def test_schedule_cuts_four_percent_every_eight_epochs():
    s = Schedule(lr=0.1, decay=0.96, decay_epochs=8, dataset_size=100)
    assert s.lr_at(0) == 0.1
    assert s.lr_at(799) == 0.1
    assert s.lr_at(800) == pytest.approx(0.096)
    assert s.lr_at(1600) == pytest.approx(0.1 * 0.96**2)
    assert s.epoch(250) == 2.5


@pytest.mark.parametrize(
    "kw", [{"lr": 0.0}, {"lr": float("nan")}, {"lr": 1, "decay": 1.5}, {"lr": 1, "dataset_size": 0}]
)
def test_schedule_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        Schedule(**kw)


def test_unknown_rule_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown update rule 'sgd'; known: momentum"):
        make_rule("sgd", torch.zeros(3), weight_decay=0, momentum=0)


@pytest.mark.parametrize("name", ["momentum", "nesterov", "adagrad"])
def test_rule_state_round_trips(name):
    torch.manual_seed(1)
    grads = [torch.randn(50) for _ in range(6)]
    a = make_rule(name, torch.ones(50), weight_decay=1e-3, momentum=0.9)
    for g in grads[:3]:
        a.apply(g, 0.1)
    b = make_rule(name, a.weights.clone(), weight_decay=1e-3, momentum=0.9)
    b.load_state({k: v.clone() for k, v in a.state().items()})
    for g in grads[3:]:
        a.apply(g, 0.1)
        b.apply(g, 0.1)
    assert torch.equal(a.weights, b.weights)
