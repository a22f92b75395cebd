"""The exchange on rate-limited links between hosts: against the link's bound and gloo.

Runs on ``bench/netbed.py``'s test bed (network namespaces on a bridge, each host's
link a token bucket of ``--rate-mbit`` both ways; needs root), in one run:

1. **Exchange time** of the GoogLeNet vector (``--num-classes 1000``, f32: 13.4 M
   parameters, 54 MB) for 1, 2, 4 shard hosts × 1, 2, 4 worker hosts, one client per
   worker host exchanging the whole vector ``--reps`` times, all worker hosts at once,
   in three modes: **separate** (a push, then a pull: two round trips, the upload done
   before the download starts), **combined** (a push whose reply brings the weights
   back, whole slices sent one shard after the other so that the link uploads to one
   shard while the ones before answer; against ``--shards`` (8) shard processes spread
   over the shard hosts) and **parts** (the same push-and-pull in parts of
   ``--part-kib``, every shard at once, each part applied and answered as it arrives;
   against ``--parts-shards`` (1) shard process a shard host). The bound: moving N
   bytes up and N down over a full-duplex link of rate B takes at least N/B; a shard
   host's link carries (worker hosts / shard hosts) × N each way, so the bound is N/B ×
   max(1, workers/shard hosts). "all hosts": the round from the first start to the
   last end over the reps, against the same bound (fair to hosts served unevenly).
2. **gloo all-reduce** (as DDP does each step) of the same vector among the same
   worker hosts (2 and 4) on the same links, in f32 (DDP's default) and bf16; its bound
   is 2N(p−1)/(pB). Against the parameter server's push-and-pull in parts with as many
   shard hosts as worker hosts (BytePS's regime: the shard hosts bring their own
   links), in the same wire type.
3. **A real replica**: ``distbelief work`` (synthetic data, 32 px, ``--push-every 4``;
   ``REPLICA_VARIANTS``: f32 as it is, with ``--overlap``, with ``--overlap
   --wire-dtype bf16``, and that with whole slices) against ``distbelief serve
   --shards --replica-shards`` (2) on another host over a ``--rate-mbit`` link, and
   the same two processes on loopback; images/s of both and their ratio. With
   ``--pin`` (the default) the replica runs on core 0 and the shards on core 1, on the
   link and on loopback alike: two hosts do not share cores, and on this bed the
   emulated shard host would otherwise take the replica's (``--no-pin``: shared).

Usage: ``python -m bench.wire [--rate-mbit 1000] [--reps 6] [--shard-hosts 1,2,4]
[--worker-hosts 1,2,4] [--parts exchange,allreduce,replica]``; about 20 minutes at the
defaults. Internal: ``python -m bench.wire exchange|allreduce ...`` is what runs inside
a host.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import machine
from bench.netbed import NetBed, available
from distbelief.client import PART_BYTES, probe_stats

START_TIMEOUT_S = 180.0
RUN_TIMEOUT_S = 600.0
PORT = 5570
GLOO_PORT = 29511
HERE = [sys.executable, "-m", "bench.wire"]
EXCHANGE_MODES = {
    "separate": "a push, then a pull",
    "combined": "push-and-pull, whole slices one shard after the other",
    "parts": "push-and-pull in parts to every shard at once, each applied as it arrives",
}
# each names its wire type: `work`'s default (auto) would be bf16 between hosts
REPLICA_VARIANTS = {
    "plain": ["--wire-dtype", "f32"],
    "overlap": ["--overlap", "--wire-dtype", "f32"],
    "overlap-bf16": ["--overlap", "--wire-dtype", "bf16"],
    # the same with whole slices one shard after the other (parts are on between hosts)
    "overlap-bf16-whole": ["--overlap", "--wire-dtype", "bf16", "--wire-parts", "off"],
}


# -- inside a worker host --------------------------------------------------------------


def exchange_main(args: argparse.Namespace) -> None:
    """Exchange the whole vector with the shards ``--reps`` times; times as JSON."""
    import torch

    from distbelief.client import ClientConfig, ParameterClient
    from distbelief.layout import Layout
    from distbelief.models import build_model

    torch.set_num_threads(1)
    layout = Layout.of(build_model("googlenet", args.num_classes), "googlenet")
    weights = torch.zeros(layout.total)
    grads = torch.full((layout.total,), 1e-9)
    times: dict[str, list[float]] = {}
    spans: dict[str, list[float]] = {}  # wall-clock start and end of the timed exchanges
    retries = 0
    for mode in args.modes.split(","):
        cfg = ClientConfig(
            servers=tuple(args.servers.split(",")),
            wire_dtype=args.dtype,
            wire_parts="on" if mode == "parts" else "off",
            part_bytes=args.part_kib * 1024,
        )
        with ParameterClient(cfg, layout) as client:
            client.connect()
            client.pull(weights)
            _barrier(Path(args.sync), mode, args.out)
            spent = []
            for rep in range(args.reps + 1):  # the first is a warm-up
                began = time.perf_counter()
                if rep == 1:
                    spans[mode] = [time.time(), 0.0]  # the hosts share this machine's clock
                if mode == "separate":
                    client.push(grads, 1)
                    client.pull(weights)
                else:
                    client.push(grads, 1, pull_into=weights)
                if rep:
                    spent.append(time.perf_counter() - began)
            times[mode] = spent
            spans[mode][1] = time.time()
            retries += client.retries_total
    Path(args.out).write_text(json.dumps({"times": times, "spans": spans, "retries": retries}))


def allreduce_main(args: argparse.Namespace) -> None:
    """gloo all-reduce of the vector (``--dtype``) among ``--world`` hosts, ``--reps``
    times."""
    import torch
    import torch.distributed as dist

    from distbelief import protocol

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=args.init, rank=args.rank, world_size=args.world)
    try:
        tensor = torch.full((args.size,), 1e-9, dtype=protocol.DTYPES[args.dtype][0])
        spent = []
        for rep in range(args.reps + 1):
            dist.barrier()
            began = time.perf_counter()
            dist.all_reduce(tensor)
            tensor.div_(args.world)  # DDP averages the summed gradients
            if rep:
                spent.append(time.perf_counter() - began)
        Path(args.out).write_text(json.dumps({"times": spent}))
    finally:
        dist.destroy_process_group()


def _barrier(sync: Path, mode: str, me: str) -> None:
    """Say we are ready for ``mode``; wait for the driver's go (every host at once)."""
    (sync / f"ready-{mode}-{Path(me).name}").touch()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (sync / f"go-{mode}").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no go for {mode} from the driver")
        time.sleep(0.005)


