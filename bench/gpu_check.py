"""GPU check: does the project's loader really give a 4-bit Falcon-7B, and how fast does it run?

One run, on a Falcon-7B-shaped checkpoint with random weights (speed and memory do not depend on
the values; quality cannot be judged):

1. build the checkpoint in bf16 on the GPU and save it with a 65,024-entry tokenizer;
2. the trap: plain `from_pretrained(..., quantization_config=nf4)` without the project's fix
   (transformers 5.x skips Falcon's `FalconLinear`), memory and `verify_quantized`'s refusal;
3. the fix: `app.llm.loader.load_model`, memory, quantized layers, load time;
4. one stream, greedy, 64-token prompt, 128 new tokens: `model.generate` vs the project's
   `GenerationEngine`, time to first token (64 and 1,024-token prompts), and whether the two
   paths give the same greedy tokens;
5. a short table.

Prints one JSON line per figure, writes $OUT/gpu_check.json (or /tmp), ends with the table.

    GPU:  python3 bench/gpu_check.py
    CPU:  .venv/bin/python bench/gpu_check.py --tiny   (a small Falcon on the CPU, same steps)

Imports nothing from the web stack: torch, transformers, peft, bitsandbytes and `app.llm` only.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EOS_ID = 11
VOCAB = 65024
PROMPT_LEN = 64
NEW_TOKENS = 128
LONG_PROMPT = 1024
COMPARE = 32

results: dict[str, Any] = {}


def log(key: str, value: Any) -> None:
    results[key] = value
    print(json.dumps({key: value}), flush=True)


def out_dir() -> Path:
    """Where a run writes its files: $OUT on the GPU machine (the device tool brings it back), else /tmp."""
    path = Path(os.environ.get("OUT") or "/tmp")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(name: str, data: Any) -> Path:
    """`data` as indented JSON in `out_dir()`/`name` (anything else as its str); returns the path."""
    path = out_dir() / name
    path.write_text(json.dumps(data, indent=1, default=str))
    return path


def log_tree(root: Path) -> None:
    """Record which commit (and which local changes) a run measured."""
    import subprocess

    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        )
        dirty = subprocess.run(["git", "status", "--short"], cwd=root, capture_output=True, text=True)
        log("tree", {"commit": head.stdout.strip() or None, "modified": dirty.stdout.split("\n")[:30]})
    except OSError:
        log("tree", "no git here")


def gib(n: int | float) -> float:
    return round(n / 2**30, 3)


class Env:
    def __init__(self, tiny: bool) -> None:
        self.tiny = tiny
        self.cuda = torch.cuda.is_available() and not tiny
        self.device = "cuda" if self.cuda else "cpu"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.ckpt = "/tmp/falcon-tiny-random" if tiny else "/tmp/falcon7b-random"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def allocated(self) -> int | None:
        return torch.cuda.memory_allocated() if self.cuda else None

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def falcon_config(tiny: bool) -> Any:
    from transformers import FalconConfig

    # Falcon-7B's published shape; tiny keeps the architecture (and the vocabulary) at toy width.
    shape = (
        dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4)
        if tiny
        else dict(hidden_size=4544, num_hidden_layers=32, num_attention_heads=71)
    )
    return FalconConfig(
        vocab_size=VOCAB,
        multi_query=True,
        parallel_attn=True,
        bias=False,
        alibi=False,
        new_decoder_architecture=False,
        bos_token_id=EOS_ID,
        eos_token_id=EOS_ID,
        **shape,
    )


def build_tokenizer() -> Any:
    """A word-level tokenizer with 65,024 entries: "t<id>" for every id, "<|endoftext|>" at 11.

    Only prompt ids matter to the benchmark; it must load with AutoTokenizer and decode any id.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    vocab = {f"t{i}": i for i in range(VOCAB) if i != EOS_ID}
    vocab[eos] = EOS_ID
    wl = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=wl, eos_token=eos, bos_token=eos, pad_token=eos, unk_token="t0"
    )
    tok.model_max_length = 2048
    return tok


# ---------------------------------------------------------------------------------------------
# 1. checkpoint


