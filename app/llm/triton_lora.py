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
  result to the base layer's output in place. Where the base layer is 4-bit and the pass is one
  token, app/llm/triton_nf4.py's kernel does this as it writes its own output (`lora_delta`), one
  launch fewer per layer: 128 of a Falcon-7B step's ~800.

They run for passes of at most `lora.TRITON_MAX_TOKENS` tokens on a CUDA device (decoding steps);
a packed prefill keeps the masked products. Triton ships with PyTorch's CUDA builds; this module is
only imported on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

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
def lora_delta(part_ptr, b_ptr, slot, row, n, in_n, b_stride, rank, n_chunks,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    # fp32 [len(n)]: (sum over chunks of part[row]) @ B[n, slot * rank : slot * rank + rank]^T.
    # Shared with app/llm/triton_nf4.py, whose one-row kernel adds it to its output as it writes it.
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
    return tl.sum(b * h[None, :], axis=1)


@triton.jit
def _expand(part_ptr, b_ptr, slot_ptr, y_ptr, n_out, y_stride, b_stride, rank, n_chunks,
            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    # y[row, n] += lora_delta(row, n), rounded once to y's dtype
    row = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = n < n_out
    slot = tl.load(slot_ptr + row)
    delta = lora_delta(part_ptr, b_ptr, slot, row, n, in_n, b_stride, rank, n_chunks, BLOCK_R, BLOCK_C)
    y = tl.load(y_ptr + row * y_stride + n, mask=in_n, other=0.0)
    tl.store(y_ptr + row * y_stride + n, (y.to(tl.float32) + delta).to(y.dtype), mask=in_n)


@dataclass(frozen=True)
class LoraUpdate:
    """The shrink's result for one layer's tokens, and what expanding it takes."""

    parts: torch.Tensor  # fp32 [tokens, n_chunks, block_r]: partial sums of x @ A[slot]^T
    b: torch.Tensor  # [out, slots x rank], the scale folded in
    slots: torch.Tensor  # [tokens]
    rank: int

    @property
    def n_chunks(self) -> int:
        return self.parts.shape[1]

    @property
    def block_r(self) -> int:
        return self.parts.shape[2]

    @property
    def block_c(self) -> int:
        return triton.next_power_of_2(self.n_chunks)


def shrink(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, rank: int) -> LoraUpdate:
    """Each token's input times its slot of A, as partial sums over `CHUNK`-column pieces.

    x is [..., in]; a is [slots x rank, in] and b [out, slots x rank] with the scale folded in
    (app/llm/lora.py's buffers); slots [tokens] is each token's slot.
    """
    x2 = x.reshape(-1, x.shape[-1])
    tokens, n_in = x2.shape
    n_chunks = triton.cdiv(n_in, CHUNK)
    block_r = triton.next_power_of_2(rank)
    parts = torch.empty((tokens, n_chunks, block_r), dtype=torch.float32, device=x.device)
    _shrink[(tokens, n_chunks)](
        x2, a, slots, parts, n_in, x2.stride(0), a.stride(0), rank, n_chunks, BLOCK_R=block_r, CHUNK=CHUNK
    )
    return LoraUpdate(parts, b, slots, rank)


def expand(y: torch.Tensor, update: LoraUpdate) -> torch.Tensor:
    """Add the update to the base layer's output `y` ([..., out], contiguous) in place; return it."""
    y2 = y.view(-1, y.shape[-1])
    block_n = 64
    _expand[(y2.shape[0], triton.cdiv(y2.shape[1], block_n))](
        update.parts, update.b, update.slots, y2, y2.shape[1], y2.stride(0), update.b.stride(0), update.rank,
        update.n_chunks, BLOCK_R=update.block_r, BLOCK_C=update.block_c, BLOCK_N=block_n,
    )  # fmt: skip
    return y
