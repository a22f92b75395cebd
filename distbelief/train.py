"""The reference trainer: plain single-process PyTorch, the yardstick for the cluster.

Same model, data, loss and schedule as the distributed system, with
``torch.optim.SGD`` doing the update. The distributed run with one replica and
``--fetch-every 1 --push-every 1`` must reproduce it; the benchmarks measure the
cluster's overhead and convergence against it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from distbelief.crops import Augmentation
from distbelief.data import evaluate, load_dataset
from distbelief.layout import Layout, flatten_into
from distbelief.loader import Loader
from distbelief.models import build_model, training_loss
from distbelief.progress import StepProgress
from distbelief.server.rules import Schedule

log = logging.getLogger(__name__)


def forward_backward(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """One forward and backward pass with the aux losses; gradients accumulate in place.

    Returns the training loss (main + 0.3·(aux1 + aux2)) as a float.
    """
    loss = training_loss(model(images), labels)
    loss.backward()
    return float(loss.detach())


def flat_sgd(
    model: nn.Module, model_name: str, **hyper: Any
) -> tuple[torch.optim.SGD, torch.Tensor]:
    """``torch.optim.SGD`` over the model's parameters laid out as one flat vector.

    The parameters become views into one flat buffer (as on a replica) and the
    optimizer steps that buffer as a single parameter. The update is the same
    arithmetic as SGD over the separate tensors, but every element takes the same
    vectorised path as on the shards (whose ranges and the padded total are multiples
    of 64), so a run through the shards reproduces this one bit for bit; per-tensor
    stepping differs in the last ulp at each tensor's tail, which training amplifies.
    Returns the optimizer
    and the flat gradient buffer (zero it before each accumulation).
    """
    weights, grads = flatten_into(model, Layout.of(model, model_name))
    flat = nn.Parameter(weights)  # shares memory with the model's parameters
    flat.grad = grads
    return torch.optim.SGD([flat], **hyper), grads


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: str = "googlenet"
    num_classes: int | None = None  # None: the data set's class count
    seed: int = 0
    data: str = "demo"
    image_size: int = 32
    batch_size: int = 64
    augmentation: Augmentation | None = None  # None: the data source's default
    loader_workers: int = 0  # processes decoding batches ahead of the loop
    decode: str = "loader"  # where a folder's training JPEGs are decoded: loader | device
    steps: int | None = None
    epochs: float | None = None  # used when steps is None; default 1 epoch
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0002
    lr_decay: float = 0.96
    lr_decay_epochs: float = 8.0
    lr_warmup_epochs: float = 0.0
    dataset_size: int | None = None  # None: the training set's size
    threads: int | None = None
    log_every: int = 20

    def __post_init__(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")


@dataclass
class TrainResult:
    steps: int
    examples: int
    seconds: float
    last_loss: float
    top1: float
    top5: float
    data_wait_s: float = 0.0  # seconds the loop waited for its next batch
    num_classes: int = 0  # of the classifier trained
    curve: list[tuple[int, float]] = field(default_factory=list)
    weights: torch.Tensor | None = field(default=None, repr=False)  # the final flat weights

    @property
    def images_per_s(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("curve", "weights")} | {
            "images_per_s": self.images_per_s
        }

    def describe(self) -> str:
        return (
            f"trained {self.steps} steps ({self.examples} images) in {self.seconds:.1f} s, "
            f"{self.images_per_s:.1f} images/s, last loss {self.last_loss:.4f}, "
            f"{self.data_wait_s / self.seconds if self.seconds else 0:.1%} of it waiting for data\n"
            f"held-out top-1 {self.top1:.2%}  top-5 {self.top5:.2%}"
        )


def train_reference(cfg: TrainConfig, *, show_progress: bool = True) -> TrainResult:
    """Train ``cfg.model`` with torch.optim.SGD and evaluate it on the held-out split."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train_set = load_dataset(
        cfg.data,
        "train",
        image_size=cfg.image_size,
        seed=cfg.seed,
        augmentation=cfg.augmentation,
        decode=cfg.decode,
    )
    val_set = load_dataset(cfg.data, "val", image_size=cfg.image_size, seed=cfg.seed)
    batches = Loader(
        train_set, batch_size=cfg.batch_size, seed=cfg.seed, workers=cfg.loader_workers
    )
    num_classes = cfg.num_classes or train_set.num_classes
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes)
    optimizer, grads = flat_sgd(
        model, cfg.model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    schedule = Schedule(
        lr=cfg.lr,
        decay=cfg.lr_decay,
        decay_epochs=cfg.lr_decay_epochs,
        dataset_size=cfg.dataset_size or len(train_set),
        warmup_epochs=cfg.lr_warmup_epochs,
    )
    total = cfg.steps or math.ceil((cfg.epochs or 1.0) * len(train_set) / cfg.batch_size)
    model.train()
    examples, loss, curve = 0, float("nan"), []
    began = time.perf_counter()
    with StepProgress("train", total, enabled=show_progress, log_every=cfg.log_every) as progress:
        for step in range(1, total + 1):
            _, images, labels = next(batches)
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr_at(examples)
            grads.zero_()
            loss = forward_backward(model, images, labels)
            optimizer.step()
            examples += len(labels)
            curve.append((step, loss))
            progress.update(step, loss=loss, examples=examples)
    seconds = time.perf_counter() - began
    batches.close()
    scores = evaluate(model, val_set, crops=1)
    return TrainResult(
        steps=total,
        examples=examples,
        seconds=seconds,
        last_loss=loss,
        top1=scores["top1"],
        top5=scores["top5"],
        data_wait_s=batches.data_wait_s,
        num_classes=num_classes,
        curve=curve,
        weights=optimizer.param_groups[0]["params"][0].detach().clone(),
    )