def release(sync: Path, mode: str, count: int, procs) -> None:
    """The driver's side of :func:`_barrier`: go once ``count`` hosts are ready."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while len(list(sync.glob(f"ready-{mode}-*"))) < count:
        failed = [p for p in procs if p.poll() not in (None, 0)]
        if failed or time.monotonic() > deadline:
            logs = "\n".join(p.log_path.read_text()[-2000:] for p in failed)
            raise RuntimeError(f"the exchange clients did not get ready for {mode}:\n{logs}")
        time.sleep(0.01)
    (sync / f"go-{mode}").touch()


# -- the driver ------------------------------------------------------------------------


def vector_size(num_classes: int) -> int:
    from distbelief.layout import Layout
    from distbelief.models import build_model

    return Layout.of(build_model("googlenet", num_classes), "googlenet").total


def start_shards(bed: NetBed, shard_hosts: list[str], shards: int, num_classes: int, tmp: Path):
    """``--shards`` shard processes spread over ``shard_hosts``; their addresses once up."""
    addresses = []
    for i in range(shards):
        host = shard_hosts[i * len(shard_hosts) // shards]
        argv = [sys.executable, "-m", "distbelief", "serve", "--shard-index", str(i)]
        argv += ["--num-shards", str(shards), "--num-classes", str(num_classes)]
        argv += ["--bind", "0.0.0.0", "--port", str(PORT), "--metrics-port", "0"]
        argv += ["--threads", "1", "--log-level", "WARNING"]
        bed.popen(host, argv, tmp / f"shard{i}.log")
        addresses.append(f"tcp://{bed.addresses[host]}:{PORT + i}")
    _wait_answer(addresses, bed.started)
    return addresses


def run_all(
    bed: NetBed, hosts: list[str], argvs: list[list[str]], tmp: Path, modes: list[str] = ()
) -> list[dict]:
    """Run one command per host at once, each of ``modes`` started on every host at the
    same moment (:func:`release`); their JSON outputs (``--out``)."""
    procs, outs = [], []
    sync = Path(tempfile.mkdtemp(prefix="sync-", dir=tmp))
    for n, (host, argv) in enumerate(zip(hosts, argvs, strict=True)):
        out = tmp / f"out-{host}-{n}-{time.monotonic_ns()}.json"
        extra = ["--sync", str(sync)] if modes else []
        procs.append(bed.popen(host, [*argv, *extra, "--out", str(out)], tmp / f"{host}.log"))
        outs.append(out)
    for n, mode in enumerate(modes):
        release(sync, mode, len(procs), procs)
        if n == 0:
            cpu_before = cpu_times()
    for proc in procs:
        if proc.wait(RUN_TIMEOUT_S) != 0:
            raise RuntimeError(
                f"{proc.args}: exit {proc.returncode}\n{proc.log_path.read_text()[-2000:]}"
            )
    results = [json.loads(out.read_text()) for out in outs]
    if modes:
        results[0]["cpu_busy"] = busy_fraction(cpu_before, cpu_times())
    return results


def cpu_times() -> list[int]:
    """This machine's CPU time counters (``/proc/stat``'s first line)."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def busy_fraction(before: list[int], after: list[int]) -> float:
    """The share of the cores busy between two :func:`cpu_times` (1.0: every core)."""
    spent = [b - a for a, b in zip(before, after, strict=True)]
    return 1.0 - (spent[3] + spent[4]) / max(1, sum(spent))  # idle + iowait