def make_checkpoint(env: Env) -> None:
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    if os.path.isdir(env.ckpt):
        shutil.rmtree(env.ckpt)
    torch.manual_seed(0)
    with torch.device(env.device):
        model = AutoModelForCausalLM.from_config(falcon_config(env.tiny), dtype=torch.bfloat16)
    with torch.no_grad():
        # End-of-text (11) must not end the timed replies early: a zero output row gives it a
        # logit of exactly 0, which never wins the greedy argmax against 65,023 random logits.
        # (lm_head is not quantized, so the row stays zero.) Speed does not depend on it.
        model.get_output_embeddings().weight[EOS_ID].zero_()
    log("ckpt.params", sum(p.numel() for p in model.parameters()))
    log("ckpt.tied_embeddings", model.get_output_embeddings().weight is model.get_input_embeddings().weight)
    model.save_pretrained(env.ckpt, max_shard_size="4GB")
    build_tokenizer().save_pretrained(env.ckpt)
    del model
    env.free()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(env.ckpt)
    assert len(tok) == VOCAB and tok.eos_token_id == EOS_ID, (len(tok), tok.eos_token_id)
    tok.decode([5, EOS_ID, VOCAB - 1, 12345], skip_special_tokens=True)
    log("ckpt.bytes", sum(f.stat().st_size for f in Path(env.ckpt).iterdir()))
    log("ckpt.wall_s", round(time.perf_counter() - t, 1))


# ---------------------------------------------------------------------------------------------
# 2. the trap


def trap(env: Env) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from app.llm.loader import ModelLoadError, verify_quantized

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=env.dtype,
    )
    env.free()
    before = env.allocated()
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        env.ckpt, quantization_config=quant, dtype=env.dtype, device_map={"": 0 if env.cuda else "cpu"}
    )
    env.sync()
    log("unfixed.load_s", round(time.perf_counter() - t, 1))
    if env.cuda:
        log("unfixed.mem_alloc_GiB", gib(env.allocated() - before))
    log("unfixed.footprint_GiB", gib(model.get_memory_footprint()))
    log("unfixed.mlp_class", type(model.transformer.h[0].mlp.dense_h_to_4h).__name__)
    try:
        verify_quantized(model, "nf4")
        log("unfixed.verify", "passed (the trap did NOT show)")
    except ModelLoadError as error:
        log("unfixed.verify", "ModelLoadError")
        log("unfixed.verify_message", str(error)[:200])
    del model
    env.free()
    if env.cuda:
        log("unfixed.mem_after_free_GiB", gib(env.allocated()))


# ---------------------------------------------------------------------------------------------
# 3. the project's loader


def load_fixed(env: Env) -> Any:
    from app.llm.loader import ModelSpec, load_model

    env.free()
    before = env.allocated()
    if env.cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    loaded = load_model(ModelSpec(env.ckpt, quantization="nf4", device=env.device))
    env.sync()
    log("fixed.load_s", round(time.perf_counter() - t, 1))
    log("fixed.loader_load_seconds", round(loaded.load_seconds, 1))
    if env.cuda:
        log("fixed.mem_alloc_GiB", gib(env.allocated() - before))
        log("fixed.peak_during_load_GiB", gib(torch.cuda.max_memory_allocated()))
    log("fixed.footprint_GiB", gib(loaded.memory_bytes))
    log("fixed.quantized_layers", loaded.quantized_layers)
    log("fixed.mlp_class", type(loaded.model.transformer.h[0].mlp.dense_h_to_4h).__name__)
    log("fixed.eos_token_ids", sorted(loaded.eos_token_ids))
    log("fixed.context_window", loaded.context_window)
    n_layers = loaded.model.config.num_hidden_layers
    assert loaded.quantized_layers == 4 * n_layers, loaded.quantized_layers
    if env.cuda:
        assert env.allocated() - before < 5 * 2**30, "NF4 Falcon-7B should take about 3.7 GiB"
    return loaded


# ---------------------------------------------------------------------------------------------
# 4. speed


def prompt(seed: int, length: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 60000, (1, length), generator=g).to(device)


def generate(model: Any, ids: torch.Tensor, new: int, env: Env, **kw: Any) -> tuple[Any, float]:
    env.sync()
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=EOS_ID,
            **kw,
        )
    env.sync()
    return out, time.perf_counter() - t


class Recorder:
    """Wraps the engine's per-token hook to record the token ids it samples (text hides them)."""

    def __init__(self) -> None:
        from app.llm.engine import GenerationEngine

        self.engine_class = GenerationEngine
        self.original = GenerationEngine._accept
        self.tokens: list[int] = []
        original = self.original

        def recording(engine: Any, seq: Any, token: int) -> bool:
            self.tokens.append(token)
            return original(engine, seq, token)

        GenerationEngine._accept = recording  # type: ignore[method-assign]

    def restore(self) -> None:
        self.engine_class._accept = self.original  # type: ignore[method-assign]


