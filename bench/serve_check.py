"""Serve check: the engine against the plain `model.generate` recipe, many streams over many adapters.

One run, on the Falcon-7B-shaped random checkpoint of `bench/gpu_check.py` (its word-level
tokenizer decodes id N as "tN", so streamed text gives back the token ids):

1. the checkpoint, loaded through `app.llm.loader.load_model` (NF4, checked), and rank-16 LoRA
   adapters on all four Falcon linear layers (random A and B, as `bench/adapter_check.py` makes them);
2. the plain recipe (the peer): `generate` on a PEFT model holding the adapters, greedy:
   one stream on the bare base and with an adapter (tokens/s), and one padded batch of the
   concurrent prompts with `adapter_names=` (aggregate tokens/s, fewer new tokens to keep it short);
3. the engine (`GenerationEngine`, continuous batching): one stream, bare and with an adapter
   (tokens/s), time to first token of a 1,024-token prompt;
4. the engine under load: `--streams` concurrent streams over the adapters plus the base (prompts
   128-1,024 tokens, `--new-tokens` each): aggregate tokens/s, p50/p95 time to first token and
   inter-token latency, and, while they run, a new adapter is read, probed (as a publication does)
   and asked for: the time from the start of the publication to its first token, and whether any of
   the running streams ended any other way than by length;
5. greedy equality: the engine's tokens against `generate`'s for the same prompts and adapters, each
   alone and all batched (random weights have near-ties, so mismatches are counted, not asserted).

Prints one JSON line per figure, writes $OUT/serve_check.json (or /tmp), ends with a table.

    GPU:  python3 bench/serve_check.py [--streams 32 --new-tokens 256]
    CPU:  .venv/bin/python bench/serve_check.py --tiny   (a small Falcon on the CPU; checks the script)

Imports nothing from the web stack: torch, transformers, peft, bitsandbytes and `app.llm` only.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.adapter_check import make_adapter
from bench.gpu_check import EOS_ID, Env, generate, log, log_tree, make_checkpoint, results, write_json

ROOT = Path(__file__).resolve().parents[1]
WORK = Path("/tmp/serve_check")


def ids_of(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"t(\d+)", text)]


def prompt_ids(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 60000) for _ in range(length)]


def burst_prompts(streams: int, tiny: bool) -> list[list[int]]:
    """The load's prompts: 128 to 1,024 tokens each (16 to 128 with --tiny), the same every run."""
    rng = random.Random(7)
    lo, hi = (16, 128) if tiny else (128, 1024)
    return [prompt_ids(100 + i, rng.randint(lo, hi)) for i in range(streams)]


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 1)


# ---------------------------------------------------------------------------------------------
# the plain recipe


def plain(
    env: Env, refs: list[Any], cases: list[tuple[list[int], str | None]], args: argparse.Namespace
) -> dict:
    from peft import PeftModel

    from app.llm.loader import ModelSpec, load_model

    loaded = load_model(ModelSpec(env.ckpt, device=env.device))
    model = PeftModel.from_pretrained(loaded.model, str(refs[0].path), adapter_name=refs[0].key)
    for ref in refs[1:]:
        model.load_adapter(str(ref.path), adapter_name=ref.key)
    model.eval()
    out: dict[str, Any] = {}
    ids = torch.tensor([prompt_ids(1, 64)], device=env.device)
    generate(model, ids, 8, env, adapter_names=["__base__"])  # warm-up
    for label, name in (("base", "__base__"), ("adapter", refs[0].key)):
        _, seconds = generate(model, ids, args.single_tokens, env, adapter_names=[name])
        out[f"single_{label}_tokens_per_s"] = round(args.single_tokens / seconds, 1)
    # The concurrent prompts as one left-padded batch, each row with its adapter.
    width = max(len(p) for p, _ in cases)
    batch = torch.tensor([[EOS_ID] * (width - len(p)) + p for p, _ in cases], device=env.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in cases], device=env.device)
    names = [name or "__base__" for _, name in cases]
    env.sync()
    t = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            batch, attention_mask=mask, max_new_tokens=args.plain_new_tokens,
            min_new_tokens=args.plain_new_tokens, do_sample=False, pad_token_id=EOS_ID, adapter_names=names,
        )  # fmt: skip
    env.sync()
    seconds = time.perf_counter() - t
    out["batch_streams"] = len(cases)
    out["batch_new_tokens"] = args.plain_new_tokens
    out["batch_tokens_per_s"] = round(len(cases) * args.plain_new_tokens / seconds, 1)
    # Reference tokens for the equality check: each case alone, greedy.
    reference, scores = [], []
    for p, name in cases[: args.compare]:
        with torch.inference_mode():
            ids = torch.tensor([p], device=env.device)
            ref = model.generate(
                ids, attention_mask=torch.ones_like(ids),
                max_new_tokens=args.compare_tokens, min_new_tokens=args.compare_tokens, do_sample=False,
                pad_token_id=EOS_ID, adapter_names=[name or "__base__"], output_scores=True,
                return_dict_in_generate=True,
            )  # fmt: skip
        reference.append(ref.sequences[0, len(p) :].tolist())
        scores.append(torch.stack([step[0].float().cpu() for step in ref.scores]))  # [tokens, vocab]
    out["reference"] = reference
    out["reference_scores"] = scores
    model.unload()
    env.free()
    return out


