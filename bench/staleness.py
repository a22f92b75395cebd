"""The staleness simulator: N asynchronous replicas in one process, at equal examples.

One process runs the shard's own update (:class:`distbelief.server.staleness.Updater`
over the rules of ``server/rules.py``, one shard holding the whole vector) and the
reference trainer's data order (``iterate_batches`` with its seed, its dropout masks),
but computes the gradient of update ``t`` on the weights of version ``t − τ``:

- ``τ = N − 1`` for N equal replicas pushing in turn (round robin: every other
  replica pushed once since this one pulled), ramping up from 0 at the start;
- or ``τ`` drawn from a staleness histogram a real run exported
  (``--staleness-from`` a shard's ``/metrics`` text: ``distbelief_shard_staleness``);
- with ``+warm`` after a policy, replica 0 trains alone (``τ = 0``) for
  ``--warm-start`` of the first epoch, the shards warm the rate up linearly over
  ``--lr-warmup-epochs``, and async-momentum-lr ramps its rate up from the stable
  policy's over ``--join-ramp-epochs`` after the join, as ``distbelief up
  --warm-start … --lr-warmup-epochs … --join-ramp-epochs …``.
- with ``--wire-dtypes f32,bf16``, each run also as over a wire of that type: the
  weights a replica pulls and the gradient it pushes rounded to it, as
  ``work --wire-dtype`` sends them (the shard keeps and updates f32);
- the Polyak average of the shard's vector (as ``distbelief average`` keeps it, the
  same :class:`~distbelief.server.averager.Average`) over every version from
  ``--polyak-from`` of the budget on, evaluated beside the iterate at each budget
  from there: the model ``up`` serves for inference, and a steadier figure than one
  snapshot of an asynchronous iterate;
- with ``--fresh-gradients``, every gradient is computed on the newest weights while
  the policy is still told the staleness the replicas would have had: the policy's
  rate and momentum without the delay, which separates what the delay costs from what
  the policy's smaller steps cost (an experiment; no real replica can do this);
- with ``--join-over J`` as well, replica 1 joins when the warm start ends and the
  others one by one over the next ``J`` of the first epoch (an experiment on the join
  shock; ``work`` has no such flag: ``bench/RESULTS.md`` says why).

With ``N = 1`` (τ = 0) it is the reference trainer (``distbelief train``) bit for bit
(``tests/test_staleness_sim.py``). It reports held-out top-1 at fixed example budgets
and the examples needed to reach ``--target``, over seeds, for every N and policy;
each policy is run on the same learning-rate grid (``--lrs``) and reported at its best
rate per N. Writes ``staleness.json`` and prints a table with the ratio to the
reference (N = 1) at equal examples.

Usage: ``python -m bench.staleness [--replicas 1,2,4,8,16,32] [--examples 25600] …``
(the full grid's cost is in bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import random
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from distbelief.server.averager import Average
from distbelief.server.rules import Schedule, make_rule
from distbelief.server.staleness import StalenessConfig, Updater

from bench.common import machine
from distbelief import protocol
from distbelief.cli import DEMO_JOIN_RAMP_EPOCHS
from distbelief.data import evaluate, iterate_batches, load_dataset
from distbelief.layout import Layout, flatten_into
from distbelief.models import build_model
from distbelief.train import forward_backward
from distbelief.tuning import available_cores

POLICY_SPECS = (
    "none",
    "async-momentum",
    "async-momentum-lr",
    "lr-scale",
    "dc-asgd",
    "gap-aware",
    "none+warm",
    "async-momentum+warm",
    "async-momentum-lr+warm",
    "async-momentum-stable+warm",
)


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    """One simulated run. ``policy`` is a staleness policy, optionally with ``+warm``."""

    replicas: int = 1
    policy: str = "none"
    seed: int = 0
    model: str = "googlenet"
    data: str = "demo"
    image_size: int = 32
    num_classes: int | None = None
    batch_size: int = 32
    examples: int = 25600
    budgets: tuple[int, ...] = ()  # evaluate at these examples (and at the end)
    lr: float = 0.005
    momentum: float = 0.9
    weight_decay: float = 0.0002
    warm_start: float = 0.2  # with +warm: share of the first epoch replica 0 trains alone
    join_over: float = 0.0  # with +warm: share of the first epoch the others join over
    lr_warmup_epochs: float = 0.0  # with +warm: linear warm-up of the rate
    staleness_histogram: tuple[tuple[int, float], ...] = ()  # (τ, probability); () = N−1
    staleness_decay: float = StalenessConfig.staleness_decay  # async-momentum's running mean
    dc_lambda: float = StalenessConfig.dc_lambda
    lr_power: float = StalenessConfig.lr_power
    join_ramp_epochs: float = StalenessConfig.join_ramp_epochs
    eval_examples: int = 1000
    threads: int | None = None
    wire_dtype: str = "f32"  # what pulled weights and pushed gradients are rounded to
    polyak_from: float = 0.5  # share of the budget after which versions enter the average
    fresh_gradients: bool = False  # gradients on the newest weights, the policy told τ

    @property
    def base_policy(self) -> str:
        return self.policy.removesuffix("+warm")

    @property
    def warm(self) -> bool:
        return self.policy.endswith("+warm")


@dataclass
class SimResult:
    config: SimConfig
    curve: list[tuple[int, float]] = field(default_factory=list)  # (examples, top-1)
    polyak: list[tuple[int, float]] = field(default_factory=list)  # the average's, from there
    seconds: float = 0.0
    weights: torch.Tensor | None = None
    average: torch.Tensor | None = None  # the Polyak average at the end (None if empty)

    def top1_at(self, examples: int) -> float:
        return next(t for e, t in self.curve if e >= examples)

    def to_json(self) -> dict:
        return {
            "config": asdict(self.config),
            "curve": self.curve,
            "polyak": self.polyak,
            "seconds": self.seconds,
        }


class StalenessModel:
    """τ for each update: round robin over N replicas, or draws from a histogram."""

    def __init__(self, cfg: SimConfig, warm_steps: int, join_steps: int = 0) -> None:
        self.cfg = cfg
        self.warm_steps = warm_steps
        self.join_steps = join_steps
        self.rng = random.Random(cfg.seed)  # not torch's: the dropout stream stays put
        taus, weights = (
            zip(*cfg.staleness_histogram, strict=True) if cfg.staleness_histogram else ((), ())
        )
        self.taus, self.weights = list(taus), list(weights)

    @property
    def max_tau(self) -> int:
        return max(self.taus) if self.taus else self.cfg.replicas - 1

    def tau(self, step: int) -> int:
        if step < self.warm_steps:
            return 0  # replica 0 alone
        since = step - self.warm_steps  # the others join with the weights of this version
        if self.taus:
            return min(since, self.rng.choices(self.taus, self.weights)[0])
        return min(since, self.active(since) - 1)

    def active(self, since: int) -> int:
        """Replicas pushing ``since`` updates after the warm start: replica 1 joins at
        once, the others one by one over ``join_steps`` (all at once when 0)."""
        n = self.cfg.replicas
        if self.join_steps <= 0 or n <= 2:
            return n
        return min(n, 2 + since * (n - 1) // self.join_steps)


def simulate(cfg: SimConfig) -> SimResult:
    """Train as ``cfg.replicas`` asynchronous replicas would; held-out top-1 at budgets."""
    began = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # the reference trainer's order of construction: data, seed, model (same RNG draws)
    train_set, val_set = _datasets(cfg.data, cfg.image_size, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, cfg.num_classes or train_set.num_classes)
    layout = Layout.of(model, cfg.model)
    replica, grads = flatten_into(model, layout)  # where gradients are computed
    shard = replica.clone()  # the shard's vector, updated by the shard's own code
    rule = make_rule("momentum", shard, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    warm = cfg.warm and cfg.replicas > 1
    schedule = Schedule(
        lr=cfg.lr,
        dataset_size=len(train_set),
        warmup_epochs=cfg.lr_warmup_epochs if warm else 0.0,
    )
    policy = StalenessConfig(
        policy=cfg.base_policy,
        staleness_decay=cfg.staleness_decay,
        dc_lambda=cfg.dc_lambda,
        lr_power=cfg.lr_power,
        join_ramp_epochs=cfg.join_ramp_epochs if warm else 0.0,
    )
    updater = Updater(rule, schedule, policy)
    warm_steps = math.ceil(cfg.warm_start * len(train_set) / cfg.batch_size) if warm else 0
    join_steps = math.ceil(cfg.join_over * len(train_set) / cfg.batch_size) if warm else 0
    staleness = StalenessModel(cfg, warm_steps, join_steps)
    history = [shard.clone() for _ in range(staleness.max_tau + 1)]  # ring: version % len
    wire = protocol.DTYPES[cfg.wire_dtype][0]
    scratch = None if wire is torch.float32 else torch.empty(replica.numel(), dtype=wire)

    def rounded(values: torch.Tensor) -> None:
        """``values`` as the wire carries them: converted as protocol.to_wire does, into
        one buffer reused every step, and back to f32."""
        if scratch is not None:
            values.copy_(scratch.copy_(values))

    batches = iterate_batches(train_set, batch_size=cfg.batch_size, seed=cfg.seed)
    budgets = sorted({*(b for b in cfg.budgets if b < cfg.examples), cfg.examples})
    average = Average(shard.numel(), "polyak", decay=0.999)
    average_from = cfg.polyak_from * cfg.examples
    result, examples = SimResult(config=cfg), 0
    model.train()
    for version in range(math.ceil(cfg.examples / cfg.batch_size)):
        _, images, labels = next(batches)
        base = version - staleness.tau(version)
        pulled = version if cfg.fresh_gradients else base
        with torch.no_grad():
            replica.copy_(history[pulled % len(history)])  # the weights this replica pulled
            rounded(replica)  # as they crossed the wire
        grads.zero_()
        forward_backward(model, images, labels)
        rounded(grads)  # as the push carries it
        updater.apply(grads, examples_before=examples, staleness=version - base, base_version=base)
        examples += len(labels)
        history[(version + 1) % len(history)].copy_(shard)
        updater.pulled(version + 1)  # the pusher pulls the new version at once
        if examples > average_from:
            average.add(shard, version + 1)
        while budgets and examples >= budgets[0]:
            budget = budgets.pop(0)
            result.curve.append((budget, _top1(model, replica, shard, val_set, cfg)))
            if average.count:
                result.polyak.append((budget, _top1(model, replica, average.value(), val_set, cfg)))
    result.seconds = time.perf_counter() - began
    result.weights = shard
    result.average = average.value() if average.count else None
    return result


@functools.lru_cache(maxsize=6)
def _datasets(data: str, image_size: int, seed: int):
    """The train and held-out splits, built once per process (a grid reuses them)."""
    return (
        load_dataset(data, "train", image_size=image_size, seed=seed),
        load_dataset(data, "val", image_size=image_size, seed=seed),
    )


def _top1(model, replica: torch.Tensor, weights: torch.Tensor, val_set, cfg: SimConfig) -> float:
    with torch.no_grad():
        replica.copy_(weights)
    scores = evaluate(model, val_set, crops=1, max_examples=cfg.eval_examples)
    model.train()
    return float(scores["top1"])


def read_histogram(path: str) -> tuple[tuple[int, float], ...]:
    """(τ, probability) from a shard's ``/metrics`` text (cumulative ``le`` buckets)."""
    from prometheus_client.parser import text_string_to_metric_families

    cumulative: dict[float, float] = {}
    for family in text_string_to_metric_families(Path(path).read_text()):
        if family.name != "distbelief_shard_staleness":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                le = float(sample.labels["le"])
                cumulative[le] = cumulative.get(le, 0.0) + sample.value
    if not cumulative:
        raise ValueError(f"{path}: no distbelief_shard_staleness histogram in it")
    out, below = [], 0.0
    for le in sorted(cumulative):
        count = cumulative[le] - below
        below = cumulative[le]
        if count > 0:  # a bucket's mass at its upper bound (the last, +Inf, at twice the top)
            tau = (
                int(le)
                if math.isfinite(le)
                else 2 * int(max(k for k in cumulative if math.isfinite(k)))
            )
            out.append((tau, count))
    total = sum(c for _, c in out)
    return tuple((t, c / total) for t, c in out)


