"""4-bit matmuls for decoding steps: bitsandbytes' own against a dequantized copy of the weights.

A Falcon-7B-shaped set of bitsandbytes NF4 layers (double-quantized, as app/llm/loader.py loads
them: Falcon-7B's four linear shapes x 32 layers, 3.4 GiB, so the L2 cache holds none of it from
one pass to the next, as in a real step) is multiplied by 1 to 64 rows of input, each way captured
in one CUDA graph and replayed, as the server runs a step:

- bnb:          `Linear4bit.forward`, bitsandbytes' own choice of kernel per shape and row count
- dequantized:  the weights dequantized once to bf16 (app/llm/dequantized.py,
                KEEP_DEQUANTIZED_WEIGHTS), then cuBLAS alone

Tried and dropped, measured with earlier versions of this script on an H200 (docs/benchmarks.md):
a Triton kernel with the NF4 lookup in registers (commit 1370869, results
bench/results/2026-11-28-h200-nf4_kernels-triton-lut.log) and dequantizing in row slices meant to
stay in the L2 cache (results bench/results/2026-11-28-h200-nf4_kernels-sliced.json): both slower
than bitsandbytes.

Values are checked against bitsandbytes' dequantized weight times the input in fp32.

    GPU:  python3 bench/nf4_kernels.py [--rows 1,4,8,32,64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.lora_kernels import time_graph

SHAPES = [(4544, 4672), (4544, 4544), (4544, 18176), (18176, 4544)]  # (in, out) of Falcon-7B's linears
LAYERS = 32


def layers_of(k: int, n: int, count: int) -> list[torch.nn.Module]:
    import bitsandbytes as bnb

    out = []
    for _ in range(count):
        layer = bnb.nn.Linear4bit(
            k, n, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4"
        )
        layer.weight = bnb.nn.Params4bit(
            torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02,  # quantized where it is
            requires_grad=False,
            compress_statistics=True,
            quant_type="nf4",
        )
        out.append(layer.cuda())
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1,4,8,32,64")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from bitsandbytes import functional as F

    torch.manual_seed(0)
    layers = {(k, n): layers_of(k, n, LAYERS) for k, n in SHAPES}
    print(
        json.dumps({"layers": LAYERS * len(SHAPES), "gib": round(torch.cuda.memory_allocated() / 2**30, 2)}),
        flush=True,
    )
    with torch.no_grad():
        bf16 = {
            shape: [F.dequantize_4bit(x.weight.data, x.weight.quant_state) for x in g]
            for shape, g in layers.items()
        }
    results: dict[str, object] = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__}
    ways = ["bnb", "dequantized"]
    model_ms: dict[str, dict[int, float]] = {way: {} for way in ways}
    for rows in [int(r) for r in args.rows.split(",")]:
        totals = dict.fromkeys(ways, 0.0)
        for (k, n), group in layers.items():
            x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
            reference = x.float() @ bf16[(k, n)][0].float().t()
            scale = float(reference.abs().max())
            line: dict[str, object] = {"rows": rows, "shape": [n, k]}
            fns = {
                "bnb": lambda x=x, g=group: [type(m).forward(m, x) for m in g],
                "dequantized": lambda x=x, ws=bf16[(k, n)]: [torch.nn.functional.linear(x, w) for w in ws],
            }
            per_layer: dict[str, float] = {}
            for way, fn in fns.items():
                with torch.no_grad():
                    got = fn()[0].float()
                    seconds = time_graph(fn, replays=20)
                totals[way] += seconds
                per_layer[way] = seconds / LAYERS
                line[f"{way}_us"] = round(seconds / LAYERS * 1e6, 1)
                line[f"{way}_max_diff"] = round(float((got - reference).abs().max()) / scale, 5)
            line["bnb_gb_per_s"] = round(n * k / 2 / per_layer["bnb"] / 1e9)  # of 4-bit weights
            print(json.dumps(line), flush=True)
            results[f"rows{rows}_{n}x{k}"] = line
        for way, seconds in totals.items():
            model_ms[way][rows] = round(seconds * 1e3, 3)
        print(
            json.dumps({"rows": rows, "model_ms": {w: round(s * 1e3, 3) for w, s in totals.items()}}),
            flush=True,
        )
    results["model_ms"] = model_ms
    path = Path(os.environ.get("OUT") or "/tmp") / "nf4_kernels.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")
    print("\nms per step, 32 layers x 4 shapes")
    print(f"{'rows':>5} | " + " | ".join(f"{way:>12}" for way in ways))
    for rows in model_ms["bnb"]:
        print(f"{rows:>5} | " + " | ".join(f"{model_ms[way][rows]:>12.3f}" for way in ways))
    return 0


if __name__ == "__main__":
    sys.exit(main())