def measure_exchange(
    args, hs: int, hw: int, tmp: Path, dtype: str | None = None, modes: list[str] | None = None
) -> dict[str, float]:
    """Each of ``modes`` (default ``--exchange-modes``) with ``hs`` shard hosts and
    ``hw`` worker hosts: the exchange's median time, the whole round's (``<mode> all``),
    retries and this machine's CPU use. Whole slices run against ``--shards`` shard
    processes spread over the shard hosts (their pipeline needs several a host);
    ``parts`` against ``--parts-shards`` a host (parts pipeline within one shard, and
    fewer flows a host burst less into its link's queue)."""
    modes = modes or args.exchange_modes.split(",")
    layouts = [(args.shards, [m for m in modes if m != "parts"])]
    layouts.append((args.parts_shards * hs, [m for m in modes if m == "parts"]))
    row: dict[str, float] = {"retries": 0, "cpu_busy": 0.0}
    for shards, group in (layout for layout in layouts if layout[1]):
        got = _measure_modes(args, hs, hw, tmp, dtype or args.dtype, group, shards)
        row["retries"] += got.pop("retries")
        row["cpu_busy"] = max(row["cpu_busy"], got.pop("cpu_busy"))
        row |= got
    return row


def _measure_modes(args, hs, hw, tmp, dtype, modes, shards) -> dict[str, float]:
    shard_hosts = [f"ps{i}" for i in range(hs)]
    workers = [f"w{i}" for i in range(hw)]
    with NetBed([*shard_hosts, *workers], rate_mbit=args.rate_mbit) as bed:
        servers = start_shards(bed, shard_hosts, shards, args.num_classes, tmp)
        argv = [*HERE, "exchange", "--servers", ",".join(servers), "--reps", str(args.reps)]
        argv += ["--num-classes", str(args.num_classes), "--modes", ",".join(modes)]
        argv += ["--dtype", dtype, "--part-kib", str(args.part_kib)]
        results = run_all(bed, workers, [argv] * hw, tmp, modes)
    row = {}
    for mode in modes:
        row[mode] = statistics.median(t for r in results for t in r["times"][mode])
        # every host's exchanges from the first start to the last end, per exchange: what
        # the links carried in all (a host served ahead of the others ends early, so its
        # own exchanges can look shorter than the bound, which assumes fair shares)
        first = min(r["spans"][mode][0] for r in results)
        row[mode + " all"] = (max(r["spans"][mode][1] for r in results) - first) / args.reps
    row["retries"] = sum(r["retries"] for r in results)
    row["cpu_busy"] = results[0]["cpu_busy"]
    return row


