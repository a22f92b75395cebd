"""``distbelief evaluate``: top-1/top-5 of a checkpoint file or the live average."""

from __future__ import annotations

import click

from distbelief.cli.options import MODEL_CHOICES, curve_option
from distbelief.config import config_option, option
from distbelief.logs import setup_logging


@click.command()
@config_option("evaluate")
@click.argument("checkpoint", required=False, type=click.Path(dir_okay=False))
@option("--averager", default=None, help="Evaluate the live average at tcp://host:5590.")
@option("--data", default="demo", help="demo, synthetic, or an ImageNet-style folder.")
@option(
    "--crops",
    type=click.Choice(["1", "10", "144"]),
    default="1",
    help="Test crops per image, softmax averaged (section 7 of the paper).",
)
@option("--image-size", type=click.IntRange(min=32), default=32)
@option(
    "--model",
    type=MODEL_CHOICES,
    default=None,
    help="Model to evaluate (default: the averager's, else googlenet).",
)
@option(
    "--num-classes",
    type=click.IntRange(min=2),
    default=None,
    help="Default: the averager's, else the data set's class count.",
)
@option("--batch-size", type=click.IntRange(min=1), default=64)
@option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@curve_option(server=False)
def evaluate(
    checkpoint, averager, data, crops, image_size, model, num_classes, batch_size, as_json, curve
) -> None:
    """Top-1/top-5 of an exported or averaged model on held-out data."""
    import json

    from distbelief.checkpoint import CheckpointError
    from distbelief.data import DataError
    from distbelief.evaluation import evaluate_model, load_weights

    if (checkpoint is None) == (averager is None):
        raise click.UsageError("give a CHECKPOINT file or --averager tcp://host:port")
    setup_logging("evaluate")
    try:
        result = evaluate_model(
            load_weights(
                checkpoint=checkpoint,
                averager=averager,
                model=model,
                num_classes=num_classes,
                data=data,
                image_size=image_size,
                curve=curve,
            ),
            data=data,
            crops=int(crops),
            image_size=image_size,
            batch_size=batch_size,
            progress=not as_json,
        )
    except (CheckpointError, DataError, ValueError, ConnectionError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(
            f"top-1 {result['top1']:.2%}  top-5 {result['top5']:.2%}  "
            f"({result['examples']} images, {crops} crop(s))"
        )
