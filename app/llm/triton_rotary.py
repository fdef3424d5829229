"""Falcon's rotary position embedding in one kernel for queries and keys (CUDA, bf16).

transformers computes `q * cos + rotate_half(q) * sin`, and the same for the keys, as ten small
kernels per layer (two halves, a negation and a concatenation for rotate_half, two products and a
sum, twice). In a one-stream decoding step on an H200 those 320 kernels are about 0.3 ms of GPU
time plus their launch gaps, where the whole step is about 6 ms (bench/decode_profile.py). This
kernel does both in one launch with the same arithmetic: each product is rounded to bf16 and then
the sum, as separate bf16 kernels round them (on the CPU, transformers' result bit for bit; on an
H200, tests/llm/test_triton_rotary.py checks that rounding bit for bit and transformers' own result
within a step of bf16).

`install` swaps transformers' Falcon `apply_rotary_pos_emb` for one that takes this kernel for
bf16 CUDA tensors and calls the original otherwise (the CPU, other dtypes).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from app.llm.triton_common import require_close, round_to_bf16


@triton.jit
def _rotate(x_ptr, out_ptr, cos_ptr, sin_ptr, heads, length, x_sb, x_sh, x_sl, c_sb, c_sl,
            HALF: tl.constexpr, BLOCK_H: tl.constexpr):  # fmt: skip
    # One program per (batch, position, block of heads): out = x * cos + rotate_half(x) * sin,
    # each product rounded to bf16, then the sum. out is contiguous [batch, heads, length, 2 * HALF].
    row = tl.program_id(0)
    b = row // length
    p = row % length
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, HALF)
    h_ok = (h < heads)[:, None]
    c = cos_ptr + b * c_sb + p * c_sl
    cos1 = tl.load(c + d).to(tl.float32)[None, :]
    cos2 = tl.load(c + HALF + d).to(tl.float32)[None, :]
    s = sin_ptr + b * c_sb + p * c_sl
    sin1 = tl.load(s + d).to(tl.float32)[None, :]
    sin2 = tl.load(s + HALF + d).to(tl.float32)[None, :]
    at = x_ptr + b * x_sb + p * x_sl + h[:, None] * x_sh
    x1 = tl.load(at + d[None, :], mask=h_ok, other=0.0).to(tl.float32)
    x2 = tl.load(at + HALF + d[None, :], mask=h_ok, other=0.0).to(tl.float32)
    # rotate_half(x) = cat(-x2, x1)
    # (the last conversion is exact: the values are bf16 already)
    out1 = round_to_bf16(round_to_bf16(x1 * cos1) + round_to_bf16(-x2 * sin1)).to(tl.bfloat16)
    out2 = round_to_bf16(round_to_bf16(x2 * cos2) + round_to_bf16(x1 * sin2)).to(tl.bfloat16)
    dst = out_ptr + ((b * heads + h[:, None]) * length + p) * (2 * HALF)
    tl.store(dst + d[None, :], out1, mask=h_ok)
    tl.store(dst + HALF + d[None, :], out2, mask=h_ok)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [batch, heads, length, dim] rotated by cos/sin [batch, length, dim]; contiguous, bf16."""
    batch, heads, length, dim = x.shape
    out = torch.empty((batch, heads, length, dim), dtype=x.dtype, device=x.device)
    block_h = min(16, triton.next_power_of_2(heads))
    grid = (batch * length, triton.cdiv(heads, block_h))
    _rotate[grid](
        x, out, cos, sin, heads, length, x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1),
        HALF=dim // 2, BLOCK_H=block_h,
    )  # fmt: skip
    return out


def _fits(x: torch.Tensor, cos: torch.Tensor) -> bool:
    dim = x.shape[-1]
    return (
        x.is_cuda
        and x.dtype == cos.dtype == torch.bfloat16
        and x.dim() == 4
        and cos.dim() == 3
        and dim % 2 == 0
        and (dim // 2) & (dim // 2 - 1) == 0  # a power of two: Triton's block sizes
        and x.stride(-1) == 1
        and cos.stride(-1) == 1
        and cos.shape[0] in (1, x.shape[0])
    )


def install(device: torch.device) -> None:
    """Falcon's rotary embedding through `rotate` where it fits (idempotent), once a check on
    `device` finds it within a bf16 step of transformers' (KernelMismatch, or the compiler's error,
    otherwise)."""
    from transformers.models.falcon import modeling_falcon

    original = modeling_falcon.apply_rotary_pos_emb
    if getattr(original, "fused", False):
        return
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(2, 4, 3, 64, generator=generator, device=device).to(torch.bfloat16)
    angles = torch.randn(2, 3, 64, generator=generator, device=device)
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    require_close("rotary", rotate(q, cos, sin), original(q, q[:, :1], cos, sin)[0], "transformers'", 1e-6)

    def apply_rotary_pos_emb(q: Any, k: Any, cos: Any, sin: Any, unsqueeze_dim: int = 1) -> Any:
        if unsqueeze_dim != 1 or not (_fits(q, cos) and _fits(k, cos) and sin.stride() == cos.stride()):
            return original(q, k, cos, sin, unsqueeze_dim)
        if cos.shape[0] != q.shape[0]:
            cos, sin = cos.expand(q.shape[0], -1, -1), sin.expand(q.shape[0], -1, -1)
        return rotate(q, cos, sin), rotate(k, cos, sin)

    apply_rotary_pos_emb.fused = True  # type: ignore[attr-defined]
    apply_rotary_pos_emb.original = original  # type: ignore[attr-defined]
    modeling_falcon.apply_rotary_pos_emb = apply_rotary_pos_emb
