"""Check an unpacked LoRA adapter against the served base model, before it is registered.

`inspect_adapter(directory, model=..., base=..., max_rank=...)` reads the adapter's config, our
optional manifest (`private_gpt.json`) and the header and values of its safetensors weights, and
checks them against the real loaded model: that it is plain LoRA, trained for this base (by
name, and by architecture fingerprint when the manifest records one), that every module it
targets is a linear layer of this model, and that every tensor is a LoRA A or B matrix of the
right shape, floating point and finite. It only reads the model's module names and layer sizes:
it never changes the model, and never loads the adapter onto it.

Target matching is PEFT's own (`check_target_module_exists`, `get_pattern_key`), so the modules
checked here are exactly those PEFT will adapt when the server loads the adapter.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from app.registry.archive import MANIFEST_FILE, AdapterRejected

PROMPT_TEMPLATES = ("alpaca", "chat_template")
DEFAULT_PROMPT_TEMPLATE = "alpaca"
MANIFEST_FIELDS: dict[str, type] = {
    "base_fingerprint": str,
    "prompt_template": str,
    "metrics": dict,
    "source": str,
}

_MAX_JSON_BYTES = 2**20  # configs are a few kilobytes
_MAX_NAME_CHARS = 300  # the longest base model name we record
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# base_model.model.<module path>.lora_A[.<adapter name>].weight, as PEFT saves LoRA weights.
_LORA_KEY = re.compile(r"base_model\.model\.(?P<module>.+?)\.(?P<matrix>lora_A|lora_B)(?:\.[\w-]+)?\.weight")
# LoRA variants and extras that change what the adapter computes or adds tensors besides A and B:
# refused when set, since the server serves plain LoRA only.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora) adapters are not supported; only plain LoRA adapters can be served",
    "modules_to_save": (
        "modules_to_save saves full copies of whole layers, which is not LoRA; train without "
        "modules_to_save to serve this adapter"
    ),
    "lora_bias": "lora_bias adds bias vectors to the LoRA matrices; only LoRA A/B matrices are accepted",
    "trainable_token_indices": (
        "trainable_token_indices trains embedding rows besides LoRA; only plain LoRA adapters can be served"
    ),
    "target_parameters": "target_parameters (LoRA on raw parameters) is not supported; target linear layers",
    "layer_replication": "layer_replication changes the base model's layers; it is not supported",
    "use_qalora": "QA-LoRA (use_qalora) adapters are not supported; only plain LoRA adapters can be served",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
    "megatron_config": "Megatron-parallel LoRA (megatron_config) is not supported",
    "use_bdlora": "use_bdlora is a LoRA variant this server does not serve",
    "kasa_config": "kasa_config is a LoRA variant this server does not serve",
    "monteclora_config": "monteclora_config is a LoRA variant this server does not serve",
    "velora_config": "velora_config is a LoRA variant this server does not serve",
}


@dataclass(frozen=True)
class BaseIdentity:
    model_id: str  # MODEL_ID as configured (a hub id or a local path)
    served_name: str  # the name the API serves it under
    fingerprint: str  # app.llm.loader.base_fingerprint(model.config)


@dataclass(frozen=True)
class AdapterFacts:
    peft_type: str
    rank: int  # `r`; rank_pattern may give some modules another (checked against the cap too)
    alpha: float
    target_modules: tuple[str, ...]  # as listed in the config; for a regex, the layer names it selects
    base_model: str  # the base it says it was trained for (base_model_name_or_path)
    prompt_template: str  # "alpaca" or "chat_template"
    base_fingerprint: str  # the served base's: checked equal when the manifest records one
    tensor_count: int
    parameter_count: int
    metrics: dict[str, Any] | None  # from the manifest, as written
    manifest_source: str | None  # from the manifest, as written


def inspect_adapter(
    directory: Path,
    *,
    model: nn.Module | None = None,
    linear_layers: Mapping[str, tuple[int, int]] | None = None,
    base: BaseIdentity,
    max_rank: int,
) -> AdapterFacts:
    """Check the adapter files in `directory` against the base; AdapterRejected says what is wrong.

    The base is given either as the loaded `model` itself, or as `linear_layers`, its linear layers
    (name -> (in_features, out_features)) as `LoadedModel.linear_layers` records them at load time:
    the table can be read from any thread while the engine loads adapters onto the model. With
    only the table, "all-linear" leaves out a layer named lm_head as the output head.
    """
    if (model is None) == (linear_layers is None):
        raise TypeError("inspect_adapter() takes either model= or linear_layers=")
    config = _read_json(directory / "adapter_config.json")
    if config is None:
        raise AdapterRejected("adapter_config.json is missing")
    manifest = _read_manifest(directory)
    lora = _LoraSettings.read(config, max_rank)
    _check_base(lora.base_model, manifest.get("base_fingerprint"), base)
    layers = _Layers.of(model) if model is not None else _Layers.table(linear_layers or {})
    targeted = _targeted_modules(config, layers)
    tensors, parameters = _check_tensors(directory / "adapter_model.safetensors", layers, targeted, lora)
    if isinstance(lora.targets, str):
        listed = tuple(dict.fromkeys(name.rsplit(".", 1)[-1] for name in targeted))
    else:
        listed = tuple(lora.targets)
    return AdapterFacts(
        peft_type="LORA",
        rank=lora.rank,
        alpha=lora.alpha,
        target_modules=listed,
        base_model=lora.base_model,
        prompt_template=manifest.get("prompt_template", DEFAULT_PROMPT_TEMPLATE),
        base_fingerprint=base.fingerprint,
        tensor_count=tensors,
        parameter_count=parameters,
        metrics=manifest.get("metrics"),
        manifest_source=manifest.get("source"),
    )


# -- config and manifest ---------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    size = path.stat().st_size
    if size > _MAX_JSON_BYTES:
        raise AdapterRejected(f"{path.name} is {size} bytes; such a file is a few kilobytes")
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise AdapterRejected(f"{path.name} is not valid JSON: it is not UTF-8 text ({error})") from error
    except json.JSONDecodeError as error:
        raise AdapterRejected(
            f"{path.name} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})"
        ) from error
    if not isinstance(value, dict):
        raise AdapterRejected(f"{path.name} must hold a JSON object, not {type(value).__name__}")
    return value


def _read_manifest(directory: Path) -> dict[str, Any]:
    manifest = _read_json(directory / MANIFEST_FILE) or {}
    for key, value in manifest.items():
        expected = MANIFEST_FIELDS.get(key)
        if expected is None:
            raise AdapterRejected(
                f"{MANIFEST_FILE} has an unknown field {key!r}; it may hold {', '.join(MANIFEST_FIELDS)}"
            )
        if not isinstance(value, expected):
            raise AdapterRejected(
                f"{MANIFEST_FILE}: {key} must be a JSON {'object' if expected is dict else 'string'}"
            )
    template = manifest.get("prompt_template", DEFAULT_PROMPT_TEMPLATE)
    if template not in PROMPT_TEMPLATES:
        raise AdapterRejected(
            f"{MANIFEST_FILE}: prompt_template {_text(template)} is not one of {', '.join(PROMPT_TEMPLATES)}"
        )
    return manifest


@dataclass(frozen=True)
class _LoraSettings:
    rank: int
    alpha: float
    rank_pattern: dict[str, int]
    targets: list[str] | str
    base_model: str

    @classmethod
    def read(cls, config: dict[str, Any], max_rank: int) -> _LoraSettings:
        peft_type = config.get("peft_type")
        if peft_type is None:
            raise AdapterRejected("adapter_config.json has no peft_type; is this a PEFT adapter?")
        if peft_type != "LORA":
            raise AdapterRejected(
                f"peft_type {_text(peft_type)} is not supported; only LoRA adapters can be served"
            )
        task_type = config.get("task_type")
        if task_type not in (None, "CAUSAL_LM"):
            raise AdapterRejected(
                f"task_type {_text(task_type)}: this adapter was trained for another task; only "
                "CAUSAL_LM adapters can chat"
            )
        for option, refusal in _UNSUPPORTED_OPTIONS.items():
            if config.get(option):
                raise AdapterRejected(refusal)
        if config.get("bias", "none") != "none":
            raise AdapterRejected(
                f"bias={_text(config['bias'])} means the adapter also changes the base model's biases; "
                "only LoRA A/B matrices are accepted (train with bias='none')"
            )
        rank = _rank(config.get("r"), "r", max_rank)
        rank_pattern = config.get("rank_pattern") or {}
        alpha_pattern = config.get("alpha_pattern") or {}
        if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
            raise AdapterRejected("rank_pattern and alpha_pattern must be JSON objects (pattern: value)")
        for pattern, value in rank_pattern.items():
            _rank(value, f"rank_pattern[{pattern!r}]", max_rank)
        alpha = _alpha(config.get("lora_alpha"), "lora_alpha")
        for pattern, value in alpha_pattern.items():
            _alpha(value, f"alpha_pattern[{pattern!r}]")
        for pattern in (*rank_pattern, *alpha_pattern):
            try:
                re.compile(pattern)
            except re.error as error:
                raise AdapterRejected(
                    f"the pattern {pattern!r} is not a valid regular expression ({error})"
                ) from error
        targets = config.get("target_modules")
        if isinstance(targets, str):
            if targets != "all-linear":
                try:
                    re.compile(targets)
                except re.error as error:
                    raise AdapterRejected(
                        f"target_modules {_text(targets)} is not a valid regular expression ({error})"
                    ) from error
        elif not (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
            raise AdapterRejected(
                "target_modules must be a non-empty list of module names or a regular expression"
            )
        base_model = config.get("base_model_name_or_path")
        if not isinstance(base_model, str) or not base_model.strip():
            raise AdapterRejected(
                "adapter_config.json does not say which base model it was trained for "
                "(base_model_name_or_path is missing)"
            )
        if len(base_model) > _MAX_NAME_CHARS:
            raise AdapterRejected(f"base_model_name_or_path is longer than {_MAX_NAME_CHARS} characters")
        return cls(rank, alpha, rank_pattern, targets, base_model)

    def rank_of(self, module: str) -> int:
        from peft.utils.other import get_pattern_key

        return int(self.rank_pattern.get(get_pattern_key(list(self.rank_pattern), module), self.rank))


def _rank(value: Any, name: str, max_rank: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise AdapterRejected(
            f"{name} (the LoRA rank) must be a whole number of at least 1, not {_text(value)}"
        )
    if value > max_rank:
        raise AdapterRejected(f"rank {value} is over this server's maximum of {max_rank} (MAX_ADAPTER_RANK)")
    return value


def _alpha(value: Any, name: str) -> float:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise AdapterRejected(f"{name} must be a positive number, not {_text(value)}")
    return float(value)


def _check_base(trained_for: str, fingerprint: Any, base: BaseIdentity) -> None:
    def last(name: str) -> str:
        return name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].casefold()

    names = (base.model_id, base.served_name)
    if trained_for not in names and last(trained_for) not in {last(name) for name in names}:
        served = base.model_id + (
            f" (served as {base.served_name})" if base.served_name != base.model_id else ""
        )
        raise AdapterRejected(
            f"this adapter was trained for {_text(trained_for)}, but this server runs {served}"
        )
    if fingerprint is not None and fingerprint != base.fingerprint:
        raise AdapterRejected(
            f"this adapter was trained for a different network (fingerprint {_text(fingerprint)} != "
            f"{base.fingerprint}) although the names agree; train it again on the model this server runs"
        )


# -- the base model's layers and the modules the adapter targets -----------------------------------------


@dataclass(frozen=True)
class _Layers:
    """The base model's modules by name; PEFT layers already loaded on it are seen through."""

    linear: dict[str, tuple[int, int]]  # name -> (in_features, out_features)
    other: dict[str, str]  # name -> class name, for every module that is not a linear layer (if known)
    output: str | None  # the output head, which "all-linear" leaves out as PEFT does

    @classmethod
    def of(cls, model: nn.Module) -> _Layers:
        get_base_model = getattr(model, "get_base_model", None)  # a PeftModel wraps the base
        root = get_base_model() if callable(get_base_model) else model
        get_output = getattr(root, "get_output_embeddings", None)
        output_module = get_output() if callable(get_output) else None
        linear: dict[str, tuple[int, int]] = {}
        other: dict[str, str] = {}
        output: str | None = None
        inside_peft_layer: str | None = None
        for name, module in root.named_modules():
            if not name or (inside_peft_layer and name.startswith(inside_peft_layer)):
                continue
            layer = module
            # A layer PEFT has wrapped (once an adapter is loaded): its `base_layer` is the model's own.
            while isinstance(getattr(layer, "base_layer", None), nn.Module):
                layer = layer.base_layer
            if layer is not module:
                inside_peft_layer = name + "."
            if isinstance(layer, nn.Linear):
                linear[name] = (int(layer.in_features), int(layer.out_features))
            else:
                other[name] = type(layer).__name__
            if output_module is not None and output_module in (module, layer):
                output = name
        return cls(linear, other, output)

    @classmethod
    def table(cls, linear_layers: Mapping[str, tuple[int, int]]) -> _Layers:
        linear = {name: (int(sizes[0]), int(sizes[1])) for name, sizes in linear_layers.items()}
        return cls(linear, {}, "lm_head" if "lm_head" in linear else None)

    def absent(self) -> str:
        """How to say that a name is not among the linear layers, as far as we know the model."""
        return (
            "does not exist in this base model" if self.other else "is not a linear layer of this base model"
        )

    def linear_names(self) -> str:
        return ", ".join(dict.fromkeys(name.rsplit(".", 1)[-1] for name in self.linear))


