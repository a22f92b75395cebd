"""Issue 3's benchmark: ``bench.ps_vs_zmq`` and ``bench.update_vs_memcpy`` in one run.

Kept for its command line; the measurements live in those two modules.
Usage: ``python -m bench.ps_throughput [--shards 1,2] [--reps 10] [--num-classes 1000]``.
"""

from __future__ import annotations

import argparse

from bench import ps_vs_zmq, update_vs_memcpy
from bench.common import googlenet_layout, split_transports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ps_vs_zmq.add_arguments(parser, "1,2")
    args = parser.parse_args(argv)
    layout = googlenet_layout(args.num_classes)
    counts = [int(x) for x in args.shards.split(",")]
    transports = split_transports(args.transports)
    ps_vs_zmq.run(layout, counts, args.num_classes, args.reps, args.dtype, transports)
    update_vs_memcpy.run(layout.total, args.reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
