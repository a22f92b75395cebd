"""Shard throughput as shards and clients grow: pushes/s and bytes/s.

For 1, 2, 4 shards (``distbelief serve --shards S``, real subprocesses) × 1, 2, 4, 8
synthetic clients (threads of this process, one ``ParameterClient`` each), every
client pushes a full-size gradient and pulls the full weights in a loop for
``--seconds``. Prints a table of pushes/s (summed over clients), bytes/s (push +
pull, both directions) and the CPU the shards and the clients used (as a share of
all cores); then, per shard count, where throughput stops growing. Baseline: one
client through one shard, so each cell's ratio is its speed-up over that.

Usage: ``python -m bench.scaling [--shards 1,2,4] [--clients 1,2,4,8] [--seconds 3]
[--transport tcp|ipc|shm]``.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import torch

from bench.common import TRANSPORTS, client_options, cpu_seconds, googlenet_layout, serve
from distbelief.client import ClientConfig, ParameterClient
from distbelief.layout import Layout
from distbelief.tuning import available_cores, keep_freed_memory

START_TIMEOUT_S = 300.0  # every client connects and does one warm-up exchange first


def measure(
    servers: list[str],
    serve_pid: int,
    layout: Layout,
    clients: int,
    seconds: float,
    dtype: str,
    transport: str = "tcp",
) -> tuple[float, float]:
    """Exchanges per second summed over ``clients``, and the CPU share of all cores used."""
    grads = torch.randn(layout.total) * 1e-6  # read only: every client may send it
    counts = [0] * clients
    errors: list[BaseException] = []
    ready = threading.Barrier(clients + 1)
    stop = threading.Event()

    def loop(i: int) -> None:
        cfg = ClientConfig(
            servers=tuple(servers),
            wire_dtype=dtype,
            timeout_s=60,
            worker=f"c{i}",
            **client_options(transport),
        )
        try:
            with ParameterClient(cfg, layout) as client:
                client.connect()
                weights = torch.empty(layout.total)
                client.push(grads, examples=1)
                client.pull(weights)
                ready.wait(START_TIMEOUT_S)
                while not stop.is_set():
                    client.push(grads, examples=1)
                    client.pull(weights)
                    counts[i] += 1
        except BaseException as exc:
            errors.append(exc)
            ready.abort()

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    try:
        ready.wait(START_TIMEOUT_S)
    except threading.BrokenBarrierError:
        raise RuntimeError(f"a client failed: {errors!r}") from None
    began, cpu0 = time.perf_counter(), cpu_seconds(serve_pid) + _own_cpu()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(START_TIMEOUT_S)
    elapsed = time.perf_counter() - began
    cpu = cpu_seconds(serve_pid) + _own_cpu() - cpu0
    if errors:
        raise RuntimeError(f"a client failed: {errors!r}")
    return sum(counts) / elapsed, cpu / (elapsed * available_cores())


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def saturation(rates: dict[int, float]) -> str:
    """The fewest clients that reach 90% of the best throughput seen."""
    best = max(rates.values())
    first = min(c for c, r in rates.items() if r >= 0.9 * best)
    if first == max(rates):
        return f"still growing at {first} clients ({best:.1f} pushes/s)"
    return f"saturates at {first} client(s): {rates[first]:.1f} pushes/s (best {best:.1f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="1,2,4")
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    parser.add_argument("--transport", default="tcp", choices=TRANSPORTS)
    args = parser.parse_args(argv)
    keep_freed_memory()  # as a replica process does
    layout = googlenet_layout(args.num_classes)
    wire = {"f32": 4, "bf16": 2, "f16": 2}[args.dtype]
    exchange_bytes = 2 * wire * layout.total
    print(
        f"one exchange = push + pull = {exchange_bytes / 1e6:.1f} MB ({args.dtype}), "
        f"over {args.transport}"
    )
    print(f"{'shards':>6} {'clients':>7} {'pushes/s':>9} {'MB/s':>8} {'CPU':>5}  vs 1x1")
    base = None
    for num_shards in [int(x) for x in args.shards.split(",")]:
        rates: dict[int, float] = {}
        classes = ("--num-classes", str(args.num_classes))
        with serve(num_shards, *classes, transport=args.transport) as (servers, proc):
            for clients in [int(x) for x in args.clients.split(",")]:
                rate, cpu = measure(
                    servers, proc.pid, layout, clients, args.seconds, args.dtype, args.transport
                )
                rates[clients] = rate
                base = base or rate
                print(
                    f"{num_shards:>6} {clients:>7} {rate:>9.1f} "
                    f"{rate * exchange_bytes / 1e6:>8.0f} "
                    f"{cpu:>5.0%}  ratio {rate / base:.2f}"
                )
        print(f"{num_shards} shard(s): {saturation(rates)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
