"""Run one worker through live shards beside the reference trainer; print the comparison.

``python -m tests.exactness RULE tcp://a,tcp://b`` (used by tests/test_serve.py in a
fresh interpreter). Prints JSON: whether the weights match within rtol 1e-5, the
largest difference, and the shards' versions, examples and learning rate.
"""

from __future__ import annotations

import json
import sys

import torch
from distbelief.server.rules import Schedule
from distbelief.server.shard import initial_weights

from distbelief.client import ClientConfig, ParameterClient
from distbelief.data import load_dataset
from distbelief.layout import Layout, flat_weights, flatten_into
from distbelief.models import build_model
from distbelief.train import flat_sgd, forward_backward

NUM_CLASSES = 10
BATCH = 8
STEPS = 30
DATASET_SIZE = 32  # tiny, so the 0.96 step schedule kicks in every 2 steps (decay epochs 0.5)
HP = {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.0005}


def reference_weights(rule: str, batches, hp) -> torch.Tensor:
    """The reference trainer's loop: torch.optim.SGD over the model's flat parameters."""
    torch.manual_seed(0)
    model = build_model("googlenet", NUM_CLASSES)
    opt, grads = flat_sgd(
        model,
        "googlenet",
        lr=hp["lr"],
        momentum=hp["momentum"],
        weight_decay=hp["weight_decay"],
        nesterov=rule == "nesterov",
    )
    schedule = Schedule(lr=hp["lr"], decay=0.96, decay_epochs=0.5, dataset_size=DATASET_SIZE)
    examples = 0
    for step, (images, labels) in enumerate(batches):
        opt.param_groups[0]["lr"] = schedule.lr_at(examples)
        grads.zero_()
        torch.manual_seed(1000 + step)  # dropout masks, the same on both sides
        forward_backward(model, images, labels)
        opt.step()
        examples += len(labels)
    return flat_weights(model, Layout.of(model, "googlenet"))


def compare(rule: str, addresses: list[str]) -> dict:
    data = load_dataset("demo", "train", image_size=32)
    batches = [data.batch(torch.arange(i * BATCH, (i + 1) * BATCH)) for i in range(STEPS)]
    torch.manual_seed(123)  # the worker's own init must not matter: it pulls first
    model = build_model("googlenet", NUM_CLASSES)
    layout = Layout.of(model, "googlenet")
    weights, grads = flatten_into(model, layout)
    fresh = True
    cfg = ClientConfig(servers=tuple(addresses), timeout_s=60, retries=1)
    with ParameterClient(cfg, layout) as client:
        client.connect()
        for step, (images, labels) in enumerate(batches):
            client.pull(weights)
            grads.zero_()
            torch.manual_seed(1000 + step)
            forward_backward(model, images, labels)
            results = client.push(grads, examples=len(labels))
            fresh = fresh and all(r.applied and r.staleness == 0 for r in results)
        client.pull(weights)
        stats = client.stats()
    expected = reference_weights(rule, batches, HP)
    close = torch.allclose(weights, expected, rtol=1e-5, atol=1e-7)
    return {
        "close": close,
        "max_abs_diff": float((weights - expected).abs().max()),
        "trained": not torch.equal(expected, initial_weights("googlenet", NUM_CLASSES, 0)[1]),
        "all_applied_fresh": fresh,
        "versions": [s["version"] for s in stats],
        "examples": stats[0]["examples"],
        "lr": stats[0]["lr"],
    }


if __name__ == "__main__":
    print(json.dumps(compare(sys.argv[1], sys.argv[2].split(","))))