# ---------------------------------------------------------------------------------------------
# the engine


class Timeline:
    """Per-stream timestamps of every streamed delta."""

    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.gaps: list[float] = []
        self.tokens = 0
        self.reasons: list[str] = []
        self.last_token_at = 0.0  # the window of a load run ends at its last streamed token


async def stream(engine: Any, ids: list[int], ref: Any, new_tokens: int, timeline: Timeline | None,
                 sampling: tuple[float, float] = (0.0, 1.0)) -> tuple:  # fmt: skip
    """One request's stream; `sampling` is (temperature, top_p), greedy by default."""
    from app.llm.engine import GenerationRequest, SamplingParams

    temperature, top_p = sampling
    submitted = time.perf_counter()
    s = engine.submit(
        GenerationRequest(
            ids, SamplingParams(max_tokens=new_tokens, temperature=temperature, top_p=top_p), adapter=ref
        )
    )
    last, parts = None, []
    async for delta in s:
        now = time.perf_counter()
        parts.append(delta.text)
        if timeline is not None:
            if last is None:
                timeline.ttft.append(now - submitted)
            else:
                timeline.gaps.append(now - last)
        last = now
    assert s.result is not None
    if timeline is not None:
        timeline.last_token_at = max(timeline.last_token_at, last or submitted)
        timeline.tokens += s.result.completion_tokens
        timeline.reasons.append(s.result.finish_reason)
    return "".join(parts), s.result, submitted


