"""The decoding batch: every decoding sequence's KV cache as one row of fixed buffers.

Sequences join after their prompt is prefilled (in a cache of its own, app/llm/engine.py) and
leave when they finish, at any step (continuous batching). Their caches live in a `SlotCache`: per
layer one key and one value buffer of [rows, kv heads, length, head dim]. Sequence i is row i, and
its token at position p sits in column p, so each row keeps its own positions with no padding to
line rows up; a step writes every row's new token at that row's own column, and the attention mask
hides the columns past each row's position. When a sequence leaves, the last rows move up into its
place, so the live rows are always 0..n-1.

Fixed buffers give the decoding step fixed shapes, which is what lets it be captured in a CUDA
graph and replayed (app/llm/graphs.py): the forward pass of a Falcon-7B-shaped model launches
hundreds of small kernels per token, and launched one by one from Python they, not the GPU, set the
speed of a small batch. A graph is kept per batch size (rounded up to a bucket; spare rows compute
on a free row and are thrown away), per columns of the cache attention reads (the longest row's,
rounded up to a power of two), and per adapter set-up; `uncaptured` lists those not captured yet,
which the engine captures while it is idle, so that steps need not wait for a capture.

Memory: the buffers hold `max_running` rows of the whole context window, allocated once: a graph
replays the addresses it was captured with, so buffers that grew with the sequences would throw
every graph away at each growth (capturing one takes 0.1 to 0.2 s of a Falcon-7B's time on an H200,
each bucket again as a batch drains). Falcon-7B's multi-query attention keeps a token in 8 KiB
(2 x 1 head x 64 x 32 layers x 2 bytes), so 32 rows of 2,048 tokens take 512 MiB; a model with
full multi-head attention pays its heads' worth more (MAX_RUNNING_GENERATIONS and CONTEXT_WINDOW
bound it).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

from app.llm.graphs import DecodeGraphs

FIRST_COLUMNS = 256  # the fewest columns a captured step's attention reads; then powers of two
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class SlotCache:
    """Per layer, key and value buffers [rows, kv heads, length, head dim]; row r is one sequence.

    It stands in for transformers' `Cache` in a decoding step (the decoder layers call `update`,
    the model `get_seq_length`): `update` writes each row's new key and value at that row's column
    (`write_at`) and returns the first `batch` rows, `columns` wide, for attention.
    """

    def __init__(self, like: Sequence[tuple[torch.Tensor, torch.Tensor]], rows: int, length: int) -> None:
        self.keys = [k.new_zeros((rows, k.shape[1], length, k.shape[3])) for k, _ in like]
        self.values = [v.new_zeros((rows, v.shape[1], length, v.shape[3])) for _, v in like]
        device = self.keys[0].device
        self.row_ids = torch.arange(rows, device=device)
        # Set for each forward pass by DecodeBatch:
        self.batch = 0  # rows taking part
        self.write_at = torch.zeros(0, dtype=torch.long, device=device)  # [batch] each row's new column
        self.columns = length  # columns attention reads

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # every row has its own length; the step passes positions explicitly

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one new token per row ([batch, kv heads, 1, head dim]) and return the rows' caches."""
        rows = self.row_ids[: self.batch]
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[rows, :, self.write_at] = key[:, :, 0]
        values[rows, :, self.write_at] = value[:, :, 0]
        return keys[: self.batch, :, : self.columns], values[: self.batch, :, : self.columns]

    def put(
        self,
        rows: Sequence[int],
        like: Sequence[tuple[torch.Tensor, torch.Tensor]],
        lengths: Sequence[int],
        starts: Sequence[int],
    ) -> None:
        """Copy prefilled sequences' caches into `rows`: sequence i's `lengths[i]` tokens from
        column `starts[i]` of a one-row cache (prompts packed end to end), per layer.

        Two gathers and two scatters per layer for all of them: copying sequence by sequence took
        64 launches each on a 32-layer model, ~1,500 after a packed pass of 23 prompts, while
        their first tokens waited to be streamed.
        """
        device = self.keys[0].device
        row_ids = torch.repeat_interleave(torch.tensor(rows), torch.tensor(lengths)).to(device)
        columns = torch.cat([torch.arange(n) for n in lengths]).to(device)
        sources = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)]).to(device)
        for (k, v), keys, values in zip(like, self.keys, self.values, strict=True):
            # [tokens, kv heads, head dim] on both sides
            keys[row_ids, :, columns] = k[0, :, sources].transpose(0, 1)
            values[row_ids, :, columns] = v[0, :, sources].transpose(0, 1)

    def gather(self, rows: torch.Tensor) -> None:
        """Rows `rows` (ascending, on the device) become rows 0..len-1."""
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer[: len(rows)] = buffer.index_select(0, rows)