def policy_flags(
    spec: str, warm_start: float, lr_warmup_epochs: float, join_ramp_epochs: float
) -> tuple[list, list]:
    """The ``serve`` and ``work`` flags of a policy spec such as ``async-momentum+warm``."""
    serve_flags = ["--staleness-policy", spec.removesuffix("+warm")]
    work_flags: list[str] = []
    if spec.endswith("+warm"):
        serve_flags += ["--lr-warmup-epochs", str(lr_warmup_epochs)]
        serve_flags += ["--join-ramp-epochs", str(join_ramp_epochs)]
        work_flags += ["--warm-start", str(warm_start)]
    return serve_flags, work_flags


# -- the grid ------------------------------------------------------------------------


def _run(cfg: SimConfig) -> dict:
    return simulate(cfg).to_json()


def grid(args: argparse.Namespace) -> list[SimConfig]:
    """Every (N, policy, lr, momentum, seed, wire type); one replica only with the first
    policy (with τ = 0 every policy is the reference trainer; over an f32 wire, bit for
    bit)."""
    histogram = read_histogram(args.staleness_from) if args.staleness_from else ()
    budgets = tuple(int(args.examples * k / args.points) for k in range(1, args.points))
    policies = args.policies.split(",")
    return [
        SimConfig(
            replicas=n,
            policy=policy,
            seed=seed,
            lr=lr,
            momentum=momentum,
            examples=args.examples,
            budgets=budgets,
            batch_size=args.batch_size,
            warm_start=args.warm_start,
            join_over=args.join_over,
            lr_warmup_epochs=args.lr_warmup_epochs,
            staleness_histogram=histogram if n > 1 else (),
            staleness_decay=args.staleness_decay,
            dc_lambda=args.dc_lambda,
            lr_power=args.lr_power,
            join_ramp_epochs=args.join_ramp_epochs,
            eval_examples=args.eval_examples,
            threads=args.threads,
            wire_dtype=wire,
            polyak_from=args.polyak_from,
            fresh_gradients=args.fresh_gradients,
        )  # fmt: skip
        for n, policy, lr, momentum, seed, wire in itertools.product(
            _numbers(args.replicas, int),
            policies,
            _numbers(args.lrs, float),
            _numbers(args.momenta, float),
            _numbers(args.seeds, int),
            args.wire_dtypes.split(","),
        )
        if n > 1 or policy == policies[0]
    ]


