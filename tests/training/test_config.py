"""Training configs: YAML plus overrides, and clear errors for what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_resolve_with_qlora_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "base_model: tiiuae/falcon-7b\ndata: {files: [a.jsonl]}\nlora: {r: 64}\n")
    config = load_config(path, ["--lora.alpha", "16", "--max_steps=20", "--data.eval_fraction", "0.1"])
    assert (config.lora.r, config.lora.alpha, config.max_steps, config.data.eval_fraction) == (
        64,
        16.0,
        20,
        0.1,
    )
    assert (config.learning_rate, config.max_grad_norm, config.quantization) == (2e-4, 0.3, "nf4")
    assert config.lora.target_modules == "all-linear" and config.gradient_checkpointing is True
    assert config.resolved()["lora"]["r"] == 64


def test_the_shipped_recipes_load() -> None:
    for recipe in Path("training/configs").glob("*.yaml"):
        assert load_config(recipe).base_model, recipe


def test_the_documented_multi_gpu_launch_config_is_one_accelerate_reads() -> None:
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    config = ClusterConfig.from_yaml_file("training/configs/accelerate/multi-gpu.yaml")
    assert config.distributed_type == DistributedType.MULTI_GPU and config.num_machines == 1
    assert config.num_processes >= 2 and config.mixed_precision == "bf16" and not config.use_cpu


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("data: {files: [a.jsonl]}\n", [], "base_model is required"),
        ("base_model: m\n", [], "data.files is required"),
        ("base_model: m\ndata: {files: [a]}\nlearning_rte: 1\n", [], "unknown setting learning_rte"),
        ("base_model: m\ndata: {files: [a]}\n", ["--lora.rank", "8"], "unknown setting lora.rank"),
        ("base_model: m\ndata: {files: [a]}\n", ["--batch_size", "four"], "batch_size: 'four' is not a int"),
        (
            "base_model: m\ndata: {files: [a]}\n",
            ["--quantization", "nf5"],
            "quantization: 'nf5' is not one of",
        ),
        ("base_model: m\ndata: {files: a.jsonl}\n", [], "data.files: 'a.jsonl' is not a list of str"),
        ("base_model: m\ndata: {files: [a]}\n", ["--max_length", "0"], "max_length must be at least 1"),
        ("base_model: m\ndata: {files: [a]}\n", ["--epochs"], "--epochs needs a value"),
        ("- just\n- a list\n", [], "must hold a mapping"),
    ],
)
def test_bad_configs_name_the_problem(tmp_path: Path, text: str, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), overrides)
