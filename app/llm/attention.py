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

The engine's packed prefill (app/llm/engine.py) puts several whole prompts end to end into one row
and hides the prompts from each other with a block-diagonal causal mask. Any kernel given that
mask computes the whole (sum of lengths)^2 score matrix, about 12x the attention work of ~14
prompts of ~580 tokens attending each within itself, and the mask keeps flash attention out.
`packed_prompts(lengths)` tells this hook the prompts' lengths for the pass: a call whose query and
keys are the whole pack then attends within each prompt, causally and without a mask, through
`torch.nn.attention.varlen.varlen_attn` (flash attention over all prompts in one kernel, on a GPU,
where this torch has it) or else one causal SDPA call per prompt (anywhere). Every other call
(decoding steps, a chunked prefill against its cache, other threads) is as before.

The model code cannot be reached from outside, so `multi_query_attention()` swaps the torch
function for the duration of a block. It changes no result, only the kernel (and, in a packed
pass, the order of floating-point sums), and only for one-head keys or packed prompts.

    bench/prefill_attention.py times the packed-prefill ways on a GPU.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

_lock = threading.Lock()
_depth = 0
_outside: Any = None  # the function the block replaced, called with the expanded heads
# In order of preference; the math fallback stays for calls no fused kernel takes (e.g. head sizes).
_SHAPE_INDEPENDENT_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# scaled_dot_product_attention's arguments after (query, key, value), for calls that pass them by place.
_SDPA_OPTIONS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

SegmentKernel = Literal["auto", "varlen", "segments"]


class PackedPrompts:
    """The prompts of one packed forward pass, as the attention hook sees them on its thread."""

    def __init__(self, lengths: Sequence[int], kernel: SegmentKernel) -> None:
        if not lengths or min(lengths) < 1:
            raise ValueError(f"packed prompts need one or more tokens each, got lengths {list(lengths)}")
        self.lengths = tuple(int(n) for n in lengths)
        self.total = sum(self.lengths)
        self.kernel = kernel
        # How many attention calls went which way ("varlen", "segments"): the tests and the
        # benchmark check that a pass really attended per prompt, and how.
        self.calls: Counter[str] = Counter()
        self._cumulative: dict[torch.device, torch.Tensor] = {}

    def cumulative(self, device: torch.device) -> torch.Tensor:
        """[0, n0, n0 + n1, ...] as int32 on `device`: varlen_attn's boundaries, copied once per pass."""
        if device not in self._cumulative:
            bounds = [0]
            for n in self.lengths:
                bounds.append(bounds[-1] + n)
            on_host = torch.tensor(bounds, dtype=torch.int32)
            if device.type == "cuda":
                # From pinned memory the copy is queued like a kernel; from pageable memory the
                # host would wait for the GPU to drain first, in the middle of the pass.
                on_host = on_host.pin_memory()
            self._cumulative[device] = on_host.to(device, non_blocking=True)
        return self._cumulative[device]


# Thread-local: the engine's worker sets it around its packed pass, and an SDPA call from any other
# thread (a training step, a test) must not attend by another thread's prompts.
_packed = threading.local()


