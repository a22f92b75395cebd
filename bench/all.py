"""Run every benchmark at full size, one after the other, each in a fresh interpreter.

Usage: ``python -m bench.all [--only ps_vs_zmq,overhead]``; prints every figure. Takes
about 53 minutes on a 2-core machine (``convergence`` alone about 11, ``stages`` 8; ``wire``, which
needs root for its network namespaces, about 12). Run it on a
machine that is otherwise idle: every figure is a ratio measured within one script's
run, but load from elsewhere makes both sides of a ratio noisy. ``staleness`` (the
simulator's default grid, about 2.5 hours here) and ``gpu`` (the GPU figures, for a
machine with one) run only when named in ``--only``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

BENCHES = (
    "ps_vs_zmq",
    "update_vs_memcpy",
    "ps_vs_ddp",
    "profile_exchange",
    "overhead",
    "dispatch",
    "scaling",
    "convergence",
    "input_pipeline",
    "stages",
    "wire",
)
ON_REQUEST = ("staleness", "gpu")  # too long for the default run; for a GPU machine
TIMEOUT_S = 4 * 3600.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated names")
    args = parser.parse_args(argv)
    failed = []
    for name in args.only.split(","):
        if name not in BENCHES + ON_REQUEST:
            known = ", ".join(BENCHES + ON_REQUEST)
            parser.error(f"unknown benchmark {name!r}; known: {known}")
        print(f"\n== python -m bench.{name}", flush=True)
        began = time.monotonic()
        code = subprocess.run([sys.executable, "-m", f"bench.{name}"], timeout=TIMEOUT_S).returncode
        print(f"== bench.{name}: exit {code} in {time.monotonic() - began:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
