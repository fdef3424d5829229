"""Continuous batching on the real tiny NF4 model: the same greedy text as the plain recipe, batched or alone.

The plain recipe is the seed's way of serving: `generate` on a PEFT model, one request at a time,
`adapter_names=` choosing the adapter. The engine decodes many sequences with different adapters
(and none) in one batch, each joining when its prompt is prefilled and leaving when it ends.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from app.llm.adapters import BASE, AdapterRef
from app.llm.batch import FIRST_COLUMNS
from app.llm.engine import GenerationEngine, GenerationRequest, SamplingParams
from app.llm.loader import LoadedModel, ModelSpec, load_model
from app.llm.metrics import EngineMetrics
from app.llm.prompts import ChatTurn, build_prompt
from app.llm.shapes import pass_tokens
from tests.conftest import build_adapter

QUESTIONS = [
    "What is the leave policy?",
    "Expenses?",
    "Who approves travel above the limit, and how long does it take when the manager is away on leave?",
    "How do I book a flight to the Rotterdam office for the quarterly planning week?",
    "Payroll date",
    "Can I carry unused holiday over into next year, and if so how many days?",
]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, AdapterRef]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: AdapterRef(key=name, path=build_adapter(tiny_model_dir, root / name, seed=seed), label=name)
        for name, seed in (("finance", 5), ("hr", 6))
    }


def prompt(model: LoadedModel, question: str) -> list[int]:
    return build_prompt(model.tokenizer, [ChatTurn("user", question)], max_prompt_tokens=1000).token_ids


def plain_recipe(
    tiny_model_dir: Path, adapters: dict[str, AdapterRef], cases: list[tuple[str, str | None]], tokens: int
) -> list[str]:
    """Greedy `generate`, one request at a time, on a model of its own with both adapters loaded."""
    from peft import PeftModel

    loaded = load_model(ModelSpec(str(tiny_model_dir), device="cpu"))
    model = PeftModel.from_pretrained(loaded.model, str(adapters["finance"].path), adapter_name="finance")
    model.load_adapter(str(adapters["hr"].path), adapter_name="hr")
    model.eval()
    texts = []
    for question, adapter in cases:
        ids = torch.tensor([prompt(loaded, question)])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                do_sample=False,
                adapter_names=[adapter or BASE],
                eos_token_id=sorted(loaded.eos_token_ids),
                pad_token_id=loaded.tokenizer.eos_token_id,
            )
        texts.append(loaded.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return texts


class Record(EngineMetrics):
    """Keeps the order of prefill chunks and decoding steps, and the batch sizes."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def prefill(self, tokens: int, seconds: float) -> None:
        self.events.append(("prefill", tokens))

    def step(self, batch_size: int, queue_depth: int, tokens: int, seconds: float) -> None:
        self.events.append(("step", batch_size))


@pytest.mark.parametrize("dequantized", [False, True], ids=["4-bit", "dequantized-copy"])
async def test_batched_mixed_adapters_give_the_plain_recipes_greedy_text(
    tiny_model_dir: Path, adapters: dict[str, AdapterRef], dequantized: bool
) -> None:
    """Also with KEEP_DEQUANTIZED_WEIGHTS (app/llm/dequantized.py): prefill and batched steps read
    the copy, one-row steps the 4-bit weights, and the text stays the plain recipe's."""
    cases = [(q, [None, "finance", "hr"][i % 3]) for i, q in enumerate(QUESTIONS)]
    expected = plain_recipe(tiny_model_dir, adapters, cases, tokens=24)
    assert len(set(expected)) > 3, "the adapters and the base answer differently"

    model = load_model(ModelSpec(str(tiny_model_dir), device="cpu"))
    record = Record()
    engine = GenerationEngine(
        model, max_running=8, max_adapters=4, prefill_chunk=24, keep_dequantized_weights=dequantized,
        metrics=record,
    )  # fmt: skip
    four_bit = [m for m in model.model.modules() if type(m).__name__ == "Linear4bit"]
    assert four_bit and {hasattr(m, "dequantized_weight") for m in four_bit} == {dequantized}
    engine.start()
    try:

        async def ask(question: str, adapter: str | None, delay: float) -> str:
            await asyncio.sleep(delay)  # later ones join a batch that is already decoding
            ref = adapters[adapter] if adapter else None
            request = GenerationRequest(
                prompt(model, question), SamplingParams(24, temperature=0), adapter=ref
            )
            text, result = await engine.submit(request).collect()
            assert result.finish_reason in ("length", "stop"), result
            return text

        together = await asyncio.gather(*(ask(q, a, 0.03 * (i % 3)) for i, (q, a) in enumerate(cases)))
        alone = [await ask(q, a, 0) for q, a in cases]
    finally:
        engine.shutdown()
    assert together == expected
    assert alone == expected
    assert max(size for kind, size in record.events if kind == "step") >= 4, "they really decoded together"