def prefill_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A transformers cache's (keys, values) per layer."""
    return [(layer.keys, layer.values) for layer in cache.layers]


class DecodeBatch:
    """Rows of sequences decoding together; `rows[i]` owns row i of the cache."""

    def __init__(self, device: torch.device, *, capacity: int, max_length: int, cuda_graphs: bool) -> None:
        self.device = device
        self.capacity = capacity  # the most rows at once (the engine's max_running)
        self.max_length = max_length  # the context window: no row grows past it
        self.rows: list[Any] = []
        self.positions: list[int] = []  # the position of each row's next token (= its cache length)
        self.cache: SlotCache | None = None
        # Each step's inputs, in one device tensor so that a graph's replay reads them from the same
        # memory every time: token, position, adapter slot. The tokens stay on the device from one
        # step to the next (`feed`); the host copies the positions and slots in one transfer.
        self._inputs = torch.zeros((3, capacity), dtype=torch.long, device=device)
        self._column_ids = torch.zeros(0, dtype=torch.long, device=device)
        self.graphs = DecodeGraphs(device) if cuda_graphs and device.type == "cuda" else None
        # Every (batch bucket, columns) a captured step can take, smallest first
        batches = sorted({_bucket(rows, capacity) for rows in range(1, capacity + 1)})
        widths = sorted({self._columns_for(1 << i) for i in range(max_length.bit_length() + 1)})
        self._step_shapes = [(b, c) for c in widths for b in batches]

    def __len__(self) -> int:
        return len(self.rows)

    def add(
        self,
        rows: Sequence[Any],
        tokens: Sequence[int],
        cache: Any,
        lengths: Sequence[int],
        starts: Sequence[int],
    ) -> None:
        """Add prefilled sequences whose next inputs are `tokens`: `cache` (a transformers cache of
        one row) holds sequence i's `lengths[i]` tokens from column `starts[i]` (prompts prefilled
        together are packed end to end)."""
        layers = prefill_layers(cache)
        if self.cache is None:
            self.allocate(layers)
        assert self.cache is not None
        first = len(self.rows)
        self.cache.put(range(first, first + len(rows)), layers, lengths, starts)
        self._inputs[0, first : first + len(rows)] = torch.tensor(tokens)
        self.rows.extend(rows)
        self.positions.extend(lengths)

    def allocate(self, like: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The cache's buffers, shaped after a prefilled cache's layers (`prefill_layers`)."""
        try:
            self.cache = SlotCache(like, self.capacity, self.max_length)
        except torch.OutOfMemoryError as error:
            token_bytes = sum(2 * k.shape[1] * k.shape[3] * k.element_size() for k, _ in like)
            size = token_bytes * self.capacity * self.max_length / 2**30
            raise torch.OutOfMemoryError(
                f"the KV cache of {self.capacity} sequences x {self.max_length} tokens ({size:.1f} GiB) "
                "does not fit beside the model: lower MAX_RUNNING_GENERATIONS or CONTEXT_WINDOW"
            ) from error
        self._column_ids = torch.arange(self.max_length, device=self.device)

    def feed(self, tokens: torch.Tensor) -> None:
        """The next step's input tokens of rows 0..len-1, on the device (the last step's choices):
        the host need not read them before launching it."""
        self._inputs[0, : tokens.numel()].copy_(tokens)

    def keep(self, indices: Sequence[int]) -> None:
        """Keep only these rows (ascending), moved up to rows 0..len-1."""
        if list(indices) == list(range(len(self.rows))):
            return
        if indices and self.cache is not None:
            kept = torch.tensor(list(indices), device=self.device)
            self.cache.gather(kept)
            self._inputs[0, : len(indices)] = self._inputs[0].index_select(0, kept)
        self.rows = [self.rows[i] for i in indices]
        self.positions = [self.positions[i] for i in indices]

    def step(
        self, slots: Sequence[int] | None, forward: Callable[..., Any], structure: Hashable = None
    ) -> torch.Tensor:
        """One forward pass feeding each row its next token (given to `add` or `feed`), row i with
        adapter slot `slots[i]` (None: no adapters).

        `forward(slots, **model_inputs)` runs the model; `structure` names what a captured graph
        depends on besides the shapes (the adapters' buffers). Returns the next-token logits,
        [rows, vocab]. On failure nothing has moved: the step can be run again.
        """
        assert self.cache is not None
        n = len(self.rows)
        batch = n if self.graphs is None else _bucket(n, self.capacity)
        # A new pinned buffer each step: the copy is queued behind the steps the GPU has not run
        # yet, without the host waiting for them (PyTorch reuses the buffer once it is done).
        host = torch.zeros((2, batch), dtype=torch.long, pin_memory=self.device.type == "cuda")
        host[0, :n] = torch.tensor(self.positions)
        if slots is not None:
            host[1, :n] = torch.tensor(slots)
        self._inputs[1:, :batch].copy_(host, non_blocking=True)
        with_lora = slots is not None

        def run(columns: int) -> torch.Tensor:
            return self._forward(batch, columns, forward, with_lora)

        if self.graphs is None:
            logits = run(max(self.positions) + 1)  # eager: attention reads only the columns in use
        else:
            columns = self._columns_for(max(self.positions) + 1)
            logits = self.graphs.run(structure, (batch, columns, with_lora), lambda: run(columns))
        self.positions = [p + 1 for p in self.positions]
        return logits[:n]

    def _forward(
        self, batch: int, columns: int, forward: Callable[..., Any], with_lora: bool
    ) -> torch.Tensor:
        assert self.cache is not None
        tokens, positions, slots = self._inputs[:, :batch]
        cache = self.cache
        cache.batch, cache.write_at, cache.columns = batch, positions, columns
        visible = self._column_ids[:columns] <= positions[:, None]  # [batch, columns]: where a row looks
        # Additive (0 or -inf, in the attention's dtype), not boolean: given a boolean mask, SDPA
        # converts it to this in every layer, three kernels each (96 of a Falcon-7B step's ~800).
        mask = torch.zeros(visible.shape, dtype=cache.keys[0].dtype, device=self.device)
        mask.masked_fill_(~visible, float("-inf"))
        out = forward(
            slots if with_lora else None,
            input_ids=tokens[:, None],
            position_ids=positions[:, None],
            attention_mask=mask[:, None, None, :],
            cache=cache,
        )
        return out.logits[:, -1]

    def _columns_for(self, needed: int) -> int:
        return min(max(FIRST_COLUMNS, 1 << (needed - 1).bit_length()), self.max_length)

    def uncaptured(self, structure: Hashable, lora: bool) -> list[tuple[int, int, bool]]:
        """The steps' shapes (batch bucket, columns, with LoRA) with no graph captured for
        `structure` yet, smallest first; `lora`: whether steps can run adapters."""
        if self.graphs is None:
            return []
        shapes = [(b, c, w) for w in (False, True)[: 1 + lora] for b, c in self._step_shapes]
        return self.graphs.missing(structure, shapes)

    def capture(self, structure: Hashable, shape: tuple[int, int, bool], forward: Callable[..., Any]) -> None:
        """Capture the step of `shape` (from `uncaptured`) while no sequence is decoding: its
        rows compute on zeros, writing nothing any row will read."""
        assert self.graphs is not None and self.cache is not None and not self.rows
        batch, columns, with_lora = shape
        self._inputs.zero_()
        self.graphs.capture(structure, shape, lambda: self._forward(batch, columns, forward, with_lora))


def _bucket(rows: int, capacity: int) -> int:
    """The batch size a graph is kept for: the smallest bucket that holds `rows`, within capacity."""
    return min(next((b for b in BATCH_BUCKETS if b >= rows), rows), max(capacity, rows))
