"""Triton kernels that apply each row's own LoRA adapter in a decoding step, reading only its slot.

app/llm/lora.py applies every resident adapter to every row and masks out the slots a row does not
use: three cuBLAS/elementwise kernels per layer, whatever the mix of adapters. For a decoding step
(one token per row) cuBLAS runs those skinny products at about a tenth of the GPU's bandwidth
(bench/lora_kernels.py: 1.7 ms per step for Falcon-7B's 128 layers on an H200, where the data read
is worth 0.14 ms). These two kernels do the same arithmetic the way Punica's BGMV does, reading
only the slot each row uses:

- "shrink": the input times the row's slot of A, a rank-R vector. The reduction over the input
  dimension is split across programs (`CHUNK` columns each, written as partial sums), so even one
  row keeps the whole GPU busy: a first version with one program per row was five times slower
  than cuBLAS (docs/benchmarks.md).
- "expand": sums the partials, multiplies by the slot's columns of B (scale folded in) and adds the
  result to the base layer's output in place.

They run for passes of at most `lora.TRITON_MAX_TOKENS` tokens on a CUDA device (decoding steps);
a packed prefill keeps the masked products. Triton ships with PyTorch's CUDA builds; this module is
only imported on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 256  # input columns per shrink program


@triton.jit
def _shrink(x_ptr, a_ptr, slot_ptr, part_ptr, n_in, x_stride, a_stride, rank, n_chunks,
            BLOCK_R: tl.constexpr, CHUNK: tl.constexpr):  # fmt: skip
    # (Triton resolves a kernel's annotations itself and knows only its own: the rest stay bare.)
    # part[row, chunk, :rank] = x[row, chunk] @ A[slot * rank : slot * rank + rank, chunk]^T
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    slot = tl.load(slot_ptr + row)
    r = tl.arange(0, BLOCK_R)
    k = chunk * CHUNK + tl.arange(0, CHUNK)
    in_k = k < n_in
    x = tl.load(x_ptr + row * x_stride + k, mask=in_k, other=0.0).to(tl.float32)
    a = tl.load(
        a_ptr + (slot * rank + r)[:, None] * a_stride + k[None, :],
        mask=(r < rank)[:, None] & in_k[None, :],
        other=0.0,
    ).to(tl.float32)
    tl.store(part_ptr + (row * n_chunks + chunk) * BLOCK_R + r, tl.sum(a * x[None, :], axis=1))


@triton.jit
def _expand(part_ptr, b_ptr, slot_ptr, y_ptr, n_out, y_stride, b_stride, rank, n_chunks,
            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    # y[row, n] += (sum over chunks of part[row]) @ B[n, slot * rank : slot * rank + rank]^T
    row = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = n < n_out
    slot = tl.load(slot_ptr + row)
    r = tl.arange(0, BLOCK_R)
    in_rank = r < rank
    c = tl.arange(0, BLOCK_C)
    parts = tl.load(
        part_ptr + (row * n_chunks + c)[:, None] * BLOCK_R + r[None, :],
        mask=(c < n_chunks)[:, None] & in_rank[None, :],
        other=0.0,
    )
    h = tl.sum(parts, axis=0)
    b = tl.load(
        b_ptr + n[:, None] * b_stride + (slot * rank + r)[None, :],
        mask=in_n[:, None] & in_rank[None, :],
        other=0.0,
    ).to(tl.float32)
    delta = tl.sum(b * h[None, :], axis=1)
    y = tl.load(y_ptr + row * y_stride + n, mask=in_n, other=0.0)
    tl.store(y_ptr + row * y_stride + n, (y.to(tl.float32) + delta).to(y.dtype), mask=in_n)


def add_lora(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, rank: int
) -> torch.Tensor:
    """Add each token's adapter to the base output `y` in place, and return it.

    x [..., in] and y [..., out] (contiguous) hold the same tokens; a is [slots x rank, in] and
    b [out, slots x rank] with the scale folded in (app/llm/lora.py's buffers); slots [tokens] is
    each token's slot.
    """
    x2 = x.reshape(-1, x.shape[-1])
    y2 = y.view(-1, y.shape[-1])
    tokens, n_in = x2.shape
    n_chunks = triton.cdiv(n_in, CHUNK)
    block_r = triton.next_power_of_2(rank)
    parts = torch.empty((tokens, n_chunks, block_r), dtype=torch.float32, device=x.device)
    _shrink[(tokens, n_chunks)](
        x2, a, slots, parts, n_in, x2.stride(0), a.stride(0), rank, n_chunks, BLOCK_R=block_r, CHUNK=CHUNK
    )
    block_n = 64
    _expand[(tokens, triton.cdiv(y2.shape[1], block_n))](
        parts, b, slots, y2, y2.shape[1], y2.stride(0), b.stride(0), rank, n_chunks,
        BLOCK_R=block_r, BLOCK_C=triton.next_power_of_2(n_chunks), BLOCK_N=block_n,
    )  # fmt: skip
    return y
