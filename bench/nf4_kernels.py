"""NF4 matmul kernels for decoding steps: bitsandbytes' against app/llm/triton_nf4.py's tile sizes.

A Falcon-7B-shaped set of bitsandbytes NF4 layers (double-quantized, as app/llm/loader.py loads
them: Falcon-7B's four linear shapes x 32 layers, 3.4 GiB, so the L2 cache holds none of it between
two passes, as in a real step) is multiplied by 1 to 64 rows of input, each way captured in one
CUDA graph and replayed (as the server runs a step):

- bnb:     `Linear4bit.forward` (bitsandbytes' own choice of kernel per shape)
- triton:  `app.llm.triton_nf4.nf4_matmul` with each candidate tile configuration, and with the
           one `_config` picks (what the server uses)

For every shape and row count it prints the fastest configurations, checks values against
bitsandbytes' dequantized weight times the input (fp32) and against `Linear4bit.forward`, and ends
with the model-wide time per step: 32 layers x 4 shapes.

    GPU:  python3 bench/nf4_kernels.py [--rows 1,2,4,8,16,32,64] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
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
            torch.randn(n, k, dtype=torch.bfloat16) * 0.02,
            requires_grad=False,
            compress_statistics=True,
            quant_type="nf4",
        )
        out.append(layer.cuda())
    return out


def candidates(rows: int, quick: bool) -> list:
    """Tile configurations to time: register GEMVs for up to 4 rows, tensor-core tiles from 2."""
    from app.llm.triton_nf4 import Config

    block_m = 1 << (rows - 1).bit_length()
    gemv = [
        Config(block_m=block_m, block_n=bn, block_k=bk, split_k=sk, dot=False, warps=w)
        for bn, bk, sk, w in itertools.product(
            (8, 16, 32) if rows == 1 else (8, 16),
            (256, 512),
            (1, 2, 4),
            (4,) if quick or rows > 1 else (2, 4, 8),
        )
    ]
    dot = [
        Config(block_m=max(16, block_m), block_n=bn, block_k=bk, split_k=sk, dot=True, stages=st)
        for bn, bk, sk, st in itertools.product(
            (16, 32, 64), (128, 256), (1, 2, 4), (2,) if quick else (2, 3)
        )
    ]
    if rows == 1:
        return gemv
    if rows <= 4:
        return gemv + dot
    return dot


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1,2,4,8,16,32,64")
    parser.add_argument("--quick", action="store_true", help="fewer candidate configurations")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from app.llm.triton_nf4 import Nf4Weight, _config, nf4_matmul

    torch.manual_seed(0)
    layers = {(k, n): layers_of(k, n, LAYERS) for k, n in SHAPES}
    weights = {shape: [Nf4Weight.of(layer) for layer in group] for shape, group in layers.items()}
    results: dict[str, object] = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__}
    model_ms: dict[str, dict[int, float]] = {"bnb": {}, "triton_picked": {}, "triton_best": {}}
    best_configs: dict[str, str] = {}
    for rows in [int(r) for r in args.rows.split(",")]:
        totals = {"bnb": 0.0, "triton_picked": 0.0, "triton_best": 0.0}
        for (k, n), group in layers.items():
            x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
            ws = weights[(k, n)]
            with torch.no_grad():
                reference = x.float() @ _dequantized(group[0]).float().t()
                by_bnb = group[0](x).float()
            scale = float(reference.abs().max())

            def run_bnb(x: torch.Tensor = x, group: list = group) -> None:
                for layer in group:
                    layer(x)

            bnb_s = time_graph(run_bnb, replays=20)
            timings = []
            for config in candidates(rows, args.quick):
                try:
                    got = nf4_matmul(x, ws[0], None, config).float()
                except Exception as error:  # a tile shape this Triton or card refuses
                    print(
                        json.dumps(
                            {"rows": rows, "shape": [n, k], "config": str(config), "error": str(error)[:200]}
                        )
                    )
                    continue

                def run(x: torch.Tensor = x, config: object = config, ws: list = ws) -> None:
                    for w in ws:
                        nf4_matmul(x, w, None, config)

                timings.append((time_graph(run, replays=20), config, float((got - reference).abs().max())))
            timings.sort(key=lambda t: t[0])
            picked = _config(rows, n, k)

            def run_picked(x: torch.Tensor = x, ws: list = ws) -> None:
                for w in ws:
                    nf4_matmul(x, w)

            picked_s = time_graph(run_picked, replays=20)
            got = nf4_matmul(x, ws[0]).float()
            line = {
                "rows": rows,
                "shape": [n, k],
                "bnb_us": round(bnb_s / LAYERS * 1e6, 1),
                "picked_us": round(picked_s / LAYERS * 1e6, 1),
                "picked": str(picked),
                "picked_max_diff_vs_fp32": round(float((got - reference).abs().max()) / scale, 5),
                "picked_max_diff_vs_bnb": round(float((got - by_bnb).abs().max()) / scale, 5),
                "bnb_max_diff_vs_fp32": round(float((by_bnb - reference).abs().max()) / scale, 5),
                "best": [
                    {"us": round(s / LAYERS * 1e6, 1), "config": str(c), "max_diff": round(d / scale, 5)}
                    for s, c, d in timings[:5]
                ],
                "gbps_best": round(n * k / 2 / (timings[0][0] / LAYERS) / 1e9, 0) if timings else None,
            }
            print(json.dumps(line), flush=True)
            results[f"rows{rows}_{n}x{k}"] = line
            if timings:
                best_configs[f"rows{rows}_{n}x{k}"] = str(timings[0][1])
            totals["bnb"] += bnb_s
            totals["triton_picked"] += picked_s
            totals["triton_best"] += timings[0][0] if timings else picked_s
        for way, seconds in totals.items():
            model_ms[way][rows] = round(seconds * 1e3, 3)
        print(
            json.dumps({"rows": rows, "model_ms": {w: round(s * 1e3, 3) for w, s in totals.items()}}),
            flush=True,
        )
    results["model_ms"] = model_ms
    results["best_configs"] = best_configs
    path = Path(os.environ.get("OUT") or "/tmp") / "nf4_kernels.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")
    print("\nms per step for 32 layers x 4 shapes")
    print(f"{'rows':>5} | {'bnb ms':>8} | {'triton (picked) ms':>18} | {'triton (best) ms':>16}")
    for rows in model_ms["bnb"]:
        print(
            f"{rows:>5} | {model_ms['bnb'][rows]:>8.3f} | {model_ms['triton_picked'][rows]:>18.3f} | "
            f"{model_ms['triton_best'][rows]:>16.3f}"
        )
    return 0


def _dequantized(layer: torch.nn.Module) -> torch.Tensor:
    from bitsandbytes import functional as F

    return F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


if __name__ == "__main__":
    sys.exit(main())
