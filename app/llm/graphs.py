"""CUDA graphs for the decoding step: capture its kernels once per shape, then replay them.

A decoding step of a Falcon-7B-shaped model in transformers launches hundreds of kernels (per layer:
norms, the 4-bit matmuls, rotary embedding, attention, the LoRA gathers and matmuls), each a few
microseconds of GPU work behind tens of microseconds of Python. For a small batch the launches set
the speed, not the memory bandwidth. A CUDA graph records the kernels of one forward pass and
replays them with one launch, reading its inputs from the same device memory every time
(app/llm/batch.py keeps the step's inputs and KV cache in fixed buffers for this).

A graph is only valid for the shapes and buffers it was captured with, so graphs are kept per
(structure, shape): `structure` is what changes rarely and invalidates every graph when it does
(the adapters' LoRA buffers), `shape` is the batch-size bucket, the columns of the KV cache that
attention reads, and whether LoRA runs. All graphs share one memory pool, since only one runs at a
time.

Capture needs the forward pass to make no host round trip; `make_capturable` rewrites the one
place in transformers' Falcon that does (its key/value split indexes with Python lists, which
copies the index to the GPU on every call).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Hashable
from typing import Any

import torch


class DecodeGraphs:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._structure: Hashable = None
        self._pool: Any = None
        self.captures = 0

    def __len__(self) -> int:
        """The graphs held (for the present structure)."""
        return len(self._graphs)

    def run(self, structure: Hashable, shape: Hashable, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Replay the graph of `forward` for this structure and shape (capturing it the first time).

        `forward` must compute this step from the fixed input buffers: capture runs it once for
        real first (the warm-up), so the KV writes of the step itself are what the capture's
        warm-up writes. The returned tensor is overwritten by the next replay of any graph.
        """
        self._use(structure)
        entry = self._graphs.get(shape)
        if entry is None:
            entry = self._graphs[shape] = self._capture(forward)
        graph, output = entry
        graph.replay()
        return output

    def missing(self, structure: Hashable, shapes: list[Any]) -> list[Any]:
        """Those of `shapes` with no graph for `structure`."""
        if structure != self._structure:
            return list(shapes)
        return [shape for shape in shapes if shape not in self._graphs]

    def capture(self, structure: Hashable, shape: Hashable, forward: Callable[[], torch.Tensor]) -> None:
        """Capture the graph of `forward` for this structure and shape ahead of its first step."""
        self._use(structure)
        if shape not in self._graphs:
            self._graphs[shape] = self._capture(forward)

    def _use(self, structure: Hashable) -> None:
        if structure != self._structure:
            self._graphs.clear()  # captured against buffers that are gone; their memory goes too
            self._pool = None
            self._structure = structure

    def _capture(self, forward: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            forward()  # warm-up outside the graph: lazy initialisation, kernel and workspace choices
        current.wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the adapter reader's copies on other threads may go on during a capture.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            output = forward()
        self.captures += 1
        return graph, output


def make_capturable(model: Any) -> None:
    """Rewrite Falcon's multi-query key/value split with slices (same values, no host copy)."""
    for module in model.modules():
        if (
            type(module).__name__.startswith("Falcon")
            and hasattr(module, "_split_heads")
            and getattr(module, "multi_query", False)
            and not getattr(module, "new_decoder_architecture", True)
        ):
            module._split_heads = types.MethodType(_split_multi_query_heads, module)


def _split_multi_query_heads(
    self: Any, fused_qkv: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # transformers: fused_qkv[..., :-2, :], fused_qkv[..., [-2], :], fused_qkv[..., [-1], :]
    batch, length, _ = fused_qkv.shape
    fused_qkv = fused_qkv.view(batch, length, self.num_heads + 2, self.head_dim)
    return fused_qkv[..., :-2, :], fused_qkv[..., -2:-1, :], fused_qkv[..., -1:, :]
