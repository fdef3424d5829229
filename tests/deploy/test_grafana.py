"""deploy/grafana/private-gpt.json: a well-formed dashboard whose every query names a metric the
server exports (a renamed metric would leave a panel silently empty)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client.metrics_core import Metric

from app.observability import TRAINING_FIGURES, ServerMetrics, registry_metrics
from app.registry.service import NewestVersion

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "private-gpt.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported_series() -> set[str]:
    names = set()
    families: list[Metric] = list(ServerMetrics().registry.collect())
    # The registry's figures are read from the database at each scrape: an adapter with every one.
    every_figure = NewestVersion("finance", 2, datetime.now(UTC), 2, dict.fromkeys(TRAINING_FIGURES, 1.0))
    families += registry_metrics([every_figure])
    for family in families:
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    # GPU memory is collected only where CUDA is present: take its names from the collector's source.
    source = (ROOT / "app" / "observability.py").read_text()
    names.update(re.findall(r'"(privategpt_gpu_memory_\w+_bytes)"', source))
    return names


def test_dashboard_queries_name_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 12
    exported = exported_series()
    assert "privategpt_gpu_memory_total_bytes" in exported
    used = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\b((?:privategpt|process)_[a-z_]+)\b", target["expr"]))
            assert names, target["expr"]
            assert names <= exported, f"{panel['title']}: {names - exported} are not exported"
            assert "$__rate_interval" in target["expr"] or "rate(" not in target["expr"]
            used |= names
    # The headline metrics each have a panel.
    for name in (
        "privategpt_time_to_first_token_seconds_bucket",
        "privategpt_generation_tokens_total",
        "privategpt_queue_depth",
        "privategpt_http_requests_total",
        "privategpt_resident_adapters",
        "privategpt_gpu_memory_allocated_bytes",
        "privategpt_adapter_training_loss",
        "privategpt_adapter_published_timestamp_seconds",
    ):
        assert name in used, name


def test_dashboard_layout_and_variables() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "job", "instance"}
    assert dashboard["uid"] == "private-gpt"
