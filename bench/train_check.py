"""Train check: QLoRA training speed and memory, the plain seed recipe (A) against the project's trainer (B).

One run, on the same Falcon-7B-shaped random checkpoint as `bench/gpu_check.py` (built the same way,
with its 65,024-entry word-level tokenizer: "t<id>" words, end-of-text at id 11):

1. a synthetic Alpaca JSONL whose tokenized record lengths follow a realistic instruction-data spread
   (log-normal, median ~200 tokens, clipped to [20, 1000]; the Alpaca template and the system prompt
   alone take some 30 tokens, so the shortest records come out a little longer); the prompt part
   (template + instruction) is ~30% of a record's tokens, the answer ~70%, built from "t<id>" words
   (never t11), so every record's token count is exact and checked;
2. run A, the plain seed recipe, in its own process: `from_pretrained` NF4 (double quant, bf16
   compute) with the FalconLinear fix (`plain_linear_twins()` + `quantization_config`),
   `prepare_model_for_kbit_training(use_gradient_checkpointing=True)`, LoRA r 16 / alpha 32 / dropout
   0.05 on the 4 Falcon linear layers, TRL `SFTTrainer` with `SFTConfig` defaults except batch 4 x
   accumulation 4, max_length 1024, bf16, paged 8-bit AdamW, lr 2e-4, gradient checkpointing, a fixed
   number of optimizer steps, logging every step, no eval, no saving; the data as a "text" column of
   the whole Alpaca-formatted record (TRL's language-modelling default: padding to the longest in the
   batch, random batches);
3. run B, the project's trainer, in its own process: `training.trainer.train(load_config(
   training/configs/falcon-7b-finance.yaml, overrides))` on the same file (prompt/completion,
   length-grouped batches and whatever else the trainer does by default);
4. both timed by the same callback: CUDA synchronised at every optimizer step's end, the first
   `--warmup` steps left out; real (non-padding) tokens counted from the attention masks that reach
   the model's forward (a forward pre-hook), padded tokens from the batch shapes; peak
   `torch.cuda.max_memory_allocated()` from the start of training to its end;
5. per run: real tokens/s, padding fraction, peak GPU memory, seconds per optimizer step, records/s
   and the time one finance-alpaca-sized epoch (68,900 records of this length spread) would take.

With `--dp N` it instead measures data-parallel scaling of the project's trainer: B on one GPU, then
B under `torchrun --nproc_per_node N` (one process a GPU, DDP; same per-GPU batch and accumulation,
so the effective batch is N times larger), in the same run.

Prints one JSON line per figure, writes $OUT/train_check.json (or /tmp), ends with a table.

    GPU:  python3 bench/train_check.py [--dp 2]
    CPU:  .venv/bin/python bench/train_check.py --tiny   (a small Falcon on the CPU, same steps)

Needs torch, transformers, peft, bitsandbytes, trl, datasets (+ dill, multiprocess), `app.llm` and
`training`; nothing from the web stack.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_check import (  # noqa: E402
    EOS_ID,
    Env,
    falcon_config,
    log,
    log_tree,
    make_checkpoint,
    results,
    write_json,
)

EPOCH_RECORDS = 68_900  # finance-alpaca
FINANCE_YAML = ROOT / "training" / "configs" / "falcon-7b-finance.yaml"
TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
WORK = Path("/tmp/train_check")
SHOWN_SETTINGS = ("group_by_length", "gradient_checkpointing", "optimizer", "max_length", "batch_size",
                  "gradient_accumulation_steps", "micro_batch_tokens", "quantization", "lr_scheduler",
                  "learning_rate")  # fmt: skip
PLAIN_ATTENTION = "--plain-attention"  # a variant's flag: B without app.llm.attention's fused kernels


# ---------------------------------------------------------------------------------------------
# 1. checkpoint (reused when the right one is already there)


def ensure_checkpoint(env: Env) -> None:
    config = Path(env.ckpt) / "config.json"
    if config.is_file() and (Path(env.ckpt) / "tokenizer.json").is_file():
        have = json.loads(config.read_text())
        want = falcon_config(env.tiny)
        if (have.get("hidden_size"), have.get("num_hidden_layers"), have.get("vocab_size")) == (
            want.hidden_size,
            want.num_hidden_layers,
            want.vocab_size,
        ):
            log("ckpt.reused", env.ckpt)
            return
    make_checkpoint(env)


# ---------------------------------------------------------------------------------------------
# 2. synthetic Alpaca data with exact token counts


def template_overhead(tokenizer: Any) -> int:
    """Tokens of a record with a one-word instruction and an empty answer, minus that word."""
    from app.llm.prompts import DEFAULT_SYSTEM_PROMPT, alpaca_header, format_alpaca_example

    prompt = alpaca_header(DEFAULT_SYSTEM_PROMPT) + format_alpaca_example("t5", "")
    return len(tokenizer.encode(prompt, add_special_tokens=False)) - 1


def words(rng: random.Random, n: int) -> str:
    # ids 100..65000: never 11 (end-of-text), never the unknown token t0
    return " ".join(f"t{rng.randrange(100, 65000)}" for _ in range(n))


def make_data(tokenizer: Any, n: int, median: float, sigma: float, lo: int, hi: int, path: Path) -> dict:
    """Alpaca JSONL; a record's tokenized length (template + instruction + answer + end-of-text) is
    drawn log-normal(median, sigma), clipped to [lo, hi] and to the template's minimum."""
    from app.llm.prompts import DEFAULT_SYSTEM_PROMPT, alpaca_header, format_alpaca_example

    rng = random.Random(1234)
    overhead = template_overhead(tokenizer)
    floor = overhead + 3  # one instruction word, one answer word, end-of-text
    lengths, records, texts = [], [], []
    for _ in range(n):
        target = round(min(hi, max(lo, rng.lognormvariate(math.log(median), sigma))))
        total = max(target, floor)
        prompt_tokens = max(overhead + 1, round(0.3 * total))
        answer_words = total - prompt_tokens - 1
        instruction = words(rng, prompt_tokens - overhead)
        output = words(rng, answer_words)
        records.append({"instruction": instruction, "input": "", "output": output})
        text = alpaca_header(DEFAULT_SYSTEM_PROMPT) + format_alpaca_example(instruction, "") + output
        texts.append(text)
        lengths.append(total)
    # exactness: the tokenizer gives back the intended length (+1 for the end-of-text TRL appends)
    for text, total in zip(texts[:200], lengths[:200], strict=True):
        got = len(tokenizer.encode(text, add_special_tokens=False)) + 1
        assert got == total, (got, total)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    s = sorted(lengths)

    def q(p: float) -> int:
        return s[min(len(s) - 1, int(p * len(s)))]

    return {
        "records": n,
        "template_tokens": overhead,
        "min": s[0],
        "p10": q(0.10),
        "median": int(statistics.median(s)),
        "mean": round(statistics.fmean(s), 1),
        "p90": q(0.90),
        "p99": q(0.99),
        "max": s[-1],
        "at_floor": sum(1 for x in lengths if x == floor),
        "prompt_share": round(sum(max(overhead + 1, round(0.3 * t)) for t in lengths) / sum(lengths), 3),
    }


