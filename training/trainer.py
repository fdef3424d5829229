"""QLoRA fine-tuning with transformers, peft, bitsandbytes and TRL's SFTTrainer.

The base is loaded 4-bit exactly as the server loads it (app/llm/loader.py: Falcon's layers really
quantized, and checked), LoRA goes on every linear layer, and TRL trains on prompt/completion
pairs, so only the answer tokens carry loss and each example ends with the end-of-text token.

Output, under `output_dir`: `adapter/` (a standard PEFT adapter directory plus private_gpt.json,
ready to publish), `checkpoint-N/` (resumable), `runs/` (TensorBoard: `tensorboard --logdir
OUTPUT/runs`), `loss.png`, `training_manifest.json` (config, data hashes and counts, library
versions, results).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from app.llm.attention import multi_query_attention
from app.llm.loader import (
    base_fingerprint,
    compute_dtype,
    keep_cpu_weights_in_one_layout,
    plain_linear_twins,
    quantization_config,
    resolve_device,
    verify_quantized,
)
from app.llm.prompts import DEFAULT_SYSTEM_PROMPT
from training.config import TrainingConfig
from training.data import PreparedData, prepare_data

log = logging.getLogger(__name__)

MANIFEST = "private_gpt.json"


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    metrics: dict[str, Any]
    interrupted: bool


def load_tokenizer(config: TrainingConfig) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.base_model)
    if tokenizer.pad_token is None:
        # Padding is masked by the attention mask and the loss mask, never by token id, so
        # sharing the id with end-of-text does not drop end-of-text from the labels.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_data(config: TrainingConfig, tokenizer: Any) -> PreparedData:
    return prepare_data(
        config.data.files,
        tokenizer=tokenizer,
        system_prompt=DEFAULT_SYSTEM_PROMPT,
        prompt_template=config.prompt_template,
        max_length=config.max_length,
        eval_fraction=config.data.eval_fraction,
        seed=config.seed,
        skip_bad_records=config.data.skip_bad_records,
        max_records=config.data.max_records,
    )


def load_base(config: TrainingConfig, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    with plain_linear_twins():
        model = AutoModelForCausalLM.from_pretrained(
            config.base_model,
            quantization_config=quantization_config(config.quantization, device),
            dtype=compute_dtype(device),
            device_map={"": str(device)},
        )
    verify_quantized(model, config.quantization)
    if device.type == "cpu":
        keep_cpu_weights_in_one_layout(model)  # evaluation and checkpoints would otherwise nudge the base
    return model


@dataclass
class Run:
    """A trainer ready to go, with what the run needs around it."""

    trainer: Any
    data: PreparedData
    fingerprint: str
    speed: SpeedCallback
    interrupt: InterruptCallback
    device: torch.device


def build_run(config: TrainingConfig, *, callbacks: list[Any] | None = None) -> Run:
    """Load tokenizer, data and the 4-bit base with LoRA, and set up TRL's SFTTrainer."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import SFTConfig

    from training.batching import MicroBatchingSFTTrainer

    torch.manual_seed(config.seed)
    device = training_device(config)
    tokenizer = load_tokenizer(config)
    data = load_data(config, tokenizer)
    log.info("data:\n%s", data.report.summary())
    model = load_base(config, device)
    fingerprint = base_fingerprint(model.config)
    # Not peft's prepare_model_for_kbit_training: it upcasts the frozen norms and embeddings to fp32
    # (a guard for fp16), which makes the whole residual stream fp32 and casts it back and forth to
    # bf16 around every 4-bit matmul; a quarter of a step's GPU time on an H200. In bf16 they stay
    # as the model was trained. get_peft_model freezes the base, the Trainer turns on checkpointing.
    lora = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,  # type: ignore[arg-type]  # peft annotates int; any number works
        lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    cuda = device.type == "cuda"
    args = SFTConfig(
        output_dir=str(config.output_path),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # transformers 5: a float below 1 is a ratio of all steps
        max_grad_norm=config.max_grad_norm,
        weight_decay=config.weight_decay,
        optim=config.optimizer
        if config.optimizer != "auto"
        else ("paged_adamw_8bit" if cuda else "adamw_torch"),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        logging_steps=config.logging_steps,
        eval_strategy="steps" if data.eval else "no",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        seed=config.seed,
        data_seed=config.seed,
        bf16=cuda,
        use_cpu=not cuda,
        report_to=config.report_to,
        **_checkpointing_args(SFTConfig, config.gradient_checkpointing),
        **_sampling_args(SFTConfig, config.group_by_length),
        max_length=config.max_length,
        completion_only_loss=True,  # the instruction is context; only the answer is learned
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every LoRA weight is used in every step
    )

    def rows(examples: list[Any]) -> Any:
        return Dataset.from_list([{"prompt": e.prompt, "completion": e.completion} for e in examples])

    speed, interrupt = SpeedCallback(), InterruptCallback()
    trainer = MicroBatchingSFTTrainer(
        micro_batch_tokens=config.micro_batch_tokens,
        model=model,
        args=args,
        train_dataset=rows(data.train),
        eval_dataset=rows(data.eval) if data.eval else None,
        processing_class=tokenizer,
        callbacks=[interrupt, *(callbacks or [])],
    )
    trainer.callback_handler.callbacks.insert(0, speed)  # its figures go into everyone's logs
    if device.type == "cpu":
        # TRL casts a quantized model's LoRA weights to bf16 (the QLoRA recipe for GPUs). A CPU
        # without bf16 units runs those matmuls far slower: the tiny recipe's steps took 0.62 s
        # instead of 0.33 s on 2 cores. The optimizer is made later, from these same parameters.
        for parameter in model.parameters():
            if parameter.requires_grad and parameter.dtype != torch.float32:
                parameter.data = parameter.data.float()
    return Run(trainer, data, fingerprint, speed, interrupt, device)


