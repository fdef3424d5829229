"""LoRA adapters resident on the served model: loaded on demand, chosen per request, evicted LRU.

Only the engine's worker thread touches this (loading an adapter writes the model's LoRA buffers,
so it must not happen during another request's forward pass). Each resident adapter has a slot in
every layer it targets (app/llm/lora.py), and each forward pass names every row's slot: rows on
different adapters, and rows on the bare base, run in one batch, and no request ever sees another's
adapter switched under it (unlike PEFT's global `set_adapter`).

The set is bounded by `max_resident`. When it is full, the least recently used adapter that no
running request holds is unloaded; a held adapter is never unloaded under its request, and one
that is removed from the registry while held is unloaded when its last request ends.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.llm.loader import compute_dtype
from app.llm.lora import LoraSlots
from app.llm.metrics import EngineMetrics

log = logging.getLogger(__name__)

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names


@dataclass(frozen=True)
class AdapterRef:
    """What a request asks for: `key` names one adapter version (stable across servers), `path` its files."""

    key: str
    path: Path
    label: str = ""  # e.g. "finance@3", for messages


class AdapterUnavailable(Exception):
    """The adapter cannot be served now (all slots held, or its files do not load)."""


def unloadable(ref: AdapterRef, error: BaseException) -> AdapterUnavailable:
    """The error for an adapter whose files do not load: the reason (and the server's paths) go to
    the log, the request's own message names only the adapter."""
    log.error("adapter %s: cannot load its files from %s: %s", ref.label or ref.key, ref.path, error)
    return AdapterUnavailable(
        f"the adapter {ref.label or ref.key} could not be loaded; the server log says why"
    )


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter's config and weights, read and already on the model's device: ready to install."""

    config: Any
    weights: dict[str, torch.Tensor]


def read_adapter(ref: AdapterRef, device: torch.device) -> AdapterFiles:
    """Read an adapter's files onto `device`. Touches no model: runs on any thread.

    Reading and copying the weights is most of an adapter's load time; done here, off the engine's
    worker thread, the running batch keeps decoding meanwhile and only the quick install is left.
    """
    from peft import PeftConfig
    from peft.utils import load_peft_weights

    try:
        config = PeftConfig.from_pretrained(str(ref.path))
        weights = load_peft_weights(str(ref.path), device="cpu")
    except Exception as error:
        raise unloadable(ref, error) from error
    if device.type == "cuda":
        weights = _copy_to_gpu(weights, device)
    return AdapterFiles(config=config, weights=weights)


def _copy_to_gpu(weights: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """All of an adapter's tensors in one pinned buffer and one copy, beside the decoding stream.

    Pinning each tensor apart (a few hundred of them) asks the driver for pinned memory each time,
    and those requests waited for the busy GPU: reading a rank-16 adapter took 2.6 s under load on
    an H200 that way (docs/benchmarks.md).
    """
    spans, total = [], 0
    for tensor in weights.values():
        start = -(-total // 16) * 16  # aligned for any dtype's view
        total = start + tensor.numel() * tensor.element_size()
        spans.append((start, total))
    staging = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    for (start, end), tensor in zip(spans, weights.values(), strict=True):
        staging[start:end].view(tensor.dtype).view(tensor.shape).copy_(tensor)
    side = torch.cuda.Stream(device)  # not queued behind the decoding stream's work
    with torch.cuda.stream(side):
        on_device = staging.to(device, non_blocking=True)
    side.synchronize()
    return {
        name: on_device[start:end].view(tensor.dtype).view(tensor.shape)
        for (start, end), (name, tensor) in zip(spans, weights.items(), strict=True)
    }


class ResidentAdapters:
    def __init__(
        self, base_model: Any, *, max_resident: int, max_rank: int = 256, metrics: EngineMetrics | None = None
    ) -> None:
        self.base_model = base_model
        self.metrics = metrics or EngineMetrics()
        self.max_resident = max_resident
        device = _device(base_model)
        # Slot 0 is the bare base; one more than max_resident lets a probe load beside a full set.
        self.lora = LoraSlots(
            base_model, slots=max_resident + 2, max_rank=max_rank, dtype=compute_dtype(device)
        )
        self._free_slots = list(range(max_resident + 1, 0, -1))
        self._slot_of: dict[str, int] = {}
        self._holders: collections.OrderedDict[str, int] = (
            collections.OrderedDict()
        )  # key -> requests, LRU first
        self._doomed: set[str] = set()
        self.loads = 0
        self.evictions = 0

    @property
    def resident(self) -> list[str]:
        return list(self._holders)

    def can_hold(self, key: str) -> bool:
        """Whether `acquire(key)` can succeed now without unloading an adapter a request holds."""
        return key in self._holders or len(self._holders) < self.max_resident or self._evictable() is not None

    def is_resident(self, key: str) -> bool:
        return key in self._holders

    def acquire(self, ref: AdapterRef, files: AdapterFiles | None = None) -> None:
        """Make `ref` resident (installing `files`, or reading them now; evicting the LRU idle
        adapter if full) and hold it."""
        if ref.key in self._doomed:
            raise AdapterUnavailable(f"adapter {ref.label or ref.key} was removed")
        if ref.key not in self._holders:
            if not self._make_room():
                raise AdapterUnavailable("every adapter slot is held by a running request")
            self._load(ref, files)
            self._holders[ref.key] = 0
        self._holders[ref.key] += 1
        self._holders.move_to_end(ref.key)

    def has_free_slot(self, key: str) -> bool:
        """Whether `key` is not resident and would fit without unloading anything."""
        return key not in self._holders and key not in self._doomed and len(self._holders) < self.max_resident

    def preload(self, ref: AdapterRef, files: AdapterFiles) -> bool:
        """Load `ref` ahead of its first request, into a free slot only: a preload never unloads an
        adapter. It stays idle and first in line for eviction until a request uses it. False when
        it is already resident or no slot is free."""
        if not self.has_free_slot(ref.key):
            return False
        self._load(ref, files)
        self._holders[ref.key] = 0
        self._holders.move_to_end(ref.key, last=False)
        return True

    def release(self, key: str) -> None:
        self._holders[key] -= 1
        if self._holders[key] == 0 and key in self._doomed:
            self._unload(key)

    def remove(self, key: str) -> None:
        """Unload an adapter that was disabled or deleted: now if idle, else when its last request ends."""
        if key not in self._holders:
            return
        if self._holders[key] == 0:
            self._unload(key)
        else:
            self._doomed.add(key)

    def forward(self, keys: Sequence[str | None], **inputs: Any) -> Any:
        """One forward pass, row i with adapter `keys[i]` (None: the bare base), in one batch."""
        slots = self.slots(keys)
        index = None if slots is None else torch.tensor(slots, device=_device(self.base_model))
        return self.run(index, **inputs)

    def slots(self, keys: Sequence[str | None]) -> list[int] | None:
        """Each row's LoRA slot (0: the bare base); None when no row uses an adapter."""
        if not any(keys):
            return None
        return [self._slot_of[key] if key else 0 for key in keys]

    def run(self, slots: torch.Tensor | None, **inputs: Any) -> Any:
        """One forward pass with row i on LoRA slot `slots[i]` (a device tensor); None: no LoRA at all."""
        if slots is None:
            return self.base_model(**inputs)  # every LoRA layer passes straight through
        self.lora.select(slots)
        try:
            return self.base_model(**inputs)
        finally:
            self.lora.select(None)

    def probe(self, ref: AdapterRef, prompt_ids: list[int], files: AdapterFiles | None = None) -> float:
        """Measure how much the adapter moves the next-token logits, leaving it loaded for use.

        Returns the largest absolute change of the logits at the last prompt position; 0 means
        the adapter applies to nothing (wrong module names, zero weights). The adapter stays
        resident (idle, most recently used) so the first request for it does not load it again;
        when every slot is held by a running request it is unloaded after the probe instead.
        """
        ids = torch.tensor([prompt_ids], device=_device(self.base_model))
        newly_loaded = ref.key not in self._holders
        if newly_loaded:
            self._make_room()  # when every slot is held, the probe uses the spare one
            self._load(ref, files)
            self._holders[ref.key] = 0
        with_adapter = self.forward([ref.key], input_ids=ids, logits_to_keep=1).logits
        without = self.forward([None], input_ids=ids, logits_to_keep=1).logits
        if newly_loaded and len(self._holders) > self.max_resident:
            self._unload(ref.key)
        return float((with_adapter.float() - without.float()).abs().max())

    def _make_room(self) -> bool:
        """Unload least recently used idle adapters until one more fits; False if all are held."""
        while len(self._holders) >= self.max_resident:
            victim = self._evictable()
            if victim is None:
                return False
            self._unload(victim)
            self.evictions += 1
            self.metrics.adapter_evicted()
        return True

    def _evictable(self) -> str | None:
        return next((key for key, holders in self._holders.items() if holders == 0), None)

    def _load(self, ref: AdapterRef, files: AdapterFiles | None) -> None:
        """Copy an adapter's matrices into a free slot of every layer it targets."""
        started = time.perf_counter()
        files = files or read_adapter(ref, _device(self.base_model))
        slot = self._free_slots.pop()
        try:
            self.lora.fill(slot, files.config, files.weights)
        except Exception as error:
            self.lora.clear(slot)
            self._free_slots.append(slot)
            raise unloadable(ref, error) from error
        self._slot_of[ref.key] = slot
        self.loads += 1
        self.metrics.adapter_loaded(time.perf_counter() - started)
        self.metrics.resident_adapters(len(self._holders) + 1)
        log.info("adapter %s loaded into slot %d (%d resident)", ref.key, slot, len(self._holders) + 1)

    def _unload(self, key: str) -> None:
        slot = self._slot_of.pop(key, None)
        if slot is not None:
            self.lora.clear(slot)
            self._free_slots.append(slot)
        self._holders.pop(key, None)
        self._doomed.discard(key)
        self.metrics.resident_adapters(len(self._holders))
        log.info("adapter %s unloaded (%d resident)", key, len(self._holders))


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device
