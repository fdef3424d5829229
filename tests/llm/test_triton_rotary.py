"""Falcon's rotary embedding in one kernel (app/llm/triton_rotary.py): transformers' arithmetic.

CUDA only: runs on the GPU machine (docs/benchmarks.md, "GPU tests").
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel runs on a CUDA GPU")


def rounded_as_separate_kernels(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin with every product and the sum rounded to bf16, as
    transformers' separate bf16 kernels compute it (bit for bit on the CPU)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    c, s = cos.unsqueeze(1).float(), sin.unsqueeze(1).float()

    def bf(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.bfloat16).float()

    first = bf(bf(x1 * c[..., :half]) + bf(-x2 * s[..., :half]))
    second = bf(bf(x2 * c[..., half:]) + bf(x1 * s[..., half:]))
    return torch.cat([first, second], -1).to(torch.bfloat16)


@pytest.mark.parametrize("batch,heads,length", [(1, 71, 1), (4, 71, 1), (1, 71, 300), (3, 1, 7)])
def test_the_kernel_gives_the_separate_kernels_bits(batch: int, heads: int, length: int) -> None:
    from transformers.models.falcon import modeling_falcon

    from app.llm.triton_rotary import rotate

    torch.manual_seed(heads + length)
    q = torch.randn(batch, heads, length, 64, device="cuda", dtype=torch.bfloat16) * 3
    k = torch.randn(batch, 1, length, 64, device="cuda", dtype=torch.bfloat16) * 3
    angles = torch.randn(batch, length, 64, device="cuda")
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    assert torch.equal(rotate(q, cos, sin), rounded_as_separate_kernels(q, cos, sin))
    assert torch.equal(rotate(k, cos, sin), rounded_as_separate_kernels(k, cos, sin))
    # and this transformers' own, to its rounding: within a step of bf16
    apply = getattr(modeling_falcon.apply_rotary_pos_emb, "original", modeling_falcon.apply_rotary_pos_emb)
    expected = apply(q, k, cos, sin)[0].float()
    assert ((rotate(q, cos, sin).float() - expected).abs() <= expected.abs() * 2**-7 + 1e-6).all()


def test_installed_the_model_keeps_its_logits_to_bf16_rounding(tiny_model_dir: Path) -> None:
    from transformers.models.falcon import modeling_falcon

    from app.llm import triton_rotary
    from app.llm.loader import ModelSpec, load_model

    model = load_model(ModelSpec(str(tiny_model_dir), device="cuda")).model
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]], device="cuda")
    original = getattr(modeling_falcon.apply_rotary_pos_emb, "original", modeling_falcon.apply_rotary_pos_emb)
    modeling_falcon.apply_rotary_pos_emb = original  # another test's engine may have installed it
    with torch.no_grad():
        before = model(ids).logits
        triton_rotary.install(torch.device("cuda"))
        try:
            assert modeling_falcon.apply_rotary_pos_emb is not original
            after = model(ids).logits
        finally:
            modeling_falcon.apply_rotary_pos_emb = original
    # within a step of bf16 of transformers' own logits, the same tokens
    assert (after - before).abs().max() <= 2e-2 * before.abs().max()
    assert after.argmax(-1).tolist() == before.argmax(-1).tolist()


def test_a_kernel_that_computes_something_else_is_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.models.falcon import modeling_falcon

    from app.llm import triton_rotary
    from app.llm.triton_common import KernelMismatch

    original = getattr(modeling_falcon.apply_rotary_pos_emb, "original", modeling_falcon.apply_rotary_pos_emb)
    monkeypatch.setattr(modeling_falcon, "apply_rotary_pos_emb", original)
    real = triton_rotary.rotate
    monkeypatch.setattr(triton_rotary, "rotate", lambda x, cos, sin: real(x, cos, sin) * 1.1)
    with pytest.raises(KernelMismatch, match="rotary"):
        triton_rotary.install(torch.device("cuda"))
    assert modeling_falcon.apply_rotary_pos_emb is original
