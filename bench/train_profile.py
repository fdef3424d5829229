"""Train profile: where the project's trainer spends an optimizer step (QLoRA, Falcon-7B shape).

`bench/train_check.py` found the project's trainer (run B) at about 1.9 s per optimizer step
whether a step held 7,000 tokens or 900. This script finds where that time goes, in one run:

1. the same Falcon-7B-shaped random checkpoint and the same synthetic Alpaca data (2,000 records,
   log-normal lengths) as `bench/train_check.py` (its helpers, reused);
2. the project's trainer from `training.trainer.build_run(config)`, with train_check's run-B
   overrides (falcon-7b-finance.yaml: NF4, LoRA r 16 on the 4 Falcon linear layers, gradient
   checkpointing, paged 8-bit AdamW, batch 4 x accumulation 4, max_length 1024, length-grouped
   batches, logging every step);
3. one `trainer.train()` over one whole length-grouped mega-batch (31 steps: longest records
   first, shortest last), every phase timed with CUDA synchronised at its edges: data (fetch +
   collate + count, `get_batch_samples`), forward (model forward incl. TRL's fused LM head), loss
   and metrics (the rest of TRL's `compute_loss`: entropy / accuracy `.item()`s), backward (incl.
   gradient-checkpointing recompute), gradient clipping, optimizer step, scheduler + zero_grad,
   logging, and "other" (the step's wall time minus all of these);
4. `torch.profiler` (CPU + CUDA activities, no shapes, no stacks) over 3 long steps right after
   the warm-up (4-6) and 3 short steps at the mega-batch's end (29-31): top CUDA kernels and top CPU
   ops by self time, kernel launches per step, GPU busy time (union of kernel intervals) and idle
   fraction per step and per phase;
5. one micro-batch forward + backward outside the Trainer on the same model, at ~225 to ~7,000
   tokens: wall time, how long the GPU still ran after the CPU had issued everything, and summed
   kernel time (one profiled call), to separate per-call overhead from per-token cost;
6. 3 + 3 steps again (the same first steps) with gradient checkpointing off, peak memory, and
   the isolated micro-batches again.

Prints one JSON line per figure, writes $OUT/train_profile.json (rewritten after every part, so
a run cut short keeps what it did) and a Chrome trace when one comes under 16 MiB (raw, else
gzipped): the long window's, else (a real-sized window holds ~0.9 M events) that of the first
isolated micro-batch; ends with a short table. The profiler adds ~0.5 s of CPU time to a step:
read step times from the unprofiled steps.

    GPU:  python3 bench/train_profile.py
    CPU:  .venv/bin/python bench/train_profile.py --tiny   (a small Falcon on the CPU, same steps)

Needs torch, transformers, peft, bitsandbytes, trl, datasets, `app.llm` and `training`.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import gc
import gzip
import json
import os
import platform
import shutil
import statistics
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_check import Env, log, log_tree, out_dir, results, write_json  # noqa: E402
from bench.train_check import FINANCE_YAML, ensure_checkpoint, make_data  # noqa: E402

WORK = Path("/tmp/train_profile")
TRACE_LIMIT = 16 * 2**20
PHASES = ("data", "forward", "loss_metrics", "backward", "clip", "optimizer", "sched_zero", "log", "other")
STARTED = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - STARTED


def dump() -> Path:
    return write_json("train_profile.json", results)


def gib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**30, 3)


# ---------------------------------------------------------------------------------------------
# the phase recorder: a TrainerCallback plus wrappers around the Trainer's own methods


class Recorder:
    """Times every phase of every optimizer step with CUDA synchronised at its edges, marks each
    phase as a profiler range ("PH::<phase>@<step>"), and runs the profiler over chosen steps."""

    def __init__(self, trainer: Any, cuda: bool, device: torch.device, windows: list[tuple[int, int]]):
        from transformers import TrainerCallback

        self.trainer, self.cuda, self.device = trainer, cuda, device
        self.windows = windows  # [(first step, last step)], inclusive
        self.profs: dict[int, Any] = {}
        self.active: tuple[int, Any] | None = None
        self.events: list[tuple[int, str, float, float]] = []
        self.open: dict[str, tuple[float, Any]] = {}
        self.step = 0
        self.enabled = True
        self.tokens: dict[int, list[Any]] = defaultdict(list)
        self.logged: set[int] = set()
        rec = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                rec.begin("step")

            def on_substep_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                rec.mark("substep_end")

            def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                rec.begin("optimizer")

            def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                rec.end("optimizer")
                rec.begin("sched_zero")

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                rec.end("sched_zero")
                rec.end("step")

        self.callback = Callback()
        trainer.add_callback(self.callback)
        self._wrap("get_batch_samples", "data", before=self._before_data)
        self._wrap("compute_loss", "compute_loss")
        self._wrap("_clip_grad_norm", "clip")
        self._wrap("_get_grad_norm", "grad_norm")
        self._wrap("_maybe_log_save_evaluate", "log", before=self._before_log, after=self._after_log)
        self._wrap_backward()
        model = trainer.model
        self.hooks = [
            model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            model.register_forward_hook(self._post_forward),
        ]

    # -- timing primitives
    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def begin(self, phase: str) -> None:
        if not self.enabled:
            return
        self.sync()
        handle = torch.autograd.profiler.record_function(f"PH::{phase}@{self.step}")
        handle.__enter__()
        self.open[phase] = (time.perf_counter(), handle)

    def end(self, phase: str) -> None:
        if not self.enabled or phase not in self.open:
            return
        self.sync()
        t1 = time.perf_counter()
        t0, handle = self.open.pop(phase)
        handle.__exit__(None, None, None)
        self.events.append((self.step, phase, t0, t1))

    def mark(self, what: str) -> None:
        if self.enabled:
            t = time.perf_counter()
            self.events.append((self.step, what, t, t))

    # -- wrappers
    def _wrap(self, name: str, phase: str, before: Any = None, after: Any = None) -> None:
        original = getattr(self.trainer, name, None)
        if original is None:
            log(f"recorder.missing_{name}", "not timed on this transformers version")
            return
        rec = self

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not rec.enabled:
                return original(*args, **kwargs)
            record = before() if before else True
            if record:
                rec.begin(phase)
            try:
                return original(*args, **kwargs)
            finally:
                if record:
                    rec.end(phase)
                    if after:
                        after()

        setattr(self.trainer, name, wrapper)

    def _wrap_backward(self) -> None:
        accelerator = self.trainer.accelerator
        original = accelerator.backward
        rec = self

        def backward(*args: Any, **kwargs: Any) -> Any:
            rec.begin("backward")
            try:
                return original(*args, **kwargs)
            finally:
                rec.end("backward")

        accelerator.backward = backward

    def _before_data(self) -> bool:
        self.step = self.trainer.state.global_step + 1
        for index, (first, _last) in enumerate(self.windows):
            if self.step == first and self.active is None:
                self.active = (index, self._start_profiler())
        return True

    def _before_log(self) -> bool:
        self.step = self.trainer.state.global_step
        if self.step in self.logged:  # the epoch-end call repeats the last step's; not this step's time
            return False
        self.logged.add(self.step)
        return True

    def _after_log(self) -> None:
        if self.active is not None:
            index, prof = self.active
            if self.step == self.windows[index][1]:
                prof.stop()
                self.profs[index] = prof
                self.active = None

    def _start_profiler(self) -> Any:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        prof = profile(activities=activities, record_shapes=False, with_stack=False, profile_memory=False)
        prof.start()
        return prof

    def _pre_forward(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if not self.enabled or not torch.is_grad_enabled():
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if ids is not None:
            real = mask.sum() if mask is not None else torch.tensor(ids.numel())
            self.tokens[self.step].append((real, ids.numel(), ids.shape[0], tuple(ids.shape)))
        self.begin("forward")

    def _post_forward(self, module: Any, args: Any, output: Any) -> None:
        if self.enabled and torch.is_grad_enabled():
            self.end("forward")

    def detach(self) -> None:
        self.enabled = False
        for hook in self.hooks:
            hook.remove()
        if self.active is not None:  # training ended inside a window
            index, prof = self.active
            prof.stop()
            self.profs[index] = prof
            self.active = None

    # -- per-step figures
    def step_table(self) -> list[dict[str, Any]]:
        by_step: dict[int, list[tuple[str, float, float]]] = defaultdict(list)
        for step, phase, t0, t1 in self.events:
            by_step[step].append((phase, t0, t1))
        rows, previous_end = [], None
        for step in sorted(by_step):
            if step <= 0:
                continue
            items = by_step[step]
            total = defaultdict(float)
            counts = defaultdict(int)
            for phase, t0, t1 in items:
                total[phase] += t1 - t0
                counts[phase] += 1
            spans = [(t0, t1) for phase, t0, t1 in items if phase != "substep_end"]
            start, stop = min(s[0] for s in spans), max(s[1] for s in spans)
            step_end = max((t1 for phase, _t0, t1 in items if phase == "step"), default=None)
            phases = {
                "data": total["data"],
                "forward": total["forward"],
                "loss_metrics": total["compute_loss"] - total["forward"],
                "backward": total["backward"],
                "clip": total["clip"] + total["grad_norm"],
                "optimizer": total["optimizer"],
                "sched_zero": total["sched_zero"],
                "log": total["log"],
            }
            cycle = stop - start
            phases["other"] = cycle - sum(phases.values())
            toks = self.tokens.get(step, [])
            row = {
                "step": step,
                "cycle_s": round(cycle, 4),
                "end_to_end_s": None
                if previous_end is None or step_end is None
                else round(step_end - previous_end, 4),
                "real_tokens": int(sum(int(t[0]) for t in toks)),
                "padded_tokens": int(sum(t[1] for t in toks)),
                "rows": int(sum(t[2] for t in toks)),
                "micro_batches": len(toks),
                "shapes": [list(t[3]) for t in toks],
                **{f"{k}_s": round(v, 4) for k, v in phases.items()},
            }
            previous_end = step_end
            rows.append(row)
        return rows


def phase_means(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {}
    out: dict[str, Any] = {"steps": [r["step"] for r in rows]}
    out["cycle_s"] = round(statistics.fmean(r["cycle_s"] for r in rows), 4)
    for phase in PHASES:
        mean = statistics.fmean(r[f"{phase}_s"] for r in rows)
        out[f"{phase}_s"] = round(mean, 4)
        out[f"{phase}_share"] = round(mean / out["cycle_s"], 4) if out["cycle_s"] else None
    out["real_tokens"] = round(statistics.fmean(r["real_tokens"] for r in rows), 1)
    out["padded_tokens"] = round(statistics.fmean(r["padded_tokens"] for r in rows), 1)
    return out


# ---------------------------------------------------------------------------------------------
# profiler analysis


def merged_intervals(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, stop in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return [(a, b) for a, b in merged]


def busy_within(merged: list[tuple[float, float]], starts: list[float], lo: float, hi: float) -> float:
    """Length of the union of `merged` intervals inside [lo, hi]."""
    total = 0.0
    i = max(0, bisect.bisect_right(starts, lo) - 1)
    while i < len(merged) and merged[i][0] < hi:
        a, b = merged[i]
        total += max(0.0, min(b, hi) - max(a, lo))
        i += 1
    return total


def split_events(events: Any) -> tuple[list[Any], list[Any]]:
    """(CPU events, GPU work: kernels, copies, sets). The profiler mirrors record_function ranges
    onto the GPU timeline as user annotations; those are not GPU work and are left out."""
    from torch.autograd import DeviceType

    cpu, device = [], []
    for e in events:
        (cpu if e.device_type == DeviceType.CPU else device).append(e)
    cpu_names = {e.name for e in cpu}
    device = [
        e for e in device
        if not getattr(e, "is_user_annotation", False)
        and "annotation" not in str(getattr(e, "activity_type", "") or "")
        and e.name not in cpu_names and not e.name.startswith("PH::")
    ]  # fmt: skip
    return cpu, device


def analyse(prof: Any, cuda: bool, top: int = 25) -> dict[str, Any]:
    """Kernels, CPU ops, launches, GPU busy / idle per step and per phase, from one profiler window."""
    from torch.autograd import DeviceType

    t = time.perf_counter()
    events = prof.events()
    ranges, launches, aten = [], defaultdict(int), defaultdict(int)
    cpu_all, device_events = split_events(events)
    cpu_events = []
    for e in cpu_all:
        if e.name.startswith("PH::"):
            phase, _, step = e.name[4:].rpartition("@")
            ranges.append((phase, int(step), e.time_range.start, e.time_range.end))
        else:
            cpu_events.append(e)
    spans = [(e.time_range.start, e.time_range.end) for e in device_events]
    merged = merged_intervals(spans)
    starts = [a for a, _b in merged]

    # per step: its cycle is from its first range's start to its last range's end
    by_step: dict[int, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for phase, step, a, b in ranges:
        by_step[step][phase].append((a, b))
    launch_names = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
                    "cudaGraphLaunch", "cudaLaunchCooperativeKernel")  # fmt: skip
    sync_names = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize")
    steps_out = []
    step_spans = {}
    for step in sorted(by_step):
        phases = by_step[step]
        lo = min(a for spans_ in phases.values() for a, _ in spans_)
        hi = max(b for spans_ in phases.values() for _, b in spans_)
        step_spans[step] = (lo, hi)
    # count CPU-side launches / aten ops per step by their start time
    step_keys = sorted(step_spans)
    step_los = [step_spans[s][0] for s in step_keys]
    sync_us = defaultdict(float)
    for e in cpu_events:
        i = bisect.bisect_right(step_los, e.time_range.start) - 1
        if i < 0:
            continue
        step = step_keys[i]
        if e.time_range.start > step_spans[step][1]:
            continue
        if e.name in launch_names or "LaunchKernel" in e.name:
            launches[step] += 1
        elif e.name.startswith("aten::"):
            aten[step] += 1
        if e.name in sync_names:
            sync_us[step] += e.time_range.end - e.time_range.start
    kernels_per_step = defaultdict(int)
    kernel_sum_us = defaultdict(float)
    for e in device_events:
        i = bisect.bisect_right(step_los, e.time_range.start) - 1
        if i >= 0 and e.time_range.start <= step_spans[step_keys[i]][1]:
            kernels_per_step[step_keys[i]] += 1
            kernel_sum_us[step_keys[i]] += e.time_range.end - e.time_range.start
    phase_wall: dict[str, float] = defaultdict(float)
    phase_busy: dict[str, float] = defaultdict(float)
    for step in step_keys:
        lo, hi = step_spans[step]
        busy = busy_within(merged, starts, lo, hi)
        steps_out.append({
            "step": step,
            "wall_ms": round((hi - lo) / 1e3, 2),
            "gpu_busy_ms": round(busy / 1e3, 2),
            "kernel_sum_ms": round(kernel_sum_us[step] / 1e3, 2),
            "gpu_idle_fraction": round(1 - busy / (hi - lo), 4) if hi > lo and cuda else None,
            "device_events": kernels_per_step[step],
            "kernel_launches": launches[step],
            "aten_ops": aten[step],
            "sync_wait_ms": round(sync_us[step] / 1e3, 2),
        })  # fmt: skip
        for phase, spans_ in by_step[step].items():
            for a, b in spans_:
                phase_wall[phase] += b - a
                phase_busy[phase] += busy_within(merged, starts, a, b)
    n = max(1, len(step_keys))
    phases_out = {}
    for phase in sorted(phase_wall):
        wall, busy = phase_wall[phase], phase_busy[phase]
        phases_out[phase] = {
            "wall_ms_per_step": round(wall / n / 1e3, 2),
            "gpu_busy_ms_per_step": round(busy / n / 1e3, 2),
            "gpu_idle_fraction": round(1 - busy / wall, 4) if wall > 0 and cuda else None,
        }
    # loss_metrics = compute_loss minus forward; "other" = cycle minus every named phase
    if "compute_loss" in phases_out and "forward" in phases_out:
        w = phase_wall["compute_loss"] - phase_wall["forward"]
        b = phase_busy["compute_loss"] - phase_busy["forward"]
        phases_out["loss_metrics"] = {
            "wall_ms_per_step": round(w / n / 1e3, 2),
            "gpu_busy_ms_per_step": round(b / n / 1e3, 2),
            "gpu_idle_fraction": round(1 - b / w, 4) if w > 0 and cuda else None,
        }

    # top device events (kernels, memcpy, memset) by total time
    kern: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in device_events:
        k = kern[e.name]
        k[0] += 1
        k[1] += e.time_range.end - e.time_range.start
    top_kernels = [
        {"name": name[:200], "count": c, "total_ms": round(us / 1e3, 2), "mean_us": round(us / c, 1)}
        for name, (c, us) in sorted(kern.items(), key=lambda kv: -kv[1][1])[:top]
    ]
    # top CPU ops by self time (key_averages: self time excludes children)
    cpu_avg = []
    for evt in prof.key_averages():
        if (
            evt.device_type != DeviceType.CPU
            or evt.key.startswith("PH::")
            or evt.key.startswith("ProfilerStep")
        ):
            continue
        cpu_avg.append(evt)
    cpu_avg.sort(key=lambda evt: -evt.self_cpu_time_total)
    top_cpu = [
        {"name": evt.key[:200], "count": evt.count, "self_ms": round(evt.self_cpu_time_total / 1e3, 2),
         "total_ms": round(evt.cpu_time_total / 1e3, 2)}
        for evt in cpu_avg[:top]
    ]  # fmt: skip
    total_wall = sum(hi - lo for lo, hi in step_spans.values())
    total_busy = sum(busy_within(merged, starts, lo, hi) for lo, hi in step_spans.values())
    return {
        "steps": steps_out,
        "phases": phases_out,
        "window_wall_ms": round(total_wall / 1e3, 1),
        "window_gpu_busy_ms": round(total_busy / 1e3, 1),
        "window_gpu_idle_fraction": round(1 - total_busy / total_wall, 4) if total_wall and cuda else None,
        "top_kernels": top_kernels,
        "top_cpu_ops": top_cpu,
        "distinct_kernels": len(kern),
        "events": len(events),
        "analysis_s": round(time.perf_counter() - t, 1),
    }


# ---------------------------------------------------------------------------------------------
# one micro-batch, outside the Trainer


def isolated(
    model: Any, cuda: bool, device: torch.device, shapes: list[tuple[int, int]], reps: int
) -> tuple[list[dict], Any]:
    """Forward (TRL's fused LM head, as the trainer calls it) + backward of one micro-batch; also
    returns the first shape's profiler (a small trace to export when a training window is too big)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    model.train()
    out_rows = []
    first_prof = None
    gen = torch.Generator().manual_seed(7)
    for rows, length in shapes:
        row: dict[str, Any] = {"rows": rows, "length": length, "tokens": rows * length}
        try:
            ids = torch.randint(100, 65000, (rows, length), generator=gen).to(device)
            mask = torch.ones_like(ids)
            labels = ids.clone()
            labels[:, : int(0.3 * length)] = -100  # the prompt part carries no loss, as in training

            def call(
                inner_sync: bool, ids: Any = ids, mask: Any = mask, labels: Any = labels
            ) -> dict[str, float]:
                sync()
                t0 = time.perf_counter()
                with autocast():
                    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
                t1 = time.perf_counter()
                if inner_sync:
                    sync()
                t2 = time.perf_counter()
                out.loss.backward()
                t3 = time.perf_counter()
                sync()
                t4 = time.perf_counter()
                model.zero_grad(set_to_none=True)
                return {"total": t4 - t0, "fwd": t2 - t0, "bwd": t4 - t2, "issue": (t1 - t0) + (t3 - t2),
                        "tail": t4 - t3}  # fmt: skip

            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            call(False)  # warm-up
            plain = [call(False) for _ in range(reps)]
            split = call(True)
            row["total_ms"] = round(1e3 * statistics.median(c["total"] for c in plain), 1)
            row["cpu_issue_ms"] = round(1e3 * statistics.median(c["issue"] for c in plain), 1)
            row["gpu_tail_after_issue_ms"] = round(1e3 * statistics.median(c["tail"] for c in plain), 1)
            row["forward_ms_synced"] = round(1e3 * split["fwd"], 1)
            row["backward_ms_synced"] = round(1e3 * split["bwd"], 1)
            row["all_ms"] = [round(1e3 * c["total"], 1) for c in plain]
            if cuda:
                row["peak_alloc_GiB"] = gib(torch.cuda.max_memory_allocated(device))
            # one profiled call: summed GPU time and launches
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=activities, record_shapes=False, with_stack=False) as prof:
                call(False)
            _cpu, dev = split_events(prof.events())
            busy = sum(
                b - a for a, b in merged_intervals([(e.time_range.start, e.time_range.end) for e in dev])
            )
            row["profiled_gpu_busy_ms"] = round(busy / 1e3, 1)
            row["profiled_device_events"] = len(dev)
            row["profiled_launches"] = sum(
                1 for e in prof.events() if e.device_type == DeviceType.CPU and "LaunchKernel" in e.name
            )
            row["profiled_aten_ops"] = sum(
                1 for e in prof.events() if e.device_type == DeviceType.CPU and e.name.startswith("aten::")
            )
            row["profiled_events"] = len(prof.events())
            if first_prof is None:
                first_prof = prof
            del prof
        except torch.cuda.OutOfMemoryError as error:
            row["error"] = "out of memory: " + str(error)[:200]
        except Exception as error:  # keep the other shapes
            row["error"] = repr(error)[:300]
            traceback.print_exc()
        finally:
            model.zero_grad(set_to_none=True)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        log(f"isolated.{rows}x{length}", row)
        out_rows.append(row)
    return out_rows, first_prof


