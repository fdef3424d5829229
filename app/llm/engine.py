"""The generation engine: owns the model, schedules requests, and streams their text.

One worker thread runs every forward pass, so the event loop never waits on the model and no
two requests touch the model at once. Callers on the event loop `submit()` a
`GenerationRequest` and iterate the returned `GenerationStream` for `TextDelta`s; the stream
ends with a `GenerationResult`. `cancel()` on a stream takes effect before the next token.

Scheduling is continuous batching: every round, up to `prefill_chunk` prompt tokens of newly
admitted requests go through the model (prompts that arrive together packed into one pass, shortest
first, each attending only within itself; a long prompt in chunks over several rounds, so it never
stalls the others' streams for its whole prefill), then one forward pass advances every decoding
sequence by one token, each row with its own adapter (app/llm/lora.py; rows without one use the bare
base). A sequence joins the batch when its prompt is done and leaves it the moment it finishes
(app/llm/batch.py keeps the rows' KV caches in fixed buffers, and on a GPU the step is replayed from
a CUDA graph, app/llm/graphs.py, which the worker captures while it has nothing else to do). Each
step's tokens are chosen on the device and fed to the next step there, which is launched before the
host reads and streams them (`_decode`). Up to `max_running` sequences are admitted, within
`max_batch_tokens` of KV cache; further requests wait in a bounded FIFO queue, and past that
`submit()` raises `EngineOverloaded` at once (the API turns it into 429 + Retry-After). A request
that fails fails alone: in its prefill, or, when a batched step runs out of memory, the newest
sequence ends and the others go on.

Text comes out UTF-8-safe (a character split across tokens is held back until complete), and
stop sequences are held back until they can be ruled out, so no stop text is ever streamed.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import inspect
import logging
import math
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch
from torch.profiler import record_function

from app.llm.adapters import AdapterFiles, AdapterRef, AdapterUnavailable, ResidentAdapters, read_adapter
from app.llm.attention import multi_query_attention, packed_prompts
from app.llm.batch import DecodeBatch, prefill_layers
from app.llm.dequantized import keep_dequantized
from app.llm.graphs import make_capturable
from app.llm.loader import LoadedModel
from app.llm.metrics import EngineMetrics
from app.llm.shapes import Shape, logit_rows, pass_tokens, prefill_shapes, warm

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled", "error"]
# Dividing logits by a temperature this close to 0 overflows float32 into NaN probabilities;
# so close to 0, sampling is greedy decoding anyway.
GREEDY_BELOW = 1e-6
# A prompt is prefilled in arrival order, no longer shortest first, once this many rounds' prefill
# budgets went to other prompts while it waited (GenerationEngine._order_prefills).
PREFILL_PASSED_OVER_ROUNDS = 3
# Prompt tokens a round prefills (PREFILL_CHUNK_TOKENS). Every prompt of a pass gets its first
# token when the whole pass ends, so a burst's shortest prompts get theirs sooner from smaller
# passes, its longest later; and running streams wait for each pass. On an H200, 32 prompts of 166
# to 974 tokens sent at once (bench/serve_check.py), with 2,850 to 2,940 tokens/s at every budget:
# first token p50 / mean / p95 180 / 228 / 528 ms at 3,072, 241 / 226 / 477 at 4,096,
# 150 / 238 / 446 at 6,144 and 219 / 278 / 429 at 8,192 (docs/benchmarks.md, session 8).
PREFILL_CHUNK = 6144
# An idle worker woken by a request waits until requests stop arriving for this long (at most
# BURST_WAIT_S) before it begins, so that a burst goes in together (GenerationEngine._gather_burst).
BURST_GAP_S = 0.001
BURST_WAIT_S = 0.005
T = TypeVar("T")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.7  # 0 (or anything below GREEDY_BELOW) means greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: Sequence[int]
    sampling: SamplingParams
    adapter: AdapterRef | None = None  # None: the bare base model
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class TextDelta:
    text: str
    completion_tokens: int


@dataclass(frozen=True)
class GenerationResult:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float | None
    duration_s: float
    error: str | None = None
    # The request's adapter could not be made resident (its files do not load, or it was removed):
    # the server's trouble, not the request's, and other adapters are unaffected.
    adapter_unavailable: bool = False


class EngineOverloaded(Exception):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the model is busy with other requests; try again in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class EngineNotRunning(Exception):
    pass


class GenerationStream:
    """The caller's end of one request: an async iterator of TextDelta, then `.result`."""

    def __init__(self, engine: GenerationEngine, request: GenerationRequest) -> None:
        self.request = request
        self.result: GenerationResult | None = None
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[TextDelta | GenerationResult] = asyncio.Queue()
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop generating before the next token; the stream then ends with finish_reason cancelled."""
        if not self.cancelled.is_set():
            self.cancelled.set()
            self._engine._wake(self)

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> TextDelta:
        if self.result is not None:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, GenerationResult):
            self.result = item
            raise StopAsyncIteration
        return item

    async def collect(self) -> tuple[str, GenerationResult]:
        parts = [delta.text async for delta in self]
        assert self.result is not None
        return "".join(parts), self.result

    def _deliver(self, item: TextDelta | GenerationResult) -> bool:
        """Called from the worker thread; False when the caller's loop is gone."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:
            return False
        return True