def engine_run(engine: Any, ids: list[int], max_tokens: int) -> tuple[str, Any]:
    from app.llm.engine import GenerationRequest, SamplingParams

    async def go() -> tuple[str, Any]:
        stream = engine.submit(
            GenerationRequest(prompt_ids=ids, sampling=SamplingParams(max_tokens=max_tokens, temperature=0))
        )
        return await stream.collect()

    return asyncio.run(go())


def speed(env: Env, loaded: Any) -> None:
    from app.llm.engine import GenerationEngine

    model = loaded.model
    # (a) model.generate: warm-up, then pick a prompt whose greedy continuation has no EOS.
    generate(model, prompt(999, PROMPT_LEN, env.device), 8, env)
    chosen = None
    for seed in range(5):
        ids = prompt(seed, PROMPT_LEN, env.device)
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=EOS_ID,
            )
        cont = out[0, PROMPT_LEN:].tolist()
        if len(cont) == NEW_TOKENS and EOS_ID not in cont:
            chosen = (seed, ids, cont)
            break
        log(f"prompt_seed_{seed}.rejected", f"greedy continuation hit EOS after {len(cont)} tokens")
    if chosen is None:
        raise RuntimeError("no prompt among 5 seeds ran 128 tokens without EOS")
    seed, ids, gen_tokens = chosen
    log("prompt.seed", seed)
    log("prompt.greedy_distinct_tokens_of_128", len(set(gen_tokens)))

    times = []
    for _ in range(3):
        out, dt = generate(model, ids, NEW_TOKENS, env)
        assert out.shape[1] - PROMPT_LEN == NEW_TOKENS
        times.append(dt)
    gen_dt = statistics.median(times)
    log("generate.times_s", [round(x, 3) for x in times])
    log("generate.tok_s", round(NEW_TOKENS / gen_dt, 2))
    firsts = [generate(model, ids, 1, env)[1] for _ in range(3)]
    gen_first = statistics.median(firsts)
    log("generate.first_token_s", round(gen_first, 4))
    log("generate.decode_tok_s", round((NEW_TOKENS - 1) / (gen_dt - gen_first), 2))
    same_run = out[0, PROMPT_LEN:].tolist() == gen_tokens
    log("generate.deterministic", same_run)

    # (b) the project's engine, one stream.
    recorder = Recorder()
    engine = GenerationEngine(loaded, max_running=1, max_queued=4)
    engine.start()
    try:
        engine_run(engine, prompt(999, PROMPT_LEN, "cpu")[0].tolist(), 8)  # warm-up
        runs = []
        for _ in range(3):
            recorder.tokens.clear()
            text, res = engine_run(engine, ids[0].tolist(), NEW_TOKENS)
            runs.append((res, list(recorder.tokens), text))
        for i, (res, _, _) in enumerate(runs):
            log(
                f"engine.run{i}",
                {
                    "finish_reason": res.finish_reason,
                    "completion_tokens": res.completion_tokens,
                    "duration_s": round(res.duration_s, 3),
                    "ttft_s": round(res.time_to_first_token_s or 0, 4),
                    "error": res.error,
                },
            )
        res, eng_tokens, text = sorted(runs, key=lambda r: r[0].duration_s)[1]
        log("engine.completion_tokens", res.completion_tokens)
        log("engine.finish_reason", res.finish_reason)
        if res.completion_tokens < NEW_TOKENS:
            log("engine.note", "stopped before 128 tokens; tokens/s is over what it generated")
        log("engine.tok_s", round(res.completion_tokens / res.duration_s, 2))
        log("engine.ttft_s", round(res.time_to_first_token_s, 4))
        if res.completion_tokens > 1:
            log(
                "engine.decode_tok_s",
                round((res.completion_tokens - 1) / (res.duration_s - res.time_to_first_token_s), 2),
            )
        log("engine.text_head", text[:60])

        # Same greedy tokens? Compare the first 32; on a mismatch, show generate's top-2 margin there.
        a, b = gen_tokens[:COMPARE], eng_tokens[:COMPARE]
        match = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        log("compare.first32_matching_prefix", match)
        log("compare.first32_equal_positions", sum(x == y for x, y in zip(a, b, strict=False)))
        log("compare.all128_equal", gen_tokens == eng_tokens[:NEW_TOKENS])
        if match < COMPARE:
            with torch.inference_mode():
                sc = (
                    model.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=match + 1,
                        do_sample=False,
                        pad_token_id=EOS_ID,
                        output_scores=True,
                        return_dict_in_generate=True,
                    )
                    .scores[match][0]
                    .float()
                )
            top = sc.topk(2)
            log(
                "compare.mismatch",
                {
                    "position": match,
                    "generate": a[match],
                    "engine": b[match],
                    "generate_top2_logits": [round(v, 4) for v in top.values.tolist()],
                    "generate_logit_of_engine_token": round(float(sc[b[match]]), 4),
                },
            )

        # (c) time to first token for a 1,024-token prompt through the engine (max_tokens=1).
        long_ids = prompt(1234, LONG_PROMPT, "cpu")[0].tolist()
        engine_run(engine, long_ids, 1)  # warm-up at this length
        ttfts = []
        for _ in range(3):
            _, r = engine_run(engine, long_ids, 1)
            ttfts.append(r.time_to_first_token_s)
        log("engine.ttft_1024_runs_s", [round(x, 4) for x in ttfts])
        log("engine.ttft_1024_s", round(statistics.median(ttfts), 4))
    finally:
        engine.shutdown()
        recorder.restore()

    # The bare forward pass over the same 1,024 tokens, as the peer measures prefill.
    long_t = torch.tensor([long_ids], device=env.device)
    with torch.inference_mode():
        model(long_t, logits_to_keep=1)
        pre = []
        for _ in range(3):
            env.sync()
            t = time.perf_counter()
            model(long_t, logits_to_keep=1)
            env.sync()
            pre.append(time.perf_counter() - t)
    log("forward.prefill_1024_runs_s", [round(x, 4) for x in pre])
    log("forward.prefill_1024_s", round(statistics.median(pre), 4))


