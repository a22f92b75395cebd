"""Pull+push through the shards against a raw pyzmq echo of the same bytes.

In one run, on the same machine: a pyzmq ROUTER/DEALER echo (a separate process) of
one GoogLeNet-sized f32 vector (send N bytes, get N bytes back), then a push of the
gradient (applied by the shard's update rule) plus a pull of the weights, the same
2·N bytes, through ``distbelief serve --shards S`` for each S. Two baselines: a plain
echo, and one whose processes get the malloc tuning that shards and replicas use
(``distbelief.tuning``). Prints both times and the ratio baseline / ours (target ≥ 0.8).
Each transport is compared with an echo over the same transport: ``tcp`` (loopback)
and ``ipc`` (Unix sockets: ``serve --ipc-dir``). ``shm`` (headers over TCP, payloads
through shared memory: ``work --shared-memory``, what ``distbelief up`` uses on one
host) has no ZeroMQ counterpart; it is compared with the TCP echo of the same bytes.

Usage: ``python -m bench.ps_vs_zmq [--shards 1,2,4] [--reps 10] [--num-classes 1000]
[--transports tcp,ipc,shm]``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time

import torch

from bench.common import (
    client_options,
    googlenet_layout,
    median_time,
    process,
    random_port_start,
    ratio_line,
    shards,
    split_transports,
    stderr_tail,
    transports_argument,
)
from distbelief.client import ClientConfig, ParameterClient
from distbelief.launcher import free_port_run
from distbelief.layout import Layout
from distbelief.tuning import keep_freed_memory

ECHO_OVER = {"shm": "tcp"}  # ZeroMQ has no shared-memory transport: the TCP echo

ECHO_SERVER = """
import sys, zmq
if sys.argv[2] == "tune":
    from distbelief.tuning import keep_freed_memory
    keep_freed_memory()
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER); s.bind(sys.argv[1])
while True:
    s.send_multipart(s.recv_multipart(copy=False), copy=False)
"""


def zmq_echo_time(total: int, reps: int, tune: bool, transport: str = "tcp") -> float:
    """Median round trip of ``total`` float32 through a pyzmq echo process."""
    with contextlib.ExitStack() as stack:
        if transport == "ipc":
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="db-echo-"))
            address = f"ipc://{folder}/echo.sock"
        else:
            address = f"tcp://127.0.0.1:{free_port_run(1, random_port_start())}"
        return _echo_time(address, total, reps, tune)


def _echo_time(address: str, total: int, reps: int, tune: bool) -> float:
    import zmq

    payload = torch.randn(total).numpy()
    with process([sys.executable, "-c", ECHO_SERVER, address, "tune" if tune else "plain"]) as echo:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        time.sleep(0.5)

        def round_trip() -> None:
            sock.send_multipart([b"h", payload], copy=False)
            if not sock.poll(60_000):
                died = stderr_tail(echo) if echo.poll() is not None else ""
                raise TimeoutError(f"the echo process did not answer in 60 s {died}")
            sock.recv_multipart(copy=False)

        try:
            return median_time(round_trip, reps)
        finally:
            sock.close(linger=0)
            ctx.term()


def ps_time(
    layout: Layout, num_shards: int, num_classes: int, reps: int, dtype: str, transport: str
) -> float:
    """Median push of a gradient plus pull of the weights through ``num_shards`` shards."""
    weights = torch.empty(layout.total)
    grads = torch.randn(layout.total) * 1e-6
    with shards(num_shards, "--num-classes", str(num_classes), transport=transport) as addresses:
        cfg = ClientConfig(
            servers=tuple(addresses), wire_dtype=dtype, timeout_s=60, **client_options(transport)
        )
        with ParameterClient(cfg, layout) as client:
            client.connect()

            def push_pull() -> None:
                client.push(grads, examples=1)
                client.pull(weights)

            return median_time(push_pull, reps)


def run(
    layout: Layout,
    shard_counts: list[int],
    num_classes: int,
    reps: int,
    dtype: str,
    transports: list[str],
) -> None:
    """Measure and print, per transport, the echo baselines and each shard count's ratios.

    The plain echo goes first for every transport: once this process is tuned
    (``keep_freed_memory``) it cannot be untuned."""
    echoes = sorted({ECHO_OVER.get(t, t) for t in transports})
    plain = {t: zmq_echo_time(layout.total, reps, tune=False, transport=t) for t in echoes}
    keep_freed_memory()
    tuned = {t: zmq_echo_time(layout.total, reps, tune=True, transport=t) for t in echoes}
    for transport in transports:
        over = ECHO_OVER.get(transport, transport)
        for num_shards in shard_counts:
            ours = ps_time(layout, num_shards, num_classes, reps, dtype, transport)
            name = f"pull+push, {num_shards} shard(s), {dtype}, {transport}"
            echo = f"raw zmq echo over {over}"
            print(ratio_line(name, f"{echo} (plain malloc)", plain[over], "distbelief", ours))
            print(ratio_line(name, f"{echo} (tuned malloc)", tuned[over], "distbelief", ours))


def add_arguments(parser: argparse.ArgumentParser, shard_counts: str) -> None:
    parser.add_argument("--shards", default=shard_counts, help="comma-separated shard counts")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    transports_argument(parser, "tcp,ipc,shm")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, "1,2,4")
    args = parser.parse_args(argv)
    layout = googlenet_layout(args.num_classes)
    counts = [int(x) for x in args.shards.split(",")]
    run(layout, counts, args.num_classes, args.reps, args.dtype, split_transports(args.transports))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
