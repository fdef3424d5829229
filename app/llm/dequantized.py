"""A bf16 copy of the 4-bit weights, dequantized once, for passes of several tokens (opt-in).

With NF4 weights, bitsandbytes multiplies a pass of two or more tokens by dequantizing each whole
weight to bf16 (on Hopper: its calibrated choice for these shapes) and handing that to cuBLAS: it
writes a bf16 copy four times the 4-bit weight's size and reads it back, in every layer of every
decoding step. On an H200 that made Falcon-7B's 4-bit matmuls 12 ms of a step of 8 to 64 rows,
against 3.9 ms for the same products on weights already in bf16 (bench/nf4_kernels.py,
docs/benchmarks.md). Two ways to avoid the round trip measured slower than bitsandbytes: a Triton
kernel with the NF4 lookup in registers, and dequantizing in slices meant to stay in the L2 cache
(its bf16 writes still went back to memory).

So where the card has the memory, `KEEP_DEQUANTIZED_WEIGHTS=true` keeps each 4-bit layer's
weight dequantized once, by bitsandbytes itself, exactly as its batched path dequantizes it in
every pass: the model is the same NF4 model (the base its QLoRA adapters were trained against, not
the original bf16 checkpoint), passes of two tokens or more compute what bitsandbytes computes,
and a one-row step keeps a one-row 4-bit kernel (app/llm/triton_nf4.py's on a GPU, else
bitsandbytes' fused one), which is faster there. It costs two
bytes per parameter on top of the 4-bit weights: 12.3 GiB for Falcon-7B.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

MIN_TOKENS = 2  # one token: a one-row 4-bit kernel reads the 4-bit weight once, and wins
RESERVE_BYTES = 2 << 30  # left free after the copy: KV cache, a packed prefill's activations


def keep_dequantized(model: nn.Module, dtype: torch.dtype, free_bytes: int | None = None) -> int:
    """Give every 4-bit layer of `model` a dequantized copy used for passes of MIN_TOKENS or more
    tokens; returns the bytes the copies take.

    Refuses (ModelLoadError, before copying anything) when the copies and RESERVE_BYTES for the KV
    cache and activations do not fit in `free_bytes`: by default, what the GPU has free (no bound
    on the CPU). Running out of memory halfway through loading would leave the server unable to
    start with nothing but an allocator's traceback to say why.
    """
    import bitsandbytes as bnb
    from bitsandbytes import functional as F

    from app.llm.loader import ModelLoadError

    layers = [
        m
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit) and not hasattr(m, "dequantized_weight")
    ]
    if not layers:
        return 0
    itemsize = torch.empty(0, dtype=dtype).element_size()
    needed = sum(_packed(m).quant_state.shape.numel() * itemsize for m in layers)
    device = layers[0].weight.device
    if free_bytes is None and device.type == "cuda":
        free_bytes = torch.cuda.mem_get_info(device)[0]
    if free_bytes is not None and needed + RESERVE_BYTES > free_bytes:
        raise ModelLoadError(
            f"KEEP_DEQUANTIZED_WEIGHTS=true needs {needed / 2**30:.1f} GiB for the dequantized copy "
            f"(and {RESERVE_BYTES / 2**30:.0f} GiB left for the KV cache and activations), but "
            f"{device} has {free_bytes / 2**30:.1f} GiB free: set KEEP_DEQUANTIZED_WEIGHTS=false to "
            "serve from the 4-bit weights alone, or use a GPU with more memory"
        )
    added = 0
    for module in layers:
        packed = _packed(module)
        with torch.no_grad():
            weight = F.dequantize_4bit(packed.data, packed.quant_state).to(dtype)
        module.dequantized_weight = weight
        # This instance's forward only: the model's other code (and PEFT) still sees a Linear4bit.
        # Wrapped as app/llm/triton_nf4.py and triton_norm.py wrap theirs, around the forward the
        # layer had, so the wrappers compose in any order.
        module.forward = functools.partial(_forward, module, module.forward)  # type: ignore[method-assign]
        added += weight.numel() * weight.element_size()
    return added


def _packed(layer: nn.Module) -> Any:
    return layer.weight  # bitsandbytes' Params4bit: the packed 4-bit values, with their quant_state


def _forward(layer: Any, previous: Any, x: torch.Tensor) -> torch.Tensor:
    if x.numel() // x.shape[-1] < MIN_TOKENS or not layer.compute_type_is_set:
        return previous(x)  # bitsandbytes' own (and its first call's setup)
    weight = layer.dequantized_weight
    bias = None if layer.bias is None else layer.bias.to(weight.dtype)
    return nn.functional.linear(x.to(weight.dtype), weight, bias).to(x.dtype)