def _field_names(args_class: Any) -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(args_class)}


def _checkpointing_args(args_class: type, enabled: bool) -> dict[str, Any]:
    """Gradient checkpointing, under the name this transformers release uses (5.23 renamed it)."""
    names = _field_names(args_class)
    prefix = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {prefix: enabled, f"{prefix}_kwargs": {"use_reentrant": False}}


def _sampling_args(args_class: type, group_by_length: bool) -> dict[str, Any]:
    """Length-grouped batches, under the name this transformers release uses."""
    if "train_sampling_strategy" in _field_names(args_class):
        return {"train_sampling_strategy": "group_by_length" if group_by_length else "random"}
    return {"group_by_length": group_by_length}


def training_device(config: TrainingConfig) -> torch.device:
    """This process's device: under `accelerate launch` each process trains on its own GPU."""
    import os

    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and config.device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device(f"cuda:{int(local_rank)}")
    return resolve_device(config.device)


def train(config: TrainingConfig, *, resume: bool = False, callbacks: list[Any] | None = None) -> TrainResult:
    """Train an adapter as `config` says; returns where it was written and the run's figures."""
    started = time.perf_counter()
    out = config.output_path
    out.mkdir(parents=True, exist_ok=True)
    run = build_run(config, callbacks=callbacks)
    trainer, cuda = run.trainer, run.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(run.device)
    with run.interrupt.catching_ctrl_c(), multi_query_attention():
        output = trainer.train(resume_from_checkpoint=_last_checkpoint(out) if resume else None)
    adapter_dir = out / "adapter"
    trainer.save_model(str(adapter_dir))
    interrupted = run.interrupt.fired
    if not trainer.is_world_process_zero():
        # Under accelerate every process trains; one writes the results.
        return TrainResult(adapter_dir=adapter_dir, metrics={}, interrupted=interrupted)

    history = trainer.state.log_history
    metrics = {
        "train_loss": output.training_loss,
        "final_train_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
        "eval_loss": next((h["eval_loss"] for h in reversed(history) if "eval_loss" in h), None),
        "tokens_per_s": run.speed.tokens_per_s,
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(run.device) / 2**30, 3)
        if cuda
        else None,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "steps": trainer.state.global_step,
        # The data set's size, beside the figures: /metrics exports it per adapter (older adapters
        # were published without it, and simply have no sample).
        "train_records": run.data.report.train,
        "eval_records": run.data.report.eval,
        "loss_curve": loss_curve(history),
    }
    (adapter_dir / MANIFEST).write_text(json.dumps({
        "base_fingerprint": run.fingerprint,
        "prompt_template": config.prompt_template,
        "source": "training",
        "metrics": metrics,
    }, indent=1))  # fmt: skip
    write_manifest(out, config, run.data, metrics, run.fingerprint)
    plot_loss(history, out / "loss.png")
    return TrainResult(adapter_dir=adapter_dir, metrics=metrics, interrupted=interrupted)


