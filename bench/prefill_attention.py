"""Packed-prefill attention: one layer of Falcon-7B's attention over a pack of whole prompts, timed.

The engine's packed prefill (app/llm/engine.py) puts several prompts end to end into one row. Before
`packed_prompts`, attention saw a dense block-diagonal causal mask, and the memory-efficient kernel
computed the whole (sum of lengths)^2 score matrix; now each prompt attends within itself
(app/llm/attention.py). For Falcon-7B's shapes (71 query heads, one key/value head, head dim 64,
bf16) and packs of prompts of 128 to 1,024 tokens (uniform, seeded) filling about 2,048, 4,096 and
8,192 tokens, this times one layer's attention, with CUDA events after a warm-up, each way:

- masked:   as before: keys expanded, the dense bool mask, the memory-efficient kernel
- varlen:   `torch.nn.attention.varlen.varlen_attn`, one flash-attention call for every prompt
- segments: one causal SDPA call per prompt, no mask (flash attention may take it)
- packed:   `packed_prompts(lengths)` as the engine uses it (varlen where it works, else segments)

and checks each against `masked` (the largest absolute difference). One JSON line per case, a
table last, and $OUT/prefill_attention.json (or /tmp). Imports torch and app.llm only.

    GPU:  PYTHONPATH=. python3 bench/prefill_attention.py
    CPU:  .venv/bin/python bench/prefill_attention.py --tiny   (checks the script; timings mean nothing)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.llm.attention import multi_query_attention, packed_prompts, varlen_unusable
from bench.gpu_check import write_json

# varlen before packed: a varlen_attn that fails shows its own error in its row, and packed then
# shows the fallback it took (kernel_calls).
WAYS = ("masked", "varlen", "segments", "packed")


def prompt_lengths(total: int, shortest: int, longest: int, seed: int) -> list[int]:
    """Prompt lengths drawn uniformly from [shortest, longest] while the pack stays within `total`."""
    generator = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while True:
        n = int(torch.randint(shortest, longest + 1, (1,), generator=generator))
        if sum(lengths) + n > total:
            return lengths or [total]
        lengths.append(n)


def block_diagonal_causal(lengths: list[int], device: torch.device) -> torch.Tensor:
    """The engine's packed-prefill mask, [1, 1, tokens, tokens]."""
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)
    order = torch.arange(len(segment), device=device)
    return ((segment[:, None] == segment[None, :]) & (order[:, None] >= order[None, :]))[None, None]


def elapsed_ms(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        return float(start.elapsed_time(end)) / repeats
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) * 1000 / repeats


def falcon_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention as transformers' Falcon calls it: the mask and is_causal=False by keyword, through
    whatever `F.scaled_dot_product_attention` is at the time of the call (the blocks swap it)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)


def attention_block(way: str, lengths: list[int]) -> contextlib.AbstractContextManager[Any]:
    """The block the engine runs a pass's layers in, for `way`: entered once, as for a pass."""
    if way == "masked":
        return multi_query_attention()
    return packed_prompts(lengths, kernel="auto" if way == "packed" else way)  # type: ignore[arg-type]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU, to check the script")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if args.tiny:
        device, dtype, heads, head_dim = torch.device("cpu"), torch.float32, 4, 16
        totals, shortest, longest = (128, 256, 512), 8, 64
    elif torch.cuda.is_available():
        device, dtype, heads, head_dim = torch.device("cuda"), torch.bfloat16, 71, 64
        totals, shortest, longest = (2048, 4096, 8192), 128, 1024
    else:
        print("needs a CUDA GPU (or --tiny)", file=sys.stderr)
        return 2
    results: dict[str, Any] = {
        "torch": torch.__version__,
        "card": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "shape": {"query_heads": heads, "key_heads": 1, "head_dim": head_dim, "dtype": str(dtype)},
        "prompt_lengths": [shortest, longest],
        "seed": args.seed,
        "varlen_unusable": varlen_unusable(),
        "cases": [],
    }
    print(json.dumps({k: v for k, v in results.items() if k != "cases"}), flush=True)
    for case, total in enumerate(totals):
        lengths = prompt_lengths(total, shortest, longest, args.seed + case)
        tokens = sum(lengths)
        generator = torch.Generator(device=device).manual_seed(args.seed + case)
        # As Falcon hands them over: [1, heads, tokens, dim] query, one key/value head.
        q = torch.randn(1, heads, tokens, head_dim, generator=generator, device=device, dtype=dtype)
        k = torch.randn(1, 1, tokens, head_dim, generator=generator, device=device, dtype=dtype)
        v = torch.randn(1, 1, tokens, head_dim, generator=generator, device=device, dtype=dtype)
        mask = block_diagonal_causal(lengths, device)
        reference: torch.Tensor | None = None
        for way in WAYS:
            row: dict[str, Any] = {
                "tokens": tokens,
                "prompts": len(lengths),
                "way": way,
                # Score-matrix entries a kernel computes with the dense mask, over those of the
                # prompts' own squares (a causal kernel skips about half of those too).
                "dense_over_per_prompt": round(tokens**2 / sum(n * n for n in lengths), 1),
            }

            call = functools.partial(falcon_attention, q, k, v, mask)
            try:
                with torch.inference_mode(), attention_block(way, lengths) as pack:
                    out = call()
                    if reference is None:
                        reference = out
                    row["max_diff"] = float((out.float() - reference.float()).abs().max())
                    row["ms"] = round(elapsed_ms(call, device, warmup=3, repeats=args.repeats), 3)
                if pack is not None:
                    row["kernel_calls"] = dict(pack.calls)  # which way the block really went
            except Exception as error:  # a way this torch or card does not run: say so, go on
                row["error"] = f"{type(error).__name__}: {error}"[:300]
            results["cases"].append(row)
            print(json.dumps(row), flush=True)
    print()
    print(f"{'tokens':>7} {'prompts':>7} {'way':>9} {'ms':>9} {'x masked':>9} {'max diff':>9}")
    masked_ms = {row["tokens"]: row.get("ms") for row in results["cases"] if row["way"] == "masked"}
    for row in results["cases"]:
        base = masked_ms.get(row["tokens"])
        if "ms" not in row:
            print(f"{row['tokens']:>7} {row['prompts']:>7} {row['way']:>9}   failed: {row['error'][:60]}")
            continue
        speedup = f"{base / row['ms']:.2f}" if base and row["ms"] else "-"
        print(
            f"{row['tokens']:>7} {row['prompts']:>7} {row['way']:>9} {row['ms']:>9.3f} {speedup:>9} "
            f"{row['max_diff']:>9.2e}"
        )
    print(f"wrote {write_json('prefill_attention.json', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
