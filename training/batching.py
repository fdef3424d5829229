"""Token-budgeted micro-batches: each optimizer step's batch in as few forward/backward passes as fit.

A QLoRA step on a 7B model is bound by the CPU, not the GPU, below a few thousand tokens per pass:
every forward and backward issues some 9,500 kernels whatever the batch holds (about 0.4 s on an
H200, docs/benchmarks.md), so four passes of 4 short records cost four times what one pass of 16
does. Fixed micro-batches (batch 4 x accumulation 4) pay that four times on every step; a fixed
batch of 16 would run out of memory on the rare steps of 16 long records.

So the trainer takes the whole step's batch at once (`batch_size` records, right-padded,
length-grouped so they are of similar length) and splits it here into passes of at most
`micro_batch_tokens` padded tokens each, trimming each pass's padding to its own longest record.
The loss is normalised by the step's token count (`num_items_in_batch`), so the passes' gradients
add up to the one-pass gradient: the same training, with memory bounded by the budget.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from trl import SFTTrainer

log = logging.getLogger(__name__)


def split_batch(inputs: dict[str, Any], budget: int, parts: int | None = None) -> list[dict[str, Any]]:
    """Split a right-padded batch into passes of at most `budget` padded tokens (rows x longest row).

    Rows go longest first into the fewest passes that fit; a row longer than the budget gets a pass
    of its own. With `parts`, the batch is split into exactly that many passes (the largest passes
    halved until there are enough), so that every data-parallel process runs as many as the others.
    """
    mask = inputs["attention_mask"]
    rows, width = mask.shape
    lengths = mask.sum(dim=1).tolist()  # right padding: a row's tokens are its first `length` columns
    order = sorted(range(rows), key=lambda row: -lengths[row])
    groups: list[list[int]] = []
    for row in order:
        current = groups[-1] if groups else None
        if current and (len(current) + 1) * lengths[current[0]] <= budget:
            current.append(row)
        else:
            groups.append([row])
    if parts is not None:
        if not len(groups) <= parts <= rows:
            raise ValueError(f"cannot split {rows} rows into {parts} passes (at least {len(groups)} needed)")
        while len(groups) < parts:
            largest = max((g for g in groups if len(g) > 1), key=lambda g: len(g) * lengths[g[0]])
            index = groups.index(largest)
            half = len(largest) // 2
            groups[index : index + 1] = [largest[:half], largest[half:]]
    return [_select(inputs, group, int(lengths[group[0]]), rows, width) for group in groups]


def _select(inputs: dict[str, Any], group: list[int], longest: int, rows: int, width: int) -> dict[str, Any]:
    index = torch.tensor(group, device=inputs["attention_mask"].device)
    chosen: dict[str, Any] = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows:
            value = value.index_select(0, index)
            if value.dim() >= 2 and value.shape[1] == width:
                value = value[:, :longest]
        chosen[key] = value
    return chosen


class MicroBatchingSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer, running each step's batch as token-budgeted passes (see the module docstring)."""

    def __init__(self, *args: Any, micro_batch_tokens: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.micro_batch_tokens = micro_batch_tokens
        self._warned_unscaled = False

    def training_step(
        self, model: Any, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        if not self.micro_batch_tokens or "attention_mask" not in inputs:
            return super().training_step(model, inputs, num_items_in_batch)
        if num_items_in_batch is None:
            # Each pass's loss would then be its own mean, and the sum of means is not the step's loss.
            if not self._warned_unscaled:
                log.warning("micro_batch_tokens ignored: this trainer does not normalise the loss by tokens")
                self._warned_unscaled = True
            return super().training_step(model, inputs, num_items_in_batch)
        passes = split_batch(inputs, self.micro_batch_tokens, self._passes_everywhere(inputs))
        total: torch.Tensor | None = None
        for number, chunk in enumerate(passes, start=1):
            # Data parallel: gradients are averaged across processes once, after the step's last pass.
            last = number == len(passes)
            with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                loss = super().training_step(model, chunk, num_items_in_batch)
            total = loss if total is None else total + loss
        assert total is not None
        return total

    def _passes_everywhere(self, inputs: dict[str, Any]) -> int | None:
        """Under data parallelism, the most passes any process needs (every pass is a collective)."""
        if self.accelerator.num_processes == 1:
            return None
        import torch.distributed as dist

        needed = torch.tensor(
            len(split_batch(inputs, self.micro_batch_tokens or 0)), device=self.accelerator.device
        )
        dist.all_reduce(needed, op=dist.ReduceOp.MAX)
        return int(needed.item())