def _numbers(text: str, kind: type) -> list:
    return [kind(x) for x in text.split(",")]


def summarise(runs: list[dict], target: float) -> list[dict]:
    """Per (N, policy, wire type): the best rate by mean final top-1; its means over
    seeds. Ratios are to N = 1 over an f32 wire (the reference trainer)."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        c = run["config"]
        fresh = c.get("fresh_gradients", False)
        key = (c["replicas"], c["policy"], c["wire_dtype"], fresh, c["lr"], c["momentum"])
        groups.setdefault(key, []).append(run)
    best: dict[tuple, dict] = {}
    for (n, policy, wire, fresh, lr, momentum), group in groups.items():
        curves = [r["curve"] for r in group]
        averages = [r.get("polyak") or [] for r in group]
        final = statistics.mean(c[-1][1] for c in curves)
        reach = [next((e for e, t in c if t >= target), None) for c in curves]
        row = {
            "replicas": n,
            "policy": policy,
            "wire_dtype": wire,
            "fresh_gradients": fresh,
            "lr": lr,
            "momentum": momentum,
            "seeds": len(group),
            "top1": [statistics.mean(c[i][1] for c in curves) for i in range(len(curves[0]))],
            "top1_sd": statistics.stdev(c[-1][1] for c in curves) if len(curves) > 1 else 0.0,
            "budgets": [e for e, _ in curves[0]],
            # the Polyak average's top-1 at the budgets from --polyak-from on, its mean
            "polyak": [statistics.mean(a[i][1] for a in averages) for i in range(len(averages[0]))]
            if all(averages)
            else [],
            "polyak_budgets": [e for e, _ in averages[0]],
            "to_target": statistics.mean(reach) if None not in reach else None,
            "reached": sum(r is not None for r in reach),
        }
        which = (n, policy, wire, fresh)
        if which not in best or final > best[which]["top1"][-1]:
            best[which] = row
    rows = sorted(
        best.values(),
        key=lambda r: (r["replicas"], r["policy"], r["wire_dtype"], r["fresh_gradients"]),
    )
    ones = [r for r in rows if r["replicas"] == 1]
    reference = next((r for r in ones if r["wire_dtype"] == "f32"), ones[0] if ones else None)
    for row in rows:  # at equal examples: the same budget
        row["ratio"] = row["top1"][-1] / max(reference["top1"][-1], 1e-9) if reference else None
        row["polyak_ratio"] = (
            row["polyak"][-1] / max(reference["polyak"][-1], 1e-9)
            if reference and reference["polyak"] and row["polyak"]
            else None
        )
    return rows


def print_table(rows: list[dict], target: float) -> None:
    budgets = rows[0]["budgets"]
    head = " | ".join(f"top-1 @{b // 1000}k" if b >= 1000 else f"@{b}" for b in budgets)
    print(
        f"| N | policy | best lr, momentum | {head} | ratio | Polyak at the end | "
        f"Polyak ratio | examples to {target:.0%} |"
    )
    print("|---|---|---|" + "---|" * len(budgets) + "---|---|---|---|")
    for r in rows:
        cells = " | ".join(f"{t:.1%}" for t in r["top1"])
        reach = f"{r['to_target']:.0f}" if r["to_target"] is not None else "not all"
        ratio = f"ratio {r['ratio']:.2f}" if r["ratio"] is not None else "(no N = 1)"
        polyak = f"{r['polyak'][-1]:.1%}" if r["polyak"] else "—"
        polyak_ratio = f"{r['polyak_ratio']:.2f}" if r["polyak_ratio"] is not None else "—"
        wire = "" if r["wire_dtype"] == "f32" else f", {r['wire_dtype']} wire"
        wire += ", fresh gradients" if r["fresh_gradients"] and r["replicas"] > 1 else ""
        print(
            f"| {r['replicas']} | {r['policy']}{wire} | {r['lr']:g}, {r['momentum']:g} | {cells} "
            f"± {r['top1_sd']:.1%} | {ratio} | {polyak} | {polyak_ratio} | "
            f"{reach} ({r['reached']}/{r['seeds']}) |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", default="1,2,4,8,16,32")
    parser.add_argument("--policies", default=",".join(POLICY_SPECS), help="add +warm to any")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lrs", default="0.005", help="the tuning grid, the same for each policy")
    parser.add_argument("--examples", type=int, default=25600, help="budget per run")
    parser.add_argument("--points", type=int, default=4, help="evaluations per run")
    parser.add_argument("--target", type=float, default=0.5, help="top-1 to reach")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--momenta", default="0.9", help="the tuning grid's momentum values")
    parser.add_argument("--warm-start", type=float, default=0.2)
    parser.add_argument("--join-over", type=float, default=0.0)
    parser.add_argument("--lr-warmup-epochs", type=float, default=0.0)
    parser.add_argument("--staleness-decay", type=float, default=StalenessConfig.staleness_decay)
    parser.add_argument("--dc-lambda", type=float, default=StalenessConfig.dc_lambda)
    parser.add_argument("--lr-power", type=float, default=StalenessConfig.lr_power)
    parser.add_argument("--join-ramp-epochs", type=float, default=DEMO_JOIN_RAMP_EPOCHS)
    parser.add_argument(
        "--fresh-gradients",
        action="store_true",
        help="gradients on the newest weights, the policy told the replicas' staleness",
    )
    parser.add_argument("--staleness-from", default=None, help="a shard's /metrics text")
    parser.add_argument("--eval-examples", type=int, default=1000)
    parser.add_argument(
        "--polyak-from", type=float, default=0.5, help="share of the budget before the average"
    )
    parser.add_argument(
        "--wire-dtypes", default="f32", help="f32, bf16, f16: what pulls and pushes carry"
    )
    parser.add_argument(
        "--jobs", type=int, default=available_cores(), help="runs at once (processes)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", default="bench/out")
    args = parser.parse_args(argv)
    print(machine())
    configs = grid(args)
    print(f"{len(configs)} runs of {args.examples} examples, {args.jobs} at a time")
    began = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) if args.jobs > 1 else nullcontext() as pool:
        results = pool.map(_run, configs) if pool else map(_run, configs)
        runs = []
        for run in results:  # in order, as each finishes
            runs.append(run)
            c = run["config"]
            print(
                f"[{len(runs)}/{len(configs)}] N={c['replicas']} {c['policy']} "
                f"{c['wire_dtype']} lr {c['lr']:g} "
                f"seed {c['seed']}: top-1 {run['curve'][-1][1]:.1%} ({run['seconds']:.0f} s)",
                flush=True,
            )
    print(f"simulated in {time.perf_counter() - began:.0f} s")
    rows = summarise(runs, args.target)
    print_table(rows, args.target)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "staleness.json").write_text(json.dumps({"runs": runs, "summary": rows}, indent=1))
    print(f"wrote {out}/staleness.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
