"""Training configuration: a YAML file plus `--key value` overrides, checked before anything runs.

    base_model: tiiuae/falcon-7b
    data: {files: [data/finance.jsonl]}
    lora: {r: 16, alpha: 32}

Every field has a default from the QLoRA recipe (arXiv 2305.14314) except `base_model` and
`data.files`. The resolved config is saved next to the adapter, so a run can be repeated.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

FALCON_LINEAR = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


class ConfigError(ValueError):
    """The configuration is not usable; the message names the field and what is wrong."""


@dataclass
class LoraSettings:
    r: int = 16  # rank of the update matrices
    alpha: float = 32  # scaling: the update is multiplied by alpha / r
    dropout: float = 0.05
    # "all-linear" (every linear layer but the output head, as QLoRA does) or a list of layer names;
    # for Falcon that is query_key_value, dense, dense_h_to_4h and dense_4h_to_h.
    target_modules: list[str] | str = "all-linear"


@dataclass
class DataSettings:
    files: list[str] = field(default_factory=list)  # .json / .jsonl (Alpaca or chat) or .csv
    eval_fraction: float = 0.05  # held out for eval loss; 0 disables evaluation
    skip_bad_records: bool = False  # report and skip bad records instead of stopping
    max_records: int | None = None  # use only the first N good records (quick trials)


@dataclass
class TrainingConfig:
    base_model: str = ""  # a local directory or a Hugging Face hub id
    data: DataSettings = field(default_factory=DataSettings)
    prompt_template: Literal["alpaca", "chat_template"] = "alpaca"  # must match how the server prompts
    lora: LoraSettings = field(default_factory=LoraSettings)
    quantization: Literal["nf4", "fp4", "int8", "none"] = "nf4"  # NF4 + double quant + bf16 compute on CUDA
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_length: int = 1024  # tokens; longer records are bad records (reported, never silently cut)
    batch_size: int = 4  # per device
    gradient_accumulation_steps: int = 4  # effective batch = batch_size x this x devices
    # Run each batch as forward/backward passes of at most this many padded tokens (rows x longest
    # row), as few as fit: the same gradient as one pass, with memory bounded by the budget. Each pass
    # has a fixed cost on a GPU, so a large batch with a token budget beats small fixed micro-batches
    # with accumulation (training/batching.py). None: one pass per batch.
    micro_batch_tokens: int | None = None
    learning_rate: float = 2e-4
    lr_scheduler: str = "constant"  # any transformers scheduler name
    warmup_ratio: float = 0.03
    max_grad_norm: float = 0.3
    weight_decay: float = 0.0
    optimizer: str = "auto"  # auto: paged 8-bit AdamW on CUDA, AdamW on the CPU
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    gradient_checkpointing: bool = True
    # Batch records of similar length together: far less padding on real data, whose records range
    # from a few dozen to a thousand tokens (the order within an epoch is still seeded and shuffled).
    group_by_length: bool = True
    logging_steps: int = 10
    eval_steps: int = 50
    save_steps: int = 100  # checkpoint every N steps (and on Ctrl-C); --resume continues from the last
    seed: int = 42
    output_dir: str = "runs/adapter"
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # add "wandb" to use it
    publish: str | None = None  # adapter name to publish the result under when training ends
    notes: str = ""  # stored with the published version

    def resolved(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir)


def load_config(path: Path | None, overrides: list[str] | None = None) -> TrainingConfig:
    """Read YAML, apply `--dotted.key value` overrides, and check every field."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"cannot read {path}: {error}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of settings, not {type(loaded).__name__}")
        raw = loaded
    for key, value in parse_overrides(overrides or []).items():
        target = raw
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--{key}: {parent} is not a section")
        target[leaf] = value
    config = _build(TrainingConfig, raw, "")
    _check(config)
    return config


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--lora.r 8 --max_steps 20` -> {"lora.r": 8, "max_steps": 20} (values parsed as YAML)."""
    result: dict[str, Any] = {}
    items = iter(args)
    for arg in items:
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --key value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            try:
                value = next(items)
            except StopIteration:
                raise ConfigError(f"--{key} needs a value") from None
        result[key.replace("-", "_")] = yaml.safe_load(value)
    return result


def _build(kind: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown setting {where}{unknown[0]} (known: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(kind)
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, f"{where}{name}.")
        else:
            values[name] = _coerce(value, hint, f"{where}{name}")
    return kind(**values)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _coerce(value, option, name)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: {value!r} is not a {_describe(hint)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(item, args[0]) for item in value):
            raise ConfigError(f"{name}: {value!r} is not a list of {args[0].__name__}")
        return value
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{name}: expected nothing")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ConfigError(f"{name}: {value!r} is not a {hint.__name__}")
    return value


def _describe(hint: Any) -> str:
    return " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(hint))


def _check(config: TrainingConfig) -> None:
    problems = []
    if not config.base_model:
        problems.append("base_model is required (a model directory or hub id)")
    if not config.data.files:
        problems.append("data.files is required (one or more .json, .jsonl or .csv files)")
    if not 0 <= config.data.eval_fraction < 0.5:
        problems.append("data.eval_fraction must be at least 0 and below 0.5")
    for name in (
        "max_length",
        "batch_size",
        "gradient_accumulation_steps",
        "logging_steps",
        "eval_steps",
        "save_steps",
    ):
        if getattr(config, name) < 1:
            problems.append(f"{name} must be at least 1")
    if config.micro_batch_tokens is not None and config.micro_batch_tokens < config.max_length:
        problems.append(
            f"micro_batch_tokens ({config.micro_batch_tokens}) must be at least max_length"
            f" ({config.max_length}), so that the longest record fits in one pass"
        )
    if config.lora.r < 1:
        problems.append("lora.r must be at least 1")
    if not 0 <= config.lora.dropout < 1:
        problems.append("lora.dropout must be at least 0 and below 1")
    if config.learning_rate <= 0:
        problems.append("learning_rate must be positive")
    if config.epochs <= 0 and config.max_steps <= 0:
        problems.append("set epochs > 0 or max_steps > 0")
    if problems:
        raise ConfigError("; ".join(problems))
