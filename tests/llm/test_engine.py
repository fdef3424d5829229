"""The generation engine on the real tiny NF4 model: streaming, limits, stop, cancel, overload."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from app.llm.engine import (
    EngineOverloaded,
    GenerationEngine,
    GenerationRequest,
    IncrementalDetokenizer,
    SamplingParams,
    StopMatcher,
    choose_tokens,
    install_triton_kernels,
)
from app.llm.loader import LoadedModel, ModelSpec, load_model
from app.llm.metrics import EngineMetrics
from app.llm.prompts import ChatTurn, build_prompt


def prompt(model: LoadedModel, text: str = "What is the expense policy?") -> list[int]:
    return build_prompt(model.tokenizer, [ChatTurn("user", text)], max_prompt_tokens=1000).token_ids


@pytest.fixture
async def engine(tiny_model: LoadedModel):  # type: ignore[no-untyped-def]
    engine = GenerationEngine(tiny_model, max_running=2, max_queued=1)
    engine.start()
    yield engine
    await asyncio.to_thread(engine.shutdown)


@pytest.mark.skipif(importlib.util.find_spec("triton") is not None, reason="this torch ships Triton")
def test_without_triton_the_model_keeps_its_own_kernels_and_the_log_says_why(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A CUDA build of PyTorch ships Triton; were it missing, the server would still start."""
    from transformers.models.falcon import modeling_falcon

    model = load_model(ModelSpec(str(tiny_model_dir), device="cpu")).model
    rotary = modeling_falcon.apply_rotary_pos_emb
    with caplog.at_level(logging.WARNING, logger="app.llm.engine"):
        install_triton_kernels(model, model.device)
    assert "no Triton kernels" in caplog.text
    assert modeling_falcon.apply_rotary_pos_emb is rotary
    assert not any(hasattr(m, "nf4_weight") or hasattr(m, "one_kernel") for m in model.modules())


def greedy(max_tokens: int, **kwargs: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kwargs)  # type: ignore[arg-type]


async def test_streams_deltas_that_add_up_to_the_decoded_reply(engine: GenerationEngine, tiny_model) -> None:
    stream = engine.submit(GenerationRequest(prompt(tiny_model), greedy(40)))
    deltas = [delta async for delta in stream]
    result = stream.result
    assert result is not None and result.finish_reason == "length"
    assert result.completion_tokens == 40 == deltas[-1].completion_tokens
    assert result.prompt_tokens == len(prompt(tiny_model))
    assert result.time_to_first_token_s is not None and 0 < result.time_to_first_token_s <= result.duration_s
    assert len(deltas) > 10 and all(d.text for d in deltas)
    # Greedy decoding is deterministic, and matches what transformers' own generate() produces.
    import torch

    ids = torch.tensor([prompt(tiny_model)])
    expected = tiny_model.model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0)
    assert "".join(d.text for d in deltas) == tiny_model.tokenizer.decode(expected[0, ids.shape[1] :])