def fit(rows: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    pts = [(r["tokens"], r[key]) for r in rows if key in r and r.get(key) is not None]
    if len(pts) < 2:
        return None
    mx = statistics.fmean(x for x, _ in pts)
    my = statistics.fmean(y for _, y in pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else 0.0
    return {
        "fixed_ms": round(my - slope * mx, 1),
        "ms_per_1k_tokens": round(slope * 1e3, 1),
        "points": len(pts),
    }


# ---------------------------------------------------------------------------------------------
# the trainer runs


def config_for(args: argparse.Namespace, steps: int) -> Any:
    from training.config import load_config

    overrides = [
        "--base_model", args.ckpt,
        "--data.files", json.dumps([str(args.data)]),
        "--max_steps", str(steps),
        "--save_steps", "100000",
        "--eval_steps", "100000",
        "--data.eval_fraction", "0",
        "--report_to", "[]",
        "--logging_steps", "1",
        "--output_dir", str(WORK / "train-profile"),
        "--batch_size", str(args.batch),
        "--gradient_accumulation_steps", str(args.accum),
    ]  # fmt: skip
    config = load_config(FINANCE_YAML, overrides)
    if args.tiny:
        config.device = "cpu"
    return config


def checkpointing_field(trainer: Any) -> str:
    names = set(vars(trainer.args))
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def checkpointed_layers(model: Any) -> int:
    return sum(1 for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True)


def train_window(trainer: Any, cuda: bool, device: torch.device, windows: list[tuple[int, int]], steps: int,
                 tag: str) -> tuple[Recorder, dict[str, Any]]:  # fmt: skip
    trainer.args.max_steps = steps
    rec = Recorder(trainer, cuda, device, windows)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    error = None
    try:
        trainer.train()
    except Exception as e:  # keep what was measured
        error = repr(e)[:600]
        traceback.print_exc()
    train_s = time.perf_counter() - t
    rec.sync()
    rec.detach()
    trainer.remove_callback(rec.callback)
    body: dict[str, Any] = {
        "train_s": round(train_s, 1),
        "error": error,
        "peak_alloc_GiB": gib(torch.cuda.max_memory_allocated(device)) if cuda else None,
        "peak_reserved_GiB": gib(torch.cuda.max_memory_reserved(device)) if cuda else None,
        "checkpointed_layers": checkpointed_layers(trainer.model),
        "steps": rec.step_table(),
    }
    log(f"{tag}.train", {k: v for k, v in body.items() if k != "steps"})
    for row in body["steps"]:
        print(json.dumps({f"{tag}.step": row}), flush=True)
    return rec, body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a small Falcon on the CPU (checks the script)")
    parser.add_argument("--records", type=int)
    parser.add_argument("--steps", type=int, help="steps of the checkpointing-on run (one mega-batch)")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--accum", type=int, default=4)
    parser.add_argument("--budget-s", type=float, default=480, help="skip optional parts past this")
    args = parser.parse_args()

    env = Env(args.tiny)
    if not args.tiny and not torch.cuda.is_available():
        print("no CUDA GPU: run with --tiny on the CPU", file=sys.stderr)
        return 2
    cuda = env.cuda
    device = torch.device("cuda:0" if cuda else "cpu")
    args.records = args.records or (120 if args.tiny else 2000)
    args.steps = args.steps or (7 if args.tiny else 31)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    p = args.profile_steps
    long_window = (args.warmup + 1, args.warmup + p)
    short_window = (args.steps - p + 1, args.steps)
    windows = [long_window] + ([short_window] if short_window[0] > long_window[1] else [])
    args.ckpt = env.ckpt
    WORK.mkdir(parents=True, exist_ok=True)

    import bitsandbytes
    import datasets
    import peft
    import transformers
    import trl

    cpu_model = None
    with contextlib.suppress(OSError):
        cpu_model = next(
            (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")), None)  # fmt: skip
    log("versions", {
        "card": torch.cuda.get_device_name(0) if cuda else "CPU (--tiny)",
        "gpu_memory_GiB": gib(torch.cuda.get_device_properties(0).total_memory) if cuda else None,
        "cpu": cpu_model or platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl": trl.__version__,
        "datasets": datasets.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "python": sys.version.split()[0],
    })  # fmt: skip
    log_tree(ROOT)
    log("settings", {"records": args.records, "steps": args.steps, "warmup": args.warmup, "windows": windows,
                     "batch": args.batch, "accum": args.accum, "budget_s": args.budget_s})  # fmt: skip

    # -- checkpoint and data, as train_check builds them
    ensure_checkpoint(env)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(env.ckpt)
    args.data = WORK / "synthetic_alpaca.jsonl"
    spread = (60, 0.8, 20, 200) if args.tiny else (200, 0.8, 20, 1000)
    log("data", make_data(tokenizer, args.records, *spread, args.data))
    env.free()

    # -- the project's trainer
    from training.trainer import build_run

    t = time.perf_counter()
    run = build_run(config_for(args, args.steps))
    trainer = run.trainer
    field = checkpointing_field(trainer)
    log("build_run_s", round(time.perf_counter() - t, 1))
    log("trainer", {
        "class": type(trainer).__name__,
        "optimizer": str(trainer.args.optim),
        field: getattr(trainer.args, field),
        "checkpointing_kwargs": getattr(trainer.args, f"{field}_kwargs", None),
        "logging_steps": trainer.args.logging_steps,
        "bf16": trainer.args.bf16,
        "dataloader_num_workers": trainer.args.dataloader_num_workers,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "trainable_tensors": sum(1 for p in trainer.model.parameters() if p.requires_grad),
        "trainable_dtypes": sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad}),
        "attn_implementation": getattr(trainer.model.config, "_attn_implementation", None),
    })  # fmt: skip
    dump()

    # -- 1. checkpointing on: one whole mega-batch, two profiled windows
    rec_on, body_on = train_window(trainer, cuda, device, windows, args.steps, "gc_on")
    results["gc_on"] = body_on
    timed = [r for r in body_on["steps"] if r["step"] > args.warmup]
    results["gc_on.phase_means_after_warmup"] = phase_means(timed)
    for name, (first, last) in zip(("long", "short"), windows, strict=False):
        results[f"gc_on.phase_means_{name}"] = phase_means([r for r in timed if first <= r["step"] <= last])
    results["gc_on.phase_means_unprofiled"] = phase_means(
        [r for r in timed if not any(first <= r["step"] <= last for first, last in windows)]
    )
    log("gc_on.phase_means", {k: results[k] for k in results if k.startswith("gc_on.phase_means")})
    for index, name in enumerate(("long", "short")):
        prof = rec_on.profs.get(index)
        if prof is None:
            continue
        try:
            a = analyse(prof, cuda)
            results[f"gc_on.profile_{name}"] = a
            log(
                f"gc_on.profile_{name}.summary",
                {k: v for k, v in a.items() if k not in ("top_kernels", "top_cpu_ops")},
            )
        except Exception as error:
            log(f"gc_on.profile_{name}.error", repr(error)[:400])
            traceback.print_exc()
        if index > 0:
            del rec_on.profs[index], prof  # only the long window may still be exported
    dump()

    small_prof = None
    shapes = (
        [(1, 225), (4, 225), (16, 225), (4, 1024), (7, 1000)]
        if not args.tiny
        else [(1, 32), (4, 32), (4, 128)]
    )
    reps = 3
    # -- 2. one micro-batch outside the Trainer, checkpointing on
    if elapsed() < args.budget_s - 200:
        rows, small_prof = isolated(trainer.model, cuda, device, shapes, reps)
        results["isolated.gc_on"] = rows
        results["isolated.gc_on.fit_total"] = fit(rows, "total_ms")
        results["isolated.gc_on.fit_gpu_busy"] = fit(rows, "profiled_gpu_busy_ms")
        log("isolated.gc_on.fit", {"total": results["isolated.gc_on.fit_total"],
                                   "gpu_busy": results["isolated.gc_on.fit_gpu_busy"]})  # fmt: skip
        dump()
    else:
        log("isolated.gc_on.skipped", f"{elapsed():.0f} s used")

    # -- 3. checkpointing off: the same first steps again
    off_steps = args.warmup + p
    if elapsed() < args.budget_s - 120:
        setattr(trainer.args, field, False)
        base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
        if hasattr(base, "activation_checkpointing_disable"):
            base.activation_checkpointing_disable()
        else:
            base.gradient_checkpointing_disable()
        log("gc_off.checkpointed_layers_before", checkpointed_layers(trainer.model))
        from transformers import set_seed

        # the length-grouped sampler draws from the global RNG: seeded again, the same batches come again
        set_seed(trainer.args.seed)
        rec_off, body_off = train_window(trainer, cuda, device, [long_window], off_steps, "gc_off")
        results["gc_off"] = body_off
        timed_off = [r for r in body_off["steps"] if long_window[0] <= r["step"] <= long_window[1]]
        results["gc_off.phase_means_long"] = phase_means(timed_off)
        on_same = [r for r in body_on["steps"] if long_window[0] <= r["step"] <= long_window[1]]
        results["gc_off.same_batches_as_gc_on"] = [r["real_tokens"] for r in timed_off] == [
            r["real_tokens"] for r in on_same
        ]
        log("gc_off.phase_means_long", results["gc_off.phase_means_long"])
        log("gc_off.same_batches_as_gc_on", results["gc_off.same_batches_as_gc_on"])
        prof = rec_off.profs.get(0)
        if prof is not None:
            try:
                a = analyse(prof, cuda)
                results["gc_off.profile_long"] = a
                log(
                    "gc_off.profile_long.summary",
                    {k: v for k, v in a.items() if k not in ("top_kernels", "top_cpu_ops")},
                )
            except Exception as error:
                log("gc_off.profile_long.error", repr(error)[:400])
        del prof, rec_off
        dump()
        if elapsed() < args.budget_s - 60:
            rows, _ = isolated(trainer.model, cuda, device, shapes, reps)
            results["isolated.gc_off"] = rows
            results["isolated.gc_off.fit_total"] = fit(rows, "total_ms")
            results["isolated.gc_off.fit_gpu_busy"] = fit(rows, "profiled_gpu_busy_ms")
            log("isolated.gc_off.fit", {"total": results["isolated.gc_off.fit_total"],
                                        "gpu_busy": results["isolated.gc_off.fit_gpu_busy"]})  # fmt: skip
            dump()
        else:
            log("isolated.gc_off.skipped", f"{elapsed():.0f} s used")
    else:
        log("gc_off.skipped", f"{elapsed():.0f} s used")

    # -- 4. a Chrome trace, only when it comes back under 16 MiB (raw, else gzipped): the long
    # window when it is small enough to write, else one isolated micro-batch (the first shape)
    candidates = [("gc_on_long_window", rec_on.profs.get(0)), ("isolated_first_shape", small_prof)]
    for label, prof in candidates:
        if prof is None or elapsed() > args.budget_s - 30:
            continue
        n_events = len(prof.events())
        if n_events > 400_000:
            log(f"trace.{label}.skipped", f"{n_events} events: too big for 16 MiB even gzipped")
            continue
        try:
            info = export_trace(prof, label)
            info["events"] = n_events
            log(f"trace.{label}", info)
            if info.get("written"):
                break
        except Exception as error:
            log(f"trace.{label}.error", repr(error)[:300])
    log("total_wall_s", round(elapsed(), 1))
    path = dump()
    print(f"\nwrote {path}\n")
    print(summary_table(), flush=True)
    return 0


def export_trace(prof: Any, label: str) -> dict[str, Any]:
    t = time.perf_counter()
    raw = WORK / f"train_profile_trace_{label}.json"
    prof.export_chrome_trace(str(raw))
    size = raw.stat().st_size
    info: dict[str, Any] = {"raw_bytes": size, "written": None}
    if size <= TRACE_LIMIT:
        shutil.copy(raw, out_dir() / raw.name)
        info["written"] = raw.name
    else:
        packed = out_dir() / (raw.name + ".gz")
        with raw.open("rb") as src, gzip.open(packed, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
        info["gz_bytes"] = packed.stat().st_size
        if info["gz_bytes"] <= TRACE_LIMIT:
            info["written"] = packed.name
        else:
            packed.unlink()
    raw.unlink()
    info["export_s"] = round(time.perf_counter() - t, 1)
    return info


def summary_table() -> str:
    lines = []
    card = results.get("versions", {}).get("card")
    lines.append(f"card: {card}")
    cols = [
        ("gc_on.phase_means_long", "GC on, long steps"),
        ("gc_on.phase_means_short", "GC on, short steps"),
        ("gc_on.phase_means_unprofiled", "GC on, unprofiled steps"),
        ("gc_off.phase_means_long", "GC off, long steps"),
    ]
    cols = [(k, n) for k, n in cols if results.get(k)]
    if cols:
        lines.append("| per optimizer step (s) | " + " | ".join(n for _, n in cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        lines.append(
            "| real / padded tokens | "
            + " | ".join(
                f"{results[k]['real_tokens']:.0f} / {results[k]['padded_tokens']:.0f}" for k, _ in cols
            )
            + " |"
        )
        for phase in ("cycle", *PHASES):
            cells = []
            for k, _ in cols:
                v = results[k].get(f"{phase}_s")
                share = results[k].get(f"{phase}_share")
                cells.append(
                    "-" if v is None else f"{v:.3f}" + ("" if phase == "cycle" else f" ({share:.0%})")
                )
            lines.append(f"| {phase} | " + " | ".join(cells) + " |")
        cells_idle, cells_busy, cells_launch = [], [], []
        for k, _ in cols:
            pk = {
                "gc_on.phase_means_long": "gc_on.profile_long",
                "gc_on.phase_means_short": "gc_on.profile_short",
                "gc_off.phase_means_long": "gc_off.profile_long",
            }.get(k)
            a = results.get(pk) if pk else None
            if not a:
                cells_idle.append("-")
                cells_busy.append("-")
                cells_launch.append("-")
                continue
            steps = a["steps"]
            idle = a.get("window_gpu_idle_fraction")
            cells_idle.append("-" if idle is None else f"{idle:.0%}")
            cells_busy.append(f"{statistics.fmean(s['gpu_busy_ms'] for s in steps) / 1e3:.3f}")
            cells_launch.append(f"{statistics.fmean(s['kernel_launches'] for s in steps):,.0f}")
        lines.append("| profiled: GPU busy (s) | " + " | ".join(cells_busy) + " |")
        lines.append("| profiled: GPU idle fraction | " + " | ".join(cells_idle) + " |")
        lines.append("| profiled: kernel launches | " + " | ".join(cells_launch) + " |")
        peaks = {"gc_on": results.get("gc_on", {}).get("peak_alloc_GiB"),
                 "gc_off": results.get("gc_off", {}).get("peak_alloc_GiB")}  # fmt: skip
        lines.append(f"peak allocated GiB: GC on {peaks['gc_on']}, GC off {peaks['gc_off']}")
    for mode in ("gc_on", "gc_off"):
        rows = results.get(f"isolated.{mode}")
        if not rows:
            continue
        lines.append(f"\none micro-batch fwd+bwd outside the Trainer, {mode.replace('_', ' ')} (ms):")
        lines.append("| rows x length | tokens | wall | CPU issue | GPU tail | GPU busy | launches |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['rows']} x {r['length']} | {r['tokens']} | {r['error'][:40]} | | | | |")
                continue
            lines.append(
                f"| {r['rows']} x {r['length']} | {r['tokens']} | {r['total_ms']} | {r['cpu_issue_ms']} | "
                f"{r['gpu_tail_after_issue_ms']} | {r['profiled_gpu_busy_ms']} | {r['profiled_launches']} |"
            )
        f1, f2 = results.get(f"isolated.{mode}.fit_total"), results.get(f"isolated.{mode}.fit_gpu_busy")
        if f1:
            busy = f"{f2['fixed_ms']} ms + {f2['ms_per_1k_tokens']} ms/1k" if f2 else "-"
            lines.append(
                f"fit wall: {f1['fixed_ms']} ms + {f1['ms_per_1k_tokens']} ms per 1k tokens; GPU busy: {busy}"
            )
    a = results.get("gc_on.profile_short") or results.get("gc_on.profile_long")
    if a:
        window = "short" if "gc_on.profile_short" in results else "long"
        lines.append(f"\ntop CPU ops by self time (GC on, {window} window, 3 steps):")
        for op in a["top_cpu_ops"][:8]:
            lines.append(f"  {op['self_ms']:>9.1f} ms  x{op['count']:<7} {op['name'][:70]}")
        lines.append("top GPU kernels by time:")
        for k in a["top_kernels"][:8]:
            lines.append(f"  {k['total_ms']:>9.1f} ms  x{k['count']:<7} {k['name'][:70]}")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as error:
        log("fatal", repr(error)[:600])
        traceback.print_exc()
        with contextlib.suppress(Exception):
            dump()
        sys.exit(1)
