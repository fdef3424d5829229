"""Load a Hugging Face causal LM with its tokenizer, quantized with bitsandbytes, and prove it.

`load_model(ModelSpec(...))` works the same for the embedded demo model, a local checkpoint
directory and a hub id. It imports nothing from the web stack, so `bench/` uses it as-is on
the GPU machine.

Why the extra care: transformers 5.x swaps in 4-bit layers only for modules whose type is
exactly `nn.Linear`. Falcon builds its layers from `FalconLinear(nn.Linear)`, so a plain
`from_pretrained(..., quantization_config=...)` silently leaves Falcon-7B in bf16 (12.9 GiB
instead of 3.7 GiB). We construct such models with plain `nn.Linear` (same maths), and after
every load we check that each linear layer we meant to quantize really is quantized.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

QUANTIZATIONS = ("nf4", "fp4", "int8", "none")

# nn.Linear subclasses whose forward is exactly nn.Linear's, keyed by the module that defines
# them. Building the model with nn.Linear in their place lets transformers quantize them.
_LINEAR_TWINS: dict[str, tuple[str, ...]] = {
    "transformers.models.falcon.modeling_falcon": ("FalconLinear",),
}
_twin_lock = threading.Lock()


class ModelLoadError(RuntimeError):
    """The model cannot be served as configured; the message says what to change."""


@dataclass(frozen=True)
class ModelSpec:
    path_or_id: str
    quantization: str = "nf4"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    context_window: int | None = None
    offline: bool = field(
        default_factory=lambda: os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "yes")
    )


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel
    tokenizer: Any  # a transformers PreTrainedTokenizerBase
    spec: ModelSpec
    device: torch.device
    context_window: int
    eos_token_ids: frozenset[int]
    quantized_layers: int
    memory_bytes: int
    load_seconds: float
    # Every linear layer of the base as loaded (name -> (in_features, out_features)), taken before
    # any adapter wraps them: what an adapter's target modules and tensor shapes are checked against.
    linear_layers: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return base_fingerprint(self.model.config)

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.spec.path_or_id,
            "quantization": self.spec.quantization,
            "device": str(self.device),
            "context_window": self.context_window,
            "quantized_layers": self.quantized_layers,
            "memory_gib": round(self.memory_bytes / 2**30, 3),
            "load_seconds": round(self.load_seconds, 2),
        }


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"DEVICE={device} but no CUDA GPU is visible; set DEVICE=auto or cpu")
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda:0")
    return resolved


def quantization_config(quantization: str, device: torch.device) -> Any:
    """The BitsAndBytesConfig for a QUANTIZATION value, or None for `none`."""
    from transformers import BitsAndBytesConfig

    if quantization not in QUANTIZATIONS:
        raise ModelLoadError(f"QUANTIZATION={quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    if quantization == "none":
        return None
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(device),
    )


def compute_dtype(device: torch.device) -> torch.dtype:
    # bf16 on the GPU as in the QLoRA recipe; the CPU path computes in float32, which is
    # what its kernels are fastest and most exact at.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@contextlib.contextmanager
def plain_linear_twins() -> Iterator[None]:
    """Build models with nn.Linear in place of same-maths subclasses, so they get quantized."""
    import importlib

    with _twin_lock:
        saved: list[tuple[Any, str, Any]] = []
        try:
            for module_name, class_names in _LINEAR_TWINS.items():
                try:
                    module = importlib.import_module(module_name)
                except ImportError:
                    continue
                for class_name in class_names:
                    saved.append((module, class_name, getattr(module, class_name)))
                    setattr(module, class_name, nn.Linear)
            yield
        finally:
            for module, class_name, original in saved:
                setattr(module, class_name, original)


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load tokenizer and model as `spec` says, verify quantization, and return both."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    device = resolve_device(spec.device)
    quant = quantization_config(spec.quantization, device)
    common: dict[str, Any] = {"local_files_only": spec.offline}
    if spec.path_or_id.startswith((".", "/")) and not os.path.isdir(spec.path_or_id):
        raise ModelLoadError(f"MODEL_ID={spec.path_or_id!r} looks like a path, but no such directory exists")
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.path_or_id, **common)
        with plain_linear_twins():
            model = AutoModelForCausalLM.from_pretrained(
                spec.path_or_id,
                quantization_config=quant,
                dtype=compute_dtype(device),
                device_map={"": str(device)},
                **common,
            )
    except (OSError, ValueError) as error:
        hint = " (HF_HUB_OFFLINE is set: the model must be in the local cache)" if spec.offline else ""
        raise ModelLoadError(f"cannot load MODEL_ID={spec.path_or_id!r}{hint}: {error}") from error
    model.eval()
    quantized = verify_quantized(model, spec.quantization)
    if device.type == "cpu":
        keep_cpu_weights_in_one_layout(model)
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
    if not eos_ids:
        raise ModelLoadError(f"{spec.path_or_id}: neither the model nor the tokenizer defines an EOS token")
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        device=device,
        context_window=spec.context_window or model_context_window(model, tokenizer),
        eos_token_ids=eos_ids,
        quantized_layers=quantized,
        memory_bytes=model.get_memory_footprint(),
        load_seconds=time.perf_counter() - started,
        linear_layers={
            name: (module.in_features, module.out_features)
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
        },
    )
    log.info("model loaded: %s", loaded.describe())
    return loaded


# Config keys that describe how a checkpoint was saved or is run, not what the network is.
_FINGERPRINT_IGNORES = frozenset({
    "_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype", "quantization_config",
    "use_cache", "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
    "architectures", "auto_map", "output_attentions", "output_hidden_states", "return_dict",
})  # fmt: skip


def base_fingerprint(config: Any) -> str:
    """A short hash of a model config's architecture: equal for the same network, however it is loaded.

    Adapters record it, so an adapter trained for another network is caught even when the names agree.
    """
    import hashlib
    import json

    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    kept = {key: value for key, value in values.items() if key not in _FINGERPRINT_IGNORES}
    blob = json.dumps(kept, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def keep_cpu_weights_in_one_layout(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its AVX512-BF16 CPU kernels.

    It repacks on the first forward and unpacks whenever the state dict is read (PEFT does when it
    loads an adapter), re-quantizing the block scales each time: the base model's output would
    drift a little with every adapter load. One layout keeps outputs exactly reproducible, which
    matters more than CPU speed (the CPU serves the demo and the tests; production is CUDA).
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010 - a plain attribute of bnb's


def model_context_window(model: Any, tokenizer: Any) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    return 2048


def verify_quantized(model: nn.Module, quantization: str) -> int:
    """Count the quantized linear layers; raise if any layer meant to be quantized is not.

    The output projection (lm_head) stays in higher precision by design, as transformers does.
    Returns the number of quantized layers (0 for `none`).
    """
    if quantization == "none":
        return 0
    import bitsandbytes as bnb

    wanted = bnb.nn.Linear8bitLt if quantization == "int8" else bnb.nn.Linear4bit
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    quantized, missed = 0, []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is output:
            continue
        if isinstance(module, wanted) and _weight_is_quantized(module, quantization):
            quantized += 1
        else:
            missed.append(f"{name} ({type(module).__name__})")
    if missed or not quantized:
        shown = ", ".join(missed[:5]) + (f" and {len(missed) - 5} more" if len(missed) > 5 else "")
        raise ModelLoadError(
            f"QUANTIZATION={quantization} was requested but {len(missed)} linear layers were left "
            f"unquantized: {shown or 'no linear layers found'}. This model's layer classes are not "
            "handled by the quantizer; refusing to serve it at several times the expected memory. "
            "Set QUANTIZATION=none to serve it unquantized on purpose."
        )
    return quantized


def _weight_is_quantized(module: nn.Module, quantization: str) -> bool:
    weight = module.weight
    if quantization == "int8":
        return weight.dtype == torch.int8
    return getattr(weight, "quant_state", None) is not None and weight.dtype == torch.uint8