# ---------------------------------------------------------------------------------------------


def table() -> str:
    r = results.get
    v = r("versions", {})
    unfixed = r("unfixed.mem_alloc_GiB", r("unfixed.footprint_GiB"))
    fixed = r("fixed.mem_alloc_GiB", r("fixed.footprint_GiB"))
    what = "memory_allocated" if "fixed.mem_alloc_GiB" in results else "footprint (CPU)"
    rows = [
        ("card", v.get("card")),
        (
            "torch / transformers / bitsandbytes / peft",
            f"{v.get('torch')} / {v.get('transformers')} / {v.get('bitsandbytes')} / {v.get('peft')}",
        ),
        (f"unfixed 'nf4' load, {what} GiB", f"{unfixed}  (verify: {r('unfixed.verify')})"),
        (
            f"project loader nf4, {what} GiB",
            f"{fixed}  ({r('fixed.quantized_layers')} layers, load {r('fixed.load_s')} s)",
        ),
        (
            "generate, 1 stream, tokens/s (decode only)",
            f"{r('generate.tok_s')}  ({r('generate.decode_tok_s')})",
        ),
        ("engine, 1 stream, tokens/s (decode only)", f"{r('engine.tok_s')}  ({r('engine.decode_tok_s')})"),
        (
            "engine completion tokens / finish",
            f"{r('engine.completion_tokens')} / {r('engine.finish_reason')}",
        ),
        (
            "TTFT 64-token prompt: generate / engine, ms",
            f"{_ms(r('generate.first_token_s'))} / {_ms(r('engine.ttft_s'))}",
        ),
        ("TTFT 1,024-token prompt, engine, ms", _ms(r("engine.ttft_1024_s"))),
        ("prefill 1,024 tokens, bare forward, ms", _ms(r("forward.prefill_1024_s"))),
        (
            "greedy first 32: matching prefix / equal",
            f"{r('compare.first32_matching_prefix')} / {r('compare.first32_equal_positions')}",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {val}" for k, val in rows)


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1000:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a small Falcon on the CPU (checks the script)")
    args = parser.parse_args()
    env = Env(args.tiny)
    if not args.tiny and not torch.cuda.is_available():
        print("no CUDA GPU: run with --tiny on the CPU", file=sys.stderr)
        return 2

    import bitsandbytes
    import peft
    import transformers

    log(
        "versions",
        {
            "card": torch.cuda.get_device_name(0) if env.cuda else "CPU (--tiny)",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "bitsandbytes": bitsandbytes.__version__,
            "peft": peft.__version__,
            "python": sys.version.split()[0],
        },
    )
    failed = False
    for name, step in (("make_checkpoint", make_checkpoint), ("trap", trap), ("load_fixed", load_fixed)):
        try:
            out = step(env)
        except Exception as error:
            failed = True
            log(f"{name}.error", repr(error)[:400])
            traceback.print_exc()
            if name != "trap":
                break
    else:
        try:
            speed(env, out)
        except Exception as error:
            failed = True
            log("speed.error", repr(error)[:400])
            traceback.print_exc()
    print(f"\nwrote {write_json('gpu_check.json', results)}\n")
    print(table(), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
