"""Inspecting unpacked adapters against the real tiny NF4 model: the facts of a good adapter, the
cases refused, and that inspection never changes the model."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from app.llm.loader import LoadedModel
from app.registry.archive import AdapterRejected
from app.registry.inspect import AdapterFacts, BaseIdentity, inspect_adapter
from tests.conftest import FALCON_TARGETS, build_adapter
from tests.registry.hostile import (
    ADAPTER_CASES,
    MAX_RANK,
    Hostile,
    Materials,
    build_materials,
    refuse,
    safetensors_file,
    tiny_base,
)


@pytest.fixture(scope="module")
def materials(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Materials:
    return build_materials(tmp_path_factory.mktemp("adapter"), tiny_model_dir)


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path, tiny_model: LoadedModel) -> BaseIdentity:
    return tiny_base(tiny_model_dir, tiny_model)


def lora_parameters(model: nn.Module, targets: tuple[str, ...], rank: int) -> int:
    return sum(
        rank * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )


def copy_adapter(materials: Materials, dest: Path, **config_changes: object) -> Path:
    shutil.copytree(materials.adapter, dest)
    if config_changes:
        (dest / "adapter_config.json").write_bytes(materials.config(**config_changes))
    return dest


def test_a_real_peft_adapter_passes_with_its_facts(
    materials: Materials, tiny_model: LoadedModel, base: BaseIdentity
) -> None:
    facts = inspect_adapter(materials.adapter, model=tiny_model.model, base=base, max_rank=MAX_RANK)
    assert facts == AdapterFacts(
        peft_type="LORA",
        rank=4,
        alpha=8.0,
        target_modules=facts.target_modules,
        base_model=str(materials.base_dir),
        prompt_template="alpaca",
        base_fingerprint=tiny_model.fingerprint,
        tensor_count=4 * len(FALCON_TARGETS) * 2,  # 4 blocks, A and B for each targeted layer
        parameter_count=lora_parameters(tiny_model.model, FALCON_TARGETS, 4),
        metrics=None,
        manifest_source=None,
    )
    assert sorted(facts.target_modules) == sorted(FALCON_TARGETS)


def test_the_manifest_gives_template_metrics_and_source(
    materials: Materials, tiny_model: LoadedModel, base: BaseIdentity, tmp_path: Path
) -> None:
    adapter = copy_adapter(materials, tmp_path / "adapter")
    manifest = {
        "base_fingerprint": tiny_model.fingerprint,
        "prompt_template": "chat_template",
        "metrics": {"eval_loss": 1.25, "steps": 300},
        "source": "training run 7",
    }
    (adapter / "private_gpt.json").write_text(json.dumps(manifest))
    facts = inspect_adapter(adapter, model=tiny_model.model, base=base, max_rank=MAX_RANK)
    assert (facts.prompt_template, facts.metrics, facts.manifest_source) == (
        "chat_template",
        {"eval_loss": 1.25, "steps": 300},
        "training run 7",
    )


@pytest.mark.parametrize(
    "trained_for",
    ["private-gpt-test", "some-org/tiny", "/elsewhere/models/tiny/"],
    ids=["served", "hub", "path"],
)
def test_the_base_is_recognised_by_served_name_or_last_path_component(
    trained_for: str, materials: Materials, tiny_model: LoadedModel, base: BaseIdentity, tmp_path: Path
) -> None:
    adapter = copy_adapter(materials, tmp_path / "adapter", base_model_name_or_path=trained_for)
    facts = inspect_adapter(adapter, model=tiny_model.model, base=base, max_rank=MAX_RANK)
    assert facts.base_model == trained_for


def test_a_regex_target_resolves_to_the_layers_it_selects(
    tiny_model_dir: Path, tiny_model: LoadedModel, base: BaseIdentity, tmp_path: Path
) -> None:
    adapter = build_adapter(
        tiny_model_dir, tmp_path / "adapter", rank=2, alpha=4, targets=("query_key_value", "dense")
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = r".*\.(query_key_value|dense)"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    facts = inspect_adapter(adapter, model=tiny_model.model, base=base, max_rank=MAX_RANK)
    assert (facts.rank, facts.alpha, facts.target_modules) == (2, 4.0, ("query_key_value", "dense"))
    assert facts.tensor_count == 4 * 2 * 2


def test_rank_pattern_gives_layers_their_own_rank(
    materials: Materials, tiny_model: LoadedModel, base: BaseIdentity, tmp_path: Path
) -> None:
    # `dense` at rank 8, the rest at 4, written as PEFT writes such an adapter.
    adapter = copy_adapter(materials, tmp_path / "adapter", rank_pattern={"dense": 8})
    from safetensors.torch import load_file, save_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    for key, tensor in tensors.items():
        if ".self_attention.dense.lora_A" in key:
            tensors[key] = torch.randn(8, tensor.shape[1])
        elif ".self_attention.dense.lora_B" in key:
            tensors[key] = torch.randn(tensor.shape[0], 8)
    save_file(tensors, adapter / "adapter_model.safetensors")
    facts = inspect_adapter(adapter, model=tiny_model.model, base=base, max_rank=MAX_RANK)
    assert facts.rank == 4
    with pytest.raises(AdapterRejected, match="rank 8 is over this server's maximum of 6"):
        inspect_adapter(adapter, model=tiny_model.model, base=base, max_rank=6)


def test_a_model_with_adapters_already_loaded_is_seen_through(
    materials: Materials, tiny_model_dir: Path, base: BaseIdentity
) -> None:
    # Once the server has loaded an adapter, PEFT has wrapped the base's layers in place.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = inspect_adapter(materials.adapter, model=plain, base=base, max_rank=MAX_RANK)
    peft_model = PeftModel.from_pretrained(plain, str(materials.adapter), adapter_name="first")
    for model in (peft_model, peft_model.get_base_model()):
        assert inspect_adapter(materials.adapter, model=model, base=base, max_rank=MAX_RANK) == expected


def model_state(model: nn.Module) -> tuple[list[tuple[str, str]], str]:
    digest = hashlib.sha256()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return [(name, type(module).__name__) for name, module in model.named_modules()], digest.hexdigest()


def test_inspection_does_not_change_the_model(
    materials: Materials, tiny_model: LoadedModel, base: BaseIdentity
) -> None:
    before = model_state(tiny_model.model)
    inspect_adapter(materials.adapter, model=tiny_model.model, base=base, max_rank=MAX_RANK)
    assert model_state(tiny_model.model) == before


@pytest.mark.parametrize("case", ADAPTER_CASES, ids=lambda case: case.id)
def test_a_bad_adapter_is_refused_and_leaves_nothing(
    case: Hostile, materials: Materials, tiny_model: LoadedModel, base: BaseIdentity, tmp_path: Path
) -> None:
    refuse(case, materials, tmp_path, model=tiny_model.model, base=base)


def linear_table(model: nn.Module) -> dict[str, tuple[int, int]]:
    """What LoadedModel records at load time: every linear layer and its sizes."""
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }


def test_the_base_may_be_given_as_its_table_of_linear_layers(
    materials: Materials, tiny_model: LoadedModel, base: BaseIdentity, tmp_path: Path
) -> None:
    table = linear_table(tiny_model.model)
    by_model = inspect_adapter(materials.adapter, model=tiny_model.model, base=base, max_rank=MAX_RANK)
    assert inspect_adapter(materials.adapter, linear_layers=table, base=base, max_rank=MAX_RANK) == by_model

    # The adapter covers every linear layer but the output head, which is what all-linear means to PEFT.
    everything = copy_adapter(materials, tmp_path / "all-linear", target_modules="all-linear")
    for given in ({"model": tiny_model.model}, {"linear_layers": table}):
        facts = inspect_adapter(everything, base=base, max_rank=MAX_RANK, **given)  # type: ignore[arg-type]
        assert sorted(facts.target_modules) == sorted(FALCON_TARGETS)

    embedding = copy_adapter(materials, tmp_path / "embedding", target_modules=["word_embeddings"])
    with pytest.raises(AdapterRejected, match="'word_embeddings' is not a linear layer of this base model"):
        inspect_adapter(embedding, linear_layers=table, base=base, max_rank=MAX_RANK)

    with pytest.raises(TypeError, match="either model= or linear_layers="):
        inspect_adapter(materials.adapter, model=tiny_model.model, linear_layers=table, base=base, max_rank=8)


def test_tensor_keys_may_name_their_adapter(
    materials: Materials, tiny_model: LoadedModel, base: BaseIdentity, tmp_path: Path
) -> None:
    # Some PEFT versions save "...lora_A.<adapter name>.weight".
    adapter = copy_adapter(materials, tmp_path / "adapter")
    tensors = materials.tensors()
    named = {key.replace(".weight", ".default.weight"): tensor for key, tensor in tensors.items()}
    (adapter / "adapter_model.safetensors").write_bytes(safetensors_file(named))
    facts = inspect_adapter(adapter, model=tiny_model.model, base=base, max_rank=MAX_RANK)
    assert facts.tensor_count == len(tensors)