class StepRecord(EngineMetrics):
    """Records the decoding steps the engine reports (the server's observer exports the same)."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, float]] = []  # (tokens streamed, seconds from launch to read)

    def step(self, batch_size: int, queue_depth: int, tokens: int, seconds: float) -> None:
        self.steps.append((tokens, seconds))


async def test_decoding_steps_report_the_tokens_they_streamed_and_no_step_outlives_its_batch(
    tiny_model: LoadedModel,
) -> None:
    """Each step is launched before the host reads the one before (GenerationEngine._decode): a
    sequence that ends takes part in one step too many, whose token is never streamed nor counted,
    and the step in flight when the batch empties is dropped, not read when the next request comes."""
    record = StepRecord()
    engine = GenerationEngine(tiny_model, max_running=2, max_queued=2, metrics=record)
    engine.start()
    try:
        results = [
            await engine.submit(GenerationRequest(prompt(tiny_model, text), greedy(n))).collect()
            for text, n in (("What is the expense policy?", 9), ("Who approves travel?", 14))
        ]
        await asyncio.sleep(1.0)  # idle, with the last step of the last request launched and not read
        results.append(await engine.submit(GenerationRequest(prompt(tiny_model), greedy(6))).collect())
    finally:
        await asyncio.to_thread(engine.shutdown)
    for _, result in results:
        assert result.finish_reason == "length"
    # Each request's first token comes from its prefill, every other one from a step.
    assert sum(tokens for tokens, _ in record.steps) == sum(r.completion_tokens - 1 for _, r in results)
    assert max(seconds for _, seconds in record.steps) < 1.0


async def test_seed_makes_sampling_repeatable(engine: GenerationEngine, tiny_model) -> None:
    def sampled(seed: int) -> SamplingParams:
        return SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, seed=seed)

    first, _ = await engine.submit(GenerationRequest(prompt(tiny_model), sampled(7))).collect()
    again, _ = await engine.submit(GenerationRequest(prompt(tiny_model), sampled(7))).collect()
    other, _ = await engine.submit(GenerationRequest(prompt(tiny_model), sampled(8))).collect()
    assert first == again
    assert first != other


async def test_stop_sequence_ends_the_reply_without_streaming_it(
    engine: GenerationEngine, tiny_model
) -> None:
    full, _ = await engine.submit(GenerationRequest(prompt(tiny_model), greedy(60))).collect()
    stop = full[20:26]  # a piece of text the model is known to write
    stream = engine.submit(GenerationRequest(prompt(tiny_model), greedy(60, stop=(stop,))))
    text, result = await stream.collect()
    assert result.finish_reason == "stop"
    assert text == full[: full.index(stop)]


async def test_end_of_text_token_finishes_with_stop(eos_model_dir: Path) -> None:
    model = load_model(ModelSpec(str(eos_model_dir), device="cpu"))
    engine = GenerationEngine(model)
    engine.start()
    try:
        text, result = await engine.submit(GenerationRequest(prompt(model), greedy(50))).collect()
    finally:
        engine.shutdown()
    assert (text, result.finish_reason, result.completion_tokens) == ("", "stop", 0)


async def test_cancel_ends_the_stream_and_frees_the_slot(engine: GenerationEngine, tiny_model) -> None:
    stream = engine.submit(GenerationRequest(prompt(tiny_model), greedy(5000)))
    received = []
    async for delta in stream:
        received.append(delta)
        if len(received) == 3:
            stream.cancel()
    assert stream.result is not None and stream.result.finish_reason == "cancelled"
    assert stream.result.completion_tokens < 100
    assert engine.load() == {"running": 0, "waiting": 0}


async def test_full_queue_is_refused_at_once_and_others_keep_running(
    engine: GenerationEngine, tiny_model
) -> None:
    # max_running=2 and max_queued=1: three requests fit, the fourth is refused.
    streams = [engine.submit(GenerationRequest(prompt(tiny_model), greedy(5000))) for _ in range(3)]
    with pytest.raises(EngineOverloaded) as refused:
        engine.submit(GenerationRequest(prompt(tiny_model), greedy(5)))
    assert refused.value.retry_after_s >= 1
    # Cancelling the queued one answers it at once, without waiting for a running slot.
    streams[2].cancel()
    _, result = await asyncio.wait_for(streams[2].collect(), 5)
    assert result.finish_reason == "cancelled" and result.completion_tokens == 0
    for stream in streams[:2]:
        stream.cancel()
        await stream.collect()


async def test_a_failing_request_fails_alone(engine: GenerationEngine, tiny_model) -> None:
    good = engine.submit(GenerationRequest(prompt(tiny_model), greedy(30)))
    vocab = len(tiny_model.tokenizer)
    bad = engine.submit(GenerationRequest([vocab + 10], greedy(30)))  # an id outside the embedding
    _, bad_result = await bad.collect()
    text, good_result = await good.collect()
    assert bad_result.finish_reason == "error" and "IndexError" in (bad_result.error or "")
    assert good_result.finish_reason == "length" and len(text) > 0


async def test_kv_buffers_that_do_not_fit_fail_the_request_that_needs_them_and_the_engine_goes_on(
    engine: GenerationEngine, tiny_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first sequence to join allocates the batch's KV buffers (every row, the whole context
    window). When the GPU cannot hold them, that request ends with an error that says what to
    lower, and the next one allocates them again."""
    from app.llm import batch

    real = batch.SlotCache
    refused = []

    def out_of_memory_once(*args: Any) -> Any:
        if not refused:  # the GPU saying no, as torch raises it from an allocation
            refused.append(args)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        return real(*args)

    monkeypatch.setattr(batch, "SlotCache", out_of_memory_once)
    _, first = await engine.submit(GenerationRequest(prompt(tiny_model), greedy(8))).collect()
    text, second = await engine.submit(GenerationRequest(prompt(tiny_model), greedy(8))).collect()
    assert first.finish_reason == "error", first
    assert "KV cache of 2 sequences" in (first.error or "") and "MAX_RUNNING_GENERATIONS" in (
        first.error or ""
    )
    assert second.finish_reason == "length" and len(text) > 0


