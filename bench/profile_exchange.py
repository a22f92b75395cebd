"""Where one push+pull's time goes, piece by piece, with one torch thread.

Each piece of the exchange timed on its own in this process (medians), for one
shard's half of a GoogLeNet-sized vector (2 shards), f32 and bf16 on the wire:
the client's encoding of the push, the shard's decoding, finiteness check and update
rule, the shard's pull snapshot, and the client's copy (or decoding) of the pull
reply into its weights; then ``push`` alone and ``pull`` alone through
``distbelief serve --shards 2`` for one client, over TCP, over Unix sockets and
through shared memory (headers over TCP). A
``copy_`` of the same bytes is the baseline of each line (ratio memcpy / piece), so
the lines say how many memcpys each piece costs.

Usage: ``python -m bench.profile_exchange [--num-classes 10] [--reps 10] [--threads 1]
[--transports tcp,ipc,shm]``.
"""

from __future__ import annotations

import argparse

import torch
from distbelief.server.rules import make_rule

from bench.common import (
    client_options,
    googlenet_layout,
    median_time,
    ratio_line,
    shards,
    split_transports,
    transports_argument,
)
from distbelief import protocol
from distbelief.client import ClientConfig, ParameterClient
from distbelief.tuning import keep_freed_memory

DTYPES = ("f32", "bf16")


def pieces(size: int, dtype: str, reps: int) -> dict[str, float]:
    """Median seconds of each in-process piece of an exchange over ``size`` elements."""
    values = torch.randn(size) * 1e-3
    weights = torch.empty(size)
    torch_dtype = protocol.DTYPES[dtype][0]
    scratch = torch.empty(size, dtype=torch_dtype)
    wire = bytes(protocol.to_wire(values, dtype, scratch).data)  # as a received frame
    grad = torch.empty(size)
    rule = make_rule("momentum", torch.randn(size), weight_decay=2e-4, momentum=0.9)
    out = {}
    out["client: encode push"] = median_time(lambda: protocol.to_wire(values, dtype, scratch), reps)

    def decode() -> torch.Tensor:
        received = protocol.from_wire(wire, dtype)
        return grad.copy_(received) if dtype != "f32" else received

    out["shard: decode push"] = median_time(decode, reps)
    out["shard: finiteness check"] = median_time(
        lambda: torch.isfinite(values.sum()) or torch.isfinite(values).all(), reps
    )
    out["shard: momentum update"] = median_time(lambda: rule.apply(values, 1e-6), reps)
    out["shard: pull snapshot"] = median_time(
        lambda: scratch.copy_(values) if dtype != "f32" else weights.copy_(values), reps
    )
    out["client: install pull"] = median_time(
        lambda: weights.copy_(protocol.from_wire(wire, dtype)), reps
    )
    return out


def end_to_end(num_classes: int, dtype: str, reps: int, transport: str) -> tuple[float, float]:
    """Median ``push`` alone and ``pull`` alone through 2 shards, one client."""
    layout = googlenet_layout(num_classes, show=False)
    weights, grads = torch.empty(layout.total), torch.randn(layout.total) * 1e-6
    with shards(2, "--num-classes", str(num_classes), transport=transport) as servers:
        cfg = ClientConfig(
            servers=tuple(servers), wire_dtype=dtype, timeout_s=60, **client_options(transport)
        )
        with ParameterClient(cfg, layout) as client:
            client.connect()
            push_s = median_time(lambda: client.push(grads, examples=1), reps)
            pull_s = median_time(lambda: client.pull(weights), reps)
    return push_s, pull_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, as a shard of 2")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    transports_argument(parser, "tcp,ipc,shm")
    args = parser.parse_args(argv)
    keep_freed_memory()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        report(args)
    finally:
        torch.set_num_threads(threads)
    return 0


def report(args: argparse.Namespace) -> None:
    layout = googlenet_layout(args.num_classes)
    half = layout.total // 2
    src, dst = torch.randn(half), torch.empty(half)
    copy_s = median_time(lambda: dst.copy_(src), args.reps)
    print(f"one shard's half: {half:,} elements; memcpy of it (f32) {copy_s * 1e3:.1f} ms")
    for dtype in args.dtypes.split(","):
        for name, seconds in pieces(half, dtype, args.reps).items():
            print(ratio_line(f"{dtype} {name}", "memcpy", copy_s, "piece", seconds))
        for transport in split_transports(args.transports):
            push_s, pull_s = end_to_end(args.num_classes, dtype, args.reps, transport)
            print(
                f"{dtype} through 2 shards over {transport}, 1 client: "
                f"push {push_s * 1e3:.1f} ms, pull {pull_s * 1e3:.1f} ms"
            )


if __name__ == "__main__":
    raise SystemExit(main())
