"""Run one worker through live shards beside torch.optim.SGD; print the comparison.

``python -m tests.exactness RULE tcp://a,tcp://b`` (used by tests/test_serve.py in a
fresh interpreter). At every step the reference optimizer (the reference trainer's
flat ``torch.optim.SGD``, same hyper-parameters and schedule) steps from the weights
the worker pulled with the gradient the worker pushed, and the shards' new weights
are compared with its result. Prints JSON: the largest relative difference over the
steps, and the shards' versions, examples and learning rate.
"""

from __future__ import annotations

import json
import sys

import torch
from distbelief.server.rules import Schedule
from distbelief.server.shard import initial_weights

from distbelief.client import ClientConfig, ParameterClient
from distbelief.data import load_dataset
from distbelief.layout import Layout, flatten_into
from distbelief.models import build_model
from distbelief.train import flat_sgd, forward_backward

NUM_CLASSES = 10
BATCH = 8
STEPS = 30
DATASET_SIZE = 32  # tiny, so the 0.96 step schedule kicks in every 2 steps (decay epochs 0.5)
HP = {"lr": 0.02, "momentum": 0.9, "weight_decay": 0.0005}


def compare(rule: str, addresses: list[str]) -> dict:
    """Train through the shards; beside it, step the reference SGD from the same weights
    with the same gradient at every step, and record how far the shards' result is."""
    data = load_dataset("demo", "train", image_size=32)
    batches = [data.batch(torch.arange(i * BATCH, (i + 1) * BATCH)) for i in range(STEPS)]
    torch.manual_seed(123)  # the worker's own init must not matter: it pulls first
    model = build_model("googlenet", NUM_CLASSES)
    layout = Layout.of(model, "googlenet")
    weights, grads = flatten_into(model, layout)
    torch.manual_seed(0)
    ref_model = build_model("googlenet", NUM_CLASSES)
    opt, ref_grads = flat_sgd(
        ref_model,
        "googlenet",
        lr=HP["lr"],
        momentum=HP["momentum"],
        weight_decay=HP["weight_decay"],
        nesterov=rule == "nesterov",
    )
    (ref_weights,) = opt.param_groups[0]["params"]
    schedule = Schedule(lr=HP["lr"], decay=0.96, decay_epochs=0.5, dataset_size=DATASET_SIZE)
    fresh, worst, examples = True, 0.0, 0
    cfg = ClientConfig(servers=tuple(addresses), timeout_s=60, retries=1)
    with ParameterClient(cfg, layout) as client:
        client.connect()
        client.pull(weights)
        initial_match = torch.equal(weights, ref_weights.detach())
        for step, (images, labels) in enumerate(batches):
            grads.zero_()
            torch.manual_seed(1000 + step)
            forward_backward(model, images, labels)
            results = client.push(grads, examples=len(labels))
            fresh = fresh and all(r.applied and r.staleness == 0 for r in results)
            # the reference takes the same step from the same weights with the same gradient
            with torch.no_grad():
                ref_weights.copy_(weights)
            ref_grads.copy_(grads)
            opt.param_groups[0]["lr"] = schedule.lr_at(examples)
            opt.step()
            examples += len(labels)
            client.pull(weights)
            diff = (weights - ref_weights.detach()).abs() / ref_weights.detach().abs().clamp(
                min=1e-3
            )
            worst = max(worst, float(diff.max()))
        stats = client.stats()
    return {
        "initial_match": initial_match,
        "worst_relative_diff": worst,
        "trained": not torch.equal(weights, initial_weights("googlenet", NUM_CLASSES, 0)[1]),
        "all_applied_fresh": fresh,
        "versions": [s["version"] for s in stats],
        "examples": stats[0]["examples"],
        "lr": stats[0]["lr"],
    }


if __name__ == "__main__":
    print(json.dumps(compare(sys.argv[1], sys.argv[2].split(","))))
