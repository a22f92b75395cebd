"""Parameter-server throughput against raw ZeroMQ and the update rule against memcpy.

In one run, on the same machine:

1. raw pyzmq ROUTER/DEALER echo (a separate process) of one GoogLeNet-sized f32 vector:
   send N bytes, get N bytes back;
2. a push of the gradient plus a pull of the weights (the same 2·N bytes) through
   ``distbelief serve --shards S`` for each S;
3. the shard's update rule (one optimizer step over its slice) against ``copy_`` of
   the same bytes.

Prints each figure, its baseline and the ratio baseline time / our time (1.0 = as
fast as the baseline). Usage: ``python bench/ps_throughput.py [--shards 1,2] [--reps 10]``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from distbelief.server.rules import make_rule

from bench.common import median_time, process, ratio_line, shards
from distbelief.client import ClientConfig, ParameterClient
from distbelief.launcher import free_port_run
from distbelief.layout import Layout
from distbelief.models import build_model
from distbelief.tuning import keep_freed_memory

ECHO_SERVER = """
import sys, zmq
if sys.argv[2] == "tune":
    from distbelief.tuning import keep_freed_memory
    keep_freed_memory()
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.bind(sys.argv[1])
while True:
    s.send_multipart(s.recv_multipart(copy=False), copy=False)
"""


def zmq_echo_time(total: int, reps: int, tune: bool) -> float:
    import zmq

    address = f"tcp://127.0.0.1:{free_port_run(1, 21000)}"
    payload = torch.randn(total).numpy()
    with process([sys.executable, "-c", ECHO_SERVER, address, "tune" if tune else "plain"]):
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        time.sleep(0.5)

        def round_trip() -> None:
            sock.send_multipart([b"h", payload], copy=False)
            sock.recv_multipart(copy=False)

        try:
            return median_time(round_trip, reps)
        finally:
            sock.close(linger=0)
            ctx.term()


def ps_time(layout: Layout, num_shards: int, num_classes: int, reps: int, dtype: str) -> float:
    weights = torch.empty(layout.total)
    grads = torch.randn(layout.total) * 1e-6
    with shards(num_shards, "--num-classes", str(num_classes)) as addresses:
        cfg = ClientConfig(servers=tuple(addresses), wire_dtype=dtype, timeout_s=60)
        with ParameterClient(cfg, layout) as client:
            client.connect()

            def push_pull() -> None:
                client.push(grads, examples=1)
                client.pull(weights)

            return median_time(push_pull, reps)


def update_times(size: int, rule: str, reps: int) -> tuple[float, float]:
    src, dst = torch.randn(size), torch.empty(size)
    grad = torch.randn(size) * 1e-6
    r = make_rule(rule, torch.randn(size), weight_decay=2e-4, momentum=0.9)
    copy_s = median_time(lambda: dst.copy_(src), reps)
    apply_s = median_time(lambda: r.apply(grad, 0.01), reps)
    return copy_s, apply_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="1,2", help="comma-separated shard counts")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    args = parser.parse_args(argv)
    layout = Layout.of(build_model("googlenet", args.num_classes), "googlenet")
    mb = layout.total * 4 / 1e6
    print(
        f"GoogLeNet ({args.num_classes} classes, aux heads): {layout.total:,} parameters, "
        f"{mb:.1f} MB as f32; torch threads {torch.get_num_threads()}"
    )
    # two baselines: a plain pyzmq echo, and one whose processes get the malloc tuning
    # that shard and replica processes use (distbelief.tuning); this process is tuned
    # after the plain measurement, as a replica process is
    plain_s = zmq_echo_time(layout.total, args.reps, tune=False)
    keep_freed_memory()
    tuned_s = zmq_echo_time(layout.total, args.reps, tune=True)
    for num_shards in [int(x) for x in args.shards.split(",")]:
        ours = ps_time(layout, num_shards, args.num_classes, args.reps, args.dtype)
        name = f"pull+push, {num_shards} shard(s), {args.dtype}"
        print(ratio_line(name, "raw zmq echo (plain malloc)", plain_s, "distbelief", ours))
        print(ratio_line(name, "raw zmq echo (tuned malloc)", tuned_s, "distbelief", ours))
    for rule in ("momentum", "adagrad"):
        copy_s, apply_s = update_times(layout.total, rule, args.reps)
        print(ratio_line(f"update rule {rule} over {mb:.0f} MB", "memcpy", copy_s, "rule", apply_s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
