"""``distbelief train``: flags to TrainConfig, the one-process reference trainer."""

from __future__ import annotations

import functools

import click

from distbelief.cli.options import augmentation_config, input_options, model_options, rule_options
from distbelief.config import config_option, option
from distbelief.logs import setup_logging


@click.command()
@config_option("train")
@option("--data", default="demo", help="demo, synthetic, or an ImageNet-style folder.")
@option("--image-size", type=click.IntRange(min=32), default=32)
@option("--batch-size", type=click.IntRange(min=1), default=64)
@input_options
@option("--steps", type=click.IntRange(min=1), default=None)
@option("--epochs", type=click.FloatRange(min=0, min_open=True), default=None)
@functools.partial(model_options, num_classes=None)
@rule_options
@option("--threads", type=click.IntRange(min=1), default=None, help="torch threads.")
@option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def train(as_json, threads, **kw) -> None:
    """Train in one process with torch.optim.SGD: the reference trainer."""
    import json

    from distbelief.data import DataError
    from distbelief.loader import default_loader_workers
    from distbelief.train import TrainConfig, train_reference

    setup_logging("train")
    kw = {k: v for k, v in kw.items() if k != "rule"}
    kw["augmentation"] = augmentation_config(kw)
    kw["decode"] = kw["decode"] or "loader"
    if kw["loader_workers"] is None:  # the same default as one CPU replica's
        kw["loader_workers"] = default_loader_workers(kw["data"], device="cpu", replicas=1, cores=1)
    try:
        cfg = TrainConfig(threads=threads, **kw)
        result = train_reference(cfg, show_progress=not as_json)
    except (ValueError, DataError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(result.summary()))
    else:
        click.echo(result.describe())
