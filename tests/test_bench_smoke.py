"""The benchmarks run at tiny sizes so they do not rot (this checks output, not timing)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ps_throughput_runs_and_prints_ratios():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.ps_throughput",
            "--num-classes",
            "10",
            "--reps",
            "1",
            "--shards",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    ).stdout
    ratios = re.findall(r"ratio (\d+\.\d+)", out)
    assert len(ratios) == 4, out  # two echo baselines, two update rules
    assert all(float(r) > 0 for r in ratios)
    assert "raw zmq echo (plain malloc)" in out and "memcpy" in out
