"""The one-row NF4 kernel (app/llm/triton_nf4.py): bitsandbytes' product within bf16 rounding.

CUDA only (Triton ships with PyTorch's CUDA builds): these run on the GPU machine, where tests/llm
needs no web stack (docs/benchmarks.md, "GPU tests"). bench/nf4_kernels.py times it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel runs on a CUDA GPU")


def nf4_layer(k: int, n: int, seed: int) -> torch.nn.Module:
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(
        torch.randn(n, k, dtype=torch.bfloat16) * 0.02,
        requires_grad=False,
        compress_statistics=True,  # double-quantized scales, as app/llm/loader.py loads models
        quant_type="nf4",
    )
    return layer.cuda()


@pytest.mark.parametrize("k,n", [(4544, 4672), (18176, 4544), (4544, 18176), (256, 90)])
def test_the_kernel_gives_bitsandbytes_dequantized_product(k: int, n: int) -> None:
    from bitsandbytes import functional as F

    from app.llm.triton_nf4 import Config, Nf4Weight, nf4_gemv

    layer = nf4_layer(k, n, seed=k + n)
    weight = Nf4Weight.of(layer)
    assert weight is not None
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    dense = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    expected = x.float() @ dense.t()
    scale = expected.abs().max()
    # the shape's own tiles, the default, and small ones: rows and blocks past the end of the layer
    for config in (None, Config(), Config(block_n=4, groups=4, warps=2)):
        got = nf4_gemv(x, weight, config).float()
        assert got.shape == (1, n)
        assert float((got - expected).abs().max() / scale) < 1e-2  # bf16 output: about 4e-3


@pytest.mark.parametrize("k,n,rank", [(4544, 4672, 16), (18176, 4544, 16), (256, 90, 12)])
def test_the_kernel_adds_an_adapters_update_as_the_expand_kernel_would(k: int, n: int, rank: int) -> None:
    from bitsandbytes import functional as F

    from app.llm.triton_lora import expand, shrink
    from app.llm.triton_nf4 import Nf4Weight, nf4_gemv

    layer = nf4_layer(k, n, seed=k + n + rank)
    weight = Nf4Weight.of(layer)
    assert weight is not None
    generator = torch.Generator(device="cuda").manual_seed(rank)
    slots = 3  # the buffers of app/llm/lora.py: slot s owns `rank` rows of A and columns of B

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", generator=generator).to(torch.bfloat16)

    a, b, x = randn(slots * rank, k) * 0.02, randn(n, slots * rank) * 0.02, randn(1, k)
    base = nf4_gemv(x, weight)
    dense = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    for slot in (1, 2):
        update = shrink(x, a, b, torch.tensor([slot], device="cuda"), rank)
        fused = nf4_gemv(x, weight, lora=update)
        separate = expand(base.clone(), update)
        # The base product rounded to bf16, the update added in fp32, rounded once, as expanding
        # after the kernel does: the same bits, but for the order of the rank's fp32 sums (one step).
        steps = (fused.view(torch.int16).int() - separate.view(torch.int16).int()).abs()
        assert int(steps.max()) <= 1 and float((steps > 0).float().mean()) < 0.01
        columns = slice(slot * rank, (slot + 1) * rank)
        expected = x.float() @ dense.t() + (x.float() @ a[columns].float().t()) @ b[:, columns].float().t()
        assert float((fused.float() - expected).abs().max() / expected.abs().max()) < 1e-2
        assert not torch.equal(fused, base), "the update changes the output"


@pytest.mark.parametrize("k,n", [(4544, 4672), (18176, 4544), (4544, 18176), (256, 90)])
def test_the_matmul_kernel_gives_bitsandbytes_dequantized_product(k: int, n: int) -> None:
    from bitsandbytes import functional as F

    from app.llm.triton_nf4 import MatmulConfig, Nf4Weight, nf4_matmul

    layer = nf4_layer(k, n, seed=k + n + 1)
    weight = Nf4Weight.of(layer)
    assert weight is not None
    dense = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    for rows in (2, 5, 17, 32, 64):
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        expected = x.float() @ dense.t()
        scale = expected.abs().max()
        configs = (
            None,
            MatmulConfig(block_n=32, warps=4, stages=2),
            MatmulConfig(block_n=128, warps=8),
            MatmulConfig(block_n=64, split=3),  # the last of the reduction's slices short or empty
            MatmulConfig(block_n=16, split=16),
        )
        for config in configs:
            got = nf4_matmul(x, weight, config).float()
            assert got.shape == (rows, n)
            assert float((got - expected).abs().max() / scale) < 1e-2, (rows, config)
        # The split reduction adds its slices in a fixed order, and each call leaves its tiles'
        # counts at 0 for the next (else no program of the next would find itself the last, and
        # its output would be whatever memory it got): the same bits every time.
        split = MatmulConfig(split=4)
        assert torch.equal(nf4_matmul(x, weight, split), nf4_matmul(x, weight, split))
        assert not weight.arrived.any()


def test_one_token_passes_take_the_kernel_and_longer_ones_keep_bitsandbytes(tiny_model_dir: Path) -> None:
    from app.llm.loader import ModelSpec, load_model
    from app.llm.triton_nf4 import enable

    served = load_model(ModelSpec(str(tiny_model_dir), device="cuda"))
    model = served.model
    one = torch.tensor([[5]], device="cuda")
    prompt = torch.tensor([[5, 17, 42, 99, 7]], device="cuda")
    with torch.no_grad():
        one_before, prompt_before = model(one).logits, model(prompt).logits
        layers = enable(model)
        assert layers == sum(1 for m in model.modules() if hasattr(m, "nf4_weight")) > 0
        one_after, prompt_after = model(one).logits, model(prompt).logits
        assert torch.equal(prompt_after, prompt_before), "passes of several tokens are bitsandbytes' own"
        # bf16 rounding of another order of additions: a step or two of bf16 at the logits' scale
        assert (one_after - one_before).abs().max() <= 2e-2 * one_before.abs().max()
        assert one_after.argmax(-1).tolist() == one_before.argmax(-1).tolist()
        # Spoil one layer's packed codes as the kernel reads them: one-token passes change.
        layer = next(m for m in model.modules() if hasattr(m, "nf4_weight"))
        layer.nf4_weight.words.bitwise_not_()
        assert not torch.allclose(model(one).logits.float(), one_after.float(), atol=1e-3)
        layer.nf4_weight.words.bitwise_not_()
    assert enable(model) == 0, "layers that have the kernel keep it"


def test_passes_of_a_few_tokens_take_the_matmul_kernel_and_prompts_keep_bitsandbytes(
    tiny_model_dir: Path,
) -> None:
    from app.llm.loader import ModelSpec, load_model
    from app.llm.triton_nf4 import MAX_ROWS, enable, enable_rows

    served = load_model(ModelSpec(str(tiny_model_dir), device="cuda"))
    model = served.model
    few = torch.tensor([[5], [17], [42]], device="cuda")  # a decoding step of three streams
    prompt = torch.arange(3, 3 + MAX_ROWS + 1, device="cuda")[None]  # one token more than it takes
    with torch.no_grad():
        few_before, prompt_before = model(few).logits, model(prompt).logits
        assert enable_rows(model) == 0, "only layers that have the one-row kernel"
        enable(model)
        layers = enable_rows(model)
        assert layers == sum(1 for m in model.modules() if hasattr(m, "nf4_rows")) > 0
        few_after, prompt_after = model(few).logits, model(prompt).logits
        assert torch.equal(prompt_after, prompt_before), "longer passes are bitsandbytes' own"
        # bf16 rounding of another order of additions: a step or two of bf16 at the logits' scale
        assert (few_after - few_before).abs().max() <= 2e-2 * few_before.abs().max()
        layer = next(m for m in model.modules() if hasattr(m, "nf4_rows"))
        layer.nf4_weight.words.bitwise_not_()
        assert not torch.allclose(model(few).logits.float(), few_after.float(), atol=1e-3)
        layer.nf4_weight.words.bitwise_not_()


@pytest.mark.parametrize(
    "lookup,kernel,refused,kept",
    [
        ("lookup_asm", "one-row kernel", "nf4_weight", None),
        ("word_to_bf16_asm", "matmul kernel", "nf4_rows", "nf4_weight"),  # the one-row kernel stays
    ],
)
def test_a_kernel_that_computes_something_else_is_not_switched_on(
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    lookup: str,
    kernel: str,
    refused: str,
    kept: str | None,
) -> None:
    from app.llm import triton_nf4
    from app.llm.loader import ModelSpec, load_model
    from app.llm.triton_common import KernelMismatch

    served = load_model(ModelSpec(str(tiny_model_dir), device="cuda"))
    wrong = tuple(range(16))  # a lookup table that is not the layers' NF4 values
    real = getattr(triton_nf4, lookup)
    monkeypatch.setattr(triton_nf4, lookup, lambda code_bits: real(wrong))
    with pytest.raises(KernelMismatch, match=f"{kernel}.* is off by"):
        triton_nf4.enable(served.model)
        triton_nf4.enable_rows(served.model)
    assert not any(hasattr(m, refused) for m in served.model.modules())
    if kept is not None:
        assert any(hasattr(m, kept) for m in served.model.modules())
