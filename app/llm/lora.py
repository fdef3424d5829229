"""LoRA for a batch whose rows use different adapters, in one computation per layer.

PEFT serves a mixed batch (`adapter_names=`) by splitting every LoRA layer's input into one
sub-batch per adapter and looping over them in Python. On a Falcon-7B-shaped model with 32 rows on
5 adapter groups a decoding step took about 245 ms that way (docs/benchmarks.md), and the loop's
shape changes with every batch, so the step cannot be captured in a CUDA graph.

Here each targeted linear layer keeps its resident adapters stacked in slots: A as [slots, R, in],
B as [slots, out, R] and a scale per slot, with R the largest rank loaded so far (the buffers grow
when a higher rank arrives; smaller ranks are padded with zeros, which add nothing). Slot 0 stays
zero: the bare base. A forward pass gathers each row's A and B by its slot index and does two
batched matmuls, whatever mix of adapters the rows use:

    y = base(x) + scale[slot] * (x @ A[slot]^T) @ B[slot]^T

The result is PEFT's LoRA (same A, B and scaling, `lora_alpha / r`, or `/ sqrt(r)` with rsLoRA,
per-module `rank_pattern` / `alpha_pattern` honoured), without dropout, which inference does not use.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

PEFT_PREFIX = "base_model.model."


@dataclass
class SlotRows:
    """The slot of every row of the forward pass in progress (None: no row uses an adapter)."""

    index: torch.Tensor | None = None


class BatchedLoraLinear(nn.Module):
    """A linear layer (4-bit or not) plus the LoRA updates of every resident adapter, by slot."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: torch.Tensor

    def __init__(
        self, base_layer: nn.Linear, rows: SlotRows, slots: int, rank: int, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.base_layer = base_layer  # the name app.registry.inspect sees through, as with PEFT's layers
        self.rows = rows
        device = base_layer.weight.device
        shape_a = (slots, rank, base_layer.in_features)
        shape_b = (slots, base_layer.out_features, rank)
        self.register_buffer("lora_a", torch.zeros(shape_a, dtype=dtype, device=device))
        self.register_buffer("lora_b", torch.zeros(shape_b, dtype=dtype, device=device))
        self.register_buffer("scale", torch.zeros(slots, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        index = self.rows.index
        if index is None:
            return y
        a = self.lora_a.index_select(0, index)  # [rows, R, in]
        b = self.lora_b.index_select(0, index)  # [rows, out, R]
        scale = self.scale.index_select(0, index)[:, None, None]
        hidden = torch.bmm(x.to(a.dtype), a.transpose(1, 2))  # [rows, tokens, R]
        delta = torch.bmm(hidden, b.transpose(1, 2)) * scale  # [rows, tokens, out]
        return y + delta.to(y.dtype)

    def fill(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        rank = a.shape[0]
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.lora_a[slot, :rank].copy_(a)
        self.lora_b[slot, :, :rank].copy_(b)
        self.scale[slot] = scale

    def clear(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.scale[slot] = 0

    def grow(self, rank: int) -> None:
        """Room for rank `rank`: the slots' matrices move into larger, zero-padded buffers."""
        old = self.lora_a.shape[1]
        a = self.lora_a.new_zeros(self.lora_a.shape[0], rank, self.lora_a.shape[2])
        b = self.lora_b.new_zeros(self.lora_b.shape[0], self.lora_b.shape[1], rank)
        a[:, :old].copy_(self.lora_a)
        b[:, :, :old].copy_(self.lora_b)
        self.lora_a, self.lora_b = a, b


@dataclass
class LoraSlots:
    """The model's batched LoRA layers, created the first time an adapter targets a layer."""

    model: nn.Module
    slots: int  # slot 0 (the base) included
    max_rank: int  # the highest rank accepted
    dtype: torch.dtype
    rank: int = 0  # the rank the buffers hold now: the highest loaded so far
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
