"""The Grafana dashboard and the README's queries name only metrics that /metrics exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import REGISTRY

from imagegate import metrics

REPO = Path(__file__).resolve().parents[2]
METRIC_NAME = re.compile(r"\bimagegate_[a-z_]+")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exposed_samples() -> set[str]:
    names = set()
    for family in REGISTRY.collect():
        if family.name.startswith("imagegate_"):
            names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return names


def test_dashboard_queries_name_exposed_metrics() -> None:
    assert metrics.HTTP_REQUESTS is not None  # the definitions are registered by importing the module
    dashboard = json.loads((REPO / "deploy" / "grafana" / "imagegate.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expression in expressions for name in METRIC_NAME.findall(expression)}
    assert used and used <= exposed_samples(), used - exposed_samples()
    # Every family the operator needs is on the dashboard.
    families = {name.removesuffix("_total").removesuffix("_bucket") for name in used}
    assert {"imagegate_http_requests", "imagegate_payments", "imagegate_revenue_atomic",
            "imagegate_provider_cost_atomic", "imagegate_generation_seconds", "imagegate_queue_depth",
            "imagegate_busy_refusals", "imagegate_settlement_seconds", "imagegate_reconciliation_backlog",
            "imagegate_model_memory_bytes", "imagegate_model_loaded"} <= families
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])


def test_readme_queries_name_exposed_metrics() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```promql\n(.*?)```", readme, flags=re.DOTALL)
    used = {name for block in blocks for name in METRIC_NAME.findall(block)}
    assert len(used) >= 8 and used <= exposed_samples(), used - exposed_samples()
