"""What the engine's Triton kernels share (app/llm/triton_nf4.py, triton_rotary.py, triton_norm.py)."""

from __future__ import annotations

import triton
import triton.language as tl


class KernelMismatch(RuntimeError):
    """A kernel's start-up check found other values than the code it replaces: it is not used."""


@triton.jit
def round_to_bf16(x):
    # x rounded to the nearest bf16 value (ties to even), as PyTorch rounds, kept in fp32. Done on
    # the bits: Triton's own conversion did not give PyTorch's bits on an H200
    # (tests/llm/test_triton_rotary.py).
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)
