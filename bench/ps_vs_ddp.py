"""Exchanging a GoogLeNet-sized gradient between 2 workers: shards vs DDP's all-reduce.

In one run, on the same machine, 2 worker processes each exchange a flat float32
vector of the model's size, ``--reps`` times, started together at a barrier:

- **DDP-style**: ``torch.distributed.all_reduce`` (gloo, TCP on loopback) of the
  flat gradient, as DistributedDataParallel does each step (bucketing aside);
- **parameter server**: a push of the gradient plus a pull of the weights through
  ``distbelief serve --shards 2`` (real subprocesses), with ``--wire-dtype`` f32
  and bf16, over loopback TCP, over Unix sockets (``serve --ipc-dir``) and through
  shared memory (``work --shared-memory``: only headers cross the socket). gloo has
  neither of the last two; on one host it uses TCP.

Prints the median time per exchange over both workers and the ratio DDP / ours
(≥ 1.0: the shards are at least as fast; target ≤ 1.0× DDP's time with f32, lower
with bf16). On a 2-core machine the 2 shard processes and the 2 workers share the
cores, while DDP's two processes have them to themselves.

GoogLeNet with 10 classes and its aux heads has 10,334,080 parameters (41 MB as f32).
Usage: ``python -m bench.ps_vs_ddp [--reps 10] [--num-classes 10] [--dtypes f32,bf16]
[--transports tcp,ipc,shm]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue
import statistics
import time
from typing import Any

import torch

from bench.common import (
    client_options,
    googlenet_layout,
    random_port_start,
    ratio_line,
    shards,
    split_transports,
    transports_argument,
)
from distbelief.launcher import free_port_run

WORKERS = 2
JOIN_TIMEOUT_S = 600.0
TORCH_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def _ddp_worker(rank: int, port: int, size: int, dtype: str, reps: int, out: Any) -> None:
    import torch.distributed as dist

    from distbelief.tuning import keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORKERS
    )
    try:
        grads = (torch.randn(size) * 1e-6).to(TORCH_DTYPES[dtype])
        times = []
        for i in range(reps + 1):  # the first is a warm-up
            dist.barrier()
            began = time.perf_counter()
            dist.all_reduce(grads)
            grads.div_(WORKERS)  # DDP averages the summed gradients
            if i:
                times.append(time.perf_counter() - began)
        out.put((rank, times))
    finally:
        dist.destroy_process_group()


def _ps_worker(
    rank: int,
    servers: list[str],
    transport: str,
    num_classes: int,
    dtype: str,
    reps: int,
    barrier,
    out,
) -> None:
    from distbelief.client import ClientConfig, ParameterClient
    from distbelief.tuning import keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(1)
    layout = googlenet_layout(num_classes, show=False)
    weights = torch.empty(layout.total)
    grads = torch.randn(layout.total) * 1e-6
    cfg = ClientConfig(
        servers=tuple(servers),
        wire_dtype=dtype,
        timeout_s=60,
        worker=f"w{rank}",
        **client_options(transport),
    )
    with ParameterClient(cfg, layout) as client:
        client.connect()
        times = []
        for i in range(reps + 1):
            barrier.wait(JOIN_TIMEOUT_S)
            began = time.perf_counter()
            client.push(grads, examples=1)
            client.pull(weights)
            if i:
                times.append(time.perf_counter() - began)
    out.put((rank, times))


def _gather(ctx, target, args_of) -> float:
    """Run WORKERS processes of ``target``; median of every worker's exchange times."""
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args_of(rank), out)) for rank in range(WORKERS)]
    for p in procs:
        p.start()
    try:
        times: list[float] = []
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for _ in procs:
            while True:
                try:
                    times += out.get(timeout=1.0)[1]
                    break
                except queue.Empty:
                    dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                    if dead or time.monotonic() > deadline:
                        raise RuntimeError(f"a worker failed (exit codes {dead})") from None
        return statistics.median(times)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(5)


def ddp_time(size: int, dtype: str, reps: int) -> float:
    ctx = mp.get_context("spawn")
    port = free_port_run(1, random_port_start())
    return _gather(ctx, _ddp_worker, lambda rank: (rank, port, size, dtype, reps))


def ps_time(num_classes: int, dtype: str, reps: int, transport: str) -> float:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(WORKERS)
    with shards(2, "--num-classes", str(num_classes), transport=transport) as servers:
        return _gather(
            ctx,
            _ps_worker,
            lambda rank: (rank, servers, transport, num_classes, dtype, reps, barrier),
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--num-classes", type=int, default=10)  # 10.3M parameters
    parser.add_argument("--dtypes", default="f32,bf16")
    transports_argument(parser, "tcp,ipc,shm")
    args = parser.parse_args(argv)
    transports = split_transports(args.transports)
    layout = googlenet_layout(args.num_classes)
    for dtype in args.dtypes.split(","):
        ddp_s = ddp_time(layout.total, dtype, args.reps)
        for transport in transports:
            ours = ps_time(args.num_classes, dtype, args.reps, transport)
            name = f"gradient exchange, 2 workers, {dtype}"
            baseline = f"DDP all_reduce (gloo, {dtype})"
            print(ratio_line(name, baseline, ddp_s, f"2 shards push+pull over {transport}", ours))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
