"""What the engine's Triton kernels share (app/llm/triton_nf4.py, triton_rotary.py, triton_norm.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


class KernelMismatch(RuntimeError):
    """A kernel's start-up check found other values than the code it replaces: it is not used."""


def require_close(
    kernel: str, got: torch.Tensor, expected: torch.Tensor, reference: str, floor: float
) -> None:
    """Raise KernelMismatch unless every value of `got` is within a step of bf16 (2**-7 of its
    size, or `floor` near zero) of `expected`, what `reference` computes."""
    got, expected = got.float(), expected.float()
    if not ((got - expected).abs() <= expected.abs() * 2**-7 + floor).all():
        raise KernelMismatch(f"the {kernel} kernel is more than a bf16 step from {reference}")


@triton.jit
def round_to_bf16(x):
    # x rounded to the nearest bf16 value (ties to even), as PyTorch rounds, kept in fp32. Done on
    # the bits: Triton's own conversion did not give PyTorch's bits on an H200
    # (tests/llm/test_triton_rotary.py).
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)
