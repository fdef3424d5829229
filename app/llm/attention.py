"""Fused attention for multi-query models such as Falcon-7B (71 query heads share one key/value head).

transformers' Falcon calls `torch.nn.functional.scaled_dot_product_attention` with a one-head key
and value against all query heads, and always with a materialised mask. No fused kernel takes that
combination (flash attention refuses the mask; the memory-efficient kernel wants as many key heads
as query heads), so PyTorch runs its math fallback: the whole heads x L x L score matrix in fp32,
for every layer. On an H200 that was about a sixth of a long training step's GPU time, and most of
its activation memory (docs/benchmarks.md, training profile).

Expanding key and value to the query's head count is the same attention (it is what broadcasting
does anyway), as a view without a copy, and the memory-efficient kernel takes it: on an H200, one
layer's forward and backward over 4 x 1,000 tokens took 3.7 ms and 0.35 GiB instead of 11.9 ms
and 4.4 GiB. Torch would rather pick cuDNN's kernel (1.8 ms there), but cuDNN builds a plan for
every new shape, and training batches come in a new shape at almost every pass: whole training
steps ran slower with it than with the math fallback. So the block asks for the memory-efficient
kernel, whose speed does not depend on having seen the shape before.

A decoding step (one new token per row) needs no expansion at all: the 71 query heads against one
key head are 71 queries of a one-head attention, so they are folded into the query length.

The model code cannot be reached from outside, so `multi_query_attention()` swaps the torch
function for the duration of a block. It changes no result, only the kernel, and only for one-head
keys.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_lock = threading.Lock()
_depth = 0
_outside: Any = None  # the function the block replaced, called with the expanded heads
# In order of preference; the math fallback stays for calls no fused kernel takes (e.g. head sizes).
_SHAPE_INDEPENDENT_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _expanded_sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
) -> Any:
    heads = query.shape[-3] if query.dim() == 4 else 0
    if heads > 1 and key.dim() == 4 and key.shape[-3] == 1 and not kwargs.get("enable_gqa", False):
        if query.shape[-2] == 1 and not args and not kwargs.get("is_causal", False):
            # One new token per row (a decoding step): its heads are as many queries against the one
            # key head, so fold them into the query length. Same attention, nothing expanded, and
            # a [rows, 1, 1, keys] mask broadcasts over them.
            return _outside(query.transpose(-3, -2), key, value, **kwargs).transpose(-3, -2)
        key = key.expand(-1, heads, -1, -1)
        value = value.expand(-1, heads, -1, -1)
        if query.is_cuda:
            with sdpa_kernel(_SHAPE_INDEPENDENT_KERNELS):
                return _outside(query, key, value, *args, **kwargs)
    return _outside(query, key, value, *args, **kwargs)


@contextlib.contextmanager
def multi_query_attention() -> Iterator[None]:
    """Within this block, one-head keys and values are expanded so fused attention kernels apply."""
    global _depth, _outside
    with _lock:
        if _depth == 0:
            _outside = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = _expanded_sdpa
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                F.scaled_dot_product_attention = _outside