def _targeted_modules(config: dict[str, Any], layers: _Layers) -> list[str]:
    """The modules PEFT will adapt, in model order; each must be a linear layer."""
    from peft.tuners.tuners_utils import check_target_module_exists

    targets = config["target_modules"]
    if targets == "all-linear":  # expanded as PEFT does: every linear layer's name but the output head
        targets = sorted({name.rsplit(".", 1)[-1] for name in layers.linear if name != layers.output})
    modules = [*layers.linear, *layers.other]
    if isinstance(targets, list):
        for target in targets:
            if not any(name == target or name.endswith(f".{target}") for name in modules):
                raise AdapterRejected(
                    f"target module {target!r} {layers.absent()} (its linear layers are: "
                    f"{layers.linear_names()})"
                )
    matcher = SimpleNamespace(
        target_modules=targets,
        exclude_modules=config.get("exclude_modules"),
        layers_to_transform=config.get("layers_to_transform"),
        layers_pattern=config.get("layers_pattern"),
        modules_to_save=None,
        target_parameters=None,
    )
    try:
        targeted = [name for name in modules if check_target_module_exists(matcher, name)]
    except (TypeError, ValueError, re.error) as error:
        raise AdapterRejected(
            "target_modules, exclude_modules, layers_to_transform or layers_pattern in "
            f"adapter_config.json is malformed ({error})"
        ) from error
    if not targeted:
        raise AdapterRejected(
            f"target_modules {_text(config['target_modules'])} selects no module of this base model "
            f"(its linear layers are: {layers.linear_names()})"
        )
    for name in targeted:
        if name not in layers.linear:
            raise AdapterRejected(
                f"target_modules selects {name}, which is of type {layers.other[name]}, not a linear layer; "
                "only LoRA on linear layers can be served"
            )
    order = {name: index for index, name in enumerate(layers.linear)}
    return sorted(targeted, key=order.__getitem__)


