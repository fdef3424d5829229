"""A Triton matmul over bitsandbytes' NF4 weights for decoding steps (a few tokens per pass).

A decoding step reads every weight of the model once, so its speed is set by how fast the 4-bit
matmul streams the weights. bitsandbytes' kernels leave most of an H200's bandwidth unused there
(docs/benchmarks.md): its one-row kernel (`gemm_4bit_simt`) moved about 0.94 TB/s of the card's
4.8, 3.55 ms of a 6.7 ms single-stream step; for 2 to 64 rows it dequantizes the whole weight to
bf16 in every step and multiplies that (4.6 + 4.4 ms of a 16.9 ms step at 32 rows).

This kernel reads the same packed weights and block scales that bitsandbytes stores (nothing is
converted or copied at load) and does the same arithmetic: each weight is `code[nibble] * absmax`
in fp32, rounded to bf16, then multiplied with fp32 accumulation, as bitsandbytes' dequantize and
multiply does. The double-quantized block scales (`absmax = code2[q] * absmax2[block // 256] +
offset`) are computed in the kernel, so it is one launch per layer (two with a split reduction).

bitsandbytes' layout: the weight [N, K] flattened row-major, two elements a byte (the even one in
the high nibble), in blocks of 64 consecutive elements with one scale each. A tile here takes
BLOCK_N rows by BLOCK_K columns: the high nibbles are the tile's even columns and the low nibbles
its odd ones, so the input is read as its even and odd columns and nothing is interleaved.

Two forms, chosen by the number of tokens (`_config`):
- rows <= 4: multiply-and-sum in registers (a GEMV; tensor cores would idle on one row);
- more: `tl.dot` on tensor cores, the weight tile dequantized once for every row.
Both can split the reduction over K across programs (`SPLIT_K`) so that a layer with few output
rows still has enough programs in flight to use the whole memory bandwidth; the partial sums are
then added by a second small kernel, in a fixed order (the same input gives the same output).

Only CUDA devices use it (Triton ships with PyTorch's CUDA builds); `enable` swaps the forward of
the model's NF4 layers so that passes of at most `MAX_TOKENS` tokens take this path and larger ones
(prefill, compute-bound) keep bitsandbytes' dequantize-and-multiply.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import nn

MAX_TOKENS = 64  # larger passes are compute-bound: bitsandbytes' dequantize + cuBLAS is right there
BLOCK = 64  # elements per block scale (bitsandbytes' default, the only one this kernel takes)
NESTED_BLOCK = 256  # block scales per second-level scale (double quantization)


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    dot: bool
    warps: int = 4
    stages: int = 2


@dataclass
class Nf4Weight:
    """One layer's NF4 weight as bitsandbytes stores it, in the form the kernel reads."""

    packed: torch.Tensor  # uint8 [N * K / 2]
    absmax: torch.Tensor  # uint8 [N * K / 64], quantized block scales
    absmax2: torch.Tensor  # fp32, one per 256 block scales
    code2: torch.Tensor  # fp32 [256], the block scales' code
    code: torch.Tensor  # fp32 [16], NF4's values
    offset: float  # added to every dequantized block scale
    n: int
    k: int

    @classmethod
    def of(cls, layer: nn.Module) -> Nf4Weight | None:
        """The layer's weight, or None when it is not NF4 in the layout the kernel reads."""
        state = getattr(layer.weight, "quant_state", None)
        if (
            state is None
            or state.quant_type != "nf4"
            or state.blocksize != BLOCK
            or not state.nested
            or state.state2.blocksize != NESTED_BLOCK
            or len(state.shape) != 2
            or state.shape[1] % BLOCK
            or layer.weight.dtype != torch.uint8
        ):
            return None
        n, k = state.shape
        return cls(
            packed=layer.weight.data.reshape(-1),
            absmax=state.absmax,
            absmax2=state.state2.absmax.float(),
            code2=state.state2.code.float(),
            code=state.code.float().to(layer.weight.device),
            offset=float(state.offset),
            n=n,
            k=k,
        )


