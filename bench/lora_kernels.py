"""LoRA kernels: ways to apply every resident adapter's LoRA to a batch, timed inside CUDA graphs.

The decoding step's profile (bench/decode_profile.py) showed the LoRA matmuls of app/llm/lora.py
taking 1.1 ms of a 5.8 ms step for one stream and 3.5 ms of 17 ms for 32, mostly in cuBLAS's
split-K kernels for these skinny shapes. This times the same arithmetic written several ways, on
Falcon-7B's four linear shapes x 32 layers, 10 slots of rank 16, each way captured in one CUDA
graph (as the server runs it) and replayed:

- masked:   (x @ A^T) * mask, then addmm(y, h, B^T)   (app/llm/lora.py)
- flipped:  the same products computed transposed, (A @ x^T)^T and (B @ h^T)^T
- gathered: each row's own A and B gathered by slot, then two bmm (the version before masked)
- triton:   app/llm/triton_lora.py's kernels, reading only each row's slot (Punica's BGMV way)

    GPU:  python3 bench/lora_kernels.py
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from bench.gpu_check import write_json

SHAPES = [(4544, 4672), (4544, 4544), (4544, 18176), (18176, 4544)]  # (in, out) of Falcon-7B's linears
LAYERS, SLOTS, RANK = 32, 10, 16


def masked(
    x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, _: torch.Tensor
) -> torch.Tensor:
    hidden = F.linear(x, a) * mask
    return torch.addmm(y, hidden, b.t())


def flipped(
    x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, _: torch.Tensor
) -> torch.Tensor:
    hidden = torch.mm(a, x.t()).t() * mask
    return y + torch.mm(b, hidden.t()).t()


def gathered(
    x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, _: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    a_rows = a.view(SLOTS, RANK, -1).index_select(0, slots)  # [rows, R, in]
    b_rows = b.view(-1, SLOTS, RANK).transpose(0, 1).index_select(0, slots)  # [rows, out, R]
    hidden = torch.bmm(x[:, None, :], a_rows.transpose(1, 2))
    return y + torch.bmm(hidden, b_rows.transpose(1, 2))[:, 0]


def triton_rows(
    x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, _: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    from app.llm.triton_lora import expand, shrink

    # in place: y is the base layer's fresh output when served
    return expand(y, shrink(x, a, b, slots, RANK))


def time_graph(fn: Callable[[], object], replays: int = 50) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / replays


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    dtype, device = torch.bfloat16, "cuda"
    weights = [
        (torch.randn(SLOTS * RANK, i, dtype=dtype, device=device) * 0.01,
         torch.randn(o, SLOTS * RANK, dtype=dtype, device=device) * 0.01)
        for _ in range(LAYERS) for i, o in SHAPES
    ]  # fmt: skip
    results: dict[str, object] = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for rows in (1, 8, 32):
        slots = torch.randint(0, SLOTS, (rows,), device=device)
        mask = (torch.arange(SLOTS * RANK, device=device) // RANK == slots[:, None]).to(dtype)
        xs = {i: torch.randn(rows, i, dtype=dtype, device=device) for i, _ in SHAPES}
        ys = {o: torch.randn(rows, o, dtype=dtype, device=device) for _, o in SHAPES}
        reference = None
        ways = (("masked", masked), ("flipped", flipped), ("gathered", gathered), ("triton", triton_rows))
        for name, fn in ways:
            # Values first, on copies (the Triton way writes into y), then the timing.
            got = torch.cat(
                [
                    fn(xs[a.shape[1]], ys[b.shape[0]].clone(), a, b, mask, slots).float()
                    for a, b in weights[:4]
                ],
                dim=1,
            )
            reference = got if reference is None else reference
            error = float((got - reference).abs().max())
            outs: list[torch.Tensor] = []

            def step(
                fn: Callable[..., torch.Tensor] = fn,
                outs: list[torch.Tensor] = outs,
                inputs: tuple = (xs, ys, mask, slots),
            ) -> None:
                x_of, y_of, row_mask, row_slots = inputs
                outs.clear()
                for a, b in weights:
                    outs.append(fn(x_of[a.shape[1]], y_of[b.shape[0]], a, b, row_mask, row_slots))

            seconds = time_graph(step)
            results[f"rows{rows}_{name}_us"] = round(seconds * 1e6, 1)
            results[f"rows{rows}_{name}_max_diff"] = round(error, 4)
            print(
                json.dumps(
                    {"rows": rows, "way": name, "us_per_step": round(seconds * 1e6, 1), "max_diff": error}
                ),
                flush=True,
            )
    print(f"wrote {write_json('lora_kernels.json', results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
