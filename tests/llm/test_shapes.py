"""Prefill passes rounded up to a few sizes, each warmed once through the model's own layers."""

from __future__ import annotations

from pathlib import Path

import torch

from app.llm.adapters import AdapterRef
from app.llm.engine import GenerationEngine, GenerationRequest, SamplingParams
from app.llm.loader import ModelSpec, load_model
from app.llm.lora import BatchedLoraLinear
from app.llm.shapes import FEWEST, logit_rows, pass_tokens, prefill_shapes
from tests.conftest import build_adapter


def test_a_pass_runs_at_one_of_a_few_sizes_at_most_a_sixteenth_above_it_past_1024_tokens() -> None:
    sizes = {pass_tokens(n) for n in range(1, 8193)}
    assert all(pass_tokens(n) == n for n in range(1, FEWEST + 1))  # the Triton kernels' passes
    for n in range(FEWEST + 1, 8193):
        size = pass_tokens(n)
        assert size >= n and size % FEWEST == 0, n
        assert size - n < max(FEWEST, n / 16), n
        assert pass_tokens(size) == size  # a size is its own size
    # 128 to 8,192 tokens: 3 sizes to 256, then 4, 8 and 16 an octave
    assert len(sizes - set(range(1, FEWEST + 1))) == 3 + 4 + 8 + 16 + 16 + 16
    assert [logit_rows(n) for n in (1, 2, 3, 5, 17, 32)] == [1, 2, 4, 8, 32, 32]


async def test_the_idle_engine_warms_every_size_through_each_distinct_layer_with_lora(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Warm-up calls each distinct linear layer once per size (the output layer per logits rows),
    with the LoRA products on once an adapter is loaded, and leaves no adapter selected."""
    model = load_model(ModelSpec(str(tiny_model_dir), device="cpu"))
    ref = AdapterRef(key="a", path=build_adapter(tiny_model_dir, tmp_path / "a", seed=3), label="a")
    engine = GenerationEngine(model, max_running=3, prefill_chunk=300, warm_pass_sizes=True)
    calls: list[tuple[str, int, bool]] = []  # (layer, rows, LoRA selected) while warming up
    names: dict[torch.nn.Module, str] = {}
    warming = False

    def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if warming:
            lora = isinstance(module, BatchedLoraLinear) and module.rows.mask is not None
            calls.append((names[module].split(".")[-1], args[0].shape[-2], lora))

    engine.start()
    try:
        assert await engine.preload_adapter(ref)  # its layers wrap the model's
        names.update((module, name) for name, module in model.model.named_modules())
        for module in model.model.modules():
            if isinstance(module, BatchedLoraLinear) or module is model.model.get_output_embeddings():
                module.register_forward_pre_hook(record)
        warming = True
        done = await engine.warm_up()
        again = await engine.warm_up()
        warming = False
        text, result = await engine.submit(  # a pass of 195 tokens, run at 256
            GenerationRequest(list(range(5, 200)), SamplingParams(4, temperature=0), adapter=ref)
        ).collect()
    finally:
        engine.shutdown()
    sizes = (128, 192, 256, 320)
    assert prefill_shapes(300, 3) == [("logits", 1), ("logits", 2), ("logits", 4)] + [
        ("pass", n) for n in sizes
    ]
    assert done == {"graphs": 0, "pass_sizes": 7} and again == {"graphs": 0, "pass_sizes": 0}
    layers = ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]  # once, not once per layer
    assert sorted(calls) == sorted(
        [("lm_head", rows, False) for rows in (1, 2, 4)] + [(name, n, True) for name in layers for n in sizes]
    )
    assert engine.adapters.lora.rows.mask is None  # no adapter left selected
    assert result.finish_reason == "length" and result.completion_tokens == 4 and text