async def test_a_long_prompt_prefills_in_chunks_between_the_others_steps(tiny_model_dir: Path) -> None:
    model = load_model(ModelSpec(str(tiny_model_dir), device="cpu"))
    record = Record()
    engine = GenerationEngine(model, max_running=4, prefill_chunk=16, metrics=record)
    engine.start()
    try:
        short = engine.submit(
            GenerationRequest(prompt(model, "Expenses?"), SamplingParams(40, temperature=0))
        )
        await anext(short)  # the first token comes from the prefill,
        await anext(short)  # the second from a decoding step: the long prompt arrives mid-stream
        long_question = " ".join(QUESTIONS * 2)
        long = engine.submit(
            GenerationRequest(prompt(model, long_question), SamplingParams(4, temperature=0))
        )
        await asyncio.gather(short.collect(), long.collect())
    finally:
        engine.shutdown()
    long_tokens = len(prompt(model, long_question))
    assert long_tokens > 3 * 16
    # Everything after the short request's first step: the long prompt's chunks, and steps.
    after = record.events[next(i for i, (kind, _) in enumerate(record.events) if kind == "step") :]
    chunks = [i for i, (kind, _) in enumerate(after) if kind == "prefill"]
    assert sum(after[i][1] for i in chunks) == long_tokens and all(after[i][1] <= 16 for i in chunks)
    assert all(any(kind == "step" for kind, _ in after[a + 1 : b]) for a, b in itertools.pairwise(chunks)), (
        f"the running stream decoded between every two chunks: {after}"
    )


async def test_the_kv_budget_holds_a_request_back_until_there_is_room(tiny_model: LoadedModel) -> None:
    ids = prompt(tiny_model, "Expenses?")
    record = Record()
    # Room for one request's prompt + 30 tokens, not two.
    engine = GenerationEngine(tiny_model, max_running=4, max_batch_tokens=len(ids) + 45, metrics=record)
    engine.start()
    try:
        first = engine.submit(GenerationRequest(ids, SamplingParams(30, temperature=0)))
        second = engine.submit(GenerationRequest(ids, SamplingParams(30, temperature=0)))
        (_, one), (_, two) = await asyncio.gather(first.collect(), second.collect())
    finally:
        engine.shutdown()
    assert one.finish_reason == two.finish_reason == "length"
    assert max(size for kind, size in record.events if kind == "step") == 1, "never two in the batch"
    assert two.time_to_first_token_s is not None and two.time_to_first_token_s >= one.duration_s * 0.9


async def test_rows_that_leave_and_replies_that_grow_long_change_no_replys_tokens(
    tiny_model_dir: Path, adapters: dict[str, AdapterRef]
) -> None:
    """A middle row leaves first (the row after it moves up into its place) and the longest reply
    goes past the first columns that attention reads: every reply is still the plain recipe's."""
    cases = [
        (QUESTIONS[2], "finance", FIRST_COLUMNS + 10),
        (QUESTIONS[1], None, 12),
        (QUESTIONS[5], "hr", 60),
    ]
    expected = [plain_recipe(tiny_model_dir, adapters, [(q, a)], tokens=n)[0] for q, a, n in cases]

    model = load_model(ModelSpec(str(tiny_model_dir), device="cpu"))
    record = Record()
    engine = GenerationEngine(model, max_running=4, max_adapters=4, metrics=record)
    engine.start()
    try:
        replies = await join_in_order(engine, model, adapters, cases)
    finally:
        engine.shutdown()
    assert replies == expected
    assert max(size for kind, size in record.events if kind == "step") == 3