# ---------------------------------------------------------------------------------------------
# timing callback, shared by A and B


def make_timer(cuda: bool, device: Any) -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Syncs CUDA at every optimizer step's end; counts real and padded tokens at the model's input."""

        def __init__(self) -> None:
            self.steps: list[dict[str, Any]] = []
            self.pending_real: list[Any] = []
            self.pending_total = 0
            self.pending_rows = 0
            self.pending_labels: list[Any] = []
            self.mask_source = None
            self.t_begin = 0.0
            self.t_train_begin = 0.0
            self.peak = None
            self.peak_reserved = None
            self.hook = None

        def sync(self) -> None:
            if cuda:
                torch.cuda.synchronize(device)

        def pre_hook(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None or not torch.is_grad_enabled():
                return
            mask = kwargs.get("attention_mask")
            if mask is not None:
                self.pending_real.append(mask.sum())
                self.mask_source = "attention_mask"
            else:  # padding-free batches carry no mask: every position is a real token
                self.pending_real.append(torch.tensor(ids.numel()))
                self.mask_source = "no attention_mask (counted all positions)"
            labels = kwargs.get("labels")
            if labels is not None:
                self.pending_labels.append((labels != -100).sum())
            self.pending_total += ids.numel()
            self.pending_rows += ids.shape[0]

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            self.hook = model.register_forward_pre_hook(self.pre_hook, with_kwargs=True)
            self.sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            self.t_train_begin = time.perf_counter()

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.sync()
            self.t_begin = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.sync()
            now = time.perf_counter()
            real = int(sum(int(x) for x in self.pending_real))
            self.steps.append({
                "step": state.global_step,
                "t_end": now - self.t_train_begin,
                "inner_s": now - self.t_begin,
                "real": real,
                "total": self.pending_total,
                "rows": self.pending_rows,
                "label_tokens": int(sum(int(x) for x in self.pending_labels)),
                "micro_batches": len(self.pending_real),
            })  # fmt: skip
            self.pending_real, self.pending_labels = [], []
            self.pending_total = self.pending_rows = 0

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.sync()
            if cuda:
                self.peak = torch.cuda.max_memory_allocated(device)
                self.peak_reserved = torch.cuda.max_memory_reserved(device)
            if self.hook is not None:
                self.hook.remove()

        def report(self) -> dict[str, Any]:
            return {
                "steps": self.steps,
                "mask_source": self.mask_source,
                "peak_alloc_bytes": self.peak,
                "peak_reserved_bytes": self.peak_reserved,
            }

    return StepTimer()


def summarise(steps: list[dict[str, Any]], warmup: int, world: int = 1) -> dict[str, Any]:
    """Figures over the steps after `warmup`; `steps` per rank when world > 1 (list of lists)."""
    per_rank = steps if world > 1 else [steps]
    windows, real, total, rows, labels, inner = [], 0, 0, 0, 0, []
    for rank_steps in per_rank:
        if len(rank_steps) <= warmup:
            raise RuntimeError(f"only {len(rank_steps)} steps ran; need more than {warmup}")
        t0 = rank_steps[warmup - 1]["t_end"] if warmup > 0 else 0.0
        timed = rank_steps[warmup:]
        windows.append(timed[-1]["t_end"] - t0)
        real += sum(s["real"] for s in timed)
        total += sum(s["total"] for s in timed)
        rows += sum(s["rows"] for s in timed)
        labels += sum(s["label_tokens"] for s in timed)
        inner += [s["inner_s"] for s in timed]
    n = len(per_rank[0]) - warmup
    window = max(windows)
    records_per_s = rows / window
    return {
        "timed_steps": n,
        "window_s": round(window, 3),
        "real_tokens": real,
        "padded_tokens": total,
        "records": rows,
        "loss_tokens": labels,
        "real_tokens_per_s": round(real / window, 1),
        "padding_fraction": round(1 - real / total, 4),
        "s_per_step": round(window / n, 3),
        "median_inner_step_s": round(statistics.median(inner), 3),
        "records_per_s": round(records_per_s, 3),
        "mean_real_tokens_per_record": round(real / rows, 1),
        "epoch_68900_s_from_records": round(EPOCH_RECORDS / records_per_s, 1),
    }


# ---------------------------------------------------------------------------------------------
# the two recipes (each in its own process)


def child_a(args: argparse.Namespace) -> dict[str, Any]:
    """The plain seed recipe: transformers + peft + TRL defaults on a "text" column."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from app.llm.loader import compute_dtype, plain_linear_twins, quantization_config, verify_quantized
    from app.llm.prompts import DEFAULT_SYSTEM_PROMPT, alpaca_header, format_alpaca_example

    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda:0" if cuda else "cpu")
    torch.manual_seed(42)
    tokenizer = AutoTokenizer.from_pretrained(args.ckpt)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    t = time.perf_counter()
    with plain_linear_twins():
        model = AutoModelForCausalLM.from_pretrained(
            args.ckpt,
            quantization_config=quantization_config("nf4", device),
            dtype=compute_dtype(device),
            device_map={"": str(device)},
        )
    quantized = verify_quantized(model, "nf4")
    load_s = time.perf_counter() - t
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(
        model,
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM"),
    )
    model.train()
    header = alpaca_header(DEFAULT_SYSTEM_PROMPT)
    rows = [
        {"text": header + format_alpaca_example(r["instruction"], r.get("input") or "") + r["output"]}
        for r in map(json.loads, Path(args.data).read_text().splitlines())
    ]
    sft = SFTConfig(
        output_dir=str(WORK / "train-a"),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accum,
        max_length=1024,
        bf16=cuda,
        use_cpu=not cuda,
        optim="paged_adamw_8bit" if cuda else "adamw_torch",
        learning_rate=2e-4,
        gradient_checkpointing=True,
        max_steps=args.steps,
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=42,
    )
    timer = make_timer(cuda, device)
    trainer = SFTTrainer(
        model=model,
        args=sft,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    first = trainer.train_dataset[0]["input_ids"]
    t = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t
    history = trainer.state.log_history
    return {
        "recipe": "A: plain seed recipe (TRL SFTTrainer defaults, text column)",
        "load_s": round(load_s, 1),
        "quantized_layers": quantized,
        "train_s": round(train_s, 1),
        "first_record_ends_with_eos": first[-1] == EOS_ID,
        "sampler": str(getattr(sft, "train_sampling_strategy", getattr(sft, "group_by_length", None))),
        "gradient_checkpointing": bool(getattr(sft, "gradient_checkpointing", None)),
        "losses": [round(h["loss"], 4) for h in history if "loss" in h],
        "trl_num_tokens_last": next(
            (h.get("num_tokens") for h in reversed(history) if "num_tokens" in h), None
        ),
        **timer.report(),
    }


def child_b(args: argparse.Namespace) -> dict[str, Any]:
    """The project's trainer, as configured for finance-alpaca, on the same data."""
    from training.config import load_config
    from training.trainer import train

    overrides = [
        "--base_model", args.ckpt,
        "--data.files", json.dumps([args.data]),
        "--max_steps", str(args.steps),
        "--save_steps", "100000",
        "--eval_steps", "100000",
        "--data.eval_fraction", "0",
        "--report_to", "[]",
        "--logging_steps", "1",
        "--output_dir", str(WORK / f"train-b-{os.environ.get('LOCAL_RANK', 'x')}-{args.tag}"),
    ]  # fmt: skip
    extra = json.loads(args.overrides or "[]")
    plain_attention = PLAIN_ATTENTION in extra
    if plain_attention:
        # Measure what the fused multi-query attention gives: the trainer without it.
        import training.trainer

        extra.remove(PLAIN_ATTENTION)
        training.trainer.multi_query_attention = contextlib.nullcontext  # type: ignore[assignment]
    config = load_config(FINANCE_YAML, overrides + extra)
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda:
        config.device = "cpu"
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if rank > 0:
        # training.trainer.train writes adapter/private_gpt.json on every process, but only the main
        # process's save_model creates adapter/: without this, ranks > 0 fail after training.
        (config.output_path / "adapter").mkdir(parents=True, exist_ok=True)
    timer = make_timer(cuda, device)
    t = time.perf_counter()
    post_train_error = None
    try:
        result = train(config, callbacks=[timer])
        metrics = {k: v for k, v in result.metrics.items() if k != "loss_curve"}
        losses = [c[1] for c in result.metrics.get("loss_curve", [])]
    except Exception as error:
        if len(timer.steps) < args.steps:
            raise
        traceback.print_exc()  # training finished and was timed; what failed came after it
        post_train_error, metrics, losses = repr(error)[:600], {}, []
    total_s = time.perf_counter() - t
    return {
        "recipe": "B: project trainer (training.trainer.train, falcon-7b-finance.yaml)",
        "overrides": extra + ([PLAIN_ATTENTION] if plain_attention else []),
        "config": {k: v for k, v in config.resolved().items() if k in SHOWN_SETTINGS},
        "train_call_s": round(total_s, 1),
        "trainer_metrics": metrics,
        "post_train_error": post_train_error,
        "losses": losses,
        **timer.report(),
    }


def run_child(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    try:
        body = child_a(args) if args.child == "A" else child_b(args)
        body["error"] = None
    except Exception as error:
        traceback.print_exc()
        body = {"error": repr(error)[:600]}
    body["process_s"] = round(time.perf_counter() - started, 1)
    rank = os.environ.get("LOCAL_RANK")
    path = Path(args.result if rank is None else f"{args.result}.rank{rank}")
    path.write_text(json.dumps(body, default=str))
    return 0 if body["error"] is None else 1


# ---------------------------------------------------------------------------------------------
# attention kernels on Falcon-7B's shapes


def attention_check(rows: int = 4, length: int = 1000, heads: int = 71, dim: int = 64) -> dict[str, Any]:
    """Forward + backward of one layer's attention as Falcon calls it (one key head, padded mask): as
    called (torch picks), inside app.llm.attention's block (as training runs it), and with the keys
    expanded and each kernel forced (a kernel that cannot take the call raises; that is reported)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from app.llm.attention import multi_query_attention

    device = torch.device("cuda:0")
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(rows, heads, length, dim, device=device, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(rows, 1, length, dim, device=device, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(rows, 1, length, dim, device=device, dtype=torch.bfloat16, generator=gen)
    real = torch.tensor([length - 37 * i for i in range(rows)], device=device)
    keys_ok = torch.arange(length, device=device)[None, :] < real[:, None]
    mask = torch.ones(length, length, device=device, dtype=torch.bool).tril()[None] & keys_ok[:, None, :]
    mask = mask[:, None]  # (rows, 1, L, L) as transformers builds it for sdpa
    real_rows = keys_ok[:, None, :, None].expand(rows, heads, length, dim)

    def run(label: str, backend: Any) -> tuple[float, float, torch.Tensor]:
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        times, peak = [], 0.0
        for _ in range(6):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            query, key, value = leaves
            if label == "block":  # as training runs it: app.llm.attention picks the kernel
                with multi_query_attention():
                    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
            elif backend is None:  # as Falcon calls it: torch picks
                out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
            else:
                with sdpa_kernel(backend):
                    key, value = key.expand(-1, heads, -1, -1), value.expand(-1, heads, -1, -1)
                    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
            out.float().square().mean().backward()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            for t in leaves:
                t.grad = None
        return statistics.median(times[1:]) * 1000, peak, out.detach()

    result: dict[str, Any] = {
        "shape": f"{rows} x {heads} heads x {length} (key/value 1 head), bf16, padded causal mask"
    }
    reference = None
    for label, backend in [
        ("as_called", None),
        ("block", None),
        ("expanded_efficient", SDPBackend.EFFICIENT_ATTENTION),
        ("expanded_cudnn", SDPBackend.CUDNN_ATTENTION),
        ("expanded_math", SDPBackend.MATH),
    ]:
        try:
            ms, gib, out = run(label, backend)
        except Exception as error:  # the forced kernel refused the call
            result[label] = {"error": repr(error)[:300]}
            continue
        if reference is None:
            reference = out
        result[label] = {
            "fwd_bwd_ms": round(ms, 2),
            "peak_extra_GiB": round(gib, 3),
            "max_abs_difference": float((out - reference).abs()[real_rows].max()),
        }
    return result


# ---------------------------------------------------------------------------------------------
# orchestration


def spawn(
    args: argparse.Namespace,
    kind: str,
    tag: str,
    *,
    nproc: int = 1,
    overrides: list[str] | None = None,
    timeout: float = 900,
) -> dict:
    result = WORK / f"result-{tag}.json"
    for old in WORK.glob(f"result-{tag}.json*"):
        old.unlink()
    child = [
        "--child", kind, "--ckpt", args.ckpt, "--data", str(args.data), "--steps", str(args.steps),
        "--batch", str(args.batch), "--accum", str(args.accum), "--result", str(result), "--tag", tag,
        "--overrides", json.dumps(overrides or []),
    ] + (["--tiny"] if args.tiny else [])  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(ROOT)]))
    if nproc > 1:
        # torchrun sets RANK / LOCAL_RANK / WORLD_SIZE as `accelerate launch` does; the trainer's
        # accelerate state reads them (and it also runs with gloo on the CPU, so --tiny checks it).
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(Path(__file__).resolve()), *child]  # fmt: skip
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), *child]
        if args.gpus_for_single:
            env["CUDA_VISIBLE_DEVICES"] = args.gpus_for_single
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, timeout=timeout)
    wall = round(time.perf_counter() - t, 1)
    if nproc > 1:
        bodies = [json.loads(p.read_text()) for p in sorted(WORK.glob(f"result-{tag}.json.rank*"))]
        if not bodies:
            return {"error": f"exit code {proc.returncode}, no result", "subprocess_s": wall}
        merged = {"ranks": bodies, "error": next((b["error"] for b in bodies if b.get("error")), None)}
        merged["subprocess_s"] = wall
        return merged
    if not result.is_file():
        return {"error": f"exit code {proc.returncode}, no result", "subprocess_s": wall}
    body = json.loads(result.read_text())
    body["subprocess_s"] = wall
    return body


def figures(body: dict[str, Any], warmup: int) -> dict[str, Any]:
    if body.get("ranks"):
        steps = [b["steps"] for b in body["ranks"]]
        fig = summarise(steps, warmup, world=len(steps))
        peaks = [b.get("peak_alloc_bytes") for b in body["ranks"]]
        fig["peak_alloc_GiB"] = max(round(p / 2**30, 3) for p in peaks) if all(peaks) else None
        reserved = [b.get("peak_reserved_bytes") for b in body["ranks"]]
        fig["peak_reserved_GiB"] = max(round(p / 2**30, 3) for p in reserved) if all(reserved) else None
        fig["gpus"] = len(steps)
        return fig
    fig = summarise(body["steps"], warmup)
    peak = body.get("peak_alloc_bytes")
    fig["peak_alloc_GiB"] = round(peak / 2**30, 3) if peak else None
    reserved = body.get("peak_reserved_bytes")
    fig["peak_reserved_GiB"] = round(reserved / 2**30, 3) if reserved else None
    fig["gpus"] = 1
    return fig


def hms(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h"


def table(rows: dict[str, dict[str, Any]], ratio: str | None) -> str:
    keys = [
        ("real tokens/s", "real_tokens_per_s", "{:,.0f}"),
        ("padding fraction", "padding_fraction", "{:.1%}"),
        ("peak GPU memory (allocated, GiB)", "peak_alloc_GiB", "{}"),
        ("peak GPU memory (reserved, GiB)", "peak_reserved_GiB", "{}"),
        ("s per optimizer step", "s_per_step", "{:.3f}"),
        ("records/s", "records_per_s", "{:.2f}"),
        ("mean real tokens per timed record", "mean_real_tokens_per_record", "{}"),
        ("timed steps / records", None, None),
        ("epoch of 68,900 records (from records/s)", "epoch_68900_s_from_records", None),
    ]
    names = list(rows)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, key, fmt in keys:
        cells = []
        for name in names:
            fig = rows[name]
            if key is None:
                cells.append(f"{fig['timed_steps']} / {fig['records']}")
            elif fig.get(key) is None:
                cells.append("-")
            elif key.startswith("epoch"):
                cells.append(hms(fig[key]))
            else:
                cells.append(fmt.format(fig[key]))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if ratio:
        lines.append(ratio)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a small Falcon on the CPU (checks the script)")
    parser.add_argument("--records", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--batch", type=int, default=4, help="A's batch (B takes the yaml's)")
    parser.add_argument("--accum", type=int, default=4, help="A's gradient accumulation")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=OVERRIDES",
        help="also run B with these config overrides, e.g. 'tok8k=--micro_batch_tokens 8192'; "
        f"{PLAIN_ATTENTION} runs it without the fused multi-query attention",
    )
    parser.add_argument(
        "--dp", type=int, default=0, help="measure B on 1 GPU and on N GPUs instead of A vs B"
    )
    parser.add_argument("--only", choices=["A", "B"], help="run one recipe only")
    parser.add_argument("--child", choices=["A", "B"], help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="x", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args)

    env = Env(args.tiny)
    if not args.tiny and not torch.cuda.is_available():
        print("no CUDA GPU: run with --tiny on the CPU", file=sys.stderr)
        return 2
    args.records = args.records or (120 if args.tiny else 2000)
    args.steps = args.steps or (4 if args.tiny else 30)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    args.ckpt = env.ckpt
    args.gpus_for_single = "0" if args.dp else None
    WORK.mkdir(parents=True, exist_ok=True)

    import bitsandbytes
    import datasets
    import peft
    import transformers
    import trl

    log(
        "versions",
        {
            "card": torch.cuda.get_device_name(0) if env.cuda else "CPU (--tiny)",
            "gpus_visible": torch.cuda.device_count() if env.cuda else 0,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "trl": trl.__version__,
            "datasets": datasets.__version__,
            "bitsandbytes": bitsandbytes.__version__,
            "python": sys.version.split()[0],
        },
    )
    log_tree(ROOT)
    log("settings", {"records": args.records, "steps": args.steps, "warmup": args.warmup,
                     "batch": args.batch, "accum": args.accum, "dp": args.dp})  # fmt: skip
    failed = False
    started = time.perf_counter()
    try:
        ensure_checkpoint(env)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(env.ckpt)
        args.data = WORK / "synthetic_alpaca.jsonl"
        spread = (60, 0.8, 20, 200) if args.tiny else (200, 0.8, 20, 1000)
        log("data", make_data(tokenizer, args.records, *spread, args.data))
        gc.collect()
        if env.cuda:
            torch.cuda.empty_cache()
    except Exception as error:
        log("setup.error", repr(error)[:400])
        traceback.print_exc()
        return 1

    if env.cuda:
        log("attention", attention_check())
    runs: list[tuple[str, str, str, int, list[str]]]
    if args.dp:
        runs = [("B 1 GPU", "B", "b1", 1, []), (f"B {args.dp} GPUs", "B", f"b{args.dp}", args.dp, [])]
    else:
        runs = [("A plain", "A", "a", 1, []), ("B project", "B", "b", 1, [])]
        for number, variant in enumerate(args.variant):
            label, _, overrides = variant.partition("=")
            runs.append((f"B {label}", "B", f"v{number}", 1, overrides.split()))
        if args.only:
            runs = [r for r in runs if r[1] == args.only]
    rows: dict[str, dict[str, Any]] = {}
    for name, kind, tag, nproc, overrides in runs:
        body = spawn(args, kind, tag, nproc=nproc, overrides=overrides)
        key = tag
        log(f"{key}.raw", dict(body))
        if body.get("error"):
            failed = True
            log(f"{key}.error", body["error"])
            continue
        try:
            fig = figures(body, args.warmup)
        except Exception as error:
            failed = True
            log(f"{key}.error", repr(error)[:400])
            continue
        log(f"{key}.figures", fig)
        if args.warmup > 1:
            # Length-grouped batches run longest to shortest within a mega-batch (transformers:
            # min(records // (4 x batch x accumulation), 50) optimizer steps), so leaving out the
            # first steps biases B's window towards short records. The window from step 2 covers
            # almost a whole mega-batch at 2,000 records and 30 steps.
            try:
                log(f"{key}.figures_from_step2", figures(body, 1))
            except Exception as error:
                log(f"{key}.figures_from_step2_error", repr(error)[:200])
        rows[name] = fig
    ratios = []
    names = list(rows)
    for name in names[1:]:
        first, other = rows[names[0]], rows[name]
        speed = other["real_tokens_per_s"] / first["real_tokens_per_s"]
        mem = (
            other["peak_alloc_GiB"] / first["peak_alloc_GiB"]
            if first.get("peak_alloc_GiB") and other.get("peak_alloc_GiB")
            else None
        )
        summary: dict[str, Any] = {
            "run": name,
            "tokens_per_s_ratio": round(speed, 3),
            "peak_memory_ratio": None if mem is None else round(mem, 3),
        }
        if not args.dp:
            summary["goal_2x_no_more_memory"] = bool(speed >= 2 and (mem is None or mem <= 1.0))
        else:
            summary["scaling_efficiency"] = round(speed / args.dp, 3)
        log("compare", summary)
        ratios.append(
            f"{name} / {names[0]}: real tokens/s x{speed:.2f}" + (f", peak memory x{mem:.2f}" if mem else "")
        )
    ratio = "\n" + "\n".join(ratios) if ratios else None
    log("total_wall_s", round(time.perf_counter() - started, 1))
    print(f"\nwrote {write_json('train_check.json', results)}\n")
    if rows:
        print(table(rows, ratio), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
