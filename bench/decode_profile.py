"""Decode profile: where a decoding step's GPU time goes, one stream and 32, kernel by kernel.

On the Falcon-7B-shaped random checkpoint of `bench/gpu_check.py`, with rank-16 adapters as
`bench/serve_check.py` makes them, the engine decodes (CUDA graphs as served) while
`torch.profiler` records every kernel; the table gives each kernel's GPU time and count per step.
`--compile` first compiles the decoder layers with `torch.compile` (a trial: fused elementwise
kernels inside the same CUDA graphs), so the two can be compared. `--prefill` profiles instead the
prefill of `bench/serve_check.py`'s 32 prompts (128 to 1,024 tokens) sent at once, two new tokens
each: what sets the first tokens of a burst. Its GPU kernels; the worker thread's operators by
host time, with its waits for the GPU (read-backs, syncs); and when the GPU sat idle, put down to
the engine's phase at the time (`gpu_idle`).

    GPU:  python3 bench/decode_profile.py [--compile | --prefill [--prefill-chunk N]]
    CPU:  .venv/bin/python bench/decode_profile.py --tiny   (checks the script; timings mean nothing)

Prints one JSON line per figure and writes $OUT/decode_profile[-compiled].json
(prefill_profile-N.json with --prefill), or to /tmp.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.adapter_check import make_adapter
from bench.gpu_check import Env, log, make_checkpoint, results, write_json
from bench.serve_check import WORK, burst_prompts, prompt_ids, stream


def compile_decoder_layers(model: Any) -> int:
    """`torch.compile` every decoder layer (one compiled graph serves them all); returns how many.

    Inductor fuses the small elementwise kernels between the matmuls (norms, rotary embedding,
    residual adds, the LoRA mask), which a CUDA graph replays but cannot merge.
    """
    import torch._dynamo.config as dynamo

    # Batch-size buckets, LoRA on and off, prefill shapes: more variants than the default allows.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo, name):
            setattr(dynamo, name, 64)
    layers = next(
        module
        for module in model.modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) == model.config.num_hidden_layers
    )
    for layer in layers:
        layer.compile(dynamic=True)  # one graph for every batch size and prompt length
    return len(layers)


# The worker's phases, as app/llm/engine.py labels them with record_function. The profiler also
# shows each on the GPU's timeline (a span, not a kernel), under the same name.
PHASES = ("admit", "prefill", "packed pass", "first tokens", "join", "decode", "stream tokens")


def kernels(prof: Any, steps: int, top: int) -> list[dict[str, Any]]:
    """GPU time and launches per step by kernel name, largest first."""
    time_us: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.name not in PHASES:
            time_us[event.name] += event.device_time
            count[event.name] += 1
    total = sum(time_us.values())
    rows = sorted(time_us, key=lambda name: -time_us[name])
    out = [
        {
            "kernel": "(all)",
            "us_per_step": round(total / steps, 1),
            "per_step": round(sum(count.values()) / steps, 1),
        }
    ]
    out += [
        {
            "kernel": name[:90],
            "us_per_step": round(time_us[name] / steps, 1),
            "per_step": round(count[name] / steps, 1),
        }
        for name in rows[:top]
    ]
    return out


def host_ops(prof: Any, top: int) -> dict[str, Any]:
    """The host's operators by self time (ms), and its waits for the GPU: read-backs and syncs."""
    averages = prof.key_averages()
    ops = sorted(
        (event for event in averages if event.device_type == torch.autograd.DeviceType.CPU),
        key=lambda event: -event.self_cpu_time_total,
    )
    waits = ("aten::_local_scalar_dense", "aten::item", "cudaStreamSynchronize", "cudaDeviceSynchronize",
             "cudaEventSynchronize", "cudaMemcpy")  # fmt: skip
    return {
        "top": [
            {"op": event.key[:80], "self_ms": round(event.self_cpu_time_total / 1e3, 2), "calls": event.count}
            for event in ops[:top]
        ],
        "waits": {
            event.key: {"calls": event.count, "ms": round(event.cpu_time_total / 1e3, 2)}
            for event in averages
            if event.key.startswith(waits)
        },
    }


