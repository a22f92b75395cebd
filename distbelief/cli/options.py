"""Option specs and helpers that several ``distbelief`` commands share.

The update-rule, staleness and Downpour flags are lists of ``(flag, click kwargs)``
(``RULE_SPECS``, ``STALENESS_SPECS``, ``DOWNPOUR_SPECS``) so that a command can take
them with other defaults (``up``). ``--config FILE`` and the ``DISTBELIEF_*``
variables come from :mod:`distbelief.config` (``config_option``, ``option``).
"""

from __future__ import annotations

import click

from distbelief.config import option

MODEL_CHOICES = click.Choice(["googlenet"])
RULE_CHOICES = click.Choice(["momentum", "nesterov", "adagrad"])


def model_options(f, *, num_classes: int | None = 1000):
    """``--model``, ``--num-classes`` (None: the data set's class count) and ``--seed``."""
    f = option("--seed", type=int, default=0, help="Seed of the initial weights.")(f)
    f = option(
        "--num-classes",
        type=click.IntRange(min=2),
        default=num_classes,
        help="Classes of the model's classifier"
        + (" (default: the data set's class count)." if num_classes is None else "."),
    )(f)
    f = option("--model", type=MODEL_CHOICES, default="googlenet", help="Model to train.")(f)
    return f


def client_model_options(f):
    """``--model``/``--num-classes`` of a command that talks to the shards (``work``,
    ``average``): by default what the shards hold (:func:`model_from_servers`)."""
    f = option(
        "--num-classes",
        type=click.IntRange(min=2),
        default=None,
        help="Classes of the model's classifier (default: what the shards hold).",
    )(f)
    f = option(
        "--model",
        type=MODEL_CHOICES,
        default=None,
        help="Model to train (default: what the shards hold).",
    )(f)
    return f


