"""Token-budgeted micro-batches: the split itself, and the same gradient as one pass on the real trainer."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainerCallback

from training.batching import split_batch
from training.config import ConfigError, TrainingConfig, load_config
from training.trainer import build_run


def right_padded(lengths: list[int], width: int | None = None) -> dict[str, Any]:
    width = width or max(lengths)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    ids = torch.arange(len(lengths) * width).reshape(len(lengths), width) * mask
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "use_cache": False}


def rows_of(passes: list[dict[str, Any]]) -> list[list[int]]:
    """Each pass's rows as lists of their real token ids, to compare with the batch's."""
    return [
        [int(t) for t, m in zip(row, mask, strict=True) if m]
        for p in passes
        for row, mask in zip(p["input_ids"], p["attention_mask"], strict=True)
    ]


def test_rows_go_into_the_fewest_passes_that_fit_the_budget_each_trimmed_to_its_longest() -> None:
    lengths = [30, 200, 90, 40, 180, 60, 10, 100]
    batch = right_padded(lengths, width=256)
    passes = split_batch(batch, budget=400)
    for p in passes:
        rows, width = p["input_ids"].shape
        assert rows * width <= 400, "every pass within the budget"
        assert p["attention_mask"][:, -1].any(), "no column of padding only"
        assert p["labels"].shape == p["input_ids"].shape and p["use_cache"] is False
    assert sorted(map(tuple, rows_of(passes))) == sorted(map(tuple, rows_of([batch]))), "every row once"
    assert [p["input_ids"].shape for p in passes] == [(2, 200), (4, 100), (2, 30)]


def test_a_row_longer_than_the_budget_gets_a_pass_of_its_own() -> None:
    passes = split_batch(right_padded([500, 20, 20]), budget=100)
    assert [tuple(p["input_ids"].shape) for p in passes] == [(1, 500), (2, 20)]


def test_data_parallel_processes_can_ask_for_an_exact_number_of_passes() -> None:
    batch = right_padded([50, 50, 50, 50, 50, 50])
    assert len(split_batch(batch, budget=1000)) == 1
    passes = split_batch(batch, budget=1000, parts=4)
    assert len(passes) == 4 and sum(p["input_ids"].shape[0] for p in passes) == 6
    with pytest.raises(ValueError, match="cannot split 6 rows into 7"):
        split_batch(batch, budget=1000, parts=7)


def test_the_budget_must_hold_the_longest_record(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"micro_batch_tokens \(512\) must be at least max_length \(1024\)"):
        load_config(None, ["--base_model", "m", "--data.files", "[a.jsonl]", "--micro_batch_tokens", "512"])


class FirstStepGradients(TrainerCallback):
    """Keeps the LoRA gradients of step 1 and the shapes of the passes that produced them."""

    def __init__(self) -> None:
        self.gradients: dict[str, torch.Tensor] = {}
        self.passes: list[tuple[int, int]] = []
        self.hook: Any = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        def count(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            if torch.is_grad_enabled() and len(self.gradients) == 0:
                self.passes.append(tuple(kwargs["input_ids"].shape))

        self.hook = model.register_forward_pre_hook(count, with_kwargs=True)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        if not self.gradients:
            self.gradients = {
                name: param.grad.detach().clone()
                for name, param in model.named_parameters()
                if param.requires_grad and param.grad is not None
            }


@pytest.mark.slow
def test_passes_give_the_gradient_and_loss_of_one_pass(tmp_path: Path, tiny_model_dir: Path) -> None:
    rng = random.Random(3)
    data = tmp_path / "varied.jsonl"
    records = [
        {
            "instruction": f"Question {i}: " + "word " * rng.randint(1, 25),
            "output": "answer " * rng.randint(1, 30),
        }
        for i in range(48)
    ]
    data.write_text("\n".join(json.dumps(r) for r in records))

    def one_step(budget: int | None) -> tuple[FirstStepGradients, float]:
        config: TrainingConfig = load_config(
            Path("training/configs/tiny-cpu.yaml"),
            [
                "--base_model", str(tiny_model_dir), "--data.files", f"[{data}]", "--data.eval_fraction", "0",
                "--output_dir", str(tmp_path / f"run-{budget}"), "--max_steps", "1", "--logging_steps", "1",
                "--batch_size", "8", "--max_length", "256", "--micro_batch_tokens", json.dumps(budget),
            ],
        )  # fmt: skip
        spy = FirstStepGradients()
        run = build_run(config, callbacks=[spy])
        run.trainer.train()
        loss = next(h["loss"] for h in run.trainer.state.log_history if "loss" in h)
        return spy, loss

    whole, whole_loss = one_step(None)
    split, split_loss = one_step(384)
    assert len(whole.passes) == 1
    assert len(split.passes) > 2 and all(rows * width <= 384 for rows, width in split.passes)
    assert sum(rows for rows, _ in split.passes) == whole.passes[0][0] == 8
    assert split_loss == pytest.approx(whole_loss, rel=1e-5)
    assert whole.gradients.keys() == split.gradients.keys() and whole.gradients
    for name, gradient in whole.gradients.items():
        # Equal up to float32 summation order; a lost pass or a mis-scaled one is off by a tenth or more.
        assert gradient.dtype == torch.float32, "on the CPU the LoRA weights train in float32"
        difference = (split.gradients[name] - gradient).norm()
        assert difference <= 1e-4 * gradient.norm(), name