def gpu_idle(prof: Any, top: int) -> dict[str, Any]:
    """When the GPU had nothing to run, and what the worker was doing meanwhile.

    The GPU's busy time is the union of its kernels and copies; each gap between them is put down
    to the innermost engine phase running on the worker at its middle, with the worker's operators
    then (outermost first) for the longest gaps. A gap inside "packed pass" is the host launching
    slower than the GPU computes; one inside "first tokens" or "join" is the work after a pass.
    """
    events = prof.events()
    cpu, gpu = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    labels = [e for e in events if e.device_type == cpu and e.name in PHASES]
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in events
        if e.device_type == gpu and e.name not in PHASES
    )
    if not spans or not labels:
        return {}
    busy = [list(spans[0])]
    for start, end in spans[1:]:
        if start <= busy[-1][1]:
            busy[-1][1] = max(busy[-1][1], end)
        else:
            busy.append([start, end])
    worker = labels[0].thread
    ops = [e for e in events if e.device_type == cpu and e.thread == worker]
    origin = min(e.time_range.start for e in labels)

    def around(t: float, among: list[Any]) -> list[Any]:
        inside = (e for e in among if e.time_range.start <= t < e.time_range.end)
        return sorted(inside, key=lambda e: e.time_range.start)

    gaps = [(a[1], b[0]) for a, b in itertools.pairwise(busy) if b[0] - a[1] >= 20]  # µs
    by_phase: dict[str, float] = defaultdict(float)
    for start, end in gaps:
        inside = around((start + end) / 2, labels)
        by_phase[inside[-1].name if inside else "(between phases)"] += (end - start) / 1e3
    longest = sorted(gaps, key=lambda gap: gap[0] - gap[1])[:top]
    return {
        "window_ms": round((busy[-1][1] - origin) / 1e3, 1),
        "first_kernel_at_ms": round((busy[0][0] - origin) / 1e3, 1),
        "gpu_busy_ms": round(sum(end - start for start, end in busy) / 1e3, 1),
        "idle_ms_by_phase": {
            name: round(ms, 1) for name, ms in sorted(by_phase.items(), key=lambda kv: -kv[1])
        },
        "phases": [
            {
                "phase": e.name,
                "at_ms": round((e.time_range.start - origin) / 1e3, 1),
                "ms": round((e.time_range.end - e.time_range.start) / 1e3, 1),
            }
            for e in sorted(labels, key=lambda e: e.time_range.start)
        ],
        "longest_gaps": [
            {
                "at_ms": round((start - origin) / 1e3, 1),
                "ms": round((end - start) / 1e3, 2),
                "worker": [e.name[:60] for e in around((start + end) / 2, ops)][-6:],
            }
            for start, end in longest
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decoder layers first")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--prefill", action="store_true", help="profile a burst's prefill instead")
    parser.add_argument("--prefill-chunk", type=int, default=None, help="default: the engine's")
    args = parser.parse_args()
    from app.llm.engine import PREFILL_CHUNK

    args.prefill_chunk = args.prefill_chunk or PREFILL_CHUNK
    env = Env(args.tiny)
    from torch.profiler import ProfilerActivity, profile

    from app.llm.adapters import AdapterRef
    from app.llm.engine import GenerationEngine
    from app.llm.loader import ModelSpec, load_model

    if not (Path(env.ckpt) / "config.json").is_file():
        make_checkpoint(env)
    loaded = load_model(ModelSpec(env.ckpt, device=env.device))
    WORK.mkdir(parents=True, exist_ok=True)
    refs = []
    for i in range(2):
        make_adapter(env, loaded.linear_layers, WORK / f"p{i}", seed=i + 1)
        refs.append(AdapterRef(key=f"p{i}", path=WORK / f"p{i}", label=f"p{i}"))
    if args.compile:
        log("compiled_layers", compile_decoder_layers(loaded.model))
    engine = GenerationEngine(
        loaded, max_running=args.streams + 2, max_queued=64, max_adapters=4, prefill_chunk=args.prefill_chunk
    )
    engine.start()
    activities = [ProfilerActivity.CUDA] if env.cuda else [ProfilerActivity.CPU]

    async def burst() -> None:
        # The adapters, every decoding graph and every pass size first, as a server's start-up has
        # them: the worker would otherwise do that while idle between the bursts, and a burst wait.
        for ref in refs:
            await engine.preload_adapter(ref)
        log("warm_up", await engine.warm_up())
        # serve_check's prompts, two new tokens each: the first from the prefill, the second from a
        # decoding step, so the caches join the batch as they do in serving
        prompts = burst_prompts(args.streams, args.tiny)
        cases = [(p, refs[i % 2] if i % 3 else None) for i, p in enumerate(prompts)]
        for _ in range(2):  # a warm-up, then timed
            env.sync()
            t = time.perf_counter()
            outs = await asyncio.gather(*(stream(engine, p, ref, 2, None) for p, ref in cases))
            env.sync()
        log("prefill_wall_ms", round((time.perf_counter() - t) * 1e3, 1))
        log("prefill_first_token_ms", sorted(round(r.time_to_first_token_s * 1e3) for _, r, _ in outs))
        # With the host's side too: what the worker thread spends, and where it waits for the GPU
        # (aten::_local_scalar_dense is a value read back; the Synchronize calls are waits). The
        # profiler records the operators of the thread it starts on: the worker's.
        prof = profile(activities=sorted({ProfilerActivity.CPU, *activities}, key=str))
        await engine.call(prof.start)
        await asyncio.gather(*(stream(engine, p, ref, 2, None) for p, ref in cases))
        env.sync()
        await engine.call(prof.stop)
        log("prefill_kernels", kernels(prof, 1, args.top))
        log("prefill_host", host_ops(prof, args.top))
        log("prefill_gpu_idle", gpu_idle(prof, 15))

    async def run() -> None:
        if args.prefill:
            return await burst()
        ids = prompt_ids(1, 64)
        started = time.perf_counter()
        await stream(engine, ids, refs[0], 8, None)  # warm-up (and compilation, with --compile)
        await asyncio.gather(*(stream(engine, ids, refs[i % 2] if i % 3 else None, 4 + i // 4, None)
                               for i in range(args.streams)))  # fmt: skip
        log("warm_up_s", round(time.perf_counter() - started, 1))
        # One stream with an adapter.
        env.sync()
        t = time.perf_counter()
        _, result, _ = await stream(engine, ids, refs[0], args.tokens, None)
        env.sync()
        log("single_adapter_tokens_per_s", round(result.completion_tokens / (time.perf_counter() - t), 1))
        with profile(activities=activities) as prof:
            await stream(engine, ids, refs[0], args.tokens, None)
            env.sync()
        log("single_adapter_kernels", kernels(prof, args.tokens, args.top))
        # Many streams: short prompts, so the window is decoding steps.
        cases = [(prompt_ids(10 + i, 64), refs[i % 2] if i % 3 else None) for i in range(args.streams)]
        env.sync()
        t = time.perf_counter()
        outs = await asyncio.gather(*(stream(engine, p, ref, args.tokens, None) for p, ref in cases))
        env.sync()
        tokens = sum(r.completion_tokens for _, r, _ in outs)
        log("streams_tokens_per_s", round(tokens / (time.perf_counter() - t), 1))
        with profile(activities=activities) as prof:
            await asyncio.gather(*(stream(engine, p, ref, args.tokens, None) for p, ref in cases))
            env.sync()
        log("streams_kernels", kernels(prof, args.tokens, args.top))

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()
    name = "decode_profile-compiled.json" if args.compile else "decode_profile.json"
    name = f"prefill_profile-{args.prefill_chunk}.json" if args.prefill else name
    print(f"wrote {write_json(name, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
