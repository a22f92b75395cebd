"""``distbelief evaluate``: load a model's weights from a file or a live averager, score it."""

from __future__ import annotations

import logging
from typing import Any

import torch
from rich.progress import Progress
from torch import nn

from distbelief.checkpoint import CheckpointError, load_checkpoint
from distbelief.client import ClientConfig, ParameterClient, resolve_model
from distbelief.data import evaluate, load_dataset
from distbelief.layout import Layout, flatten_into
from distbelief.models import build_model

log = logging.getLogger(__name__)


def load_weights(
    *,
    checkpoint: str | None,
    averager: str | None,
    model: str | None,
    num_classes: int | None,
    data: str,
    image_size: int,
    curve: str | None = None,
) -> nn.Module:
    """A model in eval mode with weights from a state_dict checkpoint or from an averager.

    Left out, the model and class count are the averager's (it says in ``hello``); for a
    checkpoint, GoogLeNet with the data set's class count."""
    if averager is not None:
        model, num_classes = resolve_model(
            (averager,), model, num_classes, timeout_s=30, retries=1, curve=curve,
            where="the averager",
        )  # fmt: skip
    model = model or "googlenet"
    if num_classes is None:
        num_classes = load_dataset(data, "val", image_size=image_size).num_classes
    net = build_model(model, num_classes)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, require_digest=False).tensors
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{checkpoint} does not fit {model} with {num_classes} classes: "
                f"missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}"
            )
    else:
        layout = Layout.of(net, model)
        weights, _ = flatten_into(net, layout)
        with ParameterClient(
            ClientConfig(servers=(averager,), timeout_s=30, retries=1, curve=curve), layout
        ) as client:
            client.connect()
            with torch.no_grad():
                client.pull(weights)
    return net.eval()


def evaluate_model(
    net: nn.Module, *, data: str, crops: int, image_size: int, batch_size: int, progress: bool
) -> dict[str, Any]:
    """Top-1/top-5 over the held-out split, with a progress bar when asked."""
    val = load_dataset(data, "val", image_size=image_size)
    if not progress:
        return evaluate(net, val, crops=crops, batch_size=batch_size)
    with Progress(transient=True) as bar:
        task = bar.add_task(f"evaluating ({crops} crop(s))", total=len(val))
        result = evaluate(
            net,
            val,
            crops=crops,
            batch_size=batch_size,
            progress=lambda done, n: bar.update(task, completed=done, total=n),
        )
    return result