def test_tokens_are_chosen_without_the_host_as_torch_multinomial_draws_them() -> None:
    """The decoding step chooses its tokens where the logits are, so the next step can be launched
    before the host reads them (GenerationEngine._decode): greedy rows by argmax, sampled rows (all
    at once) from the same random numbers as torch.multinomial (which reads its check back to the
    host), each from its own generator, within its nucleus where it has a top_p."""
    logits = torch.randn(4, 500, generator=torch.Generator().manual_seed(1)) * 3
    params = [
        SamplingParams(8, temperature=0.0),
        SamplingParams(8, temperature=0.8),
        SamplingParams(8, 1.3),
        SamplingParams(8, temperature=1.1, top_p=0.5),
    ]
    seeds = [0, 11, 12, 13]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    chosen = [choose_tokens(logits, params, generators) for _ in range(20)]
    assert chosen[0].dtype == torch.long and chosen[0].shape == (4,)
    assert {int(draws[0]) for draws in chosen} == {int(logits[0].argmax())}  # greedy: the argmax
    for row in (1, 2, 3):
        generator = torch.Generator().manual_seed(seeds[row])
        probs = torch.softmax(logits[row] / params[row].temperature, dim=-1)
        if params[row].top_p < 1.0:  # the smallest set of most likely tokens reaching top_p
            order = probs.argsort(descending=True)
            before = probs[order].cumsum(0) - probs[order]
            probs = torch.zeros_like(probs).index_put_((order,), torch.where(before > 0.5, 0.0, probs[order]))
        expected = [int(torch.multinomial(probs, 1, generator=generator)) for _ in range(20)]
        assert [int(draws[row]) for draws in chosen] == expected, row
        assert len(set(expected)) > 1, "a temperature this high draws more than one token"


def test_detokenizer_never_splits_a_character(tiny_model: LoadedModel) -> None:
    tokenizer = tiny_model.tokenizer
    text = "Zürich café: 日本語 → 💶 ok"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # multi-byte characters span several byte-level tokens
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Hello", add_special_tokens=False))
    deltas = [detok.push(token) for token in ids]
    assert "".join(deltas) == text
    assert not any("\ufffd" in delta for delta in deltas)


def test_stop_matcher_holds_back_possible_stop_text() -> None:
    matcher = StopMatcher(["###", "END"])
    assert matcher.push("Hello #") == ("Hello ", False)  # "#" could start "###"
    assert matcher.push("# no") == ("## no", False)  # "## n" cannot be "###" any more
    assert matcher.push(" EN") == (" ", False)
    assert matcher.push("D and more") == ("", True)
    assert matcher.text == "Hello ## no "
    assert StopMatcher([]).push("anything") == ("anything", False)