def _last_checkpoint(out: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    found = get_last_checkpoint(str(out)) if out.is_dir() else None
    if found is None:
        raise FileNotFoundError(f"--resume: no checkpoint-N directory in {out} to resume from")
    return str(found)


def write_manifest(
    out: Path, config: TrainingConfig, data: PreparedData, metrics: dict[str, Any], fingerprint: str
) -> None:
    import importlib.metadata as metadata

    versions: dict[str, str | None] = {}
    for package in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    manifest = {
        "base_model": config.base_model,
        "base_fingerprint": fingerprint,
        "data": data.report.as_dict(),
        "config": config.resolved(),
        "versions": versions,
        "metrics": metrics,
    }
    (out / "training_manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    (out / "config.resolved.json").write_text(json.dumps(config.resolved(), indent=1))


def loss_curve(history: list[dict[str, Any]], points: int = 200) -> list[list[float]]:
    """[[step, train loss], ...], thinned to at most `points`, for the registry's admin pages."""
    curve = [[h["step"], round(float(h["loss"]), 4)] for h in history if "loss" in h]
    stride = max(1, -(-len(curve) // points))
    return curve[::stride]


def plot_loss(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    figure, axes = plt.subplots(figsize=(6, 3.5))
    if train:
        axes.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        axes.plot(*zip(*evals, strict=True), marker="o", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


class SpeedCallback(TrainerCallback):
    """Adds real (non-padding) tokens per second to the logs, the progress bar and TensorBoard."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.tokens_per_s: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.perf_counter()
        self.first_tokens = state.num_input_tokens_seen or 0

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if logs is None or self.started is None or "num_tokens" not in logs:
            return
        elapsed = time.perf_counter() - self.started
        if elapsed > 0:
            self.tokens_per_s = round((logs["num_tokens"] - self.first_tokens) / elapsed, 1)
            logs["tokens_per_s"] = self.tokens_per_s


class InterruptCallback(TrainerCallback):
    """Ctrl-C once: finish the current step, save a checkpoint that --resume continues from, stop."""

    def __init__(self) -> None:
        self.fired = False

    def catching_ctrl_c(self) -> Any:
        @contextlib.contextmanager
        def handler() -> Any:
            def on_sigint(signum: int, frame: Any) -> None:
                if self.fired:
                    raise KeyboardInterrupt  # a second Ctrl-C: stop now
                self.fired = True
                log.warning("Ctrl-C: saving a checkpoint after this step (Ctrl-C again to abort)")

            try:
                previous = signal.signal(signal.SIGINT, on_sigint)
            except ValueError:  # not the main thread: leave Ctrl-C alone
                yield
                return
            try:
                yield
            finally:
                signal.signal(signal.SIGINT, previous)

        return handler()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.fired:
            control.should_save = True
            control.should_training_stop = True
