"""4-bit matmuls for decoding steps: bitsandbytes' own against a dequantized copy of the weights.

A Falcon-7B-shaped set of bitsandbytes NF4 layers (double-quantized, as app/llm/loader.py loads
them: Falcon-7B's four linear shapes x 32 layers, 3.4 GiB, so the L2 cache holds none of it from
one pass to the next, as in a real step) is multiplied by 1 to 64 rows of input, each way captured
in one CUDA graph and replayed, as the server runs a step:

- bnb:          `Linear4bit.forward`, bitsandbytes' own choice of kernel per shape and row count
- dequantized:  the weights dequantized once to bf16 (app/llm/dequantized.py,
                KEEP_DEQUANTIZED_WEIGHTS), then cuBLAS alone
- nf4_gemv:     one row only: the Triton kernel with byte-permute lookups (app/llm/triton_nf4.py)
                that the server uses for one-token passes; `--sweep` times its tile configurations
                per shape
- nf4_matmul:   2 to 64 rows: the Triton kernel that looks the codes up the same way into a bf16
                tile in registers and multiplies it on the tensor cores (the server's passes of a
                few tokens); `--sweep` times its tile configurations at 32 rows

Tried and dropped, measured with earlier versions of this script on an H200 (docs/benchmarks.md):
a Triton kernel with the NF4 lookup in registers (commit 1370869, results
bench/results/2026-11-28-h200-nf4_kernels-triton-lut.log) and dequantizing in row slices meant to
stay in the L2 cache (results bench/results/2026-11-28-h200-nf4_kernels-sliced.json): both slower
than bitsandbytes.

Values are checked against bitsandbytes' dequantized weight times the input in fp32.

    GPU:  python3 bench/nf4_kernels.py [--rows 1,4,8,32,64] [--sweep]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.gpu_check import write_json
from bench.lora_kernels import SHAPES, time_graph

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
    parser.add_argument("--sweep", action="store_true", help="time nf4_gemv's tile configurations")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from bitsandbytes import functional as F

    from app.llm import triton_nf4

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
    ways = ["bnb", "dequantized", "nf4_gemv", "nf4_matmul"]
    gemv_weights = {shape: [triton_nf4.Nf4Weight.of(m) for m in g] for shape, g in layers.items()}
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
            if rows == 1:
                fns["nf4_gemv"] = lambda x=x, ws=gemv_weights[(k, n)]: [triton_nf4.nf4_gemv(x, w) for w in ws]
                if args.sweep:
                    line["sweep"] = sweep(
                        triton_nf4.nf4_gemv, gemv_configs(), x, gemv_weights[(k, n)], reference, scale
                    )
            elif rows <= triton_nf4.MAX_ROWS:
                ws = gemv_weights[(k, n)]
                fns["nf4_matmul"] = lambda x=x, ws=ws: [triton_nf4.nf4_matmul(x, w) for w in ws]
                if args.sweep:
                    line["sweep"] = sweep(triton_nf4.nf4_matmul, matmul_configs(), x, ws, reference, scale)
            per_layer: dict[str, float] = {}
            for way, fn in fns.items():
                with torch.no_grad():
                    got = fn()[0].float()
                    seconds = time_graph(fn, replays=20)
                totals[way] += seconds
                per_layer[way] = seconds / LAYERS
                line[f"{way}_us"] = round(seconds / LAYERS * 1e6, 1)
                line[f"{way}_max_diff"] = round(float((got - reference).abs().max()) / scale, 5)
            for way in ("bnb", "nf4_gemv", "nf4_matmul"):
                if way in per_layer:  # GB/s of 4-bit weights
                    line[f"{way}_gb_per_s"] = round(n * k / 2 / per_layer[way] / 1e9)
            print(json.dumps(line), flush=True)
            results[f"rows{rows}_{n}x{k}"] = line
        for way, seconds in totals.items():
            if seconds:
                model_ms[way][rows] = round(seconds * 1e3, 3)
        print(
            json.dumps({"rows": rows, "model_ms": {w: round(s * 1e3, 3) for w, s in totals.items()}}),
            flush=True,
        )
    results["model_ms"] = model_ms
    print(f"wrote {write_json('nf4_kernels.json', results)}")
    print("\nms per step, 32 layers x 4 shapes")
    print(f"{'rows':>5} | " + " | ".join(f"{way:>12}" for way in ways))
    for rows in model_ms["bnb"]:
        print(f"{rows:>5} | " + " | ".join(f"{model_ms[way].get(rows, float('nan')):>12.3f}" for way in ways))
    return 0


def gemv_configs() -> list[Any]:
    from app.llm import triton_nf4

    grid = itertools.product((4, 8, 16), (8, 16, 32), (2, 4))
    return [triton_nf4.Config(block_n, groups, warps) for block_n, groups, warps in grid]


def matmul_configs() -> list[Any]:
    """Session 6's sweep (3 tile heights x 4 or 8 warps x 2 or 3 stages) found the default tile
    best but for one shape. Session 7's found splitting the reduction best (several programs per
    SM), and scaling the codes before the tensor cores or taking two blocks per iteration slower;
    this one sweeps the split and the pipeline's depth."""
    from app.llm.triton_nf4 import MatmulConfig as C

    return [*(C(64, split=split) for split in (1, 2, 4, 8, 16)), *(C(64, stages=4, split=s) for s in (4, 8))]


def sweep(
    kernel: Callable[..., torch.Tensor],
    configs: list[Any],
    x: torch.Tensor,
    weights: list,
    reference: torch.Tensor,
    scale: float,
) -> list[dict[str, object]]:
    """`kernel`'s tile configurations on one shape's layers, fastest first."""
    timed = []
    for config in configs:
        try:
            with torch.no_grad():
                got = kernel(x, weights[0], config).float()
                seconds = time_graph(lambda c=config: [kernel(x, w, c) for w in weights], replays=10)
        except Exception as error:  # a configuration the compiler refuses
            print(json.dumps({"config": str(config), "error": repr(error)[:300]}), flush=True)
            continue
        timed.append(
            {
                "us": round(seconds / len(weights) * 1e6, 1),
                "config": str(config),
                "max_diff": round(float((got - reference).abs().max()) / scale, 5),
            }
        )
    return sorted(timed, key=lambda t: t["us"])


if __name__ == "__main__":
    sys.exit(main())