def model_from_servers(kw: dict, servers: tuple[str, ...]) -> None:
    """Fill ``kw["model"]`` and ``kw["num_classes"]`` left out on the command line with
    what ``servers`` hold (``hello``, waiting for them as a replica would: ``--timeout-s``
    and ``--retries``). With both given nothing is asked: the fingerprint check at
    ``connect()`` then refuses a contradiction. A flag that contradicts the answer, a
    disagreement among the servers or no answer is a one-line error."""
    from distbelief.client import ServerRefused, ServerUnavailable, resolve_model

    try:
        kw["model"], kw["num_classes"] = resolve_model(
            servers,
            kw["model"],
            kw["num_classes"],
            timeout_s=kw["timeout_s"],
            retries=kw.get("retries", 5),
            curve=kw.get("curve"),
        )
    except ServerUnavailable as exc:
        raise click.ClickException(
            f"{exc}: cannot ask the shards which model they hold; start them first, or give "
            "--model and --num-classes"
        ) from None
    except (ServerRefused, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


RULE_SPECS = [
    ("--rule", dict(type=RULE_CHOICES, default="momentum", help="Update rule.")),
    (
        "--lr",
        dict(
            type=click.FloatRange(min=0, min_open=True),
            default=0.01,
            help="Initial learning rate (lr0).",
        ),
    ),
    (
        "--momentum",
        dict(
            type=click.FloatRange(0, 1, max_open=True),
            default=0.9,
            help="Momentum of momentum and nesterov.",
        ),
    ),
    (
        "--weight-decay",
        dict(
            type=click.FloatRange(min=0),
            default=0.0002,
            help="L2 penalty added to the gradient.",
        ),
    ),
    (
        "--lr-decay",
        dict(
            type=click.FloatRange(0, 1, min_open=True),
            default=0.96,
            help="Factor applied every --lr-decay-epochs.",
        ),
    ),
    (
        "--lr-decay-epochs",
        dict(
            type=click.FloatRange(min=0, min_open=True),
            default=8.0,
            help="Epochs between learning-rate cuts.",
        ),
    ),
    (
        "--lr-warmup-epochs",
        dict(
            type=click.FloatRange(min=0),
            default=0.0,
            help="Raise the learning rate linearly to --lr over these epochs (0: no warm-up).",
        ),
    ),
    (
        "--dataset-size",
        dict(
            type=click.IntRange(min=1),
            default=1_281_167,
            help="Training examples per epoch (drives the schedule; default ImageNet).",
        ),
    ),
]

STALENESS_SPECS = [
    (
        "--staleness-policy",
        dict(
            type=click.Choice(
                [
                    "none",
                    "async-momentum",
                    "async-momentum-lr",
                    "async-momentum-stable",
                    "lr-scale",
                    "dc-asgd",
                    "gap-aware",
                ]
            ),
            default="none",
            help="How shards adjust a stale push: none (plain Downpour), async-momentum, "
            "async-momentum-lr, async-momentum-stable, lr-scale, dc-asgd or gap-aware "
            "(docs/staleness.md).",
        ),
    ),
    (
        "--join-ramp-epochs",
        dict(
            type=click.FloatRange(min=0),
            default=0.0,
            help="async-momentum-lr: over this share of an epoch after the first stale push "
            "(the others joining), raise the rate from async-momentum-stable's to its own "
            "(0: none).",
        ),
    ),
    (
        "--dc-lambda",
        dict(
            type=click.FloatRange(min=0),
            default=2.0,
            help="DC-ASGD-a's lambda0 (dc-asgd policy).",
        ),
    ),
    (
        "--weight-history",
        dict(
            type=click.IntRange(min=1),
            default=64,
            help="Weight copies a shard keeps for dc-asgd and gap-aware (memory: this many "
            "times the shard's range).",
        ),
    ),
]


def staleness_options(f, **defaults):
    """The staleness-policy flags of serve and up."""
    return _add_options(f, STALENESS_SPECS, defaults)


def staleness_config(kw: dict):
    """Pop the staleness flags from ``kw`` into a StalenessConfig."""
    from distbelief.server.staleness import StalenessConfig

    return StalenessConfig(
        policy=kw.pop("staleness_policy"),
        join_ramp_epochs=kw.pop("join_ramp_epochs"),
        dc_lambda=kw.pop("dc_lambda"),
        history=kw.pop("weight_history"),
    )


def rule_options(f, **defaults):
    """The update-rule flags; ``defaults`` overrides their defaults (by flag name)."""
    return _add_options(f, RULE_SPECS, defaults)


def _add_options(f, specs, defaults):
    for decl, kw in reversed(specs):
        name = decl.split("/")[0].lstrip("-").replace("-", "_")
        f = option(decl, **(kw | ({"default": defaults[name]} if name in defaults else {})))(f)
    return f


def curve_option(*, server: bool):
    """``--curve DIR``: CURVE authentication and encryption with the keys in DIR; the
    folder is checked up front, so a missing key is a one-line error."""

    def check(ctx, param, value):
        if value is None:
            return None
        from distbelief.curve import Curve, CurveError

        try:
            Curve.load(value, server=False)  # every role is a client of some server
            if server:
                Curve.load(value, server=True)
        except CurveError as exc:
            raise click.BadParameter(str(exc)) from None
        return value

    return option(
        "--curve",
        type=click.Path(file_okay=False),
        default=None,
        callback=check,
        help="Key folder (distbelief keys generate): CURVE auth and encryption.",
    )


def servers_option(f):
    return option(
        "--servers",
        default="tcp://127.0.0.1:5570",
        help="Comma-separated shard addresses, in shard order.",
    )(f)


def split_servers(value: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in value.split(",") if a.strip())


def data_options(f, *, batch_size: int = 32):
    f = input_options(f)
    f = option("--batch-size", type=click.IntRange(min=1), default=batch_size)(f)
    f = option("--image-size", type=click.IntRange(min=32), default=32)(f)
    f = option("--data", default="demo", help="demo, synthetic, or an ImageNet-style folder.")(f)
    return f


def _range_text(ctx, param, value):
    """Check a ``MIN,MAX`` flag (``off`` too for --crop-scale); keep the text as given."""
    if value is not None:
        try:
            parse_range(value, allow_off=param.name == "crop_scale")
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def parse_range(text: str, *, allow_off: bool = False) -> tuple[float, float] | None:
    """``"0.08,1"`` → (0.08, 1.0); ``"off"`` → None where allowed."""
    if allow_off and text.strip().lower() == "off":
        return None
    parts = text.split(",")
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"expected MIN,MAX (two numbers), got {text!r}") from None
    if not 0 < low <= high:
        raise ValueError(f"need 0 < MIN ≤ MAX, got {text!r}")
    return low, high


# The input-pipeline flags, as `up` passes them on to `work` (name, flag when True, when False)
INPUT_FLAGS = (
    ("crop_scale", "--crop-scale", None),
    ("crop_ratio", "--crop-ratio", None),
    ("flip", "--flip", "--no-flip"),
    ("color_jitter", "--color-jitter", "--no-color-jitter"),
    ("loader_workers", "--loader-workers", None),
    ("decode", "--decode", None),
)


def input_options(f):
    """How training batches are made: the augmentation and the loader processes."""
    f = option(
        "--decode",
        type=click.Choice(["loader", "device"]),
        default=None,
        help="Where a folder's training JPEGs are decoded: in the loader processes (the "
        "default) or on the replica's device, a batch at a time (nvJPEG on a GPU).",
    )(f)
    f = option(
        "--loader-workers",
        type=click.IntRange(min=0),
        default=None,
        help="Processes decoding batches ahead of each replica (default: 0 for demo and "
        "synthetic data; for a folder 1 per CPU replica, the host's cores shared among GPU "
        "replicas).",
    )(f)
    f = option(
        "--color-jitter/--no-color-jitter",
        default=None,
        help="Photometric distortions of training images (default: on for folders, off "
        "for the demo set).",
    )(f)
    f = option(
        "--flip/--no-flip",
        default=None,
        help="Mirror half the training images (default: on; synthetic data is never augmented).",
    )(f)
    f = option(
        "--crop-ratio",
        default=None,
        callback=_range_text,
        help="Width/height range of the training crop, MIN,MAX (default 0.75,1.333).",
    )(f)
    f = option(
        "--crop-scale",
        default=None,
        callback=_range_text,
        help="Area range of the training crop as a fraction of the image, MIN,MAX, or off "
        "(default: 0.08,1 for folders, as the paper; off for the demo set).",
    )(f)
    return f


