"""Prometheus metrics: the generation engine's timings and counts, HTTP traffic, GPU memory and the
adapter registry's training runs.

`ServerMetrics` holds every metric of one app in a `CollectorRegistry` of its own (never the
library's global registry, so several apps in one process keep separate counts); `GET /metrics`
(app/routes/metrics.py) renders it. Names carry the `privategpt_` prefix, times are seconds,
counters end in `_total`. The README's "Metrics" section lists them for operators.

    curl -s http://127.0.0.1:8000/metrics | grep ^privategpt_
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.llm.metrics import EngineMetrics

if TYPE_CHECKING:  # the registry's data functions bring SQLAlchemy and torch; only its type is needed
    from app.registry.service import NewestVersion

log = logging.getLogger(__name__)

P = ParamSpec("P")

# Bucket bounds (seconds) for LLM serving. A first token comes tens of milliseconds after the
# request on a free GPU and tens of seconds later behind a long prompt or a full queue; tokens
# follow each other every few milliseconds to a few hundred (a 7B model in 4-bit decodes at about
# 30 tokens/s per stream, more with a larger batch, seconds when a step stalls).
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
PREFILL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0)
# Whole replies: up to MAX_NEW_TOKENS_LIMIT tokens, minutes at most.
REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
# Making an adapter resident: reading safetensors and injecting LoRA layers, from tens of
# milliseconds (a small rank, from the page cache) to a minute (a large one from a slow disk).
ADAPTER_LOAD_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# HTTP answers: pages in milliseconds, a non-streamed completion in up to minutes.
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Event streams last as long as the reply they tail, or as long as a tab stays open.
STREAM_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

FINISH_REASONS = ("stop", "length", "cancelled", "error")
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Counted, but left out of the latency histogram: Prometheus times its own scrapes.
UNTIMED_ROUTES = frozenset({"/metrics"})
UNMATCHED_ROUTE = "unmatched"


def _never_raises(method: Callable[P, None]) -> Callable[P, None]:
    """The engine calls these from its worker between forward passes: a bug here must cost a sample,
    never a request (the engine would finish the request with an error)."""

    @functools.wraps(method)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            method(*args, **kwargs)
        except Exception:
            log.exception("recording the engine metric %s failed; the sample is lost", method.__name__)

    return guarded


class PrometheusEngineMetrics(EngineMetrics):
    """The engine's reports as Prometheus metrics in `registry`; every call is O(1)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        self.queued = counter(
            "privategpt_requests_queued_total", "Generation requests accepted into the queue."
        )
        rejected = counter(
            "privategpt_requests_rejected_total",
            "Generation requests refused at submit time (HTTP 429), by reason.",
            ("reason",),
        )
        finished = counter(
            "privategpt_requests_finished_total",
            "Generation requests ended, by reason: stop, length, cancelled or error.",
            ("reason",),
        )
        # Bound once: labels() takes a lock and a lookup on every call.
        self._rejected = {"overloaded": rejected.labels("overloaded")}
        self._rejected_family = rejected
        self._finished = {reason: finished.labels(reason) for reason in FINISH_REASONS}
        self._finished_family = finished
        self.prompt_tokens = counter(
            "privategpt_prompt_tokens_total", "Prompt tokens of generation requests, counted as each ends."
        )
        self.generation_tokens = counter(
            "privategpt_generation_tokens_total",
            "Tokens generated (a reply's completion tokens, as in the API's usage), counted as each "
            "request ends; rate() of it is the server's output tokens per second.",
        )
        self.request_duration = Histogram(
            "privategpt_request_duration_seconds",
            "Generation requests from submit to end (queueing included).",
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "privategpt_time_to_first_token_seconds",
            "From submitting a generation request to its first sampled token (queueing and prefill).",
            buckets=FIRST_TOKEN_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency = Histogram(
            "privategpt_inter_token_latency_seconds",
            "Between two consecutive tokens of one request.",
            buckets=TOKEN_GAP_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "privategpt_queue_depth",
            "Generation requests waiting for a decoding slot, as the engine last reported.",
            registry=registry,
        )
        self.batch_size = Gauge(
            "privategpt_batch_size",
            "Sequences in the engine's last decoding step.",
            registry=registry,
        )
        self.step_batch = Histogram(
            "privategpt_step_batch_size",
            "Sequences per decoding step (how well requests are batched).",
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self.step_duration = Histogram(
            "privategpt_step_duration_seconds",
            "One decoding step of the whole batch.",
            buckets=TOKEN_GAP_BUCKETS,
            registry=registry,
        )
        self.step_tokens = counter(
            "privategpt_step_tokens_total",
            "Tokens sampled by decoding steps, as they happen (end-of-text included): the engine's "
            "decoding throughput, smoother than privategpt_generation_tokens_total.",
        )
        self.prefill_tokens = counter(
            "privategpt_prefill_tokens_total", "Prompt tokens run through the model by prefills."
        )
        self.prefill_duration = Histogram(
            "privategpt_prefill_duration_seconds",
            "One prefill (a prompt, or a chunk of one).",
            buckets=PREFILL_BUCKETS,
            registry=registry,
        )
        self.adapter_loads = counter(
            "privategpt_adapter_loads_total", "Adapter versions made resident on the model."
        )
        self.adapter_load_duration = Histogram(
            "privategpt_adapter_load_duration_seconds",
            "Making one adapter version resident.",
            buckets=ADAPTER_LOAD_BUCKETS,
            registry=registry,
        )
        self.adapter_evictions = counter(
            "privategpt_adapter_evictions_total", "Resident adapters unloaded to make room for another."
        )
        self.resident = Gauge(
            "privategpt_resident_adapters", "Adapter versions resident on the model now.", registry=registry
        )

    @_never_raises
    def request_queued(self, queue_depth: int) -> None:
        self.queued.inc()
        self.queue_depth.set(queue_depth)

    @_never_raises
    def request_rejected(self, reason: str) -> None:
        child = self._rejected.get(reason) or self._rejected_family.labels(reason)
        child.inc()

    @_never_raises
    def first_token(self, seconds: float, prompt_tokens: int) -> None:
        # Prompt tokens are counted when the request ends, with the reply's.
        self.time_to_first_token.observe(seconds)

    @_never_raises
    def inter_token(self, seconds: float) -> None:
        self.inter_token_latency.observe(seconds)

    @_never_raises
    def request_finished(
        self, reason: str, prompt_tokens: int, completion_tokens: int, seconds: float
    ) -> None:
        child = self._finished.get(reason) or self._finished_family.labels(reason)
        child.inc()
        self.prompt_tokens.inc(max(prompt_tokens, 0))
        self.generation_tokens.inc(max(completion_tokens, 0))
        self.request_duration.observe(seconds)

    @_never_raises
    def step(self, batch_size: int, queue_depth: int, tokens: int, seconds: float) -> None:
        self.batch_size.set(batch_size)
        self.queue_depth.set(queue_depth)
        self.step_batch.observe(batch_size)
        self.step_duration.observe(seconds)
        self.step_tokens.inc(max(tokens, 0))

    @_never_raises
    def idle(self) -> None:
        # Without this the gauges would keep the last step's figures while nothing runs.
        self.batch_size.set(0)
        self.queue_depth.set(0)

    @_never_raises
    def prefill(self, tokens: int, seconds: float) -> None:
        self.prefill_tokens.inc(max(tokens, 0))
        self.prefill_duration.observe(seconds)

    @_never_raises
    def adapter_loaded(self, seconds: float) -> None:
        self.adapter_loads.inc()
        self.adapter_load_duration.observe(seconds)

    @_never_raises
    def adapter_evicted(self) -> None:
        self.adapter_evictions.inc()

    @_never_raises
    def resident_adapters(self, count: int) -> None:
        self.resident.set(count)


class HttpMetrics:
    """HTTP requests by method, route template (never the raw path: ids would make a series each)
    and status, and how long they took."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "privategpt_http_requests_total",
            "HTTP requests answered, by method, route template and status.",
            ("method", "route", "status"),
            registry=registry,
        )
        self.duration = Histogram(
            "privategpt_http_request_duration_seconds",
            "HTTP requests from arrival to the end of the response; event streams and /metrics "
            "are not in here.",
            ("method", "route"),
            buckets=HTTP_BUCKETS,
            registry=registry,
        )
        self.stream_duration = Histogram(
            "privategpt_http_stream_duration_seconds",
            "Event-stream responses (streamed completions, a reply being tailed) from arrival to "
            "their end: as long as the reply, or the client's patience.",
            ("method", "route"),
            buckets=STREAM_BUCKETS,
            registry=registry,
        )

    def observe(self, *, method: str, route: str, status: int, seconds: float, streamed: bool) -> None:
        method = method if method in HTTP_METHODS else "other"
        self.requests.labels(method, route, str(status)).inc()
        if streamed:
            self.stream_duration.labels(method, route).observe(seconds)
        elif route not in UNTIMED_ROUTES:
            self.duration.labels(method, route).observe(seconds)


def route_template(scope: Scope, root_path: str = "") -> str:
    """The path template of the route that answered (`/c/{conversation_id}`), never the raw path.

    The router leaves the route in the scope. A mounted app (/static) leaves only its prefix, which
    it moves onto `root_path` as ASGI does for sub-applications: `/static/{path}`.
    """
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str) and path:
        return path
    mounted = scope.get("root_path", "")
    if mounted != root_path and mounted.startswith(root_path):
        return f"{mounted.removeprefix(root_path)}/{{path}}"
    return UNMATCHED_ROUTE


class RecordHttpMetrics:
    """ASGI middleware feeding `HttpMetrics` (pure ASGI, so streamed responses are not buffered)."""

    def __init__(self, app: ASGIApp, *, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        root_path = scope.get("root_path", "")
        status = 500  # what the client gets when the app raises before answering
        streamed = False

        async def observing(message: Message) -> None:
            nonlocal status, streamed
            if message["type"] == "http.response.start":
                status = message["status"]
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                streamed = content_type.startswith(b"text/event-stream")
            await send(message)

        try:
            await self.app(scope, receive, observing)
        finally:
            self.metrics.observe(
                method=scope["method"],
                route=route_template(scope, root_path),
                status=status,
                seconds=time.perf_counter() - started,
                streamed=streamed,
            )


class GpuMemoryCollector(Collector):
    """Memory held by this process's PyTorch allocator on each GPU, read at scrape time.

    Reports nothing until CUDA is in use (a CPU server has no such metric): the allocator's
    counters are host-side, so a scrape neither synchronizes the GPU nor starts CUDA.
    """

    def collect(self) -> Iterator[Metric]:
        import torch  # loaded already by the model; imported here to keep this module light

        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return
        allocated = GaugeMetricFamily(
            "privategpt_gpu_memory_allocated_bytes",
            "GPU memory in tensors of this process.",
            labels=["device"],
        )
        reserved = GaugeMetricFamily(
            "privategpt_gpu_memory_reserved_bytes",
            "GPU memory reserved by this process's caching allocator (allocated plus cached).",
            labels=["device"],
        )
        total = GaugeMetricFamily("privategpt_gpu_memory_total_bytes", "The GPU's memory.", labels=["device"])
        try:
            for index in range(torch.cuda.device_count()):
                device = [f"cuda:{index}"]
                allocated.add_metric(device, torch.cuda.memory_allocated(index))
                reserved.add_metric(device, torch.cuda.memory_reserved(index))
                total.add_metric(device, torch.cuda.get_device_properties(index).total_memory)
        except Exception:  # a failing driver must not take the other metrics down with it
            log.exception("reading GPU memory for /metrics failed")
            return
        yield from (allocated, reserved, total)


# The training figures of each adapter's newest version: (manifest key, metric name, help, factor to
# the metric's unit). Keys are those training/trainer.py writes in the adapter's manifest.
TRAINING_METRICS = (
    (
        "final_train_loss",
        "privategpt_adapter_training_loss",
        "Training loss at the last logged step of the run that made each adapter's newest version.",
        1.0,
    ),
    (
        "eval_loss",
        "privategpt_adapter_eval_loss",
        "Loss on the held-out split at the end of that run (runs with an eval split only).",
        1.0,
    ),
    (
        "wall_time_s",
        "privategpt_adapter_training_duration_seconds",
        "Wall time of that run, from loading the base model to the adapter saved.",
        1.0,
    ),
    (
        "tokens_per_s",
        "privategpt_adapter_training_tokens_per_second",
        "Real (non-padding) tokens trained per second in that run, over all its steps.",
        1.0,
    ),
    ("steps", "privategpt_adapter_training_steps", "Optimizer steps of that run.", 1.0),
    (
        "train_records",
        "privategpt_adapter_training_records",
        "Records that run trained on (after bad records, duplicates and the eval split were set aside).",
        1.0,
    ),
    (
        "peak_gpu_memory_gib",
        "privategpt_adapter_training_peak_gpu_memory_bytes",
        "Peak GPU memory in tensors during that run (runs on a GPU only).",
        float(2**30),
    ),
)


TRAINING_FIGURES = tuple(key for key, *_ in TRAINING_METRICS)  # what /metrics reads of each manifest


def _figure(value: Any) -> float | None:
    """A manifest's figure as a sample value: figures come from the uploaded manifest as written
    (any JSON), and only a finite number is one."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def registry_metrics(newest: Iterable[NewestVersion]) -> list[Metric]:
    """The adapter registry as metrics, one series per adapter: its newest version, when it was
    published, how many versions training published, and the newest version's training figures
    (no sample where the manifest recorded none: an upload without metrics, or a figure older
    trainers did not write). Every replica reads the same registry, so every replica exports the
    same values: aggregate with max by (adapter), not sum."""
    latest = GaugeMetricFamily(
        "privategpt_adapter_latest_version",
        "The newest version number of each adapter in the registry (a publish raises it by one).",
        labels=["adapter"],
    )
    published = GaugeMetricFamily(
        "privategpt_adapter_published_timestamp_seconds",
        "When each adapter's newest version was published (Unix time).",
        labels=["adapter"],
    )
    trained = GaugeMetricFamily(
        "privategpt_adapter_trained_versions",
        "Versions of each adapter in the registry that training published (deleting one lowers it).",
        labels=["adapter"],
    )
    figures = {
        key: (GaugeMetricFamily(name, doc, labels=["adapter"]), factor)
        for key, name, doc, factor in TRAINING_METRICS
    }
    for version in newest:
        adapter = [version.name]
        latest.add_metric(adapter, version.version)
        published.add_metric(adapter, version.published_at.timestamp())
        trained.add_metric(adapter, version.trained_versions)
        for key, (family, factor) in figures.items():
            value = _figure(version.training.get(key))
            if value is not None:
                family.add_metric(adapter, value * factor)
    return [latest, published, trained, *(family for family, _ in figures.values())]


class _ScrapeCollector(Collector):
    """One scrape's exposition: the app's own metrics, then the families read for this scrape."""

    def __init__(self, registry: CollectorRegistry, extra: Sequence[Metric]) -> None:
        self.registry = registry
        self.extra = extra

    def collect(self) -> Iterator[Metric]:
        yield from self.registry.collect()
        yield from self.extra


class ServerMetrics:
    """Every metric of one app: the engine's, HTTP's, GPU memory and the process's own."""

    def __init__(self) -> None:
        # No `*_created` timestamp series beside every counter and histogram: they double what the
        # Prometheus text format exports and nothing here reads them (a process-wide switch, as vLLM
        # sets it too).
        disable_created_metrics()
        self.registry = CollectorRegistry()
        self.engine = PrometheusEngineMetrics(self.registry)
        self.http = HttpMetrics(self.registry)
        self.registry.register(GpuMemoryCollector())
        # process_cpu_seconds_total, process_resident_memory_bytes, ...: the names every exporter uses.
        ProcessCollector(registry=self.registry)

    def render(self, accept: str, extra: Sequence[Metric] = ()) -> tuple[bytes, str]:
        """The exposition in the format the scraper accepts (OpenMetrics or Prometheus text), and
        its content type, with `extra` families read for this scrape (registry_metrics) after the
        app's own. Reads GPU memory and /proc: call it off the event loop."""
        encode, content_type = choose_encoder(accept)
        if not extra:
            return encode(self.registry), content_type
        # A registry per scrape (no describe: nothing is collected twice) keeps concurrent scrapes
        # from seeing each other's figures.
        scrape = CollectorRegistry(auto_describe=False)
        scrape.register(_ScrapeCollector(self.registry, extra))
        return encode(scrape), content_type