class IncrementalDetokenizer:
    """Decode token by token without splitting characters or dropping tokenizer spacing.

    Decodes a small window ending at the new token and emits only the new suffix, as TGI and
    vLLM do; a trailing U+FFFD means a multi-byte character is incomplete, so we wait.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-6:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        text = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""


class StopMatcher:
    """Cut the text at the first stop sequence, holding back what might be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""
        self.emitted = 0

    def push(self, delta: str) -> tuple[str, bool]:
        """Add decoded text; return (text safe to stream, whether a stop sequence was hit)."""
        self.text += delta
        hits = [i for i in (self.text.find(s, self.emitted) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            out, self.emitted = self.text[self.emitted : end], end
            self.text = self.text[:end]
            return out, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        end = max(self.emitted, len(self.text) - hold)
        out, self.emitted = self.text[self.emitted : end], end
        return out, False

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted :], len(self.text)
        return out


class _Sequence:
    """One request's state inside the worker thread."""

    def __init__(self, stream: GenerationStream, model: LoadedModel) -> None:
        self.stream = stream
        request = stream.request
        self.params = request.sampling
        self.prompt = list(request.prompt_ids)
        self.prompt_len = len(self.prompt)
        self.fed = 0  # prompt tokens that went through the model so far (prefill may take rounds)
        self.passed_over = 0  # prefill rounds that spent their budget on others while it waited
        self.cache: Any = None  # its own KV cache while prefilling; then a row of the decode batch
        self.generated = 0
        self.done = False
        self.detokenizer = IncrementalDetokenizer(model.tokenizer, request.prompt_ids)
        self.stops = StopMatcher(self.params.stop)
        self.hit_stop_sequence = False
        self.generator = torch.Generator(device=model.device)
        self.generator.manual_seed(self.params.seed if self.params.seed is not None else secrets.randbits(63))
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at = 0.0
        self.adapter_key: str | None = None  # set once the engine holds the adapter for this sequence

    @property
    def reserved_tokens(self) -> int:
        """The most KV cache this sequence can come to need."""
        return self.prompt_len + self.params.max_tokens

    def result(
        self, reason: FinishReason, error: str | None = None, adapter_unavailable: bool = False
    ) -> GenerationResult:
        now = time.perf_counter()
        return GenerationResult(
            finish_reason=reason,
            prompt_tokens=self.prompt_len,
            completion_tokens=self.generated,
            time_to_first_token_s=None if self.first_token_at is None else self.first_token_at - self.started,
            duration_s=now - self.started,
            error=error,
            adapter_unavailable=adapter_unavailable,
        )


def install_triton_kernels(model: Any, device: torch.device) -> None:
    """Decoding steps' Triton kernels, each checked at start-up against the code it replaces; one
    that does not compile or computes something else stays off, and the model keeps that code.

    - the one-row 4-bit matmul, for one stream (app/llm/triton_nf4.py): bitsandbytes' otherwise;
    - the 4-bit matmul of 2 to 64 rows on the tensor cores, for several streams (triton_nf4.py),
      where bitsandbytes dequantizes every whole weight to bf16 first;
    - Falcon's rotary embedding in one kernel where transformers launches ten (triton_rotary.py);
    - layer norm of a few rows, a whole row loaded at once (triton_norm.py), where PyTorch's took
      9 us for one row on an H200.
    """
    try:
        from app.llm import triton_nf4, triton_norm, triton_rotary  # Triton: CUDA builds only
    except ImportError as error:
        log.warning("no Triton kernels (%s): bitsandbytes' and PyTorch's are used", error)
        return
    installs: list[tuple[str, Callable[[], object]]] = [
        ("one-row NF4", lambda: triton_nf4.enable(model)),
        ("NF4 matmul of a few rows", lambda: triton_nf4.enable_rows(model)),
        ("rotary", lambda: triton_rotary.install(device)),
        ("layer norm", lambda: triton_norm.install(model)),
    ]
    for name, install in installs:
        try:
            result = install()
        except Exception as error:
            log.warning("the %s kernel is off: %s", name, error)
        else:
            log.info("the %s kernel is on (%s)", name, result)


class GenerationEngine:
    def __init__(
        self,
        model: LoadedModel,
        *,
        max_running: int = 4,
        max_queued: int = 32,
        max_adapters: int = 8,
        max_batch_tokens: int | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        cuda_graphs: bool = True,
        keep_dequantized_weights: bool = False,
        triton_kernels: bool = True,
        warm_pass_sizes: bool | None = None,
        metrics: EngineMetrics | None = None,
    ) -> None:
        self.model = model
        self.metrics = metrics or EngineMetrics()
        self.max_running = max_running
        self.max_queued = max_queued
        # KV memory bound: the prompt + max_tokens of every admitted sequence, summed (None: no bound).
        self.max_batch_tokens = max_batch_tokens
        # Prompt tokens prefilled per round: a long prompt joins over several rounds while everyone
        # else's streams keep decoding, instead of stalling them for its whole prefill.
        self.prefill_chunk = prefill_chunk
        self.adapters = ResidentAdapters(model.model, max_resident=max_adapters, metrics=self.metrics)
        # Adapter files being read off the worker thread, by adapter key (see _admit).
        self._reads: dict[str, concurrent.futures.Future[AdapterFiles]] = {}
        self._reader = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="adapter-read")
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._running: list[_Sequence] = []  # admitted: prefilling or in the decode batch
        self._prefilling: collections.deque[_Sequence] = collections.deque()
        self._unread: _Step | None = None  # the decoding step in flight, its tokens not yet streamed
        self._batch = DecodeBatch(
            model.device, capacity=max_running, max_length=model.context_window, cuda_graphs=cuda_graphs
        )
        if self._batch.graphs is not None:
            make_capturable(model.model)
        self._capture_failed: Hashable = None  # the adapters' set-up a graph capture failed for
        self._capture_seconds = 0.0
        # Prefill pass sizes warmed while idle, per adapters' set-up (app/llm/shapes.py); by default
        # on a GPU only: the CPU's kernels do not depend on having met a shape before.
        self._warm_pass_sizes = model.device.type == "cuda" if warm_pass_sizes is None else warm_pass_sizes
        self._pass_shapes = prefill_shapes(prefill_chunk, max_running)
        self._warmed: set[tuple[Hashable, Shape]] = set()
        self._warm_failed: Hashable = None
        if keep_dequantized_weights:
            # Memory for speed: passes of several tokens skip dequantizing every weight each time
            # (app/llm/dequantized.py).
            added = keep_dequantized(model.model, model.model.dtype)
            log.info("kept a dequantized copy of the 4-bit weights: %.1f GiB", added / 2**30)
        if triton_kernels and model.device.type == "cuda":
            install_triton_kernels(model.model, model.device)
        self._calls: list[Callable[[], None]] = []  # work for the worker thread between rounds
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._recent_durations: collections.deque[float] = collections.deque(maxlen=32)
        self._cache_kwarg = cache_keyword(model.model)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cancel everything in flight, wait for the worker to finish its step, and stop it."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._reader.shutdown(wait=False, cancel_futures=True)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def load(self) -> dict[str, int]:
        with self._cond:
            return {"running": len(self._running), "waiting": len(self._waiting)}

    async def call(self, work: Callable[[], T]) -> T:
        """Run `work` on the worker thread between two rounds (no forward in flight); return its result."""
        if not self.running:
            raise EngineNotRunning("the generation engine is not running")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()

        def settle(result: T | None, error: BaseException | None) -> None:
            if done.done():  # the caller stopped waiting
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)  # type: ignore[arg-type]

        def run() -> None:
            try:
                loop.call_soon_threadsafe(settle, work(), None)
            except BaseException as error:
                loop.call_soon_threadsafe(settle, None, error)

        with self._cond:
            self._calls.append(run)
            self._cond.notify_all()
        return await done

    async def probe_adapter(self, ref: AdapterRef, prompt_ids: list[int]) -> float:
        """How far the adapter moves the next-token logits of `prompt_ids` (0: it does nothing).

        The adapter stays loaded (when a slot is free) for the requests that follow. Its files are
        read first, off the worker thread, so running streams only pause for the install and the
        probe's two forward passes.
        """
        files = await asyncio.to_thread(read_adapter, ref, self.model.device)
        return await self.call(lambda: self.adapters.probe(ref, prompt_ids, files))

    async def preload_adapter(self, ref: AdapterRef) -> bool:
        """Load an adapter into a free slot before anyone asks for it, so its first request does
        not wait for its files; never unloads another adapter. False when it is resident already
        or no slot is free. The files are read off the worker thread, as for a request."""
        if not await self.call(lambda: self.adapters.has_free_slot(ref.key)):
            return False
        files = await asyncio.to_thread(read_adapter, ref, self.model.device)
        return await self.call(lambda: self.adapters.preload(ref, files))

    async def resident_adapters(self) -> frozenset[str]:
        """The adapters loaded on this engine's device now (asked of the worker thread, which owns them)."""
        return await self.call(lambda: frozenset(self.adapters.resident))

    async def remove_adapter(self, key: str) -> None:
        """Unload an adapter version (at once if idle, else when the requests using it end)."""
        await self.call(lambda: self.adapters.remove(key))

    # -- the event loop's side -----------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> GenerationStream:
        """Queue a request; raises EngineOverloaded at once when the queue is full."""
        if not self.running:
            raise EngineNotRunning("the generation engine is not running")
        if request.sampling.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not request.prompt_ids:
            raise ValueError("the prompt is empty")
        stream = GenerationStream(self, request)
        with self._cond:
            self._refuse_when_full()
            self._waiting.append(_Sequence(stream, self.model))
            self.metrics.request_queued(len(self._waiting))
            self._cond.notify_all()
        return stream

    def check_room(self) -> None:
        """Raise EngineOverloaded now if `submit()` would: callers refuse a request before counting
        it anywhere (a user's rate limit should not pay for the server's full queue). `submit()`
        checks again; between the two another request may take the last place."""
        if not self.running:
            raise EngineNotRunning("the generation engine is not running")
        with self._cond:
            self._refuse_when_full()

    def _refuse_when_full(self) -> None:
        if len(self._waiting) + len(self._running) >= self.max_running + self.max_queued:
            self.metrics.request_rejected("overloaded")
            raise EngineOverloaded(self._retry_after())

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _wake(self, stream: GenerationStream) -> None:
        with self._cond:
            for seq in self._waiting:
                if seq.stream is stream:
                    # Never started: answer at once instead of waiting for a slot.
                    self._waiting.remove(seq)
                    result = seq.result("cancelled")
                    self.metrics.request_finished("cancelled", result.prompt_tokens, 0, result.duration_s)
                    seq.stream._deliver(result)
                    break
            self._cond.notify_all()

    def _retry_after(self) -> int:
        typical = (
            sorted(self._recent_durations)[len(self._recent_durations) // 2] if self._recent_durations else 5
        )
        queued_rounds = (len(self._waiting) + len(self._running)) / self.max_running
        return max(1, math.ceil(typical * max(queued_rounds, 1) / 2))

    # -- the worker thread ---------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    if not (self._waiting or self._running):
                        self.metrics.idle()
                    while not (self._stopping or self._waiting or self._running or self._calls):
                        if self._uncaptured() or self._unwarmed():
                            break  # idle: capture a graph or warm a pass size, then look again
                        self._cond.wait()
                    if self._stopping:
                        break
                    if self._waiting and not self._running:
                        self._gather_burst()
                    calls, self._calls = self._calls, []
                    idle = not (calls or self._waiting or self._running)
                if idle:
                    # One at a time: a request that comes meanwhile waits for one capture or warm-up.
                    if not self._capture_graph():
                        self._warm_pass_size()
                    continue
                for call in calls:
                    call()
                with record_function("admit"):
                    self._admit()
                if self._running:
                    self._round()
                else:
                    # Requests are waiting for adapter slots that nothing running holds: should not
                    # happen, but never spin on it.
                    with self._cond:
                        self._cond.wait(0.1)
        with self._cond:
            for seq in [*self._running, *self._waiting]:
                seq.stream._deliver(seq.result("cancelled", "the server is shutting down"))
            self._running.clear()
            self._waiting.clear()
            self._prefilling.clear()
            self._batch.keep([])

    def _gather_burst(self) -> None:
        """With nothing running, wait for requests sent together to finish arriving (until none
        has come for `BURST_GAP_S`, `BURST_WAIT_S` at most), so that they go in one packed pass.

        They arrive over a few milliseconds (each submission takes the event loop's time, and the
        worker needs the GIL to run), and the worker wakes at the first. Woken mid-burst, it put 11
        of 32 prompts in its first pass instead of 19 on an H200, and the median first token came at
        327 ms instead of 152. A request alone pays `BURST_GAP_S`. Holds `_cond`, as its caller does.
        """
        deadline = time.perf_counter() + BURST_WAIT_S
        seen = -1
        while len(self._waiting) != seen and time.perf_counter() < deadline:
            seen = len(self._waiting)
            self._cond.wait(BURST_GAP_S)

    async def warm_up(self) -> dict[str, int]:
        """Do now what the worker does while idle (a benchmark's start-up): capture every decoding
        step's CUDA graph and warm every prefill pass size not done yet; returns how many of each."""

        def warm_all() -> dict[str, int]:
            if self._running:  # a capture computes on rows that sequences would hold
                raise RuntimeError("warm_up needs an engine with nothing running")
            done = {"graphs": 0, "pass_sizes": 0}
            while self._capture_graph():
                done["graphs"] += 1
            while self._warm_pass_size():
                done["pass_sizes"] += 1
            return done

        return await self.call(warm_all)

    def _unwarmed(self) -> list[Shape]:
        """The prefill pass sizes cuBLAS has not met yet with the adapters' present set-up
        (app/llm/shapes.py); none on the CPU, where no kernel is chosen per shape."""
        structure = self.adapters.lora.version
        if not self._warm_pass_sizes or structure == self._warm_failed:
            return []
        return [shape for shape in self._pass_shapes if (structure, shape) not in self._warmed]

    def _warm_pass_size(self) -> bool:
        """Warm the first of `_unwarmed`; False when there was none, or it failed."""
        shapes = self._unwarmed()
        if not shapes:
            return False
        structure = self.adapters.lora.version
        try:
            warm(self.model.model, self.adapters.lora, shapes[0], self.model.model.dtype)
        except Exception:
            log.exception("could not warm the prefill pass sizes; passes choose their kernels as they come")
            self._warm_failed = structure
            return False
        self._warmed.add((structure, shapes[0]))
        return True

    def _uncaptured(self) -> list[tuple[int, int, bool]]:
        """The decoding steps' shapes with no CUDA graph for the adapters' present set-up (after
        a capture failed for it: none, the steps capture their own)."""
        structure = self.adapters.lora.version
        if self._batch.graphs is None or structure == self._capture_failed:
            return []
        return self._batch.uncaptured(structure, lora=self.adapters.lora.rank > 0)

    def _capture_graph(self) -> bool:
        """Capture the first of `_uncaptured` (with no sequence decoding); False when there was
        none to capture, or the capture failed. Steps then replay graphs from their first token
        instead of waiting for a capture, 0.1 to 0.2 s each on a Falcon-7B (every batch size, cache
        width and adapter set-up: tens of graphs at start-up, and again after an adapter of a
        higher rank)."""
        shapes = self._uncaptured()
        if not shapes:
            return False
        structure = self.adapters.lora.version
        started = time.perf_counter()
        try:
            if self._batch.cache is None:  # shaped after one token's prefill
                cache = self._new_cache()
                self._forward(
                    None,
                    input_ids=torch.zeros((1, 1), dtype=torch.long, device=self.model.device),
                    cache=cache,
                )
                self._batch.allocate(prefill_layers(cache))
            self._batch.capture(structure, shapes[0], self._forward)
        except Exception:
            log.exception("could not capture the decoding step's graphs; steps capture their own")
            self._capture_failed = structure
            return False
        self._capture_seconds += time.perf_counter() - started
        if len(shapes) == 1:
            log.info("captured the decoding step's CUDA graphs in %.1f s", self._capture_seconds)
            self._capture_seconds = 0.0
        return True

    def _admit(self) -> None:
        """Move waiting requests into free running slots, in order, holding their adapters.

        A request whose adapter cannot be made resident now (every slot held), or whose KV cache
        would not fit beside the running ones, keeps its place in the queue and is looked at again
        next round; those behind it may go ahead.
        """
        with self._cond:
            candidates = list(self._waiting)
        reserved = sum(seq.reserved_tokens for seq in self._running)
        for seq in candidates:
            if len(self._running) >= self.max_running:
                return
            if (
                self.max_batch_tokens is not None
                and self._running
                and reserved + seq.reserved_tokens > self.max_batch_tokens
            ):
                continue
            ref = seq.stream.request.adapter
            if ref is not None and not self.adapters.can_hold(ref.key):
                continue
            files = None
            if ref is not None and not self.adapters.is_resident(ref.key):
                # Read its files in the background; the batch keeps decoding, and the request is
                # admitted in the first round after they are in memory.
                read = self._reads.get(ref.key)
                if read is None:
                    self._reads[ref.key] = read = self._reader.submit(read_adapter, ref, self.model.device)
                    read.add_done_callback(lambda _: self._notify())
                if not read.done():
                    continue
                del self._reads[ref.key]
                try:
                    files = read.result()
                except AdapterUnavailable as error:
                    self._finish(seq, "error", str(error), adapter_unavailable=True)
                    continue
            with self._cond:
                if seq not in self._waiting:  # cancelled meanwhile
                    continue
                self._waiting.remove(seq)
                self._running.append(seq)
            reserved += seq.reserved_tokens
            self._prefilling.append(seq)
            if ref is not None:
                try:
                    self.adapters.acquire(ref, files)
                    seq.adapter_key = ref.key
                except AdapterUnavailable as error:
                    self._finish(seq, "error", str(error), adapter_unavailable=True)

    def _round(self) -> None:
        """Prefill up to `prefill_chunk` prompt tokens, then advance every decoding sequence by one."""
        for seq in [*self._prefilling, *self._batch.rows]:
            if seq.stream.cancelled.is_set() and not seq.done:
                self._finish(seq, "cancelled")
        # The labels name the worker's phases in a profile (bench/decode_profile.py --prefill)
        with record_function("prefill"):
            self._prefill()
        if len(self._batch):
            with record_function("decode"):
                self._decode()
        self._batch.keep([i for i, seq in enumerate(self._batch.rows) if not seq.done])
        if not len(self._batch):
            # Every row of the step in flight has ended: none of its tokens will be streamed, and
            # reading it when the next request comes would time it as a step of that long.
            self._unread = None

    def _prefill(self) -> None:
        """Prefill up to `prefill_chunk` prompt tokens: whole prompts packed into one forward pass,
        a prompt longer than the whole budget in chunks over several rounds.

        A prompt that fits a round but not what is left of this one waits for the next, whole:
        begun with the rest of this round's budget, it would take a pass of its own next round
        (a partly fed prompt is not packed), and its first token would come no sooner. On an H200,
        a burst of 32 prompts of 166 to 974 tokens then took 2 passes and 438 ms instead of 4 and
        558 ms (`bench/decode_profile.py --prefill`).
        """
        self._order_prefills()
        budget = self.prefill_chunk
        while self._prefilling and budget > 0:
            seq = self._prefilling[0]
            if seq.done:
                self._prefilling.popleft()
                continue
            if seq.fed or seq.prompt_len > self.prefill_chunk:
                budget -= self._prefill_chunk(seq, budget)
                if seq.fed and seq.fed < seq.prompt_len:
                    break  # the rest of this prompt in the next rounds
                continue
            if seq.prompt_len > budget:
                break
            group: list[_Sequence] = []  # the whole prompts at the front of the queue that fit
            while self._prefilling:
                seq = self._prefilling[0]
                if not seq.done and (seq.fed or seq.prompt_len > budget):
                    break
                self._prefilling.popleft()
                if not seq.done:
                    group.append(seq)
                    budget -= seq.prompt_len
            self._prefill_packed(group)
        for seq in self._prefilling:
            if not seq.fed:
                seq.passed_over += 1

    def _order_prefills(self) -> None:
        """Order this round's prompts: a prompt already partly fed, then those passed over in
        `PREFILL_PASSED_OVER_ROUNDS` rounds (in arrival order), then the others shortest first.

        When many prompts arrive at once, the first pass then carries as many of them as its budget
        holds, so more first tokens come out of it than first come first served would give
        (shortest job first: the least mean wait), and a long prompt's first token comes a pass or
        two later than it would have. A partly fed prompt goes on first: its cache is held and half
        built. The fairness bound counts rounds, not seconds: a prompt is passed over only by a
        round whose budget went to others, so it waits behind at most that many budgets of
        other prompts' tokens (each a few hundred ms on an H200) whatever the card's speed and
        however many shorter prompts keep arriving; and rounds give the same order from run to run,
        which the tests rely on.
        """
        if len(self._prefilling) < 2:
            return

        def place(seq: _Sequence) -> tuple[int, int, float]:
            if seq.fed:
                return (0, 0, seq.started)
            if seq.passed_over >= PREFILL_PASSED_OVER_ROUNDS:
                return (1, 0, seq.started)
            return (2, seq.prompt_len, seq.started)

        ordered = sorted(self._prefilling, key=place)
        self._prefilling.clear()
        self._prefilling.extend(ordered)

    def _prefill_chunk(self, seq: _Sequence, budget: int) -> int:
        """Feed the next `budget` tokens of one prompt into its own cache; returns the tokens fed."""
        chunk = seq.prompt[seq.fed : seq.fed + budget]
        started = time.perf_counter()
        try:
            if seq.cache is None:
                seq.cache = self._new_cache()
            out = self._forward(
                self._slots([seq]), input_ids=torch.tensor([chunk], device=self.model.device), cache=seq.cache
            )
            seq.fed += len(chunk)
            self.metrics.prefill(len(chunk), time.perf_counter() - started)
            if seq.fed < seq.prompt_len:
                return len(chunk)
            self._prefilling.remove(seq)
            token = sample_token(out.logits[0, -1], seq.params, seq.generator)
        except Exception as error:  # one request's failure must not take down the others
            self._fail(seq, error)
            return len(chunk)
        self._join([seq], [token], seq.cache, [0])
        return len(chunk)

    def _prefill_packed(self, group: list[_Sequence]) -> None:
        """Several whole prompts in one forward pass, packed end to end into one row.

        A forward pass costs the same Python and kernel launches for ten tokens as for a thousand,
        so prompts that arrive together go in together. Each attends only to itself at its own
        positions, and each token's LoRA is its request's. The attention hook is told the prompts'
        lengths (`packed_prompts`) and attends within each prompt without a mask; the block-diagonal
        causal mask still goes to the model, for its own mask handling and for any attention call
        the hook does not take over (the result is the same either way). The row is padded to one
        of a few sizes (app/llm/shapes.py) with a segment of its own that nothing reads, and the
        logits kept likewise, so that cuBLAS has chosen the pass's kernels before.
        """
        device = self.model.device
        lengths = [seq.prompt_len for seq in group]
        starts = [sum(lengths[:i]) for i in range(len(group))]
        padding = pass_tokens(sum(lengths)) - sum(lengths)
        segments = [*lengths, padding] if padding else lengths
        segment = torch.repeat_interleave(torch.arange(len(segments)), torch.tensor(segments)).to(device)
        order = torch.arange(len(segment), device=device)
        visible = (segment[:, None] == segment[None, :]) & (order[:, None] >= order[None, :])
        slots = self.adapters.slots([seq.adapter_key for seq in group])
        last = [start + n - 1 for start, n in zip(starts, lengths, strict=True)]
        keep = last + last[-1:] * (logit_rows(len(group)) - len(group))
        started = time.perf_counter()
        try:
            cache = self._new_cache()
            token_slots = (
                None
                if slots is None
                else torch.repeat_interleave(torch.tensor([*slots, 0]), torch.tensor([*lengths, padding])).to(
                    device
                )[None, :]
            )
            with packed_prompts(segments), record_function("packed pass"):
                out = self._forward(
                    token_slots,
                    input_ids=torch.tensor(
                        [[t for seq in group for t in seq.prompt] + [0] * padding], device=device
                    ),
                    position_ids=torch.cat([torch.arange(n) for n in segments]).to(device)[None, :],
                    attention_mask=visible[None, None],
                    cache=cache,
                    logits_to_keep=torch.tensor(keep),
                )
            self.metrics.prefill(sum(lengths), time.perf_counter() - started)
            # Chosen on the device and read back at once (one wait for the GPU, not one per prompt)
            with record_function("first tokens"):
                tokens = choose_tokens(
                    out.logits[0, : len(group)],
                    [seq.params for seq in group],
                    [seq.generator for seq in group],
                ).tolist()
        except Exception as error:
            if len(group) == 1:
                self._fail(group[0], error)
                return
            log.warning(
                "packed prefill of %d prompts failed (%s); prefilling them one by one", len(group), error
            )
            self._prefilling.extendleft(reversed(group))
            for seq in group:
                self._prefill_chunk(seq, seq.prompt_len)
            return
        self._join(group, tokens, cache, starts)

    def _join(self, group: list[_Sequence], tokens: list[int], cache: Any, starts: list[int]) -> None:
        """Prompts are in: stream their first tokens, then move the caches of those that go on
        (sequence i's from column `starts[i]` of `cache`) into the decoding batch: the tokens of a
        packed pass need not wait for the copies."""
        going_on = []
        for seq, token, start in zip(group, tokens, starts, strict=True):
            seq.cache = None
            if self._accept(seq, token):
                going_on.append((seq, token, start))
        if not going_on:
            return
        seqs, first_tokens, columns = (list(column) for column in zip(*going_on, strict=True))
        try:  # the first sequences allocate the batch's KV buffers: out of memory ends them alone
            with record_function("join"):
                self._batch.add(seqs, first_tokens, cache, [seq.prompt_len for seq in seqs], columns)
        except Exception as error:
            for seq in seqs:
                self._fail(seq, error)

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.model.config)

    def _slots(self, seqs: Sequence[_Sequence]) -> torch.Tensor | None:
        slots = self.adapters.slots([seq.adapter_key for seq in seqs])
        return None if slots is None else torch.tensor(slots, device=self.model.device)

    def _decode(self) -> None:
        """Launch one forward pass for the whole batch, each row choosing its next token on the
        device; then, while the GPU runs it, stream the tokens of the step before.

        The step's input tokens are the last step's choices, already on the device, so the host
        launches it without reading them first: its own work (reading the tokens, detokenizing, stop
        sequences, streaming, metrics) overlaps the GPU's instead of adding to it. On H200 machines
        that took one stream with an adapter from 162 to 198-212 tokens/s (docs/benchmarks.md).
        A sequence that the tokens read end (end of text, a stop sequence, its length) has taken
        part in one step too many; that step's token for it is never read, and it leaves the batch
        at the end of the round.
        """
        rows = list(self._batch.rows)
        started = time.perf_counter()
        logits = None
        try:
            logits = self._batch.step(
                self.adapters.slots([seq.adapter_key for seq in rows]),
                self._forward,
                structure=self.adapters.lora.version,
            )
            chosen = choose_tokens(logits, [seq.params for seq in rows], [seq.generator for seq in rows])
            self._batch.feed(chosen)
            launched = _Step(rows, chosen, started)
        except Exception as error:
            self._stream_step(self._unread)  # its tokens were chosen before this failure
            self._unread = None
            if logits is None and isinstance(error, torch.OutOfMemoryError) and len(rows) > 1:
                # The step moved nothing: make room by ending the newest sequence alone, and the
                # others retry next round. (Once it has run, its rows have no next token: all end.)
                self._fail(rows[-1], error)
            else:
                for seq in rows:
                    self._fail(seq, error)
            return
        previous, self._unread = self._unread, launched
        with record_function("stream tokens"):
            self._stream_step(previous)

    def _stream_step(self, step: _Step | None) -> None:
        """Stream a launched step's tokens (waiting for them) to its rows that are still going."""
        if step is None:
            return
        try:
            tokens = step.tokens()
        except Exception as error:  # the GPU failed the step after its launch
            for seq in step.rows:
                self._fail(seq, error)
            return
        streamed = 0
        for seq, token in zip(step.rows, tokens, strict=True):
            if not seq.done:
                streamed += 1
                self._accept(seq, token)
        with self._cond:
            waiting = len(self._waiting)
        self.metrics.step(len(step.rows), waiting, streamed, time.perf_counter() - step.started)

    def _forward(
        self, slots: torch.Tensor | None, *, cache: Any, logits_to_keep: int | torch.Tensor = 1, **inputs: Any
    ) -> Any:
        """A forward pass of prefill or decoding: LoRA by slot (per row, or per token), and the
        logits of the last position (or of the positions `logits_to_keep` lists)."""
        # Multi-query attention through fused kernels, without expanding keys in decoding steps
        # (app/llm/attention.py); within a CUDA graph's capture too.
        with multi_query_attention():
            return self.adapters.run(
                slots, use_cache=True, logits_to_keep=logits_to_keep, **inputs, **{self._cache_kwarg: cache}
            )

    def _accept(self, seq: _Sequence, token: int) -> bool:
        """Stream a sampled token; False when it ended the sequence."""
        loaded = self.model
        now = time.perf_counter()
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.metrics.first_token(now - seq.started, seq.prompt_len)
        else:
            self.metrics.inter_token(now - seq.last_token_at)
        seq.last_token_at = now
        if token in loaded.eos_token_ids:
            self._finish(seq, "stop")
            return False
        seq.generated += 1
        text, hit_stop = seq.stops.push(seq.detokenizer.push(token))
        if text and not seq.stream._deliver(TextDelta(text, seq.generated)):
            self._finish(seq, "cancelled")
            return False
        if hit_stop:
            seq.hit_stop_sequence = True
            self._finish(seq, "stop")
            return False
        if seq.generated >= seq.params.max_tokens or seq.prompt_len + seq.generated >= loaded.context_window:
            self._finish(seq, "length")
            return False
        return True

    def _fail(self, seq: _Sequence, error: BaseException) -> None:
        log.error("generation %s failed", seq.stream.request.request_id, exc_info=error)
        if isinstance(error, torch.OutOfMemoryError):
            torch.cuda.empty_cache()
        self._finish(seq, "error", f"{type(error).__name__}: {error}")

    def _finish(
        self,
        seq: _Sequence,
        reason: FinishReason,
        error: str | None = None,
        adapter_unavailable: bool = False,
    ) -> None:
        """End a sequence; its batch row goes at the end of the round (`_round`)."""
        if seq.done:
            return
        seq.done = True
        if reason in ("stop", "length") and not seq.hit_stop_sequence:
            # Text held back as a possible stop sequence turned out not to be one.
            tail = seq.stops.flush()
            if tail:
                seq.stream._deliver(TextDelta(tail, seq.generated))
        result = seq.result(reason, error, adapter_unavailable)
        self._recent_durations.append(result.duration_s)
        self.metrics.request_finished(
            reason, result.prompt_tokens, result.completion_tokens, result.duration_s
        )
        seq.cache = None  # free a prefill cache now, not when the caller lets go of the stream
        if seq.adapter_key is not None:
            self.adapters.release(seq.adapter_key)
            seq.adapter_key = None
        with self._cond:
            for queue in (self._running, self._waiting):
                with contextlib.suppress(ValueError):
                    queue.remove(seq)
        seq.stream._deliver(result)