def augmentation_config(kw: dict):
    """Pop the augmentation flags from ``kw`` into the data source's Augmentation."""
    from distbelief.data import training_augmentation

    scale, ratio = kw.pop("crop_scale"), kw.pop("crop_ratio")
    try:
        return training_augmentation(
            kw["data"],
            crop_scale="default" if scale is None else parse_range(scale, allow_off=True),
            crop_ratio=None if ratio is None else parse_range(ratio),
            flip=kw.pop("flip"),
            color=kw.pop("color_jitter"),
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def input_flags(kw: dict) -> list[str]:
    """The input-pipeline flags the user set, as `distbelief work` takes them."""
    out: list[str] = []
    for name, flag, negative in INPUT_FLAGS:
        value = kw.get(name)
        if value is None:
            continue
        if negative is None:
            out += [flag, str(value)]
        else:
            out.append(flag if value else negative)
    return out


DOWNPOUR_SPECS = [
    (
        "--fetch-every",
        dict(type=click.IntRange(min=1), default=1, help="Pull the weights every N steps."),
    ),
    (
        "--push-every",
        dict(
            type=click.IntRange(min=1),
            default=1,
            help="Push the accumulated gradient every N steps.",
        ),
    ),
    (
        "--wire-dtype",
        dict(
            type=click.Choice(["auto", "f32", "bf16", "f16"]),
            default="auto",
            help="Element type on the wire (shards keep float32); auto: bf16 with shards "
            "on other hosts, f32 with those on this host (loopback, ipc).",
        ),
    ),
    (
        "--wire-parts",
        dict(
            type=click.Choice(["auto", "on", "off"]),
            default="auto",
            help="Push-and-pull in parts of 256 KiB, each applied and answered as it "
            "arrives (the upload and the download share the link); auto: with shards on "
            "other hosts.",
        ),
    ),
    (
        "--overlap/--no-overlap",
        dict(default=False, help="Push and pull in the background."),
    ),
    (
        "--shared-memory/--no-shared-memory",
        dict(
            default=False,
            help="Exchange payloads with shards on this host through /dev/shm (only "
            "headers cross the socket); other shards over the wire.",
        ),
    ),
    (
        "--warm-start",
        dict(
            type=click.FloatRange(0, 1),
            default=0.0,
            help="Share of the first epoch replica 0 trains alone before the others start "
            "(DistBelief's warm start; 0: all at once).",
        ),
    ),
    (
        "--data-order",
        dict(
            type=click.Choice(["auto", "dispatch", "static"]),
            default="auto",
            help="dispatch: train the chunks shard 0 hands out; static: the fixed share "
            "--first-replica of --total-replicas; auto: dispatch when the shards' "
            "--dataset-size is this data set's.",
        ),
    ),
    ("--steps", dict(type=click.IntRange(min=1), default=None, help="Steps per replica.")),
    (
        "--epochs",
        dict(
            type=click.FloatRange(min=0, min_open=True),
            default=None,
            help="Epochs over the data, shared by the replicas.",
        ),
    ),
]


STAGE_SPECS = [
    (
        "--stages",
        dict(
            type=click.IntRange(min=1),
            default=1,
            help="Split each replica into K stage processes (model parallelism).",
        ),
    ),
    (
        "--stage-cuts",
        dict(
            default=None,
            help="Blocks the stages after the first begin with, e.g. 4b or 3b,4e "
            "(default: balanced on measured block times).",
        ),
    ),
    (
        "--micro-batches",
        dict(
            type=click.IntRange(min=1),
            default=1,
            help="Micro-batches each batch is cut into, so that the stages work at once.",
        ),
    ),
    (
        "--stage-addresses",
        dict(
            default=None,
            help="Where stages 1..K-1 listen, e.g. tcp://10.0.0.2:5610,tcp://10.0.0.3:5610: "
            "they run there (work --stage I), not forked here.",
        ),
    ),
    (
        "--stage",
        dict(
            type=click.IntRange(min=0),
            default=None,
            help="With --stage-addresses: run only this stage of one replica (0: the one "
            "that reads the data).",
        ),
    ),
    (
        "--stage-transport",
        dict(
            type=click.Choice(["shm", "wire"]),
            default="shm",
            help="Activations between stages: shared memory, or TCP as between hosts.",
        ),
    ),
]


def stage_options(f):
    """The model-parallelism flags (``workers/pipeline.py``)."""
    return _add_options(f, STAGE_SPECS, {})


def downpour_options(f, **defaults):
    """The Downpour flags; ``defaults`` overrides their defaults (by flag name)."""
    return _add_options(f, DOWNPOUR_SPECS, defaults)