def engine_part(env: Env, refs: list[Any], spare: Any, cases: list[tuple[list[int], str | None]],
                args: argparse.Namespace, reference: list[list[int]]) -> dict:  # fmt: skip
    from app.llm.adapters import read_adapter
    from app.llm.engine import GenerationEngine
    from app.llm.loader import ModelSpec, load_model

    loaded = load_model(ModelSpec(env.ckpt, device=env.device))
    engine = GenerationEngine(
        loaded, max_running=args.streams + 4, max_queued=64, max_adapters=len(refs) + 2,
        prefill_chunk=args.prefill_chunk, cuda_graphs=not args.no_graphs,
        keep_dequantized_weights=args.dequantized, triton_kernels=not args.no_triton_kernels,
    )  # fmt: skip
    engine.start()
    by_key = {ref.key: ref for ref in refs}
    load_sampling = (args.temperature, args.top_p)  # the load runs'; greedy elsewhere
    out: dict[str, Any] = {}

    async def run() -> None:
        ids = prompt_ids(1, 64)
        # A server's start-up: its adapters loaded, then every decoding step's CUDA graph captured
        # and every prefill pass size warmed while it is idle (here at once, rather than between
        # the requests measured below).
        for ref in refs:
            await engine.preload_adapter(ref)
        started = time.perf_counter()
        warmed = await engine.warm_up()
        out["graph_captures"], out["pass_sizes_warmed"] = warmed["graphs"], warmed["pass_sizes"]
        out["warm_up_s"] = round(time.perf_counter() - started, 1)
        await stream(engine, ids, None, 8, None)  # warm-up
        for label, ref in (("base", None), ("adapter", refs[0])):
            await stream(engine, ids, ref, 8, None)
            env.sync()
            t = time.perf_counter()
            _, result, _ = await stream(engine, ids, ref, args.single_tokens, None)
            env.sync()
            out[f"single_{label}_tokens_per_s"] = round(
                result.completion_tokens / (time.perf_counter() - t), 1
            )
        graphs = engine._batch.graphs
        if graphs is not None:
            # The same stream without CUDA graphs, for the difference they make.
            engine._batch.graphs = None
            env.sync()
            t = time.perf_counter()
            _, result, _ = await stream(engine, ids, refs[0], args.single_tokens, None)
            env.sync()
            out["single_adapter_eager_tokens_per_s"] = round(
                result.completion_tokens / (time.perf_counter() - t), 1
            )
            engine._batch.graphs = graphs
        _, result, _ = await stream(engine, prompt_ids(2, args.long_prompt), None, 4, None)
        out["ttft_long_prompt_ms"] = ms(result.time_to_first_token_s)

        # Greedy equality, alone then all at once.
        compare = cases[: args.compare]
        alone = [ids_of((await stream(engine, p, by_key.get(n or ""), args.compare_tokens, None))[0])
                 for p, n in compare]  # fmt: skip
        batched = await asyncio.gather(
            *(stream(engine, p, by_key.get(n or ""), args.compare_tokens, None) for p, n in compare)
        )
        together = [ids_of(text) for text, _, _ in batched]
        out["equal_alone"] = sum(a == r for a, r in zip(alone, reference, strict=False))
        out["equal_batched"] = sum(a == r for a, r in zip(together, reference, strict=False))
        out["compared"] = len(reference)
        # Where a token differs, how far apart the two tokens were in the plain recipe's own logits:
        # random weights give near-ties that any change of kernel can flip.
        scores = getattr(args, "reference_scores", [])
        gaps = []
        for got, ref, score in zip(
            [*alone, *together], [*reference, *reference], [*scores, *scores], strict=False
        ):
            i = next((i for i, (x, y) in enumerate(zip(got, ref, strict=False)) if x != y), None)
            if i is not None:
                gaps.append(round(float(score[i, ref[i]] - score[i, got[i]]), 4))
        out["mismatch_logit_gaps"] = gaps
        out["logit_std"] = round(float(scores[0][scores[0].isfinite()].std()), 3) if scores else None
        out["first_mismatch_alone"] = next(
            (min(i for i, (x, y) in enumerate(zip(a, r, strict=False)) if x != y) if a != r else None
             for a, r in zip(alone, reference, strict=False) if a != r), None)  # fmt: skip

        captures = graphs.captures if graphs is not None else 0
        # Load: every stream at once, and a publication in the middle.
        timeline = Timeline()
        env.sync()
        started = time.perf_counter()
        tasks = [asyncio.create_task(
                     stream(engine, p, by_key.get(n or ""), args.new_tokens, timeline, load_sampling))
                 for p, n in cases]  # fmt: skip
        await asyncio.sleep(args.publish_after)
        publish_started = time.perf_counter()
        running_at_publish = sum(not task.done() for task in tasks)
        # What engine.probe_adapter does, in its two steps: read the files (off the worker), probe.
        files = await asyncio.to_thread(read_adapter, spare, engine.model.device)
        read = time.perf_counter()
        change = await engine.call(lambda: engine.adapters.probe(spare, prompt_ids(3, 32), files))
        probed = time.perf_counter()
        _, spare_result, submitted = await stream(engine, prompt_ids(4, 128), spare, 2, None)
        first = submitted + (spare_result.time_to_first_token_s or 0)
        await asyncio.gather(*tasks)
        window = timeline.last_token_at - started  # not the publication's request, which ends later
        # Steps that waited for a capture (a graph missing from the start-up's)
        out["graph_captures_under_load"] = (graphs.captures if graphs is not None else 0) - captures
        out["load"] = {
            "streams": len(cases),
            "new_tokens": args.new_tokens,
            "tokens": timeline.tokens,
            "wall_s": round(window, 2),
            "tokens_per_s": round(timeline.tokens / window, 1),
            "ttft_p50_ms": ms(pct(timeline.ttft, 0.5)),
            "ttft_p95_ms": ms(pct(timeline.ttft, 0.95)),
            "ttft_ms": sorted(round(t * 1e3) for t in timeline.ttft),  # which pass each came out of
            "itl_p50_ms": ms(pct(timeline.gaps, 0.5)),
            "itl_p95_ms": ms(pct(timeline.gaps, 0.95)),
            "finish_reasons": {r: timeline.reasons.count(r) for r in set(timeline.reasons)},
            "interrupted": sum(r != "length" for r in timeline.reasons),
        }
        out["publish"] = {
            "streams_running_at_publish": running_at_publish,
            "probe_change": round(change, 4),
            "read_ms": ms(read - publish_started),
            "probe_ms": ms(probed - read),
            "read_and_probe_ms": ms(probed - publish_started),
            "publish_to_first_token_ms": ms(first - publish_started),
            "request_ttft_ms": ms(spare_result.time_to_first_token_s),
        }
        # The same streams arriving one every --arrival-ms (a chat's users do not all press send
        # in the same millisecond): first tokens without the queue behind 31 simultaneous prompts.
        staggered = Timeline()

        async def later(i: int, ids: list[int], name: str | None) -> tuple:
            await asyncio.sleep(i * args.arrival_ms / 1000)
            return await stream(
                engine, ids, by_key.get(name or ""), args.new_tokens, staggered, load_sampling
            )

        env.sync()
        started = time.perf_counter()
        await asyncio.gather(*(later(i, p, n) for i, (p, n) in enumerate(cases)))
        window = staggered.last_token_at - started
        out["load_staggered"] = {
            "arrival_ms": args.arrival_ms,
            "tokens_per_s": round(staggered.tokens / window, 1),
            "ttft_p50_ms": ms(pct(staggered.ttft, 0.5)),
            "ttft_p95_ms": ms(pct(staggered.ttft, 0.95)),
            "itl_p50_ms": ms(pct(staggered.gaps, 0.5)),
            "itl_p95_ms": ms(pct(staggered.gaps, 0.95)),
            "interrupted": sum(r != "length" for r in staggered.reasons),
        }

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()
        env.free()
    return out


