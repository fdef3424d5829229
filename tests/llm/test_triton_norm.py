"""Layer norm of a few rows in one Triton kernel (app/llm/triton_norm.py): PyTorch's values to bf16.

CUDA only: runs on the GPU machine (docs/benchmarks.md, "GPU tests").
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel runs on a CUDA GPU")


@pytest.mark.parametrize("rows,n,bias", [(1, 4544, True), (32, 4544, False), (3, 100, True)])
def test_the_kernel_gives_layer_norm_to_bf16_rounding(rows: int, n: int, bias: bool) -> None:
    from app.llm.triton_norm import layer_norm

    torch.manual_seed(rows + n)
    x = (torch.randn(rows, n, device="cuda") * 3 + 1).to(torch.bfloat16)
    weight = torch.randn(n, device="cuda").to(torch.bfloat16)
    shift = torch.randn(n, device="cuda").to(torch.bfloat16) if bias else None
    exact = torch.nn.functional.layer_norm(
        x.float(), (n,), weight.float(), None if shift is None else shift.float(), 1e-5
    )
    got = layer_norm(x, weight, shift, 1e-5).float()
    assert ((got - exact).abs() <= exact.abs() * 2**-8 + 1e-3).all()  # a bf16 rounding of the exact


def test_installed_steps_of_a_few_rows_take_it_and_prompts_keep_pytorch(tiny_model_dir: Path) -> None:
    from app.llm.loader import ModelSpec, load_model
    from app.llm.triton_norm import MAX_ROWS, install

    model = load_model(ModelSpec(str(tiny_model_dir), device="cuda")).model
    one = torch.tensor([[5]], device="cuda")
    prompt = torch.arange(3, 3 + MAX_ROWS + 6, device="cuda")[None, :]
    with torch.no_grad():
        one_before, prompt_before = model(one).logits, model(prompt).logits
        assert install(model) > 0
        one_after, prompt_after = model(one).logits, model(prompt).logits
    assert torch.equal(prompt_after, prompt_before), "a prompt's rows go to PyTorch's kernel"
    assert (one_after - one_before).abs().max() <= 2e-2 * one_before.abs().max()
    assert one_after.argmax(-1).tolist() == one_before.argmax(-1).tolist()
    assert install(model) == 0, "layers that have the kernel keep it"


def test_a_kernel_that_computes_something_else_is_not_switched_on(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.llm import triton_norm
    from app.llm.loader import ModelSpec, load_model
    from app.llm.triton_common import KernelMismatch

    model = load_model(ModelSpec(str(tiny_model_dir), device="cuda")).model
    real = triton_norm.layer_norm
    monkeypatch.setattr(triton_norm, "layer_norm", lambda x, w, b, eps: real(x, w, b, eps) * 1.1)
    with pytest.raises(KernelMismatch, match="layer norm"):
        triton_norm.install(model)
    assert not any(hasattr(m, "one_kernel") for m in model.modules())
