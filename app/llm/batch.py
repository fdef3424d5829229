"""The decoding batch: many sequences' KV caches side by side, so one forward pass serves them all.

Sequences join after their prompt is prefilled (alone, in its own cache) and leave when they
finish, at any step (continuous batching). The batch keeps one transformers `DynamicCache` whose
rows are the sequences, aligned on the right: a shorter sequence is padded on the left, and the
attention mask hides the padding. Each row keeps its own position ids, so a row's attention and
rotary positions are exactly what they would be alone.

Left padding costs memory only where sequences differ in length, and rows that leave take their
padding with them (columns that every remaining row pads are dropped). For multi-query models such
as Falcon-7B a token's cache is small (2 x 1 head x 64 x 32 layers x 2 bytes = 8 KiB), so 32
sequences of 1,280 tokens, padding included, take about 320 MiB.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


def cache_tensors(cache: Any) -> list[Any]:
    """The cache's per-layer holders of `keys` and `values` ([rows, heads, length, dim] tensors)."""
    return list(cache.layers)


class DecodeBatch:
    """Rows of sequences decoding together; `rows[i]` owns row i of the cache and the mask."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rows: list[Any] = []
        self.cache: Any = None
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=device)  # 1: a real token, 0: padding
        self.positions: list[int] = []  # the position id of each row's next token

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def add(self, row: Any, cache: Any, length: int) -> None:
        """Add a prefilled sequence: `cache` holds its `length` tokens (one row)."""
        mask = torch.ones((1, length), dtype=torch.long, device=self.device)
        if not self.rows:
            self.rows, self.cache, self.mask, self.positions = [row], cache, mask, [length]
            return
        width = max(self.length, length)
        self._pad_left(self.cache, width - self.length)
        self._pad_left(cache, width - length)
        for mine, theirs in zip(cache_tensors(self.cache), cache_tensors(cache), strict=True):
            mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
            mine.values = torch.cat([mine.values, theirs.values], dim=0)
        self.mask = torch.cat(
            [F.pad(self.mask, (width - self.length, 0)), F.pad(mask, (width - length, 0))], dim=0
        )
        self.rows.append(row)
        self.positions.append(length)

    def keep(self, indices: Sequence[int]) -> None:
        """Keep only these rows (in this order), then drop columns that are padding in every row."""
        if len(indices) == len(self.rows):
            return
        if not indices:
            self.rows, self.cache, self.positions = [], None, []
            self.mask = self.mask[:0, :0]
            return
        index = torch.tensor(list(indices), device=self.device)
        for layer in cache_tensors(self.cache):
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        self.mask = self.mask.index_select(0, index)
        self.rows = [self.rows[i] for i in indices]
        self.positions = [self.positions[i] for i in indices]
        padded_everywhere = int((self.mask.sum(dim=0) == 0).long().cumprod(dim=0).sum())
        if padded_everywhere:
            for layer in cache_tensors(self.cache):
                layer.keys = layer.keys[:, :, padded_everywhere:]
                layer.values = layer.values[:, :, padded_everywhere:]
            self.mask = self.mask[:, padded_everywhere:]

    def step_inputs(self, tokens: Sequence[int]) -> dict[str, torch.Tensor]:
        """Inputs for one decoding step that feeds each row its next token."""
        ones = torch.ones((len(self.rows), 1), dtype=torch.long, device=self.device)
        return {
            "input_ids": torch.tensor([[t] for t in tokens], device=self.device),
            "attention_mask": torch.cat([self.mask, ones], dim=1),
            "position_ids": torch.tensor([[p] for p in self.positions], device=self.device),
        }

    def advance(self) -> None:
        """After a step's forward: every row holds one more token."""
        ones = torch.ones((len(self.rows), 1), dtype=torch.long, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        self.positions = [p + 1 for p in self.positions]

    def truncate(self, length: int) -> None:
        """Undo a failed step: cut every layer back to `length` tokens (some may have grown)."""
        for layer in cache_tensors(self.cache):
            if layer.keys is not None and layer.keys.shape[2] > length:
                layer.keys = layer.keys[:, :, :length]
                layer.values = layer.values[:, :, :length]

    @staticmethod
    def _pad_left(cache: Any, amount: int) -> None:
        if amount <= 0:
            return
        for layer in cache_tensors(cache):
            layer.keys = F.pad(layer.keys, (0, 0, amount, 0))
            layer.values = F.pad(layer.values, (0, 0, amount, 0))
