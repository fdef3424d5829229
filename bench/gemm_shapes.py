"""What a matmul of a shape cuBLAS has not seen before costs the host, on the GPU.

A packed prefill pass multiplies (prompt tokens) x 4,544 activations by Falcon-7B's weights, and
the token count is new at almost every pass. The first `torch.mm` of a new shape spends host time
choosing a kernel; this times the first and second call of each of a pass's shapes, for a few
token counts, with each BLAS library torch offers, so the engine can tell whether to round its
passes to a few token counts.

    GPU:  python3 bench/gemm_shapes.py

Prints one JSON line per library and writes $OUT/gemm_shapes.json (or /tmp).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_check import write_json
from bench.lora_kernels import SHAPES as LAYER_SHAPES

# Falcon-7B's linear layers (in, out), and the LoRA products of 5 slots x rank 16
SHAPES = [*LAYER_SHAPES, (4544, 80), (80, 18176)]


def host_ms(fn: Callable[[], torch.Tensor]) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    launched = time.perf_counter()
    torch.cuda.synchronize()
    return round((launched - started) * 1e3, 3)


def product(x: torch.Tensor, weight: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: torch.nn.functional.linear(x, weight)


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    device = torch.device("cuda")
    weights = {
        shape: torch.randn(shape[1], shape[0], device=device, dtype=torch.bfloat16) for shape in SHAPES
    }
    out: dict[str, object] = {"card": torch.cuda.get_device_name(), "torch": torch.__version__}
    for library in ("cublaslt", "cublas"):
        torch.backends.cuda.preferred_blas_library(library)
        rows = []
        for tokens in (8089, 7126, 4042, 1037, 8192, 7168):
            x = {k: torch.randn(tokens, k, device=device, dtype=torch.bfloat16) for k, _ in SHAPES}
            first = sum(host_ms(product(x[s[0]], weights[s])) for s in SHAPES)
            second = sum(host_ms(product(x[s[0]], weights[s])) for s in SHAPES)
            rows.append(
                {"tokens": tokens, "first_call_host_ms": round(first, 2), "again_host_ms": round(second, 2)}
            )
        out[library] = rows
        print(json.dumps({library: rows}))
    print(f"wrote {write_json('gemm_shapes.json', out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
