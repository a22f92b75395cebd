"""docs/metrics.md and the README's metrics table against the metrics the code defines."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import generate_latest

from distbelief.metrics import (
    AveragerMetrics,
    ShardMetrics,
    SupervisorMetrics,
    WorkerMetrics,
    new_registry,
)

ROOT = Path(__file__).resolve().parent.parent
ROLES = {
    "shard": ShardMetrics,
    "worker": WorkerMetrics,
    "averager": AveragerMetrics,
    "supervisor": SupervisorMetrics,
}


def defined() -> dict[str, str]:
    """Every metric family the code exports, with its type."""
    out = {}
    for role, cls in ROLES.items():
        text = generate_latest(cls(new_registry(role)).registry).decode()
        out |= dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    return out


def test_docs_metrics_table_lists_exactly_the_metrics_the_code_defines():
    text = (ROOT / "docs" / "metrics.md").read_text()
    rows = dict(re.findall(r"^\| `(distbelief_\w+)` \| (\w+)", text, re.M))
    code = defined()
    assert set(rows) == set(code)
    for name, kind in code.items():
        assert rows[name] == kind, name


def test_readme_metrics_table_agrees_with_the_code_and_links_the_full_table():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(distbelief_\w+?)(?:\{[^`]*\})?`", section))
    assert named and named <= set(defined()), sorted(named - set(defined()))
    assert "docs/metrics.md" in section
