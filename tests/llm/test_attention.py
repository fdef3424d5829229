"""Multi-query attention through fused kernels: the same attention, one-head keys expanded to all heads."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from app.llm.attention import multi_query_attention
from app.llm.loader import LoadedModel


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
