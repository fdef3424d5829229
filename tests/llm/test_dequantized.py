"""KEEP_DEQUANTIZED_WEIGHTS: a dequantized copy of the 4-bit weights for passes of several tokens.

On the real tiny NF4 model: the copy is what bitsandbytes dequantizes, passes of two tokens or
more read it and one-token steps do not, and without the memory for it nothing is copied. The
engine with it gives the plain recipe's greedy text: tests/llm/test_batching.py.
"""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes import functional as F

from app.llm.dequantized import RESERVE_BYTES, keep_dequantized
from app.llm.loader import ModelLoadError, ModelSpec, load_model
from tests.llm.test_batching import QUESTIONS, prompt


def four_bit_layers(model: torch.nn.Module) -> list[bnb.nn.Linear4bit]:
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_the_copy_is_bitsandbytes_dequantized_weight_and_only_passes_of_several_tokens_read_it(
    tiny_model_dir: Path,
) -> None:
    loaded = load_model(ModelSpec(str(tiny_model_dir), quantization="nf4", device="cpu"))
    model = loaded.model
    ids = torch.tensor([prompt(loaded, QUESTIONS[2])])
    with torch.no_grad():
        before = model(ids).logits
        added = keep_dequantized(model, model.dtype)
        layers = four_bit_layers(model)
        assert layers and added == sum(layer.weight.quant_state.shape.numel() for layer in layers) * 4  # fp32
        for layer in layers:
            expected = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(model.dtype)
            assert torch.equal(layer.dequantized_weight, expected)
        assert torch.equal(model(ids).logits, before), "the same model, computed the same way"

        # Spoil one layer's copy: a prompt's pass reads it, a one-token pass does not.
        one_token = ids[:, :1]
        single_before = model(one_token).logits
        layers[0].dequantized_weight.mul_(-1)
        assert not torch.allclose(model(ids).logits, before)
        assert torch.equal(model(one_token).logits, single_before)
    assert keep_dequantized(model, model.dtype) == 0, "layers that have a copy keep it"


def test_without_the_memory_for_the_copy_it_refuses_before_copying_anything(tiny_model_dir: Path) -> None:
    loaded = load_model(ModelSpec(str(tiny_model_dir), quantization="nf4", device="cpu"))
    with pytest.raises(ModelLoadError) as refused:
        keep_dequantized(loaded.model, loaded.model.dtype, free_bytes=RESERVE_BYTES)
    message = str(refused.value)
    assert "KEEP_DEQUANTIZED_WEIGHTS=false" in message and "GiB free" in message
    assert not any(hasattr(layer, "dequantized_weight") for layer in four_bit_layers(loaded.model))