# -- the weights --------------------------------------------------------------------------------------


def _check_tensors(path: Path, layers: _Layers, targeted: list[str], lora: _LoraSettings) -> tuple[int, int]:
    """Check every tensor's name, shape, dtype and values; returns (tensor count, parameter count)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise AdapterRejected(f"{path.name} is missing")
    wanted = set(targeted)
    found: set[tuple[str, str]] = set()
    tensors = parameters = 0
    try:
        with safe_open(str(path), framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                match = _LORA_KEY.fullmatch(key)
                if match is None:
                    raise AdapterRejected(
                        f"unexpected tensor {_text(key)}: only LoRA A/B matrices are accepted"
                    )
                module, matrix = match["module"], match["matrix"]
                if module not in layers.linear:
                    kind = layers.other.get(module)
                    raise AdapterRejected(
                        f"tensor {_text(key)} is for {_text(module)}, which "
                        + (f"is of type {kind}, not a linear layer" if kind else layers.absent())
                    )
                if module not in wanted:
                    raise AdapterRejected(
                        f"tensor {key} is for {module}, which target_modules does not select"
                    )
                if (module, matrix) in found:
                    raise AdapterRejected(f"tensor {key} is a second {matrix} matrix for {module}")
                found.add((module, matrix))
                tensor = weights.get_slice(key)
                dtype, shape = tensor.get_dtype(), tuple(tensor.get_shape())
                if dtype not in _FLOAT_DTYPES:
                    raise AdapterRejected(
                        f"tensor {key} has dtype {dtype}; LoRA weights must be floating point "
                        f"({', '.join(_FLOAT_DTYPES)})"
                    )
                in_features, out_features = layers.linear[module]
                rank = lora.rank_of(module)
                expected = (rank, in_features) if matrix == "lora_A" else (out_features, rank)
                if shape != expected:
                    raise AdapterRejected(
                        f"tensor {key} has shape {shape}, but {module} of this base model at rank {rank} "
                        f"needs {expected}; was the adapter trained for a different model size?"
                    )
                if not bool(torch.isfinite(weights.get_tensor(key)).all()):
                    raise AdapterRejected(f"tensor {key} contains NaN or Inf values")
                tensors += 1
                parameters += math.prod(shape)
    except SafetensorError as error:
        raise AdapterRejected(f"{path.name} is not a valid safetensors file: {error}") from error
    for module in targeted:
        for matrix in ("lora_A", "lora_B"):
            if (module, matrix) not in found:
                raise AdapterRejected(f"{module} is targeted but the adapter has no {matrix} matrix for it")
    return tensors, parameters


def _text(value: Any) -> str:
    """A value from the upload, as safe to show in a message: printable, short; quoted unless a plain word."""
    shown = (
        value if isinstance(value, str) and value.isprintable() and value.strip() == value else repr(value)
    )
    return shown if len(shown) <= 120 else shown[:100] + "…" + shown[-19:]
