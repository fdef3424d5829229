"""The engine's prefill order on the real tiny model: within a round, whole prompts go shortest first,
a partly fed prompt goes before them, and a prompt passed over for PREFILL_PASSED_OVER_ROUNDS rounds
goes first however many shorter prompts keep arriving.

The worker is held (an `engine.call` that waits, or a metrics callback that waits) while requests
arrive, so each round sees exactly the prompts the test means it to, and the order is the same
from run to run.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from app.llm import engine as engine_module
from app.llm.engine import (
    PREFILL_PASSED_OVER_ROUNDS,
    GenerationEngine,
    GenerationRequest,
    GenerationStream,
    SamplingParams,
)
from app.llm.loader import LoadedModel
from app.llm.metrics import EngineMetrics

TEXT = (
    "Who approves travel above the limit, and how long does it take when the manager is away on leave? "
    "How do I book a flight to the Rotterdam office for the quarterly planning week? "
) * 8


class Record(EngineMetrics):
    """Prefill passes (their tokens) and first tokens (their prompt's length), in order; optionally
    runs `on_prefill` on the worker thread after each pass, while the worker waits for it."""

    def __init__(self, on_prefill: Callable[[int], None] | None = None) -> None:
        self.events: list[tuple[str, int]] = []
        self.on_prefill = on_prefill

    def prefill(self, tokens: int, seconds: float) -> None:
        self.events.append(("prefill", tokens))
        if self.on_prefill is not None:
            self.on_prefill(tokens)

    def first_token(self, seconds: float, prompt_tokens: int) -> None:
        self.events.append(("first", prompt_tokens))


def request(model: LoadedModel, length: int) -> GenerationRequest:
    ids = model.tokenizer.encode(TEXT)
    assert len(ids) >= length
    return GenerationRequest(ids[:length], SamplingParams(1, temperature=0))


def of(record: Record, kind: str) -> list[int]:
    return [n for k, n in record.events if k == kind]


async def test_prompts_that_arrive_together_prefill_shortest_first(tiny_model: LoadedModel) -> None:
    record = Record()
    engine = GenerationEngine(tiny_model, max_running=8, prefill_chunk=60, metrics=record)
    engine.start()
    try:
        gate = threading.Event()
        held = asyncio.ensure_future(engine.call(lambda: gate.wait(10)))  # the worker waits here
        await asyncio.sleep(0)
        streams = [engine.submit(request(tiny_model, n)) for n in (40, 30, 20, 10, 25)]  # in this order
        gate.set()
        await held
        results = [(await stream.collect())[1] for stream in streams]
    finally:
        engine.shutdown()
    assert all(result.finish_reason == "length" for result in results)
    # Round 1: 10 + 20 + 25 in one pass; the 30 does not fit the 5 left, and waits whole for
    # round 2 (begun there, it would take a pass of its own); the 40 then waits for round 3.
    assert of(record, "prefill") == [55, 30, 40]
    assert of(record, "first") == [10, 20, 25, 30, 40]


async def test_a_partly_fed_prompt_goes_on_before_shorter_arrivals(tiny_model: LoadedModel) -> None:
    loop = asyncio.get_running_loop()
    engine: GenerationEngine
    streams: list[GenerationStream] = []
    arrived = asyncio.Event()

    def after_first_chunk(tokens: int) -> None:
        if len(streams) == 1:  # on the worker: a short prompt arrives before the next round

            async def arrive() -> None:
                streams.append(engine.submit(request(tiny_model, 10)))
                arrived.set()

            asyncio.run_coroutine_threadsafe(arrive(), loop).result(10)

    record = Record(after_first_chunk)
    engine = GenerationEngine(tiny_model, max_running=8, prefill_chunk=60, metrics=record)
    engine.start()
    try:
        streams.append(engine.submit(request(tiny_model, 200)))
        await asyncio.wait_for(arrived.wait(), 10)
        for stream in list(streams):
            await stream.collect()
    finally:
        engine.shutdown()
    assert of(record, "prefill") == [60, 60, 60, 20, 10]
    assert of(record, "first") == [200, 10]


async def test_a_long_prompt_is_passed_over_for_a_bounded_number_of_rounds(tiny_model: LoadedModel) -> None:
    """Three short prompts fill each round's budget and three more arrive in every round: shortest
    first alone would never reach the long prompt while they keep coming."""
    loop = asyncio.get_running_loop()
    engine: GenerationEngine
    streams: list[GenerationStream] = []
    arrivals_left = PREFILL_PASSED_OVER_ROUNDS + 3
    arrivals_over = asyncio.Event()

    def three_more(tokens: int) -> None:
        nonlocal arrivals_left
        if arrivals_left:  # on the worker, after each pass: three short prompts arrive

            async def arrive() -> None:
                streams.extend(engine.submit(request(tiny_model, 10)) for _ in range(3))
                if not arrivals_left:
                    arrivals_over.set()

            arrivals_left -= 1
            asyncio.run_coroutine_threadsafe(arrive(), loop).result(10)

    record = Record(three_more)
    engine = GenerationEngine(tiny_model, max_running=32, max_queued=32, prefill_chunk=30, metrics=record)
    engine.start()
    try:
        gate = threading.Event()
        held = asyncio.ensure_future(engine.call(lambda: gate.wait(10)))
        await asyncio.sleep(0)
        streams.append(engine.submit(request(tiny_model, 25)))  # first to arrive, longest
        streams.extend(engine.submit(request(tiny_model, 10)) for _ in range(3))
        gate.set()
        await held
        await asyncio.wait_for(arrivals_over.wait(), 30)
        for stream in list(streams):
            await stream.collect()
    finally:
        engine.shutdown()
    firsts = of(record, "first")
    # Passed over by PREFILL_PASSED_OVER_ROUNDS full rounds of shorter prompts, then first in the next.
    assert of(record, "prefill")[: PREFILL_PASSED_OVER_ROUNDS + 1] == [30] * PREFILL_PASSED_OVER_ROUNDS + [25]
    assert firsts.index(25) == 3 * PREFILL_PASSED_OVER_ROUNDS
    assert len(firsts) - firsts.index(25) > 3, "short prompts were still arriving when it went"


async def test_an_idle_engine_waits_for_a_burst_to_finish_arriving_before_its_first_pass(
    tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests sent together reach the worker over some milliseconds, and it wakes at the first:
    it waits until they stop coming, so they share the first pass (GenerationEngine._gather_burst).

    Here they are submitted 5 ms apart, the event loop asleep in between (the GIL released) so
    that the worker can wake and run after any of them; the gap the worker waits for is widened
    from 1 ms to 50 ms, so that a loaded machine's late wake-ups cannot split the burst."""
    monkeypatch.setattr(engine_module, "BURST_GAP_S", 0.05)
    monkeypatch.setattr(engine_module, "BURST_WAIT_S", 2.0)
    record = Record()
    engine = GenerationEngine(tiny_model, max_running=8, metrics=record)
    engine.start()
    try:
        streams = []
        for n in (12, 14, 16, 18, 20, 22):
            streams.append(engine.submit(request(tiny_model, n)))
            await asyncio.sleep(0.005)
        results = [(await stream.collect())[1] for stream in streams]
    finally:
        engine.shutdown()
    assert all(result.finish_reason == "length" for result in results)
    # One pass took them all (a worker that began at the first request took it alone)
    assert of(record, "prefill") == [12 + 14 + 16 + 18 + 20 + 22]