async def join_in_order(
    engine: GenerationEngine, model: LoadedModel, adapters: dict[str, AdapterRef], cases: list
) -> list[str]:
    """Submit each (question, adapter, tokens) once the one before is in the batch (its first
    token out), so the rows are in this order; the whole replies, each to its length."""
    streams, firsts = [], []
    for question, adapter, tokens in cases:
        ref = adapters[adapter] if adapter else None
        request = GenerationRequest(
            prompt(model, question), SamplingParams(tokens, temperature=0), adapter=ref
        )
        streams.append(engine.submit(request))
        firsts.append((await anext(streams[-1])).text)
    replies = []
    for first, stream in zip(firsts, streams, strict=True):
        text, result = await stream.collect()
        assert result.finish_reason == "length", result
        replies.append(first + text)
    return replies


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
async def test_on_a_gpu_the_idle_engine_captures_the_steps_and_decoding_waits_for_none(
    tiny_model_dir: Path, adapters: dict[str, AdapterRef]
) -> None:
    """Captured while idle: every batch size, cache width and adapter set-up, so that rows joining,
    leaving and growing past the first columns replay graphs without capturing one; and the
    replies are the eager engine's on the same GPU."""
    cases = [
        (QUESTIONS[2], "finance", FIRST_COLUMNS + 10),
        (QUESTIONS[1], None, 12),
        (QUESTIONS[5], "hr", 60),
    ]
    replies: dict[bool, list[str]] = {}
    for graphs in (False, True):
        model = load_model(ModelSpec(str(tiny_model_dir), device="cuda"))  # an engine's LoRA wraps its layers
        engine = GenerationEngine(model, max_running=4, max_adapters=4, cuda_graphs=graphs)
        engine.start()
        try:
            for name in ("finance", "hr"):
                assert await engine.preload_adapter(adapters[name])
            await engine.warm_up()  # what the idle worker has not captured yet
            held = engine._batch.graphs
            assert (held is not None) == graphs
            before = None if held is None else (len(held), held.captures)
            replies[graphs] = await join_in_order(engine, model, adapters, cases)
            if held is not None:
                # 4 rows at most: batch buckets 1, 2, 4; every power of two of columns from
                # FIRST_COLUMNS to the context window; without and with LoRA. And no step
                # waited for a capture.
                widths = (model.context_window - 1).bit_length() - FIRST_COLUMNS.bit_length() + 2
                assert before == (3 * widths * 2, held.captures)
        finally:
            engine.shutdown()
    assert replies[True] == replies[False]


async def test_prompts_that_arrive_together_prefill_in_one_pass_with_their_own_adapters(
    tiny_model_dir: Path, adapters: dict[str, AdapterRef]
) -> None:
    cases = [(q, [None, "finance", "hr"][i % 3]) for i, q in enumerate(QUESTIONS)]
    expected = plain_recipe(tiny_model_dir, adapters, cases, tokens=16)

    model = load_model(ModelSpec(str(tiny_model_dir), device="cpu"))
    record = Record()
    engine = GenerationEngine(model, max_running=8, max_adapters=4, metrics=record)
    original = F.scaled_dot_product_attention
    causal_unmasked: list[tuple[int, int]] = []  # (queries, keys) of causal calls without a mask

    def calls_reaching_torch(
        query: torch.Tensor, key: torch.Tensor, *args: object, **kwargs: object
    ) -> object:
        if kwargs.get("is_causal") and kwargs.get("attn_mask") is None:
            causal_unmasked.append((query.shape[-2], key.shape[-2]))
        return original(query, key, *args, **kwargs)  # type: ignore[arg-type]

    F.scaled_dot_product_attention = calls_reaching_torch  # type: ignore[assignment]
    engine.start()
    try:
        for name in ("finance", "hr"):  # resident first, so no request waits for its files
            await engine.submit(
                GenerationRequest(prompt(model, "Hi"), SamplingParams(1), adapter=adapters[name])
            ).collect()
        record.events.clear()
        causal_unmasked.clear()
        requests = [
            GenerationRequest(
                prompt(model, q), SamplingParams(16, temperature=0), adapter=adapters[a] if a else None
            )
            for q, a in cases
        ]
        streams = [engine.submit(request) for request in requests]  # all before the worker's next round
        replies = [(await stream.collect())[0] for stream in streams]
    finally:
        engine.shutdown()
        F.scaled_dot_product_attention = original
    assert replies == expected
    prefills = [tokens for kind, tokens in record.events if kind == "prefill"]
    assert prefills[0] > max(len(request.prompt_ids) for request in requests), f"packed: {prefills}"
    assert sum(prefills) == sum(len(request.prompt_ids) for request in requests)
    # The packed pass attended per prompt (app/llm/attention.py's packed_prompts): each prompt of it
    # reached torch alone, causal and without the block-diagonal mask, in every layer; so did the
    # padding up to the pass's size (app/llm/shapes.py), a segment of its own.
    layers = model.model.config.num_hidden_layers
    paddings = [pass_tokens(n) - n for n in prefills]
    segments = [len(r.prompt_ids) for r in requests] + [n for n in paddings if n]
    assert sorted(causal_unmasked) == sorted((n, n) for n in segments * layers)
