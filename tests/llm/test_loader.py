"""The loader quantizes for real and refuses a model it could not quantize (the Falcon trap)."""

from __future__ import annotations

import copy
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from app.llm.loader import LoadedModel, ModelLoadError, ModelSpec, load_model, verify_quantized

FALCON_LAYERS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


def test_every_falcon_linear_layer_is_nf4(tiny_model: LoadedModel) -> None:
    layers = {
        name: module for name, module in tiny_model.model.named_modules() if isinstance(module, nn.Linear)
    }
    quantized = {name for name, module in layers.items() if isinstance(module, bnb.nn.Linear4bit)}
    # Four Falcon layers in each of the 4 blocks; only the output head stays in full precision.
    assert len(quantized) == 16 == tiny_model.quantized_layers
    assert set(layers) - quantized == {"lm_head"}
    assert {name.rsplit(".", 1)[-1] for name in quantized} == set(FALCON_LAYERS)
    weight = layers["transformer.h.0.mlp.dense_h_to_4h"].weight
    assert weight.dtype == torch.uint8 and weight.quant_state.quant_type == "nf4"


def test_quantized_model_is_smaller_and_still_generates(
    tiny_model: LoadedModel, tiny_model_dir: Path
) -> None:
    full = load_model(ModelSpec(str(tiny_model_dir), quantization="none", device="cpu"))
    assert full.quantized_layers == 0
    layer_bytes = sum(
        m.weight.numel() * m.weight.element_size()
        for m in tiny_model.model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
    )
    full_layer_bytes = sum(
        m.weight.numel() * m.weight.element_size()
        for name, m in full.model.named_modules()
        if isinstance(m, nn.Linear) and name != "lm_head"
    )
    # 4 bits instead of 32 per weight: an eighth of the bytes.
    assert layer_bytes * 8 == full_layer_bytes
    ids = torch.tensor([[5, 6, 7, 8]])
    out = tiny_model.model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


def test_plain_transformers_load_leaves_falcon_unquantized_and_we_catch_it(tiny_model_dir: Path) -> None:
    """The trap: transformers swaps only exact nn.Linear, so Falcon's FalconLinear layers stay float."""
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=config, device_map={"": "cpu"}
    )
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    with pytest.raises(
        ModelLoadError, match=r"QUANTIZATION=nf4 was requested but 16 linear layers were left"
    ):
        verify_quantized(model, "nf4")


@pytest.mark.parametrize("quantization", ["fp4", "int8"])
def test_other_quantizations_are_verified_too(tiny_model_dir: Path, quantization: str) -> None:
    loaded = load_model(ModelSpec(str(tiny_model_dir), quantization=quantization, device="cpu"))
    assert loaded.quantized_layers == 16
    kind = bnb.nn.Linear8bitLt if quantization == "int8" else bnb.nn.Linear4bit
    assert isinstance(loaded.model.transformer.h[0].mlp.dense_4h_to_h, kind)


def test_unknown_quantization_and_missing_model_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="QUANTIZATION='nf5' is not one of nf4, fp4, int8, none"):
        load_model(ModelSpec(str(tmp_path), quantization="nf5", device="cpu"))
    with pytest.raises(ModelLoadError, match="looks like a path, but no such directory exists"):
        load_model(ModelSpec(str(tmp_path / "missing"), device="cpu"))
    with pytest.raises(ModelLoadError, match="cannot load MODEL_ID"):
        load_model(ModelSpec(str(tmp_path), device="cpu"))  # a directory without a model


def test_any_causal_lm_loads_through_the_same_path(tmp_path: Path, tiny_model: LoadedModel) -> None:
    """A Llama-architecture checkpoint with a chat template: quantized, verified and served alike."""
    import asyncio

    from transformers import LlamaConfig, LlamaForCausalLM

    from app.llm.engine import GenerationEngine, GenerationRequest, SamplingParams
    from app.llm.prompts import ChatTurn, build_prompt

    tokenizer = copy.deepcopy(tiny_model.tokenizer)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
    tokenizer.save_pretrained(tmp_path)

    loaded = load_model(ModelSpec(str(tmp_path), quantization="nf4", device="cpu"))
    assert loaded.quantized_layers == 2 * 7  # q, k, v, o, gate, up, down in each block
    assert loaded.context_window == 512
    prompt = build_prompt(loaded.tokenizer, [ChatTurn("user", "Hi")], max_prompt_tokens=100)
    assert loaded.tokenizer.decode(prompt.token_ids) == "user: Hi\nassistant:"

    async def generate() -> tuple[str, str]:
        engine = GenerationEngine(loaded)
        engine.start()
        try:
            text, result = await engine.submit(
                GenerationRequest(prompt.token_ids, SamplingParams(max_tokens=8, temperature=0))
            ).collect()
        finally:
            engine.shutdown()
        return text, result.finish_reason

    ids = torch.tensor([prompt.token_ids])
    expected = loaded.model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)[
        0, ids.shape[1] :
    ]
    text, finish_reason = asyncio.run(generate())
    assert text == loaded.tokenizer.decode(expected, skip_special_tokens=True)
    assert finish_reason == ("stop" if tokenizer.eos_token_id in expected.tolist() else "length")