def measure_allreduce(args, hw: int, size: int, tmp: Path, dtype: str = "f32") -> float:
    workers = [f"w{i}" for i in range(hw)]
    with NetBed(workers, rate_mbit=args.rate_mbit) as bed:
        init = f"tcp://{bed.addresses['w0']}:{GLOO_PORT}"
        argvs = []
        for rank, host in enumerate(workers):
            argv = ["env", f"GLOO_SOCKET_IFNAME={bed.devices[host][1]}", *HERE, "allreduce"]
            argv += ["--init", init, "--rank", str(rank), "--world", str(hw)]
            argv += ["--size", str(size), "--reps", str(args.reps), "--dtype", dtype]
            argvs.append(argv)
        results = run_all(bed, workers, argvs, tmp)
    return statistics.median(t for r in results for t in r["times"])


def replica_images_per_s(args, tmp: Path, rate_mbit: float | None, flags: list[str]) -> dict:
    """``work`` (with ``flags``) against ``serve --shards --replica-shards``: over a
    rate-limited link between two hosts, or (``rate_mbit`` None) both on this host's
    loopback."""
    steps, count = args.replica_steps, args.replica_shards
    work = ["--cpu", "1", "--data", "synthetic", "--num-classes", "10"]
    work += ["--image-size", "32", "--batch-size", "32", "--push-every", "4", "--fetch-every", "4"]
    work += ["--steps", str(steps), "--metrics-port", "0", "--no-shared-memory"]
    work += ["--max-restarts", "0", "--log-level", "WARNING", *flags]
    serve = ["--shards", str(count), "--num-classes", "10", "--metrics-port", "0"]
    serve += ["--threads", "1"]
    serve += ["--log-level", "WARNING"]
    status_dir = tmp / f"status-{rate_mbit}-{time.monotonic_ns()}"
    distbelief = [sys.executable, "-m", "distbelief"]
    # --pin: each emulated host on a core of its own (the replica on core 0, the shards
    # on core 1), on the link and on loopback alike, as two real hosts would not share
    pinned = args.pin and shutil.which("taskset") and len(os.sched_getaffinity(0)) >= 2
    pin_work, pin_serve = (["taskset", "-c", "0"], ["taskset", "-c", "1"]) if pinned else ([], [])
    if rate_mbit is None:
        from bench.common import random_port_start
        from distbelief.launcher import free_port_run

        port = free_port_run(count, random_port_start())
        servers = [f"tcp://127.0.0.1:{port + i}" for i in range(count)]
        shard = subprocess.Popen(
            [*pin_serve, *distbelief, "serve", *serve, "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            _wait_answer(servers, [shard])
            subprocess.run(
                [
                    *pin_work,
                    *distbelief,
                    "work",
                    "--servers",
                    ",".join(servers),
                    *work,
                    "--status-dir",
                    str(status_dir),
                ],
                check=True,
                timeout=RUN_TIMEOUT_S,
                capture_output=True,
            )
        finally:
            shard.terminate()
            shard.wait(30)
    else:
        with NetBed(["ps", "w"], rate_mbit=rate_mbit) as bed:
            bed.popen(
                "ps",
                [*pin_serve, *distbelief, "serve", *serve, "--bind", "0.0.0.0"],
                tmp / "serve.log",
            )
            servers = [f"tcp://{bed.addresses['ps']}:{PORT + i}" for i in range(count)]
            _wait_answer(servers, bed.started)
            proc = bed.popen(
                "w",
                [
                    *pin_work,
                    *distbelief,
                    "work",
                    "--servers",
                    ",".join(servers),
                    *work,
                    "--status-dir",
                    str(status_dir),
                ],
                tmp / "work.log",
            )
            if proc.wait(RUN_TIMEOUT_S) != 0:
                raise RuntimeError(f"work failed:\n{proc.log_path.read_text()[-2000:]}")
    status = json.loads((status_dir / "replica-0.json").read_text())
    keys = ("images_per_s", "retries", "pushes", "pulls", "exchange_s")
    return {k: status[k] for k in keys} | {"pinned": bool(pinned)}


def _wait_answer(servers: list[str], procs) -> None:
    """Until every server answers; their processes' logs in the error if one exits."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not all(s is not None for s in probe_stats(servers, 1.0)):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            logs = "\n".join(
                p.log_path.read_text()[-1500:] for p in procs if getattr(p, "log_path", None)
            )
            raise RuntimeError(f"shards did not start:\n{logs}")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    ex = sub.add_parser("exchange")
    for name, kind in (
        ("--servers", str),
        ("--reps", int),
        ("--num-classes", int),
        ("--modes", str),
        ("--sync", str),
        ("--dtype", str),
        ("--part-kib", int),
        ("--out", str),
    ):
        ex.add_argument(name, type=kind, required=True)
    ar = sub.add_parser("allreduce")
    for name, kind in (
        ("--init", str),
        ("--rank", int),
        ("--world", int),
        ("--size", int),
        ("--reps", int),
        ("--dtype", str),
        ("--out", str),
    ):
        ar.add_argument(name, type=kind, required=True)
    parser.add_argument("--rate-mbit", type=float, default=1000.0)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument(
        "--shards", type=int, default=8, help="shard processes in all, whole-slice modes"
    )
    parser.add_argument(
        "--parts-shards", type=int, default=1, help="shard processes a shard host, parts mode"
    )
    parser.add_argument("--shard-hosts", default="1,2,4")
    parser.add_argument("--worker-hosts", default="1,2,4")
    parser.add_argument("--parts", default="exchange,allreduce,replica")
    parser.add_argument(
        "--dtype", default="f32", help="of the exchange part (the bound is always f32's N/B)"
    )
    parser.add_argument(
        "--part-kib", type=int, default=PART_BYTES // 1024, help="parts mode: KiB per part"
    )
    parser.add_argument(
        "--exchange-modes",
        default=",".join(EXCHANGE_MODES),
        help="of the exchange part: " + ", ".join(f"{k} ({v})" for k, v in EXCHANGE_MODES.items()),
    )
    parser.add_argument("--replica-steps", type=int, default=80)
    parser.add_argument("--replica-shards", type=int, default=2, help="serve --shards, replica")
    parser.add_argument("--replica-variants", default=",".join(REPLICA_VARIANTS))
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="replica part: the replica on core 0 and the shards on core 1, as two hosts "
        "would not share cores (needs taskset and 2 cores)",
    )
    args = parser.parse_args(argv)
    if args.command == "exchange":
        exchange_main(args)
        return 0
    if args.command == "allreduce":
        allreduce_main(args)
        return 0
    reason = available()
    if reason:
        print(f"bench.wire needs the network test bed: {reason}", file=sys.stderr)
        return 2
    parts = args.parts.split(",")
    size = vector_size(args.num_classes)
    n_bytes = 4 * size
    link_s = n_bytes * 8 / (args.rate_mbit * 1e6)  # N/B
    print(machine())
    print(
        f"links {args.rate_mbit:g} Mbit/s each way; GoogLeNet ({args.num_classes} classes): "
        f"{size:,} parameters, N = {n_bytes / 1e6:.1f} MB as f32, N/B = {link_s * 1e3:.0f} ms; "
        f"{args.shards} shards, {args.reps} reps, medians"
    )
    in_parts: dict[tuple[int, int], float] = {}
    with tempfile.TemporaryDirectory(prefix="db-wire-") as tmp_name:
        tmp = Path(tmp_name)
        if "exchange" in parts:
            modes = args.exchange_modes.split(",")
            print(
                "| shard hosts | worker hosts | bound | "
                + " | ".join(f"{m} | /bound | all hosts /bound" for m in modes)
                + " | retries | cores busy |"
            )
            print("|---|---|---|" + "---|---|---|" * len(modes) + "---|---|")
            for hs in (int(h) for h in args.shard_hosts.split(",")):
                for hw in (int(h) for h in args.worker_hosts.split(",")):
                    row = measure_exchange(args, hs, hw, tmp)
                    bound = link_s * max(1.0, hw / hs)
                    if "parts" in row:
                        in_parts[hs, hw] = row["parts"]
                    cells = " | ".join(
                        f"{row[m] * 1e3:.0f} ms | {row[m] / bound:.2f} | "
                        f"{row[m + ' all'] / bound:.2f}"
                        for m in modes
                    )
                    print(
                        f"| {hs} | {hw} | {bound * 1e3:.0f} ms | {cells} | {row['retries']} "
                        f"| {row['cpu_busy']:.0%} |",
                        flush=True,
                    )
        if "allreduce" in parts:
            print(
                "| worker hosts | wire type | gloo all-reduce | its bound 2N(p-1)/(pB) "
                "| PS push-and-pull in parts (as many shard hosts) | PS / gloo |"
            )
            print("|---|---|---|---|---|---|")
            for hw in (int(h) for h in args.worker_hosts.split(",") if int(h) >= 2):
                for dtype in ("f32", "bf16"):  # DDP's default; distbelief's between hosts
                    gloo = measure_allreduce(args, hw, size, tmp, dtype)
                    ps = in_parts.get((hw, hw)) if dtype == args.dtype else None
                    if ps is None:
                        ps = measure_exchange(args, hw, hw, tmp, dtype, ["parts"])["parts"]
                    bound = 2 * link_s * (hw - 1) / hw * (0.5 if dtype == "bf16" else 1.0)
                    print(
                        f"| {hw} | {dtype} | {gloo * 1e3:.0f} ms | {bound * 1e3:.0f} ms | "
                        f"{ps * 1e3:.0f} ms | {ps / gloo:.2f} |",
                        flush=True,
                    )
        if "replica" in parts:
            for name in args.replica_variants.split(","):
                flags = REPLICA_VARIANTS[name]
                slow = replica_images_per_s(args, tmp, args.rate_mbit, flags)
                fast = replica_images_per_s(args, tmp, None, flags)
                print(
                    f"replica {' '.join(flags) or '(no --overlap)'}"
                    f"{', each host on a core of its own' if slow['pinned'] else ''}, "
                    "synthetic 32 px, batch 32, "
                    f"--push-every 4 --fetch-every 4: {slow['images_per_s']:.1f} images/s on a "
                    f"{args.rate_mbit:g} Mbit/s link (exchange {slow['exchange_s']:.1f} s, "
                    f"retries {slow['retries']}), {fast['images_per_s']:.1f} on loopback "
                    f"(exchange {fast['exchange_s']:.1f} s): "
                    f"ratio {slow['images_per_s'] / fast['images_per_s']:.2f}",
                    flush=True,
                )
    return 0


def _exit_on_sigterm(*_: object) -> None:
    raise SystemExit(143)  # unwinds the ``with NetBed`` blocks: the bed is removed


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    raise SystemExit(main())
