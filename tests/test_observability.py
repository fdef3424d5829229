"""The Prometheus metrics objects on their own registries: what each engine report records."""

from __future__ import annotations

import asyncio
import inspect
import logging

import prometheus_client
import pytest
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from app.llm.engine import GenerationEngine, GenerationRequest, SamplingParams
from app.llm.loader import LoadedModel
from app.llm.metrics import EngineMetrics
from app.observability import GpuMemoryCollector, PrometheusEngineMetrics, ServerMetrics


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def test_every_report_of_the_engine_interface_is_recorded() -> None:
    reports = [
        name for name, _ in inspect.getmembers(EngineMetrics, inspect.isfunction) if not name.startswith("_")
    ]
    assert len(reports) == 11
    for name in reports:
        assert getattr(PrometheusEngineMetrics, name) is not getattr(EngineMetrics, name), name
        assert inspect.signature(getattr(PrometheusEngineMetrics, name)) == inspect.signature(
            getattr(EngineMetrics, name)
        ), name


def test_engine_reports_land_in_their_metrics() -> None:
    registry = CollectorRegistry()
    metrics = PrometheusEngineMetrics(registry)
    metrics.request_queued(queue_depth=3)
    metrics.request_rejected("overloaded")
    metrics.first_token(0.2, prompt_tokens=12)
    for _ in range(4):
        metrics.inter_token(0.03)
    metrics.request_finished("length", prompt_tokens=12, completion_tokens=5, seconds=0.4)
    metrics.request_finished("stop", prompt_tokens=7, completion_tokens=2, seconds=0.1)
    metrics.step(batch_size=4, queue_depth=1, tokens=4, seconds=0.02)
    metrics.prefill(tokens=12, seconds=0.05)
    metrics.adapter_loaded(1.5)
    metrics.adapter_evicted()
    metrics.resident_adapters(2)

    assert value(registry, "privategpt_requests_queued_total") == 1
    assert value(registry, "privategpt_requests_rejected_total", reason="overloaded") == 1
    assert value(registry, "privategpt_time_to_first_token_seconds_count") == 1
    assert value(registry, "privategpt_time_to_first_token_seconds_bucket", le="0.1") == 0
    assert value(registry, "privategpt_time_to_first_token_seconds_bucket", le="0.25") == 1
    assert value(registry, "privategpt_inter_token_latency_seconds_count") == 4
    assert value(registry, "privategpt_inter_token_latency_seconds_sum") == pytest.approx(0.12)
    assert value(registry, "privategpt_requests_finished_total", reason="length") == 1
    assert value(registry, "privategpt_requests_finished_total", reason="stop") == 1
    assert value(registry, "privategpt_requests_finished_total", reason="error") == 0
    assert value(registry, "privategpt_prompt_tokens_total") == 19
    assert value(registry, "privategpt_generation_tokens_total") == 7
    assert value(registry, "privategpt_request_duration_seconds_count") == 2
    # The step is the latest report: it sets the gauges.
    assert value(registry, "privategpt_queue_depth") == 1
    assert value(registry, "privategpt_batch_size") == 4
    assert value(registry, "privategpt_step_batch_size_bucket", le="4.0") == 1
    assert value(registry, "privategpt_step_duration_seconds_count") == 1
    assert value(registry, "privategpt_step_tokens_total") == 4
    assert value(registry, "privategpt_prefill_tokens_total") == 12
    assert value(registry, "privategpt_prefill_duration_seconds_count") == 1
    assert value(registry, "privategpt_adapter_loads_total") == 1
    assert value(registry, "privategpt_adapter_load_duration_seconds_sum") == 1.5
    assert value(registry, "privategpt_adapter_evictions_total") == 1
    assert value(registry, "privategpt_resident_adapters") == 2


def test_a_bad_report_costs_its_sample_never_the_request(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusEngineMetrics(registry)
    with caplog.at_level(logging.ERROR, logger="app.observability"):
        metrics.first_token("soon", prompt_tokens=1)  # type: ignore[arg-type]
        metrics.request_finished("length", prompt_tokens=-1, completion_tokens=-3, seconds=0.1)
    assert "first_token" in caplog.text
    assert value(registry, "privategpt_time_to_first_token_seconds_count") == 0
    # A negative count would make a counter raise; it adds nothing instead.
    assert value(registry, "privategpt_requests_finished_total", reason="length") == 1
    assert value(registry, "privategpt_generation_tokens_total") == 0


def test_each_server_keeps_its_own_registry() -> None:
    first, second = ServerMetrics(), ServerMetrics()  # two apps in one process: no name clash
    first.engine.request_queued(queue_depth=1)
    first.http.observe(method="GET", route="/healthz", status=200, seconds=0.001, streamed=False)
    assert value(first.registry, "privategpt_requests_queued_total") == 1
    assert value(second.registry, "privategpt_requests_queued_total") == 0
    assert prometheus_client.REGISTRY.get_sample_value("privategpt_requests_queued_total") is None

    body, content_type = first.render(accept="")
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert b"_created" not in body
    families = {family.name: family for family in text_string_to_metric_families(body.decode())}
    requests = families["privategpt_http_requests"]
    assert requests.type == "counter"
    assert [(s.labels, s.value) for s in requests.samples if s.name.endswith("_total")] == [
        ({"method": "GET", "route": "/healthz", "status": "200"}, 1.0)
    ]
    assert families["process_resident_memory_bytes"].samples[0].value > 0  # the process's own, on Linux


def test_http_methods_outside_the_standard_ones_share_one_label() -> None:
    metrics = ServerMetrics()
    metrics.http.observe(method="BREW", route="unmatched", status=405, seconds=0.001, streamed=False)
    assert (
        value(
            metrics.registry,
            "privategpt_http_requests_total",
            method="other",
            route="unmatched",
            status="405",
        )
        == 1
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only case")
def test_gpu_memory_is_absent_without_cuda() -> None:
    assert list(GpuMemoryCollector().collect()) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_memory_is_read_at_scrape_time() -> None:
    metrics = ServerMetrics()
    held = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda:0")
    allocated = value(metrics.registry, "privategpt_gpu_memory_allocated_bytes", device="cuda:0")
    reserved = value(metrics.registry, "privategpt_gpu_memory_reserved_bytes", device="cuda:0")
    total = value(metrics.registry, "privategpt_gpu_memory_total_bytes", device="cuda:0")
    assert 64 * 2**20 <= allocated <= reserved < total
    del held
    assert value(metrics.registry, "privategpt_gpu_memory_allocated_bytes", device="cuda:0") < allocated


async def test_the_gauges_fall_to_zero_when_the_engine_has_nothing_to_do(tiny_model: LoadedModel) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusEngineMetrics(registry)
    engine = GenerationEngine(tiny_model, max_running=2, metrics=metrics)
    engine.start()
    try:
        ids = tiny_model.tokenizer.encode("What is the leave policy?")
        streams = [engine.submit(GenerationRequest(ids, SamplingParams(6, temperature=0))) for _ in range(3)]
        await asyncio.gather(*(stream.collect() for stream in streams))
        assert value(registry, "privategpt_step_batch_size_bucket", le="2.0") > 0, "they decoded together"
        for _ in range(50):  # the worker reports idle once it has finished the round
            if value(registry, "privategpt_batch_size") == 0:
                break
            await asyncio.sleep(0.02)
    finally:
        engine.shutdown()
    assert value(registry, "privategpt_batch_size") == 0
    assert value(registry, "privategpt_queue_depth") == 0
