"""LoRA for a batch whose rows use different adapters, in one computation per layer.

PEFT serves a mixed batch (`adapter_names=`) by splitting every LoRA layer's input into one
sub-batch per adapter and looping over them in Python. On a Falcon-7B-shaped model with 32 rows on
5 adapter groups a decoding step took about 245 ms that way (docs/benchmarks.md), and the loop's
shape changes with every batch, so the step cannot be captured in a CUDA graph.

Here each targeted linear layer keeps all resident adapters side by side: slot s owns R columns
(R the largest rank loaded so far; smaller ranks are padded with zeros, which add nothing) of
A = [slots x R, in] and B = [out, slots x R], with the slot's scale folded into its part of B.
Slot 0 stays zero: the bare base. A forward pass multiplies every row by all the slots' A at once,
zeroes the columns of the slots the row does not use (a mask computed once per pass, shared by
every layer), and multiplies by B:

    y = base(x) + ((x @ A^T) * mask[row]) @ B^T  =  base(x) + scale[slot] * (x @ A[slot]^T) @ B[slot]^T

That is three kernels per layer whatever the mix of adapters, with no per-row copies of A and B.
It reads every resident adapter's matrices, which costs little (rank 16 on all of Falcon-7B's
layers is 65 MB per adapter, against 3.7 GB of 4-bit weights), while the decoding step's time goes
mostly to launching kernels: an earlier version that gathered each row's A and B took about three
times as many. The result is PEFT's LoRA (same A, B and scaling, `lora_alpha / r`, or `/ sqrt(r)`
with rsLoRA, per-module `rank_pattern` / `alpha_pattern` honoured), without dropout, which
inference does not use.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

PEFT_PREFIX = "base_model.model."


# Passes of at most this many tokens on a GPU (decoding steps) apply LoRA with the Triton kernels of
# app/llm/triton_lora.py, which read only each row's slot; bigger ones use the masked products.
TRITON_MAX_TOKENS = 64


@dataclass
class SlotRows:
    """Which slot each row (or token) of the forward pass in progress uses (None: no LoRA at all)."""

    slots: torch.Tensor | None = None  # [rows, 1], or [rows, tokens] for packed prompts
    mask: torch.Tensor | None = None  # [rows, 1 or tokens, slots x R], 1 on the slot's columns


class BatchedLoraLinear(nn.Module):
    """A linear layer (4-bit or not) plus the LoRA updates of every resident adapter, by slot."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor

    def __init__(
        self, base_layer: nn.Linear, rows: SlotRows, slots: int, rank: int, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.base_layer = base_layer  # the name app.registry.inspect sees through, as with PEFT's layers
        self.rows = rows
        self.slots = slots
        device = base_layer.weight.device
        shape_a = (slots * rank, base_layer.in_features)
        shape_b = (base_layer.out_features, slots * rank)
        self.register_buffer("lora_a", torch.zeros(shape_a, dtype=dtype, device=device))
        self.register_buffer("lora_b", torch.zeros(shape_b, dtype=dtype, device=device))

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0] // self.slots

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        mask, slots = self.rows.mask, self.rows.slots
        if mask is None or slots is None:
            return self.base_layer(x, *args, **kwargs)
        if x.is_cuda and slots.shape == x.shape[:-1] and slots.numel() <= TRITON_MAX_TOKENS:
            from app.llm import triton_lora, triton_nf4

            update = triton_lora.shrink(x, self.lora_a, self.lora_b, slots.reshape(-1), self.rank)
            if triton_nf4.one_row(self.base_layer, x) and self.base_layer.bias is None:
                # The 4-bit kernel adds the update as it writes its output: one launch fewer.
                return triton_nf4.nf4_gemv(x, self.base_layer.nf4_weight, lora=update)
            return triton_lora.expand(self.base_layer(x, *args, **kwargs).contiguous(), update)
        y = self.base_layer(x, *args, **kwargs)
        hidden = (
            torch.nn.functional.linear(x.to(self.lora_a.dtype), self.lora_a) * mask
        )  # [rows, tokens, SxR]
        out = torch.addmm(  # y + hidden @ B^T, the add inside the matmul
            y.reshape(-1, y.shape[-1]),
            hidden.reshape(-1, hidden.shape[-1]).to(y.dtype),
            self.lora_b.t().to(y.dtype),
        )
        return out.view_as(y)

    def _columns(self, slot: int) -> slice:
        return slice(slot * self.rank, (slot + 1) * self.rank)

    def fill(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        rank, columns = a.shape[0], self._columns(slot)
        self.clear(slot)
        self.lora_a[columns][:rank].copy_(a)
        self.lora_b[:, columns][:, :rank].copy_(b * scale)

    def clear(self, slot: int) -> None:
        self.lora_a[self._columns(slot)].zero_()
        self.lora_b[:, self._columns(slot)].zero_()

    def grow(self, rank: int) -> None:
        """Room for rank `rank`: every slot's columns move into larger, zero-padded buffers."""
        old = self.rank
        a = self.lora_a.new_zeros(self.slots, rank, self.lora_a.shape[1])
        b = self.lora_b.new_zeros(self.lora_b.shape[0], self.slots, rank)
        if old:
            a[:, :old].copy_(self.lora_a.view(self.slots, old, -1))
            b[:, :, :old].copy_(self.lora_b.view(-1, self.slots, old))
        self.lora_a, self.lora_b = a.view(self.slots * rank, -1), b.view(-1, self.slots * rank)


@dataclass
class LoraSlots:
    """The model's batched LoRA layers, created the first time an adapter targets a layer."""

    model: nn.Module
    slots: int  # slot 0 (the base) included
    max_rank: int  # the highest rank accepted
    dtype: torch.dtype
    rank: int = 0  # the rank the buffers hold now: the highest loaded so far
    # Bumped whenever a layer gets new buffers (a higher rank, a newly targeted layer): CUDA graphs
    # captured before read the old ones (app/llm/graphs.py).
    version: int = 0
    rows: SlotRows = field(default_factory=SlotRows)
    layers: dict[str, BatchedLoraLinear] = field(default_factory=dict)

    def fill(self, slot: int, config: Any, weights: dict[str, torch.Tensor]) -> None:
        """Put an adapter (its PEFT LoraConfig and saved weights) into `slot`."""
        pairs = dict(_pairs(weights))
        needed = max((a.shape[0] for a, _ in pairs.values()), default=0)
        if needed > self.max_rank:
            raise ValueError(f"rank {needed} is above the largest served ({self.max_rank})")
        if needed > self.rank:
            self.rank = needed
            self.version += 1
            for layer in self.layers.values():
                layer.grow(needed)
        for name, layer in self.layers.items():
            if name not in pairs:
                layer.clear(slot)  # a layer this adapter leaves alone: nothing from the slot's last tenant
        for name, (a, b) in pairs.items():
            self._layer(name).fill(slot, a, b, _scale(config, name, a.shape[0]))

    def clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.clear(slot)

    def select(self, slots: torch.Tensor | None) -> None:
        """Give the next forward pass's row i the adapter in `slots[i]`, or with [rows, tokens]
        slots each token its own (packed prompts); None: no LoRA at all."""
        if slots is None or self.rank == 0:
            self.rows.slots = self.rows.mask = None
            return
        column_slot = torch.arange(self.slots * self.rank, device=slots.device) // self.rank
        by_token = slots if slots.dim() == 2 else slots[:, None]
        self.rows.slots = by_token
        self.rows.mask = (column_slot == by_token[..., None]).to(self.dtype)

    def _layer(self, name: str) -> BatchedLoraLinear:
        if name not in self.layers:
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            base = getattr(parent, child)
            if not isinstance(base, nn.Linear):
                raise ValueError(f"{name} is not a linear layer of the base model")
            layer = BatchedLoraLinear(base, self.rows, self.slots, self.rank, self.dtype)
            setattr(parent, child, layer)
            self.layers[name] = layer
            self.version += 1
        return self.layers[name]


def _pairs(weights: dict[str, torch.Tensor]) -> Iterator[tuple[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(module name, (A, B)) from PEFT's saved keys: base_model.model.<module>.lora_A.weight."""
    for key, a in weights.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight").removeprefix(PEFT_PREFIX)
        b = weights.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise ValueError(f"{module}: lora_A without lora_B")
        yield module, (a, b)


def _scale(config: Any, module: str, rank: int) -> float:
    from peft.utils.other import get_pattern_key

    alpha_pattern = getattr(config, "alpha_pattern", None) or {}
    alpha = config.lora_alpha
    if alpha_pattern:
        alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), alpha)
    return float(alpha) / (math.sqrt(rank) if getattr(config, "use_rslora", False) else rank)
