"""GET /metrics exports the adapter registry's training runs, read from SQLite and PostgreSQL.

Adapters are published as `python -m training publish` does (training/publish.py: the real
inspection, probe on the tiny model and registry functions) and uploaded by an admin over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import Adapter, AdapterVersion
from app.observability import registry_metrics
from app.routes import metrics as metrics_route
from tests.conftest import (
    LiveServer,
    build_adapter,
    create_user,
    make_admin,
    make_settings,
    with_db,
    zip_directory,
)
from tests.routes.test_metrics import scrape
from training.publish import publish_adapter

PUBLISHER = "trainer@example.com"


def training_metrics(loss: float, **overrides: Any) -> dict[str, Any]:
    """A run's metrics as training/trainer.py writes them into the adapter's manifest."""
    metrics: dict[str, Any] = {
        "train_loss": loss + 0.4,
        "final_train_loss": loss,
        "eval_loss": loss + 0.1,
        "tokens_per_s": 5088.0,
        "peak_gpu_memory_gib": 10.5,
        "wall_time_s": 3600.5,
        "steps": 500,
        "train_records": 68_900,
        "eval_records": 100,
        "loss_curve": [[step, round(2.0 - step / 300, 4)] for step in range(1, 501, 5)],
    }
    metrics.update(overrides)
    return metrics


def trained_adapter(tiny_model_dir: Path, directory: Path, metrics: dict[str, Any] | None, seed: int) -> Path:
    build_adapter(tiny_model_dir, directory, seed=seed)
    if metrics is not None:
        manifest = {"prompt_template": "alpaca", "source": "training", "metrics": metrics}
        (directory / "private_gpt.json").write_text(json.dumps(manifest))
    return directory


def publish(live: LiveServer, directory: Path, name: str) -> int:
    version = asyncio.run(publish_adapter(directory, name=name, settings=live.settings, by=PUBLISHER))
    return version.version


@pytest.fixture
def live(database_url: str, tmp_path: Path, tiny_model_dir: Path) -> Iterator[LiveServer]:
    settings = make_settings(tmp_path, tiny_model_dir, database_url)
    server = LiveServer(settings).start()
    create_user(settings, PUBLISHER, admin=True)
    yield server
    server.stop()


def test_training_runs_are_exported_per_adapter_from_the_registry(
    live: LiveServer, tiny_model_dir: Path, tmp_path: Path
) -> None:
    before = scrape(live, token=None)
    assert not before.labelled("privategpt_adapter_latest_version")  # an empty registry: no series

    # Two training runs of `finance`; the second's figures are the ones exported.
    first = training_metrics(1.2)
    assert publish(live, trained_adapter(tiny_model_dir, tmp_path / "f1", first, 1), "finance") == 1
    second = training_metrics(
        0.75, eval_loss=None, peak_gpu_memory_gib=None, tokens_per_s=4200.5, train_records=70_000
    )
    assert publish(live, trained_adapter(tiny_model_dir, tmp_path / "f2", second, 2), "finance") == 2
    # A run by a trainer older than train_records, with a figure that is not a number (manifests
    # are uploaded as written): those two have no sample, the others do.
    older = training_metrics(0.9, steps="many")
    del older["train_records"]
    publish(live, trained_adapter(tiny_model_dir, tmp_path / "hr", older, 3), "hr")
    # An admin's upload of an adapter trained elsewhere: no metrics at all.
    uploaded = make_admin(live).upload(
        "legal",
        zip_directory(trained_adapter(tiny_model_dir, tmp_path / "legal", None, 4), tmp_path / "l.zip"),
    )
    assert uploaded.status_code == 201, uploaded.text

    async def published_at(db: AsyncSession) -> dict[str, float]:
        rows = await db.execute(
            select(Adapter.name, AdapterVersion.version, AdapterVersion.created_at).join(
                AdapterVersion.adapter
            )
        )
        # SQLite gives the stored UTC time back without its zone.
        return {
            f"{name}@{version}": at.replace(tzinfo=at.tzinfo or UTC).timestamp() for name, version, at in rows
        }

    when = with_db(live.settings, published_at)
    samples = scrape(live, token=None)

    def exported(name: str) -> dict[str, float]:
        return {labels["adapter"]: samples(name, **labels) for labels in samples.labelled(name)}

    assert exported("privategpt_adapter_latest_version") == {"finance": 2, "hr": 1, "legal": 1}
    assert exported("privategpt_adapter_trained_versions") == {"finance": 2, "hr": 1, "legal": 0}
    published = exported("privategpt_adapter_published_timestamp_seconds")
    assert published.keys() == {"finance", "hr", "legal"}
    for adapter, version in (("finance", 2), ("hr", 1), ("legal", 1)):
        # The text format prints 15 significant digits: a Unix time to about 10 µs.
        assert published[adapter] == pytest.approx(when[f"{adapter}@{version}"], abs=1e-3)
        assert abs(published[adapter] - time.time()) < 600  # Unix time, whatever the local zone
    assert exported("privategpt_adapter_training_loss") == {"finance": 0.75, "hr": 0.9}
    assert exported("privategpt_adapter_eval_loss") == {"hr": pytest.approx(1.0)}  # finance@2 had none
    assert exported("privategpt_adapter_training_duration_seconds") == {"finance": 3600.5, "hr": 3600.5}
    assert exported("privategpt_adapter_training_tokens_per_second") == {"finance": 4200.5, "hr": 5088.0}
    assert exported("privategpt_adapter_training_steps") == {"finance": 500}
    assert exported("privategpt_adapter_training_records") == {"finance": 70_000}
    assert exported("privategpt_adapter_training_peak_gpu_memory_bytes") == {"hr": 10.5 * 2**30}
    # The engine's and the process's metrics are still there, beside the registry's.
    assert {"privategpt_requests_queued_total", "process_cpu_seconds_total"} <= samples.names()

    # Prometheus asks for OpenMetrics: the same families, as gauges, and a well-formed exposition.
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    response = httpx.get(f"{live.url}/metrics", headers={"Accept": accept})
    assert response.status_code == 200 and response.text.endswith("# EOF\n")
    families = {family.name: family for family in openmetrics_families(response.text)}
    assert families["privategpt_adapter_training_loss"].type == "gauge"
    assert len(families["privategpt_adapter_latest_version"].samples) == 3


def test_a_registry_that_does_not_answer_in_time_costs_only_its_own_figures(
    live: LiveServer, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(live, trained_adapter(tiny_model_dir, tmp_path / "f1", training_metrics(1.2), 1), "finance")
    assert scrape(live, token=None)("privategpt_adapter_latest_version", adapter="finance") == 1
    # No time at all for the registry's query: the scrape still answers, without its figures.
    monkeypatch.setattr(metrics_route, "REGISTRY_READ_TIMEOUT_S", 0.0)
    samples = scrape(live, token=None)
    assert "privategpt_requests_queued_total" in samples.names()
    assert not {family.name for family in registry_metrics([])} & samples.names()
    # The query cut short left the connection pool usable: the next scrape has them again.
    monkeypatch.undo()
    assert scrape(live, token=None)("privategpt_adapter_latest_version", adapter="finance") == 1
