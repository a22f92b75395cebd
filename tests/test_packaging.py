"""A wheel of the project installs distbelief.server and distbelief.workers, nothing bare."""

import site
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_server_and_workers_under_distbelief(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        timeout=240,
    )
    (wheel,) = tmp_path.glob("distbelief-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "distbelief/server/shard.py" in names and "distbelief/workers/replica.py" in names
    # every package folder of the source tree is in the wheel (a package left out of
    # pyproject's list would install a `distbelief` command that cannot import)
    for init in ROOT.glob("distbelief/**/__init__.py"):
        assert init.relative_to(ROOT).as_posix() in names, init
    tops = {n.split("/")[0] for n in names}
    assert tops == {"distbelief", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    entry = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith("entry_points.txt")))
        .decode()
    )
    assert "distbelief = distbelief.cli:main" in entry
    # installed on its own (no editable finder), the mapped packages import; bare ones do not
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        timeout=240,
    )
    probe = (
        "import importlib.util, distbelief.server.shard, distbelief.workers.replica;"
        "import distbelief.cli.up, distbelief.cli;"
        f"assert distbelief.server.shard.__file__.startswith({str(target)!r});"
        f"assert distbelief.cli.__file__.startswith({str(target)!r});"
        "assert importlib.util.find_spec('server') is None;"
        "assert importlib.util.find_spec('workers') is None"
    )
    # -S: no site processing, so the editable install's path hook stays out; the venv's
    # site-packages still provide torch and the other dependencies
    path = [str(target), *site.getsitepackages()]
    subprocess.run(
        [sys.executable, "-S", "-c", f"import sys; sys.path[:0] = {path!r}; " + probe],
        check=True,
        timeout=120,
        cwd=tmp_path,
    )
