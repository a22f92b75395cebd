import pytest
import torch
from torch import nn

from distbelief.layout import SHARD_ALIGN, Layout, ShardPlan, flat_weights, flatten_into
from distbelief.models import build_model


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


@pytest.mark.parametrize("total,shards", [(100, 1), (1000, 3), (13_378_280, 4), (64 * 7, 7)])
def test_plan_tiles_the_vector_with_balanced_aligned_sizes(total, shards):
    ranges = ShardPlan(total=total, num_shards=shards).ranges()
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert all(start % SHARD_ALIGN == 0 for start, _ in ranges)
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 2 * SHARD_ALIGN


def test_plan_rejects_bad_counts():
    with pytest.raises(ValueError, match="at least 1"):
        ShardPlan(total=10, num_shards=0)
    with pytest.raises(ValueError, match="at least 64"):
        ShardPlan(total=200, num_shards=4)
    with pytest.raises(ValueError, match="out of range"):
        ShardPlan(total=1000, num_shards=2).range(2)


def test_layout_follows_named_parameters_order():
    model = small_model()
    layout = Layout.of(model, "mlp")
    names = [n for n, _ in model.named_parameters()]
    assert [e.name for e in layout.entries] == names
    assert layout.parameters == 5 * 7 + 7 + 7 * 3 + 3 == 66
    assert layout.total == 2 * SHARD_ALIGN  # padded, so no kernel sees a ragged tail
    assert [e.offset for e in layout.entries] == [0, 35, 42, 63]
    weights, grads = flatten_into(model, layout)
    model(torch.randn(4, 5)).sum().backward()
    assert not weights[66:].any() and not grads[66:].any()
    assert ShardPlan(total=layout.total, num_shards=2).ranges() == [(0, 64), (64, 128)]


def test_fingerprint_depends_on_model_classes_and_shards():
    a = Layout.of(build_model("googlenet", 10), "googlenet")
    b = Layout.of(build_model("googlenet", 11), "googlenet")
    assert a.fingerprint(2) == Layout.of(build_model("googlenet", 10), "googlenet").fingerprint(2)
    assert a.fingerprint(2) != a.fingerprint(3)
    assert a.fingerprint(2) != b.fingerprint(2)


def test_flatten_makes_parameters_and_grads_views_of_two_buffers():
    model = small_model()
    before = [p.detach().clone() for p in model.parameters()]
    layout = Layout.of(model, "mlp")
    weights, grads = flatten_into(model, layout)
    for p, old in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), old)
    # writing the flat buffer changes the model
    weights[:35] = 1.5
    assert torch.all(model[0].weight == 1.5)
    # backward accumulates into the flat gradient buffer, twice means twice
    x = torch.randn(4, 5)
    model(x).sum().backward()
    first = grads.clone()
    assert first.abs().sum() > 0
    model(x).sum().backward()
    torch.testing.assert_close(grads, 2 * first)
    for e, p in zip(layout.entries, model.parameters(), strict=True):
        assert p.grad.data_ptr() == grads[e.offset :].data_ptr()
    torch.testing.assert_close(flat_weights(model, layout), weights)
