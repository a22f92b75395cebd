"""Run one worker through live shards beside torch.optim.SGD; print the comparison.

``python -m tests.exactness RULE tcp://a,tcp://b [WARMUP_EPOCHS [parts]]`` (used by
tests/test_serve.py in a fresh interpreter; the shards may run any staleness policy:
with one worker every push is fresh, and each policy is then the plain rule). The
reference trainer's loop (``torch.optim.SGD`` over the flat parameters, same seed,
batches, dropout masks, hyper-parameters and schedule, warm-up included) runs on its
own beside the worker, and after every step the weights the worker pulls from the
shards are compared with the reference's. Prints JSON: how many steps matched bit for
bit, the largest relative difference, and the shards' versions, examples and rate.
With ``parts`` the worker's push-and-pulls go in parts of ``PART_BYTES`` (each applied
as it arrives, where the shard can: server/parts.py), over loopback too.
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
PART_BYTES = 1 << 20  # 12 parts of each shard's 3 M parameters


def compare(
    rule: str, addresses: list[str], warmup_epochs: float = 0.0, parts: bool = False
) -> dict:
    """Train one worker through the shards and, beside it, the reference trainer's
    ``torch.optim.SGD`` on its own from the same seed, batches and schedule; after every
    step compare the weights the worker pulls with the reference's."""
    data = load_dataset("demo", "train", image_size=32)
    batches = [data.batch(torch.arange(i * BATCH, (i + 1) * BATCH)) for i in range(STEPS)]
    torch.manual_seed(123)  # the worker's own init must not matter: it pulls first
    model = build_model("googlenet", NUM_CLASSES)
    layout = Layout.of(model, "googlenet")
    weights, grads = flatten_into(model, layout)
    torch.manual_seed(0)  # the shards' --seed
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
    schedule = Schedule(
        lr=HP["lr"],
        decay=0.96,
        decay_epochs=0.5,
        dataset_size=DATASET_SIZE,
        warmup_epochs=warmup_epochs,
    )
    fresh, worst, exact_steps, examples = True, 0.0, 0, 0
    cfg = ClientConfig(
        servers=tuple(addresses),
        timeout_s=60,
        retries=1,
        wire_parts="on" if parts else "off",
        part_bytes=PART_BYTES,
    )
    with ParameterClient(cfg, layout) as client:
        client.connect()
        client.pull(weights)
        initial_match = torch.equal(weights, ref_weights.detach())
        for step, (images, labels) in enumerate(batches):
            # the worker: gradient at the pulled weights, pushed to the shards
            grads.zero_()
            torch.manual_seed(1000 + step)  # dropout masks, the same on both sides
            forward_backward(model, images, labels)
            if step % 2:  # push-and-pull: the weights come back with the push's reply
                results = client.push(grads, examples=len(labels), pull_into=weights)
            else:
                results = client.push(grads, examples=len(labels))
                client.pull(weights)
            fresh = fresh and all(r.applied and r.staleness == 0 for r in results)
            # the reference: its own step, from its own weights
            ref_grads.zero_()
            torch.manual_seed(1000 + step)
            forward_backward(ref_model, images, labels)
            opt.param_groups[0]["lr"] = schedule.lr_at(examples)
            opt.step()
            examples += len(labels)
            ref = ref_weights.detach()
            exact_steps += int(torch.equal(weights, ref))
            diff = (weights - ref).abs() / ref.abs().clamp(min=1e-3)
            worst = max(worst, float(diff.max()))
        stats = client.stats()
    return {
        "initial_match": initial_match,
        "bit_exact_steps": exact_steps,
        "worst_relative_diff": worst,
        "padding_zero": bool((weights[layout.parameters :] == 0).all()),
        "trained": not torch.equal(weights, initial_weights("googlenet", NUM_CLASSES, 0)[1]),
        "all_applied_fresh": fresh,
        "versions": [s["version"] for s in stats],
        "examples": stats[0]["examples"],
        "lr": stats[0]["lr"],
        "parts": [s["parts"] for s in stats],
        "in_parts": client.in_parts,
        "part_counts": client.part_counts,
    }


if __name__ == "__main__":
    warmup = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    parts = len(sys.argv) > 4 and sys.argv[4] == "parts"
    print(json.dumps(compare(sys.argv[1], sys.argv[2].split(","), warmup, parts)))
