"""Per-request LoRA adapters in the engine, on the real tiny NF4 model with real PEFT adapters."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from app.llm.adapters import AdapterRef
from app.llm.engine import GenerationEngine, GenerationRequest, SamplingParams
from app.llm.loader import LoadedModel, ModelSpec, load_model
from app.llm.prompts import ChatTurn, build_prompt
from tests.conftest import build_adapter


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, AdapterRef]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: AdapterRef(key=name, path=build_adapter(tiny_model_dir, root / name, seed=seed), label=name)
        for name, seed in (("finance", 1), ("hr", 2), ("legal", 3))
    }


@pytest.fixture
def model(tiny_model_dir: Path) -> LoadedModel:
    # A model of its own: adapters change the model's modules, so tests must not share one.
    return load_model(ModelSpec(str(tiny_model_dir), device="cpu"))


def prompt(model: LoadedModel) -> list[int]:
    return build_prompt(
        model.tokenizer, [ChatTurn("user", "What is the leave policy?")], max_prompt_tokens=500
    ).token_ids


async def run(engine: GenerationEngine, model: LoadedModel, ref: AdapterRef | None, tokens: int = 24) -> str:
    request = GenerationRequest(prompt(model), SamplingParams(max_tokens=tokens, temperature=0), adapter=ref)
    text, result = await engine.submit(request).collect()
    assert result.finish_reason == "length", result
    return text


async def test_concurrent_requests_each_get_their_own_adapter(model: LoadedModel, adapters) -> None:  # type: ignore[no-untyped-def]
    engine = GenerationEngine(model, max_running=3, max_adapters=4)
    engine.start()
    try:
        alone = {name: await run(engine, model, adapters.get(name)) for name in ("finance", "hr", None)}
        assert len(set(alone.values())) == 3, "each adapter, and the base, writes something different"
        together = await asyncio.gather(
            *(run(engine, model, adapters.get(name)) for name in ("finance", "hr", None))
        )
        assert together == [alone["finance"], alone["hr"], alone[None]]
    finally:
        engine.shutdown()


async def test_eviction_and_reload_give_the_same_output(model: LoadedModel, adapters) -> None:  # type: ignore[no-untyped-def]
    engine = GenerationEngine(model, max_running=2, max_adapters=1)
    engine.start()
    try:
        first = await run(engine, model, adapters["finance"])
        other = await run(engine, model, adapters["hr"])  # evicts a
        assert engine.adapters.resident == ["hr"] and engine.adapters.evictions == 1
        again = await run(engine, model, adapters["finance"])  # reloads a, evicts b
        assert (again, other != first) == (first, True)
        assert engine.adapters.loads == 3 and engine.adapters.resident == ["finance"]
    finally:
        engine.shutdown()


async def test_a_held_adapter_is_never_evicted_under_its_request(model: LoadedModel, adapters) -> None:  # type: ignore[no-untyped-def]
    engine = GenerationEngine(model, max_running=2, max_adapters=1)
    engine.start()
    try:
        expected_b = await run(engine, model, adapters["hr"])
        long_a = engine.submit(
            GenerationRequest(
                prompt(model), SamplingParams(max_tokens=150, temperature=0), adapter=adapters["finance"]
            )
        )
        # a holds the only slot (b, asked for before that, could go first while a's files are read)
        await anext(long_a)
        b_waits = asyncio.ensure_future(run(engine, model, adapters["hr"]))
        await asyncio.sleep(0.2)
        assert not b_waits.done() and engine.load() == {"running": 1, "waiting": 1}
        _, result = await long_a.collect()
        assert result.finish_reason == "length" and result.completion_tokens == 150
        assert await b_waits == expected_b  # b ran once a's request let go of the only slot
    finally:
        engine.shutdown()


async def test_removed_adapter_is_unloaded_after_its_last_request(model: LoadedModel, adapters) -> None:  # type: ignore[no-untyped-def]
    engine = GenerationEngine(model, max_running=2, max_adapters=4)
    engine.start()
    try:
        running = engine.submit(
            GenerationRequest(
                prompt(model), SamplingParams(max_tokens=100, temperature=0), adapter=adapters["legal"]
            )
        )
        async for _ in running:
            break  # it is decoding now
        await engine.remove_adapter("legal")
        assert "legal" in engine.adapters.resident  # still held by the running request
        _, result = await running.collect()
        assert result.finish_reason == "length" and result.completion_tokens == 100
        await engine.call(lambda: None)  # one round later
        assert "legal" not in engine.adapters.resident
    finally:
        engine.shutdown()


async def test_probe_tells_an_adapter_that_does_nothing_and_keeps_a_good_one_loaded(
    model: LoadedModel, adapters, tmp_path: Path, tiny_model_dir: Path
) -> None:
    engine = GenerationEngine(model, max_adapters=2)
    engine.start()
    try:
        assert await engine.probe_adapter(adapters["finance"], prompt(model)) > 0.1
        assert engine.adapters.resident == ["finance"]  # ready for the first request
        loads = engine.adapters.loads
        assert len(await run(engine, model, adapters["finance"])) > 0
        assert engine.adapters.loads == loads  # ... which did not load it again
        inert = build_adapter(tiny_model_dir, tmp_path / "inert", scale=0.0)  # B = 0, as PEFT initialises it
        assert await engine.probe_adapter(AdapterRef("inert", inert), prompt(model)) == 0.0
        await engine.remove_adapter("inert")  # what the intake does with a refused upload
        assert engine.adapters.resident == ["finance"]
    finally:
        engine.shutdown()


async def test_an_adapter_that_does_not_load_fails_its_request_alone(
    model: LoadedModel, adapters, tmp_path: Path
) -> None:
    engine = GenerationEngine(model)
    engine.start()
    try:
        broken = AdapterRef(key="broken", path=tmp_path / "missing", label="broken@1")
        request = GenerationRequest(
            prompt(model), SamplingParams(max_tokens=5, temperature=0), adapter=broken
        )
        _, result = await engine.submit(request).collect()
        assert result.finish_reason == "error" and result.adapter_unavailable
        # The request's message names the adapter; the server's paths stay in its log.
        assert "broken@1 could not be loaded" in (result.error or "") and str(tmp_path) not in (
            result.error or ""
        )
        assert len(await run(engine, model, adapters["finance"])) > 0
    finally:
        engine.shutdown()