def cache_keyword(model: Any) -> str:
    """The forward() keyword for the KV cache: `cache` from transformers 5.24, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _Step:
    """A decoding step launched on the device, its tokens not yet read by the host."""

    def __init__(self, rows: list[_Sequence], chosen: torch.Tensor, started: float) -> None:
        self.rows = rows
        self.started = started
        self._ready: torch.cuda.Event | None = None
        if chosen.is_cuda:
            # Copied into pinned memory behind the step, so that waiting for these tokens does not
            # wait for the steps launched after it.
            self._host = torch.empty(chosen.shape, dtype=chosen.dtype, pin_memory=True)
            self._host.copy_(chosen, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = chosen

    def tokens(self) -> list[int]:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.tolist()


def choose_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """Each row's next token ([rows, vocab] logits -> [rows] on the same device), without a host
    sync: greedy rows (temperature 0) by argmax, the others by temperature and nucleus (top-p)
    sampling, all of them in the same few kernels but each drawing from its own generator.

    The draw is what `torch.multinomial(probs, 1)` draws from the same random numbers (the
    exponential race), without the check of the probabilities it first reads back to the host.
    Row by row, sampling took about 14 launches a row: 450 a step for 32 chat replies (the API's
    defaults sample), where the host has a step's time to launch the next one.
    """
    sampled = [row for row, p in enumerate(params) if p.temperature >= GREEDY_BELOW]
    if not sampled:
        return logits.argmax(dim=-1)
    device = logits.device
    temperature = _per_row([max(p.temperature, GREEDY_BELOW) for p in params], device)
    probs = torch.softmax(logits.float() / temperature[:, None], dim=-1)
    if any(params[row].top_p < 1.0 for row in sampled):
        top_p = _per_row([p.top_p if p.top_p < 1.0 else math.inf for p in params], device)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p[:, None]
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill_(outside, 0.0))
    race = torch.ones_like(probs)
    for row in sampled:
        race[row].exponential_(1, generator=generators[row])
    drawn = (probs / race).argmax(dim=-1)
    if len(sampled) == len(params):
        return drawn
    is_sampled = _per_row([p.temperature >= GREEDY_BELOW for p in params], device)
    return torch.where(is_sampled, drawn, logits.argmax(dim=-1))


def _per_row(values: list[float] | list[bool], device: torch.device) -> torch.Tensor:
    """A small per-row tensor on `device`, copied from pinned memory: queued behind the GPU's work
    instead of waiting for it, as a copy from pageable memory would."""
    on_host = torch.tensor(values, pin_memory=device.type == "cuda")
    return on_host.to(device, non_blocking=True)


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """`choose_tokens` for one row of logits, read back."""
    return int(choose_tokens(logits[None], [params], [generator])[0])