# ---------------------------------------------------------------------------------------------


def table(plain_out: dict, engine_out: dict) -> str:
    load = engine_out.get("load", {})
    pub = engine_out.get("publish", {})
    stag = engine_out.get("load_staggered", {})
    rows = [
        ("one stream, bare base (tokens/s)", plain_out.get("single_base_tokens_per_s"),
         engine_out.get("single_base_tokens_per_s")),
        ("one stream, rank-16 adapter (tokens/s)", plain_out.get("single_adapter_tokens_per_s"),
         engine_out.get("single_adapter_tokens_per_s")),
        ("one stream, rank-16 adapter, engine without CUDA graphs (tokens/s)", "-",
         engine_out.get("single_adapter_eager_tokens_per_s")),
        (f"{load.get('streams')} streams over adapters + base (tokens/s)",
         f"{plain_out.get('batch_tokens_per_s')} ({plain_out.get('batch_new_tokens')} new tokens, padded)",
         f"{load.get('tokens_per_s')} ({load.get('new_tokens')} new tokens)"),
        ("time to first token, p50 / p95 (ms)", "-",
         f"{load.get('ttft_p50_ms')} / {load.get('ttft_p95_ms')}"),
        ("inter-token latency, p50 / p95 (ms)", "-",
         f"{load.get('itl_p50_ms')} / {load.get('itl_p95_ms')}"),
        ("same streams arriving every "f"{stag.get('arrival_ms')} ms: tokens/s, TTFT p50 / p95 (ms)", "-",
         f"{stag.get('tokens_per_s')}, {stag.get('ttft_p50_ms')} / {stag.get('ttft_p95_ms')}"),
        ("time to first token, 1,024-token prompt, alone (ms)", "-", engine_out.get("ttft_long_prompt_ms")),
        ("publish (read + probe) to first token, under load (ms)", "-", pub.get("publish_to_first_token_ms")),
        ("streams not finished by length under load", "-", load.get("interrupted")),
        ("greedy tokens equal to generate: alone / batched", "-",
         f"{engine_out.get('equal_alone')} / {engine_out.get('equal_batched')} of "
         f"{engine_out.get('compared')}"),
    ]  # fmt: skip
    lines = ["| | plain generate | engine |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a small Falcon on the CPU (checks the script)")
    parser.add_argument("--streams", type=int)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--plain-new-tokens", type=int)
    parser.add_argument("--single-tokens", type=int)
    parser.add_argument("--long-prompt", type=int, default=1024)
    parser.add_argument("--prefill-chunk", type=int, default=None, help="default: the engine's")
    parser.add_argument("--no-graphs", action="store_true", help="the engine without CUDA graphs")
    parser.add_argument(
        "--dequantized", action="store_true", help="the engine with KEEP_DEQUANTIZED_WEIGHTS=true"
    )
    parser.add_argument(
        "--no-triton-kernels", action="store_true", help="without the Triton NF4, rotary and norm kernels"
    )
    parser.add_argument("--arrival-ms", type=float, default=50.0, help="spacing of the staggered load run")
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="the load runs' sampling (0: greedy; the API's default is 0.7)",
    )
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="the load runs' nucleus (the API's default is 0.95)"
    )
    parser.add_argument("--skip-plain", action="store_true", help="only the engine (no equality check)")
    parser.add_argument("--compare", type=int, default=6)
    parser.add_argument("--compare-tokens", type=int, default=32)
    parser.add_argument(
        "--publish-after", type=float, help="seconds into the load run (while its streams decode)"
    )
    args = parser.parse_args()
    from app.llm.engine import PREFILL_CHUNK

    args.prefill_chunk = args.prefill_chunk or PREFILL_CHUNK
    env = Env(args.tiny)
    if not args.tiny and not env.cuda:
        print("no CUDA GPU: run with --tiny on the CPU", file=sys.stderr)
        return 2
    args.streams = args.streams or (6 if args.tiny else 32)
    args.new_tokens = args.new_tokens or (8 if args.tiny else 256)
    args.plain_new_tokens = args.plain_new_tokens or (4 if args.tiny else 64)
    args.single_tokens = args.single_tokens or (8 if args.tiny else 128)
    args.publish_after = args.publish_after if args.publish_after is not None else (0.5 if args.tiny else 1.0)
    if args.tiny:
        args.long_prompt, args.compare, args.compare_tokens = 128, 3, 6

    import bitsandbytes
    import peft
    import transformers

    log("versions", {
        "card": torch.cuda.get_device_name(0) if env.cuda else "CPU (--tiny)",
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__, "python": sys.version.split()[0],
    })  # fmt: skip
    log_tree(ROOT)
    log("settings", {k: v for k, v in vars(args).items()})
    started = time.perf_counter()
    plain_out: dict[str, Any] = {}
    engine_out: dict[str, Any] = {}
    failed = False
    try:
        if not (Path(env.ckpt) / "config.json").is_file():
            make_checkpoint(env)
        else:
            log("ckpt.reused", env.ckpt)
        from app.llm.adapters import AdapterRef
        from app.llm.loader import ModelSpec, load_model

        probe = load_model(ModelSpec(env.ckpt, device=env.device))
        layers = probe.linear_layers
        del probe
        env.free()
        WORK.mkdir(parents=True, exist_ok=True)
        refs = []
        for i in range(args.adapters + 1):
            make_adapter(env, layers, WORK / f"a{i}", seed=i + 1)  # the directory, and a zip beside it
            refs.append(AdapterRef(key=f"a{i}", path=WORK / f"a{i}", label=f"a{i}"))
        refs, spare = refs[:-1], refs[-1]
        names: list[str | None] = [None, *(ref.key for ref in refs)]
        cases = [(p, names[i % len(names)]) for i, p in enumerate(burst_prompts(args.streams, args.tiny))]
        log("load.prompt_tokens", sorted(len(p) for p, _ in cases))
    except Exception as error:
        traceback.print_exc()
        log("setup.error", repr(error)[:400])
        return 1
    try:
        if args.skip_plain:
            raise RuntimeError("skipped (--skip-plain)")
        plain_out = plain(env, refs, cases, args)
        args.reference_scores = plain_out.pop("reference_scores")
        log("plain", {k: v for k, v in plain_out.items() if k != "reference"})
    except Exception as error:
        failed = True
        traceback.print_exc()
        log("plain.error", repr(error)[:400])
    try:
        engine_out = engine_part(env, refs, spare, cases, args, plain_out.get("reference", []))
        log("engine", engine_out)
    except Exception as error:
        failed = True
        traceback.print_exc()
        log("engine.error", repr(error)[:400])
    log("total_wall_s", round(time.perf_counter() - started, 1))
    print(f"\nwrote {write_json('serve_check.json', results)}\n\n{table(plain_out, engine_out)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
