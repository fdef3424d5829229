"""LoRA adapters resident on the served model: loaded on demand, chosen per request, evicted LRU.

Only the engine's worker thread touches this (loading an adapter changes the model's modules, so
it must not happen during another request's forward pass). Each forward names its adapter through
PEFT's `adapter_names=` rather than `set_adapter`, which is global: two requests on different
adapters can be in flight at once, and none ever sees another's adapter switched under it.

The set is bounded by `max_resident`. When it is full, the least recently used adapter that no
running request holds is unloaded; a held adapter is never unloaded under its request, and one
that is removed from the registry while held is unloaded when its last request ends.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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


class ResidentAdapters:
    def __init__(self, base_model: Any, *, max_resident: int) -> None:
        self.base_model = base_model
        self.max_resident = max_resident
        self.peft_model: Any = None
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

    def acquire(self, ref: AdapterRef) -> None:
        """Make `ref` resident (loading it, and evicting the LRU idle one if full) and hold it."""
        if ref.key in self._doomed:
            raise AdapterUnavailable(f"adapter {ref.label or ref.key} was removed")
        if ref.key not in self._holders:
            while len(self._holders) >= self.max_resident:
                victim = self._evictable()
                if victim is None:
                    raise AdapterUnavailable("every adapter slot is held by a running request")
                self._unload(victim)
                self.evictions += 1
            self._load(ref.key, ref.path)
            self._holders[ref.key] = 0
        self._holders[ref.key] += 1
        self._holders.move_to_end(ref.key)

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
        if self.peft_model is None or (not self._holders and not any(keys)):
            # No adapter is loaded: the base model's own modules, with nothing added.
            return (
                self.peft_model.get_base_model()(**inputs)
                if self.peft_model is not None
                else self.base_model(**inputs)
            )
        return self.peft_model(**inputs, adapter_names=[key or BASE for key in keys])

    def probe(self, ref: AdapterRef, prompt_ids: list[int]) -> float:
        """Measure how much the adapter moves the next-token logits, leaving it loaded for use.

        Returns the largest absolute change of the logits at the last prompt position; 0 means
        the adapter applies to nothing (wrong module names, zero weights). The adapter stays
        resident (idle, most recently used) so the first request for it does not load it again;
        when every slot is held by a running request it is unloaded after the probe instead.
        """
        ids = torch.tensor([prompt_ids], device=_device(self.base_model))
        newly_loaded = ref.key not in self._holders
        if newly_loaded:
            while len(self._holders) >= self.max_resident and (victim := self._evictable()) is not None:
                self._unload(victim)
                self.evictions += 1
            self._load(ref.key, ref.path)
            self._holders[ref.key] = 0
        with_adapter = self.peft_model(input_ids=ids, adapter_names=[ref.key], logits_to_keep=1).logits
        without = self.peft_model(input_ids=ids, adapter_names=[BASE], logits_to_keep=1).logits
        if newly_loaded and len(self._holders) > self.max_resident:
            self._unload(ref.key)
        return float((with_adapter.float() - without.float()).abs().max())

    def _evictable(self) -> str | None:
        return next((key for key, holders in self._holders.items() if holders == 0), None)

    def _load(self, key: str, path: Path) -> None:
        from peft import PeftModel

        try:
            if self.peft_model is None:
                self.peft_model = PeftModel.from_pretrained(self.base_model, str(path), adapter_name=key)
            else:
                self.peft_model.load_adapter(str(path), adapter_name=key)
        except Exception as error:
            raise AdapterUnavailable(f"cannot load adapter files from {path}: {error}") from error
        if self.peft_model.active_adapter not in self.peft_model.peft_config:
            # Every adapter was unloaded earlier; PEFT still names the last one active.
            self.peft_model.set_adapter(key)
        self.peft_model.eval()
        self.loads += 1
        log.info("adapter %s loaded (%d resident)", key, len(self._holders) + 1)

    def _unload(self, key: str) -> None:
        if key in self.peft_model.peft_config:
            remaining = [name for name in self.peft_model.peft_config if name != key]
            if remaining:
                # PEFT forwards consult the "active" adapter's config; keep it pointing at one that stays.
                self.peft_model.set_adapter(remaining[0])
            self.peft_model.delete_adapter(key)
        self._holders.pop(key, None)
        self._doomed.discard(key)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("adapter %s unloaded (%d resident)", key, len(self._holders))


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device
