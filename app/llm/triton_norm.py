"""Layer norm for a few rows in one Triton kernel (CUDA, bf16): decoding steps.

For one row of Falcon-7B's 4,544 values PyTorch's layer norm kernel took 9 us on an H200, 0.3 ms
of a one-stream decoding step's 5.2 (33 calls; bench/decode_profile.py), for 9 KB of input. This
kernel is one program per row of up to 16 warps that loads the whole row at once (2.8 us on the
H200), with the mean and variance in fp32 and the result rounded to nearest (ties to even) as
PyTorch rounds; the sums run in another order, so values can differ from PyTorch's by a step of
bf16.

Passes of more rows (prefill) keep PyTorch's kernel, which is efficient there. `install` gives a
model's bf16 `nn.LayerNorm` layers on a CUDA device this kernel for passes of up to MAX_ROWS rows.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl
from torch import nn

from app.llm.triton_common import require_close, round_to_bf16

MAX_ROWS = 64  # a decoding step's batch; a prompt's rows go to PyTorch's kernel


@triton.jit
def _layer_norm(x_ptr, w_ptr, b_ptr, out_ptr, n, x_stride, eps,
                HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    inside = i < n
    x = tl.load(x_ptr + row * x_stride + i, mask=inside, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n
    centered = tl.where(inside, x - mean, 0.0)
    variance = tl.sum(centered * centered, axis=0) / n
    y = (
        centered
        * (1.0 / tl.sqrt_rn(variance + eps))
        * tl.load(w_ptr + i, mask=inside, other=0.0).to(tl.float32)
    )
    if HAS_BIAS:
        y += tl.load(b_ptr + i, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n + i, round_to_bf16(y).to(tl.bfloat16), mask=inside)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x [..., n] (bf16, the last dimension contiguous) normalized over n; a new contiguous tensor."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(n)
    _layer_norm[(x2.shape[0],)](
        x2, weight, weight if bias is None else bias, out, n, x2.stride(0), eps,
        HAS_BIAS=bias is not None, BLOCK=block, num_warps=min(16, max(4, block // 512)),
    )  # fmt: skip
    return out.view(x.shape)


def install(model: nn.Module) -> int:
    """This kernel for the model's bf16 LayerNorm layers on a CUDA device, in passes of up to
    MAX_ROWS rows; returns how many layers took it. The first layer is checked against PyTorch's
    first (KernelMismatch, or the compiler's error, and no layer takes it)."""
    layers: list[Any] = [
        m
        for m in model.modules()
        if isinstance(m, nn.LayerNorm)
        and m.weight is not None
        and m.weight.is_cuda
        and m.weight.dtype == torch.bfloat16
        and len(m.normalized_shape) == 1
        and not hasattr(m, "one_kernel")
    ]
    if layers:
        _check(layers[0])
    for layer in layers:
        layer.one_kernel = True
        layer.forward = functools.partial(_forward, layer, layer.forward)
    return len(layers)


def _check(layer: Any) -> None:
    n = layer.normalized_shape[0]
    generator = torch.Generator(device=layer.weight.device).manual_seed(0)
    x = (torch.randn(2, n, generator=generator, device=layer.weight.device) * 3 + 1).to(torch.bfloat16)
    with torch.no_grad():
        bias = None if layer.bias is None else layer.bias.float()
        exact = torch.nn.functional.layer_norm(x.float(), (n,), layer.weight.float(), bias, layer.eps)
        got = layer_norm(x, layer.weight, layer.bias, layer.eps)
    require_close("layer norm", got, exact, "PyTorch's", 1e-2)


def _forward(layer: Any, previous: Any, x: torch.Tensor) -> torch.Tensor:
    if (
        x.dtype != torch.bfloat16
        or not x.is_cuda
        or x.stride(-1) != 1
        or x.numel() // x.shape[-1] > MAX_ROWS
        or (layer.bias is not None and layer.bias.dtype != torch.bfloat16)
    ):
        return previous(x)
    return layer_norm(x, layer.weight, layer.bias, layer.eps)
