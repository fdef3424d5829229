"""Prefill passes rounded up to a few sizes, so that cuBLAS chooses their kernels once.

cuBLASLt picks a kernel for each new matrix shape with a heuristic query that costs the host
milliseconds: on an H200, 4 to 23 ms for the first product of a new token count with each of
Falcon-7B's layer shapes, and 0.2 to 0.6 ms the next time (bench/gemm_shapes.py). A packed
prefill pass has a new token count almost every time, so nearly every request paid that in its
time to first token while the GPU sat idle (17 ms a pass in `bench/decode_profile.py --prefill`).

So a pass's token count is rounded up to one of 16 sizes per octave (a multiple of 64: above
1,024 tokens at most 1/16 more, 3% on average, which the padding computes and nobody reads; below,
more in proportion, where a pass is bound by the host anyway), its kept logits' rows to a power
of two, and the engine warms every size while it is idle: each distinct linear layer of the model
run once on that many rows of zeros, through the same modules (4-bit dequantization, LoRA) as a
pass. Passes of up to `FEWEST` tokens run the 4-bit Triton kernels, not cuBLAS, and keep their size.
"""

from __future__ import annotations

import torch
from torch import nn

from app.llm.lora import TRITON_MAX_TOKENS, BatchedLoraLinear, LoraSlots

FEWEST = TRITON_MAX_TOKENS  # passes this short never reach cuBLAS for their layers
SIZES_PER_OCTAVE_LOG2 = 4  # 16 sizes per octave

Shape = tuple[str, int]  # ("pass", tokens) for the layers, ("logits", rows) for the output layer


def pass_tokens(tokens: int) -> int:
    """The size a pass of `tokens` prompt tokens runs at."""
    if tokens <= FEWEST:
        return tokens
    step = max(FEWEST, 1 << (tokens.bit_length() - 1 - SIZES_PER_OCTAVE_LOG2))
    return -(-tokens // step) * step


def logit_rows(rows: int) -> int:
    """The rows of logits a pass computes for `rows` prompts (a power of two)."""
    return 1 << (rows - 1).bit_length()


def prefill_shapes(most_tokens: int, most_rows: int) -> list[Shape]:
    """Every size a pass of up to `most_tokens` tokens and `most_rows` prompts can run at."""
    rows = sorted({logit_rows(n) for n in range(1, most_rows + 1)})
    tokens = sorted({pass_tokens(n) for n in range(FEWEST + 1, most_tokens + 1)})
    return [("logits", n) for n in rows] + [("pass", n) for n in tokens]


def warm(model: nn.Module, lora: LoraSlots, shape: Shape, dtype: torch.dtype) -> None:
    """Run what a pass of `shape` multiplies once, on zeros, so that cuBLAS has chosen its kernels.

    For ("pass", n): each distinct linear layer (by type and size; every decoder layer has the
    same ones) on n rows, with the LoRA products when an adapter is loaded. For ("logits", n): the
    output layer on n rows.
    """
    kind, rows = shape
    output: nn.Linear = model.get_output_embeddings()  # type: ignore[operator]
    layers = [(output, output)] if kind == "logits" else _distinct_linears(model, skip=output)
    for layer, base in layers:
        device = base.weight.device
        x = torch.zeros((1, rows, base.in_features), dtype=dtype, device=device)
        if kind == "pass" and lora.rank:
            lora.select(torch.zeros((1, rows), dtype=torch.long, device=device))
        try:
            layer(x)
        finally:
            lora.select(None)


def _distinct_linears(model: nn.Module, skip: nn.Module) -> list[tuple[nn.Module, nn.Linear]]:
    """One of each linear layer (by type and size), with the nn.Linear that holds its weight."""
    inner = {id(m.base_layer) for m in model.modules() if isinstance(m, BatchedLoraLinear)}
    seen: dict[tuple[type, int, int], tuple[nn.Module, nn.Linear]] = {}
    for module in model.modules():
        if module is skip or id(module) in inner:
            continue
        if isinstance(module, BatchedLoraLinear):
            base = module.base_layer
        elif isinstance(module, nn.Linear):
            base = module
        else:
            continue
        seen.setdefault((type(module), base.in_features, base.out_features), (module, base))
    return list(seen.values())