def _fused_sdpa(
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


def _expanded_sdpa(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
) -> Any:
    pack: PackedPrompts | None = getattr(_packed, "pack", None)
    if pack is not None:
        options = dict(zip(_SDPA_OPTIONS, args, strict=False)) | kwargs
        if _is_the_whole_pack(pack, query, key, value, options):
            return _attend_per_prompt(pack, query, key, value, options)
    return _fused_sdpa(query, key, value, *args, **kwargs)


def _is_the_whole_pack(
    pack: PackedPrompts, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, options: dict[str, Any]
) -> bool:
    """A call over the packed row itself: one row, every token a query and a key, nothing cached
    before it. Its mask is the engine's block-diagonal causal one, which the per-prompt kernels
    compute without reading it; anything else (a chunk against a cache, a decoding step) is not
    this call and keeps its mask. So does a float mask: it may carry a bias (Falcon's ALiBi
    variants add theirs to it) that attending per prompt would drop."""
    mask = options.get("attn_mask")
    return (
        query.dim() == 4
        and key.dim() == 4
        and value.dim() == 4
        and query.shape[0] == 1
        and query.shape[-2] == key.shape[-2] == value.shape[-2] == pack.total
        and (mask is None or mask.dtype == torch.bool)
        and not options.get("dropout_p")
    )


def _attend_per_prompt(
    pack: PackedPrompts, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, options: dict[str, Any]
) -> torch.Tensor:
    scale = options.get("scale")
    enable_gqa = bool(options.get("enable_gqa", False))
    fits_varlen = query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
    if pack.kernel == "varlen" and not fits_varlen:
        raise RuntimeError("varlen_attn needs CUDA tensors in float16 or bfloat16")
    if pack.kernel == "varlen" or (pack.kernel == "auto" and fits_varlen and _varlen_unusable is None):
        try:
            out = _varlen(pack, query, key, value, scale)
        except torch.OutOfMemoryError:
            raise  # the pass's trouble, not varlen_attn's: the engine retries the prompts one by one
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as error:
            if pack.kernel == "varlen":
                raise
            _give_up_varlen(f"{type(error).__name__}: {error}")
        else:
            pack.calls["varlen"] += 1
            return out
    # One causal call per prompt: its keys are its own tokens only, so the causal mask is the whole
    # mask, and without a materialised mask SDPA may pick flash attention.
    outputs = []
    start = 0
    for n in pack.lengths:
        part = slice(start, start + n)
        outputs.append(
            _fused_sdpa(
                query[..., part, :],
                key[..., part, :],
                value[..., part, :],
                is_causal=True,
                scale=scale,
                enable_gqa=enable_gqa,
            )
        )
        start += n
    pack.calls["segments"] += 1
    return torch.cat(outputs, dim=-2)


# varlen_attn as this torch has it, or why not: torch.nn.attention.varlen appeared in torch 2.9
# (causal as is_causal=), later versions take window_size=(-1, 0) for causal, and enable_gqa (one
# key head for many query heads) came later still. What the signature lacks, the call does another
# way (keys expanded as a view) or not at all.
def _find_varlen() -> tuple[Callable[..., Any] | None, frozenset[str], str | None]:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, frozenset(), f"torch {torch.__version__} has no torch.nn.attention.varlen"
    parameters = frozenset(inspect.signature(varlen_attn).parameters)
    if not {"window_size", "is_causal"} & parameters:
        return None, parameters, "this torch's varlen_attn has no causal option"
    return varlen_attn, parameters, None


_varlen_attn, _varlen_parameters, _varlen_unusable = _find_varlen()
_varlen_expands = False  # this torch's varlen_attn refused one key head for many query heads


def varlen_unusable() -> str | None:
    """Why packed prefill does not use varlen_attn here (None: it does, on CUDA in 16 bits)."""
    return _varlen_unusable


def _give_up_varlen(reason: str) -> None:
    global _varlen_unusable
    if _varlen_unusable is None:
        log.warning("varlen_attn failed (%s); packed prefill attends one prompt per call instead", reason)
        _varlen_unusable = reason


def _varlen(
    pack: PackedPrompts, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None
) -> torch.Tensor:
    if _varlen_unusable is not None or _varlen_attn is None:
        raise RuntimeError(_varlen_unusable or "no varlen_attn")
    varlen_attn = _varlen_attn
    # [1, heads, tokens, dim] -> varlen's [tokens, heads, dim], as views.
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)
    options: dict[str, Any] = {}
    if "window_size" in _varlen_parameters:
        options["window_size"] = (-1, 0)  # a tuple: varlen_attn compares it with (-1, 0) for causal
    else:
        options["is_causal"] = True
    if scale is not None:
        options["scale"] = scale
    bounds = pack.cumulative(query.device)
    longest = max(pack.lengths)

    def attend(k: torch.Tensor, v: torch.Tensor, **extra: Any) -> torch.Tensor:
        out = varlen_attn(q, k, v, bounds, bounds, longest, longest, **options, **extra)
        return out.transpose(0, 1)[None]

    heads = q.shape[1]
    if k.shape[1] == heads:
        return attend(k, v)
    if "enable_gqa" in _varlen_parameters:
        return attend(k, v, enable_gqa=True)  # flash attention reads the one key head for every query head
    if k.shape[1] != 1:
        raise ValueError("this torch's varlen_attn wants as many key heads as query heads")
    if not _varlen_expands:
        # Before enable_gqa, varlen_attn checked no head counts, and its flash kernel reads one key
        # head for many query heads anyway; should this torch refuse, expand as a view from then on.
        try:
            return attend(k, v)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError):
            _expand_for_varlen()
    return attend(k.expand(-1, heads, -1), v.expand(-1, heads, -1))


def _expand_for_varlen() -> None:
    global _varlen_expands
    _varlen_expands = True


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


@contextlib.contextmanager
def packed_prompts(lengths: Sequence[int], *, kernel: SegmentKernel = "auto") -> Iterator[PackedPrompts]:
    """Within this block, on this thread, attention over the whole packed row stays within each prompt.

    `lengths` are the prompts' token counts in the order they are packed. `kernel`: "auto" takes
    varlen_attn where it works and one SDPA call per prompt elsewhere; "varlen" or "segments"
    insist on one (the benchmark and the tests compare them).
    """
    pack = PackedPrompts(lengths, kernel)
    outer = getattr(_packed, "pack", None)
    with multi_query_attention():
        _packed.pack = pack
        try:
            yield pack
        finally:
            _packed.pack = outer
