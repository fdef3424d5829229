"""The real trainer (TRL SFTTrainer, QLoRA on the tiny NF4 model) on the CPU, and publishing."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
from transformers import TrainerCallback

from tests.conftest import LiveServer, create_api_key, make_settings
from training.config import TrainingConfig, load_config
from training.trainer import build_run, train

pytestmark = pytest.mark.slow

RECORDS = [
    {
        "instruction": f"How many days of leave does team {i} get?",
        "output": f"Team {i} gets {20 + i % 5} days.",
    }
    for i in range(120)
]


@pytest.fixture
def config(tmp_path: Path, tiny_model_dir: Path) -> TrainingConfig:
    data = tmp_path / "leave.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in RECORDS))
    return load_config(
        Path("training/configs/tiny-cpu.yaml"),
        [
            "--base_model", str(tiny_model_dir), "--data.files", f"[{data}]",
            "--output_dir", str(tmp_path / "run"), "--logging_steps", "1", "--max_steps", "12",
            "--save_steps", "6", "--eval_steps", "6", "--lora.dropout", "0.0",
        ],
    )  # fmt: skip


def test_only_the_answer_carries_loss_and_it_ends_with_end_of_text(config: TrainingConfig) -> None:
    run = build_run(config)
    tokenizer = run.trainer.processing_class
    example = run.trainer.train_dataset[0]
    batch = run.trainer.data_collator([example])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    prompt = run.data.train[0].prompt
    prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False))
    assert set(labels[:prompt_len]) == {-100}, "the instruction is context, not a target"
    answer = [token for token, label in zip(ids, labels, strict=True) if label != -100]
    assert answer[-1] == tokenizer.eos_token_id, "every example ends with end-of-text, and it is learned"
    assert tokenizer.decode(answer[:-1]).strip() == run.data.train[0].completion
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the classic trap, and it does not bite here


class CtrlCAfter(TrainerCallback):
    """Presses Ctrl-C (a real SIGINT to this process) as soon as step `step` has ended.

    The run then finishes the step in progress (the next one) and saves a checkpoint there.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def losses(output_dir: Path) -> list[float]:
    """The loss logged at every step, as the final checkpoint records it."""
    state = json.loads((output_dir / "checkpoint-12" / "trainer_state.json").read_text())
    curve = [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]
    assert [step for step, _ in curve] == list(range(1, 13))
    return [loss for _, loss in curve]


def test_loss_goes_down_and_ctrl_c_then_resume_matches_an_uninterrupted_run(
    config: TrainingConfig, tmp_path: Path
) -> None:
    whole = train(config)
    assert not whole.interrupted and whole.metrics["steps"] == 12
    curve = losses(config.output_path)
    assert sum(curve[-3:]) < sum(curve[:3]) * 0.5, curve
    adapter = whole.adapter_dir
    assert {"adapter_config.json", "adapter_model.safetensors", "private_gpt.json"} <= {
        p.name for p in adapter.iterdir()
    }
    manifest = json.loads((config.output_path / "training_manifest.json").read_text())
    assert manifest["data"]["train_records"] + manifest["data"]["eval_records"] == 120
    assert whole.metrics["train_records"] == manifest["data"]["train_records"]
    assert whole.metrics["eval_records"] == manifest["data"]["eval_records"]
    assert manifest["versions"]["trl"] and manifest["metrics"]["tokens_per_s"] > 0
    assert (config.output_path / "loss.png").stat().st_size > 1000
    assert json.loads((adapter / "private_gpt.json").read_text())["source"] == "training"

    config.output_dir = str(tmp_path / "interrupted")
    stopped = train(config, callbacks=[CtrlCAfter(4)])
    assert stopped.interrupted and stopped.metrics["steps"] == 5
    assert (config.output_path / "checkpoint-5").is_dir()  # saved on Ctrl-C, not on the 6-step schedule
    resumed = train(config, resume=True)
    assert resumed.metrics["steps"] == 12
    again = losses(config.output_path)
    assert again[:5] == curve[:5]  # the steps before Ctrl-C: identical
    # The resumed steps follow the same curve; measured differences are float noise of about 0.1%
    # (restored optimizer state and CPU kernels do not reproduce every last bit).
    assert again == pytest.approx(curve, rel=1e-2)


def test_a_trained_adapter_is_published_and_served(
    config: TrainingConfig,
    tmp_path: Path,
    tiny_model_dir: Path,
    member_factory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from app.config import get_settings
    from training.__main__ import main

    result = train(config)
    live = LiveServer(make_settings(tmp_path / "server", tiny_model_dir, default_temperature=0.0)).start()
    try:
        admin = member_factory(live, admin=True)
        settings = live.settings
        # `python -m training publish` reads the server's settings from the environment.
        monkeypatch.setenv("DATA_DIR", str(settings.data_dir))
        monkeypatch.setenv("DATABASE_URL", settings.database_url)
        monkeypatch.setenv("MODEL_ID", settings.model_id)
        monkeypatch.setenv("DEVICE", "cpu")
        monkeypatch.setenv("SECRET_KEY", settings.secret().decode())
        get_settings.cache_clear()
        published = ["publish", str(result.adapter_dir), "--name", "leave", "--notes", "team leave"]
        assert main([*published, "--default"]) == 0

        client = openai.OpenAI(
            base_url=f"{live.url}/v1", api_key=create_api_key(settings, admin.email), max_retries=0
        )
        deadline = time.monotonic() + 10
        # The server polls the registry; --default makes it the adapter new conversations start on.
        while "leave" not in {m.id for m in client.models.list()} or live.services.catalog.default != "leave":
            assert time.monotonic() < deadline, "the published adapter never reached the server"
            time.sleep(0.2)
        question = [{"role": "user", "content": "How many days of leave does team 3 get?"}]

        def answer(model: str) -> str:
            reply = client.chat.completions.create(
                model=model, messages=question, max_tokens=12, temperature=0
            )
            return reply.choices[0].message.content or ""

        assert answer("leave") != answer(settings.model_name)
        page = admin.get("/admin/adapters").text
        assert "team leave" in page and "training" in page and '<svg class="sparkline"' in page
        # /metrics exports the run's figures from the registry, as the trainer recorded them.
        metrics = {
            line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
            for line in httpx.get(f"{live.url}/metrics").text.splitlines()
            if line.startswith("privategpt_adapter_")
        }
        leave = '{adapter="leave"}'
        assert metrics[f"privategpt_adapter_latest_version{leave}"] == 1
        assert metrics[f"privategpt_adapter_trained_versions{leave}"] == 1
        assert metrics[f"privategpt_adapter_training_steps{leave}"] == 12
        assert metrics[f"privategpt_adapter_training_records{leave}"] == result.metrics["train_records"]
        # The text format prints 15 significant digits.
        loss = pytest.approx(result.metrics["final_train_loss"], rel=1e-12)
        assert metrics[f"privategpt_adapter_training_loss{leave}"] == loss
        assert (
            metrics[f"privategpt_adapter_training_duration_seconds{leave}"] == result.metrics["wall_time_s"]
        )
        assert metrics[f"privategpt_adapter_training_tokens_per_second{leave}"] > 0
    finally:
        get_settings.cache_clear()
        live.stop()
