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
import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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
        raise AdapterUnavailable(f"cannot load adapter files from {ref.path}: {error}") from error
    if device.type == "cuda":
        side = torch.cuda.Stream(device)  # copies beside the decoding stream, not queued behind it
        with torch.cuda.stream(side):
            weights = {
                name: tensor.pin_memory().to(device, non_blocking=True) for name, tensor in weights.items()
            }
        side.synchronize()
    return AdapterFiles(config=config, weights=weights)


class ResidentAdapters:
    def __init__(self, base_model: Any, *, max_resident: int, metrics: EngineMetrics | None = None) -> None:
        self.base_model = base_model
        self.metrics = metrics or EngineMetrics()
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

    def is_resident(self, key: str) -> bool:
        return key in self._holders

    def acquire(self, ref: AdapterRef, files: AdapterFiles | None = None) -> None:
        """Make `ref` resident (installing `files`, or reading them now; evicting the LRU idle
        adapter if full) and hold it."""
        if ref.key in self._doomed:
            raise AdapterUnavailable(f"adapter {ref.label or ref.key} was removed")
        if ref.key not in self._holders:
            while len(self._holders) >= self.max_resident:
                victim = self._evictable()
                if victim is None:
                    raise AdapterUnavailable("every adapter slot is held by a running request")
                self._unload(victim)
                self.evictions += 1
                self.metrics.adapter_evicted()
            self._load(ref, files)
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
            while len(self._holders) >= self.max_resident and (victim := self._evictable()) is not None:
                self._unload(victim)
                self.evictions += 1
                self.metrics.adapter_evicted()
            self._load(ref, files)
            self._holders[ref.key] = 0
        with_adapter = self.peft_model(input_ids=ids, adapter_names=[ref.key], logits_to_keep=1).logits
        without = self.peft_model(input_ids=ids, adapter_names=[BASE], logits_to_keep=1).logits
        if newly_loaded and len(self._holders) > self.max_resident:
            self._unload(ref.key)
        return float((with_adapter.float() - without.float()).abs().max())

    def _evictable(self) -> str | None:
        return next((key for key, holders in self._holders.items() if holders == 0), None)

    def _load(self, ref: AdapterRef, files: AdapterFiles | None) -> None:
        """Install an adapter as PEFT's load_adapter does, from files read beforehand."""
        from peft import PeftModel, set_peft_model_state_dict

        started = time.perf_counter()
        files = files or read_adapter(ref, _device(self.base_model))
        config = copy.copy(files.config)
        config.inference_mode = True
        key = ref.key
        try:
            # low_cpu_mem_usage: the new layers start empty and take the read tensors as they are.
            if self.peft_model is None:
                self.peft_model = PeftModel(self.base_model, config, adapter_name=key, low_cpu_mem_usage=True)
            else:
                self.peft_model.add_adapter(key, config, low_cpu_mem_usage=True)
            loaded: Any = set_peft_model_state_dict(
                self.peft_model, files.weights, adapter_name=key, low_cpu_mem_usage=True
            )
            missing = [name for name in loaded.missing_keys if "lora_" in name and f".{key}." in name]
            if missing:
                raise ValueError(f"{len(missing)} LoRA weights missing, e.g. {missing[0]}")
        except Exception as error:
            if self.peft_model is not None and key in self.peft_model.peft_config:
                self._holders.setdefault(key, 0)
                self._unload(key)
            raise AdapterUnavailable(f"cannot load adapter files from {ref.path}: {error}") from error
        if self.peft_model.active_adapter not in self.peft_model.peft_config:
            # Every adapter was unloaded earlier; PEFT still names the last one active.
            self.peft_model.set_adapter(key)
        self.peft_model.eval()
        self.loads += 1
        self.metrics.adapter_loaded(time.perf_counter() - started)
        self.metrics.resident_adapters(len(self._holders) + 1)
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
        self.metrics.resident_adapters(len(self._holders))
        log.info("adapter %s unloaded (%d resident)", key, len(self._holders))


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device
