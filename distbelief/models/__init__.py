"""Models trained by distbelief, and a small registry to build them by name."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from distbelief.models.googlenet import (
    GoogLeNet,
    GoogLeNetOutputs,
    googlenet,
    main_logits,
    training_loss,
)

__all__ = [
    "MODELS",
    "MODEL_NAMES",
    "GoogLeNet",
    "GoogLeNetOutputs",
    "build_model",
    "googlenet",
    "main_logits",
    "training_loss",
]

MODELS: dict[str, Callable[..., nn.Module]] = {"googlenet": googlenet}
MODEL_NAMES = tuple(MODELS)


def build_model(name: str, num_classes: int, aux_logits: bool = True) -> nn.Module:
    """Build the registered model ``name``; raises ValueError for an unknown name."""
    try:
        factory = MODELS[name]
    except KeyError:
        known = ", ".join(MODEL_NAMES)
        raise ValueError(f"unknown model {name!r}; known: {known}") from None
    return factory(num_classes=num_classes, aux_logits=aux_logits)
