"""The reference trainer (`distbelief train`): a plain torch.optim.SGD loop."""

import json
import subprocess
import sys


def test_reference_trainer_runs_and_reports_numbers():
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "distbelief",
            "train",
            "--steps",
            "12",
            "--batch-size",
            "16",
            # no --num-classes: the demo set's 10 classes
            "--lr",
            "0.005",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result = json.loads(run.stdout)
    assert result["steps"] == 12 and result["examples"] == 12 * 16
    assert result["num_classes"] == 10
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0
    assert result["images_per_s"] > 0 and result["last_loss"] < 10
