"""Batched LoRA slots give PEFT's own outputs: ranks that grow, per-module alpha, rsLoRA, mixed rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.llm import lora
from app.llm.adapters import BASE, AdapterRef, ResidentAdapters
from app.llm.loader import ModelSpec, load_model
from tests.conftest import build_adapter


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> list[AdapterRef]:
    root = tmp_path_factory.mktemp("lora")
    small = build_adapter(tiny_model_dir, root / "small", seed=11, rank=4)
    large = build_adapter(
        tiny_model_dir, root / "large", seed=12, rank=8, targets=("query_key_value", "dense")
    )
    patterned = build_adapter(tiny_model_dir, root / "patterned", seed=13, rank=4)
    config_file = patterned / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.update(alpha_pattern={"dense_4h_to_h": 2}, use_rslora=True)
    config_file.write_text(json.dumps(config))
    return [AdapterRef(key=p.name, path=p, label=p.name) for p in (small, large, patterned)]


def test_mixed_rows_match_peft_as_ranks_grow_and_patterns_apply(
    tiny_model_dir: Path, adapters: list[AdapterRef]
) -> None:
    from peft import PeftModel

    tokenizer_ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11 + 1]] * 4)
    reference = load_model(ModelSpec(str(tiny_model_dir), device="cpu"))
    peft = PeftModel.from_pretrained(reference.model, str(adapters[0].path), adapter_name=adapters[0].key)
    for ref in adapters[1:]:
        peft.load_adapter(str(ref.path), adapter_name=ref.key)
    peft.eval()
    rows = [adapters[0].key, BASE, adapters[1].key, adapters[2].key]
    with torch.no_grad():
        expected = peft(input_ids=tokenizer_ids, adapter_names=rows).logits

    served = load_model(ModelSpec(str(tiny_model_dir), device="cpu"))
    resident = ResidentAdapters(served.model, max_resident=3)
    for ref in adapters:  # rank 4, then 8 (the slots grow), then 4 with alpha_pattern and rsLoRA
        resident.acquire(ref)
    assert resident.lora.rank == 8
    with torch.no_grad():
        got = resident.forward([None if key == BASE else key for key in rows], input_ids=tokenizer_ids).logits
    # fp32 logits reach ~100 here, and PEFT adds each update on its own where the slots add them
    # inside one matmul: a reordered sum, up to 3e-4 apart on an AMD EPYC's kernels. A wrong slot,
    # scale or rank changes them by whole units (the adapters move them by up to 20).
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)
    assert not torch.allclose(got[0], got[1], atol=1e-1), "the adapters change the output"


def test_an_unloaded_slot_leaves_nothing_behind_for_its_next_tenant(
    tiny_model_dir: Path, adapters: list[AdapterRef]
) -> None:
    served = load_model(ModelSpec(str(tiny_model_dir), device="cpu"))
    resident = ResidentAdapters(served.model, max_resident=1)
    ids = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():
        resident.acquire(adapters[1])  # q/k/v and dense, rank 8
        resident.release(adapters[1].key)
        resident.acquire(adapters[0])  # evicts it; all four layer kinds, rank 4
        after = resident.forward([adapters[0].key], input_ids=ids).logits
        fresh = ResidentAdapters(
            load_model(ModelSpec(str(tiny_model_dir), device="cpu")).model, max_resident=1
        )
        fresh.acquire(adapters[0])
        alone = fresh.forward([adapters[0].key], input_ids=ids).logits
    assert resident.evictions == 1
    torch.testing.assert_close(after, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels run on a CUDA GPU")
def test_on_a_gpu_decoding_steps_use_the_triton_kernels_and_give_the_masked_products(
    tiny_model_dir: Path, adapters: list[AdapterRef]
) -> None:
    """Runs on the GPU machine: tests/llm needs no web stack (docs/benchmarks.md, "GPU tests").
    bench/lora_kernels.py compares the two ways on Falcon-7B's shapes."""
    served = load_model(ModelSpec(str(tiny_model_dir), device="cuda"))
    resident = ResidentAdapters(served.model, max_resident=3)
    for ref in adapters:
        resident.acquire(ref)
    rows = [adapters[0].key, None, adapters[1].key, adapters[2].key]
    ids = torch.tensor([[5], [17], [42], [99]], device="cuda")  # one token per row: a decoding step
    with torch.no_grad():
        fused = resident.forward(rows, input_ids=ids).logits
        lora.TRITON_MAX_TOKENS, kept = 0, lora.TRITON_MAX_TOKENS  # the masked products instead
        try:
            masked = resident.forward(rows, input_ids=ids).logits
        finally:
            lora.TRITON_MAX_TOKENS = kept
    # bf16 rounding of other orders of additions: a step or two of bf16 at the logits' scale
    assert (fused.float() - masked.float()).abs().max() <= 2e-2 * masked.float().abs().max()
    assert not torch.allclose(fused[0].float(), fused[1].float(), atol=1e-2), "the adapter changes the row"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels run on a CUDA GPU")
def test_on_a_gpu_one_stream_has_the_4bit_kernel_add_its_adapter(
    tiny_model_dir: Path, adapters: list[AdapterRef], monkeypatch: pytest.MonkeyPatch
) -> None:
    """tests/llm/test_triton_nf4.py checks the kernel's sums bit by bit; this, that the model's
    one-stream steps take it, and what they give."""
    from app.llm import triton_lora, triton_nf4

    served = load_model(ModelSpec(str(tiny_model_dir), device="cuda"))
    resident = ResidentAdapters(served.model, max_resident=3)
    for ref in adapters:
        resident.acquire(ref)
    assert triton_nf4.enable(served.model) > 0
    ids = torch.tensor([[42]], device="cuda")  # one stream's decoding step
    expands: list[int] = []
    real_expand = triton_lora.expand
    monkeypatch.setattr(triton_lora, "expand", lambda y, update: expands.append(1) or real_expand(y, update))
    with torch.no_grad():
        fused = {ref.key: resident.forward([ref.key], input_ids=ids).logits for ref in adapters}
        bare = resident.forward([None], input_ids=ids).logits
        lora.TRITON_MAX_TOKENS, kept = 0, lora.TRITON_MAX_TOKENS  # the masked products instead
        try:
            masked = {ref.key: resident.forward([ref.key], input_ids=ids).logits for ref in adapters}
        finally:
            lora.TRITON_MAX_TOKENS = kept
    assert expands == [], "every adapted layer is 4-bit: its kernel added the update"
    for key, logits in fused.items():
        # the same 4-bit products; bf16 rounding of other orders of additions in the LoRA update
        assert (logits - masked[key]).abs().max() <= 2e-2 * masked[key].abs().max()
        assert not torch.allclose(logits.float(), bare.float(), atol=1e-2), "the adapter changes the row"
