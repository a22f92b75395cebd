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
        name, 257, weight_decay=kw.get("weight_decay", 0.0), momentum=kw.get("momentum", 0.0)
    )
    for g, lr in zip(grads, lrs, strict=True):
        g_before = g.clone()
        rule.apply(ours, g, lr)
        assert torch.equal(g, g_before), "a rule must not write to the gradient"
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
        make_rule("sgd", 3, weight_decay=0, momentum=0)
