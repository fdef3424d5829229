"""Multi-query attention through fused kernels: the same attention, one-head keys expanded to all heads;
and packed prompts attending each within itself, the same attention as the block-diagonal mask."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from app.llm import attention as attention_module
from app.llm.attention import PackedPrompts, _varlen, multi_query_attention, packed_prompts, varlen_unusable
from app.llm.loader import LoadedModel

LENGTHS = [5, 1, 17, 3, 9]  # a one-token prompt too: its only key is itself


def block_diagonal_causal(lengths: list[int]) -> torch.Tensor:
    """The engine's packed-prefill mask: each token sees the tokens of its own prompt up to itself."""
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    order = torch.arange(len(segment))
    return ((segment[:, None] == segment[None, :]) & (order[:, None] >= order[None, :]))[None, None]


def packed_heads(lengths: list[int], key_heads: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(len(lengths) * 10 + key_heads)
    total = sum(lengths)
    query = torch.randn(1, 4, total, 16, generator=generator).to(dtype)
    key = torch.randn(1, key_heads, total, 16, generator=generator).to(dtype)
    value = torch.randn(1, key_heads, total, 16, generator=generator).to(dtype)
    return query, key, value


def test_a_padded_batch_gives_the_same_logits_with_every_key_head_reaching_torch(
    tiny_model: LoadedModel,
) -> None:
    tokenizer, model = tiny_model.tokenizer, tiny_model.model
    assert model.config.multi_query and model.config.num_attention_heads > 1
    texts = ["How many days of leave do I get?", "Expenses", "Who approves travel above the limit in Europe?"]
    ids = [tokenizer.encode(text) for text in texts]
    width = max(map(len, ids))
    input_ids = torch.tensor([row + [tokenizer.eos_token_id] * (width - len(row)) for row in ids])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    original = F.scaled_dot_product_attention
    seen: list[tuple[int, int]] = []

    def heads_reaching_torch(query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append((query.shape[1], key.shape[1]))
        return original(query, key, *args, **kwargs)

    F.scaled_dot_product_attention = heads_reaching_torch  # type: ignore[assignment]
    try:
        with torch.no_grad():
            plain = model(input_ids=input_ids, attention_mask=attention_mask).logits
            assert set(seen) == {(4, 1)}, "Falcon hands torch one key head for 4 query heads"
            seen.clear()
            with multi_query_attention():
                fused = model(input_ids=input_ids, attention_mask=attention_mask).logits
            assert set(seen) == {(4, 4)}, "inside the block every query head has its key head"
    finally:
        F.scaled_dot_product_attention = original  # type: ignore[assignment]
    real = attention_mask.bool()
    torch.testing.assert_close(fused[real], plain[real], rtol=1e-5, atol=1e-5)


def test_the_block_nests_and_restores_torch() -> None:
    original = F.scaled_dot_product_attention
    with multi_query_attention():
        with multi_query_attention():
            assert F.scaled_dot_product_attention is not original
        assert F.scaled_dot_product_attention is not original
    assert F.scaled_dot_product_attention is original


@pytest.mark.parametrize("key_heads", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_prompts_attend_per_prompt_as_the_block_diagonal_mask_does(
    key_heads: int, dtype: torch.dtype
) -> None:
    query, key, value = packed_heads(LENGTHS, key_heads, dtype)
    mask = block_diagonal_causal(LENGTHS)
    with multi_query_attention():
        masked = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0)
    with packed_prompts(LENGTHS) as pack:
        # As Falcon calls it: the mask and is_causal=False by keyword.
        per_prompt = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False
        )
    assert pack.calls == {"segments": 1}, "on the CPU, one causal SDPA call per prompt"
    assert per_prompt.shape == masked.shape and per_prompt.dtype == masked.dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(per_prompt, masked, rtol=tolerance, atol=tolerance)


def test_each_prompt_reaches_torch_alone_causal_and_without_a_mask() -> None:
    query, key, value = packed_heads(LENGTHS, 1, torch.float32)
    original = F.scaled_dot_product_attention
    seen: list[tuple[int, int, int, bool, bool]] = []

    def calls_reaching_torch(query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(
            (
                query.shape[-2],
                key.shape[-2],
                key.shape[1],
                kwargs.get("is_causal", False),
                "attn_mask" in kwargs,
            )
        )
        return original(query, key, *args, **kwargs)

    F.scaled_dot_product_attention = calls_reaching_torch
    try:
        with packed_prompts(LENGTHS):
            F.scaled_dot_product_attention(query, key, value, attn_mask=block_diagonal_causal(LENGTHS))
    finally:
        F.scaled_dot_product_attention = original
    assert seen == [(n, n, 4, True, False) for n in LENGTHS], "one key head expanded to the 4 query heads"


def test_calls_other_than_the_whole_pack_keep_their_mask() -> None:
    """A chunk against a cache (more keys than queries), a decoding step, a float mask and another
    thread's call are attended as they come, with their masks."""
    query, key, value = packed_heads(LENGTHS, 1, torch.float32)
    total = sum(LENGTHS)
    chunk_mask = torch.ones(1, 1, 4, total, dtype=torch.bool).tril(diagonal=total - 4)
    step_mask = torch.ones(1, 1, 1, total, dtype=torch.bool)
    step_mask[..., :3] = False
    # A float mask over the whole pack, as an ALiBi model adds its bias to: the bias must stay.
    biased = torch.zeros(1, 4, total, total).masked_fill(~block_diagonal_causal(LENGTHS), float("-inf"))
    biased += torch.linspace(-1, 0, total)
    cases = [(query[..., -4:, :], chunk_mask), (query[..., -1:, :], step_mask), (query, biased)]
    with multi_query_attention():
        expected = [F.scaled_dot_product_attention(q, key, value, attn_mask=m) for q, m in cases]
        elsewhere = F.scaled_dot_product_attention(
            query, key, value, attn_mask=block_diagonal_causal([total])
        )
    inside: list[torch.Tensor] = []
    with packed_prompts(LENGTHS) as pack:
        got = [F.scaled_dot_product_attention(q, key, value, attn_mask=m) for q, m in cases]
        # Another thread in the same block, with the whole row as one prompt: not this pack's.
        thread = threading.Thread(
            target=lambda: inside.append(
                F.scaled_dot_product_attention(query, key, value, attn_mask=block_diagonal_causal([total]))
            )
        )
        thread.start()
        thread.join()
    assert not pack.calls
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(inside[0], elsewhere, rtol=0, atol=0)


def test_packed_prompts_nest_restore_and_refuse_varlen_on_the_cpu() -> None:
    original = F.scaled_dot_product_attention
    query, key, value = packed_heads([2, 3], 1, torch.float32)
    with packed_prompts([2, 3]) as outer:
        with packed_prompts([5]) as inner:
            F.scaled_dot_product_attention(query, key, value, attn_mask=block_diagonal_causal([5]))
        F.scaled_dot_product_attention(query, key, value, attn_mask=block_diagonal_causal([2, 3]))
        with packed_prompts([2, 3], kernel="varlen"), pytest.raises(RuntimeError, match="CUDA"):
            F.scaled_dot_product_attention(query, key, value, attn_mask=block_diagonal_causal([2, 3]))
    assert inner.calls == {"segments": 1} and outer.calls == {"segments": 1}
    assert F.scaled_dot_product_attention is original
    with pytest.raises(ValueError, match="one or more tokens"), packed_prompts([3, 0]):
        pass


def test_a_packed_row_gives_the_same_logits_attending_per_prompt(tiny_model: LoadedModel) -> None:
    tokenizer, model = tiny_model.tokenizer, tiny_model.model
    texts = ["How many days of leave do I get?", "Expenses", "Who approves travel above the limit in Europe?"]
    ids = [tokenizer.encode(text) for text in texts]
    lengths = [len(row) for row in ids]
    inputs = {
        "input_ids": torch.tensor([[t for row in ids for t in row]]),
        "position_ids": torch.cat([torch.arange(n) for n in lengths])[None, :],
        "attention_mask": block_diagonal_causal(lengths),
    }
    with torch.no_grad():
        with multi_query_attention():
            masked = model(**inputs).logits
        with packed_prompts(lengths) as pack:
            per_prompt = model(**inputs).logits
        alone = [model(input_ids=torch.tensor([row])).logits[0] for row in ids]
    assert pack.calls["segments"] == model.config.num_hidden_layers, "every layer attended per prompt"
    torch.testing.assert_close(per_prompt, masked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_prompt[0], torch.cat(alone), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(varlen_unusable() is not None, reason=f"no usable varlen_attn: {varlen_unusable()}")
def test_the_varlen_call_passes_this_torchs_checks_on_meta_tensors() -> None:
    """varlen_attn runs on CUDA only; on meta tensors its shape checks and fake kernel still run, so
    the arguments the hook builds for this torch (causal, one key head) are at least well formed."""
    pack = PackedPrompts(LENGTHS, "varlen")
    total = sum(LENGTHS)
    query = torch.empty(1, 71, total, 64, device="meta", dtype=torch.bfloat16)
    key = torch.empty(1, 1, total, 64, device="meta", dtype=torch.bfloat16)
    out = _varlen(pack, query, key, key, None)  # the hook's varlen call itself: the public path needs CUDA
    assert out.shape == query.shape and out.dtype == query.dtype


@pytest.mark.skipif(varlen_unusable() is not None, reason=f"no usable varlen_attn: {varlen_unusable()}")
@pytest.mark.skipif(
    "enable_gqa" not in attention_module._varlen_parameters,
    reason="this torch's varlen_attn predates enable_gqa and takes one key head as it is",
)
def test_without_enable_gqa_the_varlen_call_expands_the_key_head_when_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As on a torch whose varlen_attn predates enable_gqa: this torch's refuses one key head for 71
    query heads without it, so the hook expands the head (a view) and keeps doing so."""
    from app.llm import attention

    monkeypatch.setattr(attention, "_varlen_parameters", attention._varlen_parameters - {"enable_gqa"})
    monkeypatch.setattr(attention, "_varlen_expands", False)
    total = sum(LENGTHS)
    query = torch.empty(1, 71, total, 64, device="meta", dtype=torch.bfloat16)
    key = torch.empty(1, 1, total, 64, device="meta", dtype=torch.bfloat16)
    out = _varlen(PackedPrompts(LENGTHS, "varlen"), query, key, key, None)
    assert out.shape == query.shape
    assert attention._varlen_expands