@triton.jit
def _nf4_matmul(x_ptr, w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, code_ptr, out_ptr, bias_ptr,
                m_rows, n_out, k_in, x_stride, offset, k_per_split,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                SPLIT_K: tl.constexpr, DOT: tl.constexpr, HAS_BIAS: tl.constexpr):  # fmt: skip
    # out[m, n] (or its split's partial sum) = sum over k of x[m, k] * dequant(W[n, k])
    HALF: tl.constexpr = BLOCK_K // 2
    GROUPS: tl.constexpr = BLOCK_K // 64
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    in_n = n < n_out
    n = tl.where(in_n, n, 0)  # rows past the end read row 0 and are not stored
    m = tl.arange(0, BLOCK_M)
    in_m = m < m_rows
    byte = tl.arange(0, HALF)
    group = tl.arange(0, GROUPS)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = split * k_per_split
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        in_k = (k0 + 2 * byte) < k_in  # a last tile may run past K (K is a multiple of 64 only)
        packed = tl.load(
            w_ptr + n[:, None] * (k_in // 2) + (k0 // 2 + byte)[None, :], mask=in_k[None, :], other=0
        )
        scale_index = n[:, None] * (k_in // 64) + (k0 // 64 + group)[None, :]  # [BLOCK_N, GROUPS]
        in_group = (k0 + 64 * group) < k_in
        quantized_scale = tl.load(absmax_ptr + scale_index, mask=in_group[None, :], other=0)
        scale = (
            tl.load(code2_ptr + quantized_scale.to(tl.int32))
            * tl.load(absmax2_ptr + scale_index // 256, mask=in_group[None, :], other=0.0)
            + offset
        )
        high = tl.load(code_ptr + (packed >> 4).to(tl.int32))  # [BLOCK_N, HALF] fp32
        low = tl.load(code_ptr + (packed & 15).to(tl.int32))
        # The 32 bytes of each 64-element block share its scale; rounded to bf16 as bitsandbytes'
        # dequantization does before it multiplies.
        high = tl.reshape(tl.reshape(high, (BLOCK_N, GROUPS, 32)) * scale[:, :, None], (BLOCK_N, HALF)).to(
            tl.bfloat16
        )
        low = tl.reshape(tl.reshape(low, (BLOCK_N, GROUPS, 32)) * scale[:, :, None], (BLOCK_N, HALF)).to(
            tl.bfloat16
        )
        x_at = x_ptr + m[:, None] * x_stride + (k0 + 2 * byte)[None, :]
        x_mask = in_m[:, None] & in_k[None, :]
        x_even = tl.load(x_at, mask=x_mask, other=0.0).to(tl.bfloat16)
        x_odd = tl.load(x_at + 1, mask=x_mask, other=0.0).to(tl.bfloat16)
        if DOT:
            acc += tl.dot(x_even, tl.trans(high))
            acc += tl.dot(x_odd, tl.trans(low))
        else:
            acc += tl.sum(
                high.to(tl.float32)[None, :, :] * x_even.to(tl.float32)[:, None, :]
                + low.to(tl.float32)[None, :, :] * x_odd.to(tl.float32)[:, None, :],
                axis=2,
            )
    out_mask = in_m[:, None] & in_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n).to(tl.float32)[None, :]
        tl.store(out_ptr + m[:, None] * n_out + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptr + (split * m_rows + m[:, None]) * n_out + n[None, :], acc, mask=out_mask)


@triton.jit
def _sum_splits(part_ptr, out_ptr, bias_ptr, total, n_out,
                SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr):  # fmt: skip
    # out[i] = sum over splits of part[split, i] (+ bias), in split order
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = i < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + split * total + i, mask=inside, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + i % n_out, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + i, acc.to(out_ptr.dtype.element_ty), mask=inside)


def _config(rows: int, n: int, k: int) -> Config:
    """Tile sizes by the number of rows and the layer's shape (measured on an H200:
    bench/nf4_kernels.py, docs/benchmarks.md)."""
    if rows <= 4:
        return Config(block_m=triton.next_power_of_2(rows), block_n=16, block_k=256, split_k=1, dot=False)
    return Config(block_m=max(16, triton.next_power_of_2(rows)), block_n=32, block_k=128, split_k=1, dot=True)


def nf4_matmul(
    x: torch.Tensor, weight: Nf4Weight, bias: torch.Tensor | None = None, config: Config | None = None
) -> torch.Tensor:
    """x [..., K] (bf16 or fp16) times the NF4 weight's transpose: [..., N] in x's dtype."""
    x2 = x.reshape(-1, weight.k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    c = config or _config(rows, weight.n, weight.k)
    out = torch.empty((rows, weight.n), dtype=x.dtype, device=x.device)
    k_per_split = triton.cdiv(triton.cdiv(weight.k, c.split_k), c.block_k) * c.block_k
    has_bias = bias is not None
    target = (
        out
        if c.split_k == 1
        else torch.empty((c.split_k, rows, weight.n), dtype=torch.float32, device=x.device)
    )
    grid = (triton.cdiv(weight.n, c.block_n), c.split_k)
    _nf4_matmul[grid](
        x2, weight.packed, weight.absmax, weight.absmax2, weight.code2, weight.code, target,
        bias if has_bias else out, rows, weight.n, weight.k, x2.stride(0), weight.offset, k_per_split,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, SPLIT_K=c.split_k, DOT=c.dot,
        HAS_BIAS=has_bias, num_warps=c.warps, num_stages=c.stages,
    )  # fmt: skip
    if c.split_k > 1:
        total = rows * weight.n
        _sum_splits[(triton.cdiv(total, 1024),)](
            target, out, bias if has_bias else out, total, weight.n,
            SPLIT_K=c.split_k, BLOCK=1024, HAS_BIAS=has_bias,
        )  # fmt: skip
    return out.view(*x.shape[:-1], weight.n)


def enable(model: nn.Module) -> int:
    """Give the model's NF4 layers this kernel for passes of at most MAX_TOKENS tokens; returns
    how many layers took it. Layers in another layout (FP4, other block sizes) keep theirs."""
    import bitsandbytes as bnb

    enabled = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit) or hasattr(module, "nf4_weight"):
            continue
        weight = Nf4Weight.of(module)
        if weight is None or not weight.packed.is_cuda:
            continue
        module.nf4_weight = weight
        module.forward = types.MethodType(_forward, module)
        enabled += 1
    return enabled


def _forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    tokens = x.numel() // x.shape[-1]
    if tokens > MAX_TOKENS or not self.compute_type_is_set:
        return type(self).forward(self, x)  # bitsandbytes' own: prefill, and the first call's setup
    dtype = self.compute_dtype or x.dtype
    bias = None if self.bias is None else self.bias.to(dtype)
    return nf4_matmul(x.to(dtype), self.nf4_weight, bias).to(x.dtype)
