"""Adapter check: upload-to-first-token through the real registry path, and decode speed with adapters.

One run, on the same Falcon-7B-shaped random checkpoint as `bench/gpu_check.py` (built the same way,
loaded NF4 through `app.llm.loader.load_model`):

1. rank-16 LoRA adapters on every linear layer (query_key_value, dense, dense_h_to_4h, dense_4h_to_h),
   written as PEFT saves them (adapter_config.json + fp32 adapter_model.safetensors, random A and B)
   without wrapping the served model, and zipped;
2. upload-to-first-token, per adapter: `publish_archive` (unpack, inspect, probe on the model through
   the engine, content-addressed store, SQL registry, catalog refresh; each stage timed by wrapping
   the functions the intake calls), then at once a request through `catalog.ref(catalog.resolve(name))`
   and the time to its first streamed token;
3. one stream through the engine, greedy, 64-token prompt, 128 new tokens, median of 3 after a
   warm-up: bare base before any adapter, bare base with adapters resident, adapter 1, adapter 2;
   for reference in the same run the seed's way: plain `model.generate` on the bare base, and PEFT
   `generate` with adapter 1 (by `adapter_names=` and by `set_adapter`), run on the engine's worker
   thread between rounds;
4. whether the engine's greedy tokens with adapter 1 equal PEFT generate's (first 32);
5. `torch.cuda.memory_allocated()` with the base only and with 2 adapters resident;
6. a short table.

Prints one JSON line per figure, writes $OUT/adapter_check.json (or /tmp) as it goes, ends with the table.

    GPU:  python3 bench/adapter_check.py
    CPU:  .venv/bin/python bench/adapter_check.py --tiny   (a small Falcon on the CPU, same steps)

Needs torch, transformers, peft, bitsandbytes, safetensors, SQLAlchemy (+ greenlet, aiosqlite):
`app.llm` and `app.registry`, nothing from the web stack.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import shutil
import statistics
import sys
import time
import traceback
import zipfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_check import (
    COMPARE,
    EOS_ID,
    NEW_TOKENS,
    PROMPT_LEN,
    Env,
    Recorder,
    generate,
    gib,
    log,
    make_checkpoint,
    prompt,
    results,
    write_json,
)

TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
RANK = 16
ALPHA = 32
INIT_STD = 0.01
N_ADAPTERS = 2
SERVED_NAME = "falcon-7b-random"
ADAPTER_NAMES = ("finance", "hr")
FIRST_REQUEST_TOKENS = 8
# Optional reference figures are skipped past this many seconds of the script's run, so that the
# whole run ends well inside one device call (540 s) even if adapters decode slowly.
SOFT_DEADLINE_S = 380.0

STARTED = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - STARTED


def save() -> Path:
    return write_json("adapter_check.json", results)


def r3(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


# ---------------------------------------------------------------------------------------------
# 1. adapters, written as PEFT saves them, without touching the served model


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def make_adapter(env: Env, linear_layers: dict[str, tuple[int, int]], out_dir: Path, seed: int) -> Path:
    """adapter_config.json + adapter_model.safetensors (fp32, random A and B) in out_dir, zipped."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules=list(TARGETS),
        task_type="CAUSAL_LM",
        base_model_name_or_path=env.ckpt,
    ).save_pretrained(str(out_dir))
    config = json.loads((out_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA", config["peft_type"]

    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, (fan_in, fan_out) in sorted(linear_layers.items()):
        if name.rsplit(".", 1)[-1] not in TARGETS:
            continue
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(RANK, fan_in, generator=g) * INIT_STD
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(fan_out, RANK, generator=g) * INIT_STD
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})

    archive = out_dir.with_suffix(".zip")
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
        for path in sorted(out_dir.iterdir()):
            z.write(path, path.name)
    return archive


# ---------------------------------------------------------------------------------------------
# the registry around the engine, wired as app/services.py does, on SQLite in /tmp


def make_database(path: Path) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from app.models import Base, RegistryState, Role, User

    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    sync = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(sync)
    with Session(sync) as s:
        s.add(RegistryState(id=1, revision=0))
        s.add(User(id=1, email="bench-admin@example.com", password_hash="x", role=Role.ADMIN))
        s.commit()
    sync.dispose()


class StageTimer:
    """Wraps the functions publish_archive calls, so each stage of a real publish is timed."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def _add(self, label: str, dt: float) -> None:
        self.times[label] = self.times.get(label, 0.0) + dt

    def sync(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._add(label, time.perf_counter() - t)

        return timed

    def async_(self, label: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                self._add(label, time.perf_counter() - t)

        return timed


def instrument(timer: StageTimer, engine: Any, store: Any, catalog: Any) -> None:
    import app.registry.intake as intake_mod
    import app.registry.service as service_mod

    intake_mod.extract_adapter_archive = timer.sync("unpack", intake_mod.extract_adapter_archive)
    intake_mod.inspect_adapter = timer.sync("inspect", intake_mod.inspect_adapter)
    engine.probe_adapter = timer.async_("probe", engine.probe_adapter)
    store.commit = timer.sync("store_commit", store.commit)
    service_mod.publish_version = timer.async_("register_sql", service_mod.publish_version)
    catalog.refresh = timer.async_("catalog_refresh", catalog.refresh)


# ---------------------------------------------------------------------------------------------
# engine helpers (everything runs in one event loop)


async def engine_gen(
    engine: Any, ids: list[int], max_tokens: int, adapter: Any = None
) -> tuple[float | None, Any]:
    """Submit, stream to the end; returns (seconds from submit to the first TextDelta, result)."""
    from app.llm.engine import GenerationRequest, SamplingParams

    t = time.perf_counter()
    stream = engine.submit(
        GenerationRequest(
            prompt_ids=ids, sampling=SamplingParams(max_tokens=max_tokens, temperature=0), adapter=adapter
        )
    )
    first = None
    async for _ in stream:
        if first is None:
            first = time.perf_counter() - t
    return first, stream.result


async def engine_speed(
    label: str, engine: Any, ids: list[int], warm_ids: list[int], adapter: Any, rec: Recorder
) -> list[int]:
    """Warm-up, then 3 x 128 tokens; logs the median tokens/s; returns the tokens of the median run."""
    await engine_gen(engine, warm_ids, 8, adapter)
    runs = []
    for _ in range(3):
        rec.tokens.clear()
        _, res = await engine_gen(engine, ids, NEW_TOKENS, adapter)
        runs.append((res, list(rec.tokens)))
    log(
        f"engine.{label}.runs",
        [
            {
                "completion_tokens": res.completion_tokens,
                "finish": res.finish_reason,
                "duration_s": r3(res.duration_s),
                "ttft_s": r3(res.time_to_first_token_s),
                "error": res.error,
            }
            for res, _ in runs
        ],
    )
    rates = [res.completion_tokens / res.duration_s for res, _ in runs]
    tok_s = statistics.median(rates)
    res, tokens = sorted(runs, key=lambda r: r[0].completion_tokens / r[0].duration_s)[1]
    log(f"engine.{label}.tok_s", round(tok_s, 2))
    log(f"engine.{label}.ms_per_token", round(1000 / tok_s, 2))
    log(f"engine.{label}.completion_tokens", res.completion_tokens)
    if res.completion_tokens > 1 and res.time_to_first_token_s is not None:
        log(
            f"engine.{label}.decode_tok_s",
            round((res.completion_tokens - 1) / (res.duration_s - res.time_to_first_token_s), 2),
        )
    save()
    return tokens


def generate_speed(label: str, model: Any, ids: torch.Tensor, env: Env, **kw: Any) -> list[int]:
    """Plain (PEFT) generate: warm-up, then 3 x 128 tokens; logs the median tokens/s."""
    generate(model, ids, 8, env, **kw)
    times, out = [], None
    for _ in range(3):
        out, dt = generate(model, ids, NEW_TOKENS, env, **kw)
        assert out.shape[1] - ids.shape[1] == NEW_TOKENS
        times.append(dt)
    dt = statistics.median(times)
    log(f"{label}.times_s", [round(x, 3) for x in times])
    log(f"{label}.tok_s", round(NEW_TOKENS / dt, 2))
    log(f"{label}.ms_per_token", round(1000 * dt / NEW_TOKENS, 2))
    save()
    return out[0, ids.shape[1] :].tolist()


def compare(label: str, a: list[int], b: list[int]) -> None:
    a, b = a[:COMPARE], b[:COMPARE]
    prefix = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    log(f"compare.{label}.first32_matching_prefix", prefix)
    log(f"compare.{label}.first32_equal_positions", sum(x == y for x, y in zip(a, b, strict=False)))


# ---------------------------------------------------------------------------------------------


async def run(env: Env) -> None:
    from app.db import create_engine, create_sessionmaker
    from app.llm.engine import GenerationEngine
    from app.llm.loader import ModelSpec, load_model
    from app.models import User
    from app.registry.archive import ArchiveLimits
    from app.registry.catalog import Catalog
    from app.registry.inspect import BaseIdentity
    from app.registry.intake import Intake, publish_archive
    from app.registry.store import AdapterStore

    # -- load the base through the project's loader
    env.free()
    t = time.perf_counter()
    loaded = load_model(ModelSpec(env.ckpt, quantization="nf4", device=env.device))
    env.sync()
    log("load.s", round(time.perf_counter() - t, 1))
    log("load.quantized_layers", loaded.quantized_layers)
    if env.cuda:
        log("mem.after_load_GiB", gib(env.allocated()))

    # -- 1. adapters (CPU work; the model is not touched)
    work = fresh_dir(Path("/tmp/adapter_check-tiny" if env.tiny else "/tmp/adapter_check"))
    archives = []
    for i in range(N_ADAPTERS):
        t = time.perf_counter()
        archive = make_adapter(env, loaded.linear_layers, work / f"adapter{i + 1}", seed=100 + i)
        archives.append(archive)
        log(f"adapter{i + 1}.make_s", round(time.perf_counter() - t, 2))
    folder = archives[0].with_suffix("")
    log("adapter.safetensors_bytes", (folder / "adapter_model.safetensors").stat().st_size)
    log("adapter.archive_bytes", archives[0].stat().st_size)
    log("adapter.tensors", 2 * sum(1 for n in loaded.linear_layers if n.rsplit(".", 1)[-1] in TARGETS))
    save()

    # -- the registry, as app/services.py wires it
    db_path = work / "bench.db"
    make_database(db_path)
    db_engine = create_engine(f"sqlite+aiosqlite:///{db_path}")
    sessionmaker = create_sessionmaker(engine=db_engine)
    engine = GenerationEngine(loaded, max_running=1, max_queued=4, max_adapters=8)
    store = AdapterStore(work / "store")
    catalog = Catalog(sessionmaker, store, engine, base_name=SERVED_NAME)
    intake = Intake(
        store=store,
        engine=engine,
        catalog=catalog,
        base=BaseIdentity(model_id=env.ckpt, served_name=SERVED_NAME, fingerprint=loaded.fingerprint),
        limits=ArchiveLimits(),
        max_rank=256,
    )
    timer = StageTimer()
    rec = Recorder()

    # -- 3 (seed reference). plain model.generate on the bare base; pick a prompt without EOS
    ids_dev = None
    for seed in range(5):
        candidate = prompt(seed, PROMPT_LEN, env.device)
        out, _ = generate(loaded.model, candidate, NEW_TOKENS, env)
        # (min_new_tokens forces 128; check that greedy alone would not have stopped)
        if EOS_ID not in out[0, PROMPT_LEN:].tolist():
            ids_dev = candidate
            log("prompt.seed", seed)
            break
    assert ids_dev is not None, "no prompt among 5 seeds avoided EOS"
    ids = ids_dev[0].tolist()
    warm_ids = prompt(999, PROMPT_LEN, "cpu")[0].tolist()
    gen_base = generate_speed("generate.base", loaded.model, ids_dev, env)

    engine.start()
    try:
        await catalog.refresh()
        async with sessionmaker() as db:
            actor = await db.get(User, 1)
        assert actor is not None

        # -- 3(a). engine, bare base, before any adapter exists
        base_before = await engine_speed("base_before", engine, ids, warm_ids, None, rec)
        compare("engine_base_before_vs_generate_base", base_before, gen_base)
        gc.collect()
        if env.cuda:
            log("mem.base_only_GiB", gib(env.allocated()))
            mem_base = env.allocated()

        # -- 2. upload to first token, adapter by adapter
        instrument(timer, engine, store, catalog)
        refs = []
        for i, (name, archive) in enumerate(zip(ADAPTER_NAMES, archives, strict=False)):
            key = f"adapter{i + 1}"
            timer.times.clear()
            loads_before = engine.adapters.loads
            t0 = time.perf_counter()
            async with sessionmaker() as db:
                version = await publish_archive(
                    db, intake, archive=archive, filename=archive.name, name=name, notes="bench", actor=actor
                )
            t1 = time.perf_counter()
            ref = catalog.ref(catalog.resolve(name))
            first, res = await engine_gen(engine, ids, FIRST_REQUEST_TOKENS, ref)
            t2 = t1 + (first or float("nan"))
            stages = {k: round(v, 3) for k, v in timer.times.items()}
            stages["other"] = round((t1 - t0) - sum(timer.times.values()), 3)
            log(f"{key}.publish_s", round(t1 - t0, 3))
            log(f"{key}.publish_stages_s", stages)
            log(f"{key}.first_token_after_publish_s", r3(first))
            log(f"{key}.engine_ttft_s", r3(res.time_to_first_token_s))
            log(f"{key}.upload_to_first_token_s", round(t2 - t0, 3))
            log(
                f"{key}.first_request",
                {"tokens": res.completion_tokens, "finish": res.finish_reason, "error": res.error},
            )
            log(
                f"{key}.registered",
                {"name": name, "version": version.version, "key": ref.key, "sha256": version.sha256[:12]},
            )
            log(f"{key}.peft_loads_during", engine.adapters.loads - loads_before)
            refs.append(ref)
            save()
        log("adapters.resident", engine.adapters.resident)
        gc.collect()
        if env.cuda:
            log("mem.two_adapters_GiB", gib(env.allocated()))
            log("mem.two_adapters_delta_MiB", round((env.allocated() - mem_base) / 2**20, 1))
        save()

        # -- 3(b-d). engine speeds with the PEFT wrapper in place
        base_after = await engine_speed("base_after", engine, ids, warm_ids, None, rec)
        a1 = await engine_speed("adapter1", engine, ids, warm_ids, refs[0], rec)
        a2 = await engine_speed("adapter2", engine, ids, warm_ids, refs[1], rec)
        compare("engine_base_after_vs_before", base_after, base_before)
        compare("engine_adapter1_vs_base", a1, base_before)
        compare("engine_adapter2_vs_adapter1", a2, a1)

        # -- 3/4. the seed's way, PEFT generate, on the engine's worker thread between rounds
        pm = engine.adapters.peft_model
        key1 = refs[0].key
        peft_a1 = await engine.call(
            lambda: generate_speed("peft_generate.adapter1_names", pm, ids_dev, env, adapter_names=[key1])
        )
        compare("engine_adapter1_vs_peft_generate_adapter1", a1, peft_a1)
        if a1[:COMPARE] != peft_a1[:COMPARE]:
            pos = next(i for i, (x, y) in enumerate(zip(a1, peft_a1, strict=False)) if x != y)

            def margin() -> dict[str, Any]:
                with torch.inference_mode():
                    sc = (
                        pm.generate(
                            ids_dev,
                            attention_mask=torch.ones_like(ids_dev),
                            max_new_tokens=pos + 1,
                            do_sample=False,
                            pad_token_id=EOS_ID,
                            output_scores=True,
                            return_dict_in_generate=True,
                            adapter_names=[key1],
                        )
                        .scores[pos][0]
                        .float()
                    )
                top = sc.topk(2)
                return {
                    "position": pos,
                    "peft_generate": peft_a1[pos],
                    "engine": a1[pos],
                    "peft_top2_logits": [round(v, 4) for v in top.values.tolist()],
                    "peft_logit_of_engine_token": round(float(sc[a1[pos]]), 4),
                }

            log("compare.adapter1_mismatch", await engine.call(margin))

        if elapsed() < SOFT_DEADLINE_S:

            def active_path() -> list[int]:
                previous = pm.active_adapter
                pm.set_adapter(key1)
                try:
                    return generate_speed("peft_generate.adapter1_set_adapter", pm, ids_dev, env)
                finally:
                    pm.set_adapter(previous)

            peft_active = await engine.call(active_path)
            compare("peft_set_adapter_vs_adapter_names", peft_active, peft_a1)
        else:
            log("peft_generate.adapter1_set_adapter.skipped", f"{elapsed():.0f} s elapsed")
    finally:
        engine.shutdown()
        rec.restore()
        await db_engine.dispose()


# ---------------------------------------------------------------------------------------------


def table() -> str:
    r = results.get
    v = r("versions", {})

    def eng(label: str) -> str:
        tok = r(f"engine.{label}.tok_s")
        return "-" if tok is None else f"{tok} tok/s  ({r(f'engine.{label}.ms_per_token')} ms/token)"

    def gen(label: str) -> str:
        tok = r(f"{label}.tok_s")
        return "-" if tok is None else f"{tok} tok/s  ({r(f'{label}.ms_per_token')} ms/token)"

    def pub(key: str) -> str:
        st = r(f"{key}.publish_stages_s", {})
        parts = " / ".join(f"{k} {val}" for k, val in st.items())
        return f"{r(f'{key}.publish_s')} s  ({parts})"

    def cmp(label: str) -> str:
        equal = r(f"compare.{label}.first32_equal_positions")
        return f"{equal} of 32 (prefix {r(f'compare.{label}.first32_matching_prefix')})"

    rows = [
        ("card", v.get("card")),
        (
            "torch / transformers / bitsandbytes / peft / sqlalchemy",
            " / ".join(
                str(v.get(k)) for k in ("torch", "transformers", "bitsandbytes", "peft", "sqlalchemy")
            ),
        ),
        (
            "adapter: safetensors / zip bytes",
            f"{r('adapter.safetensors_bytes')} / {r('adapter.archive_bytes')}",
        ),
        (
            "memory_allocated base only / 2 adapters, GiB",
            f"{r('mem.base_only_GiB')} / {r('mem.two_adapters_GiB')}"
            f"  (+{r('mem.two_adapters_delta_MiB')} MiB)",
        ),
    ]
    for i in (1, 2):
        key = f"adapter{i}"
        rows += [
            (f"{key} publish", pub(key)),
            (
                f"{key} first token after publish / upload-to-first-token, s",
                f"{r(f'{key}.first_token_after_publish_s')} / {r(f'{key}.upload_to_first_token_s')}",
            ),
        ]
    rows += [
        ("engine, bare base before adapters", eng("base_before")),
        ("engine, bare base with adapters resident", eng("base_after")),
        ("engine, adapter 1", eng("adapter1")),
        ("engine, adapter 2", eng("adapter2")),
        ("generate, bare base (seed)", gen("generate.base")),
        ("PEFT generate, adapter 1, adapter_names=", gen("peft_generate.adapter1_names")),
        ("PEFT generate, adapter 1, set_adapter", gen("peft_generate.adapter1_set_adapter")),
        (
            "greedy: engine adapter1 vs PEFT generate adapter1",
            cmp("engine_adapter1_vs_peft_generate_adapter1"),
        ),
        ("greedy: engine base after vs before", cmp("engine_base_after_vs_before")),
        ("greedy: engine adapter1 vs base (should differ)", cmp("engine_adapter1_vs_base")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {val}" for k, val in rows)


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
    import sqlalchemy
    import transformers

    log(
        "versions",
        {
            "card": torch.cuda.get_device_name(0) if env.cuda else "CPU (--tiny)",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "bitsandbytes": bitsandbytes.__version__,
            "peft": peft.__version__,
            "sqlalchemy": sqlalchemy.__version__,
            "python": sys.version.split()[0],
        },
    )
    # Fail fast (before the checkpoint is built) if the registry's packages did not travel.
    import aiosqlite  # noqa: F401

    import app.db
    import app.registry.intake  # noqa: F401

    failed = False
    try:
        make_checkpoint(env)
        asyncio.run(run(env))
    except Exception as error:
        failed = True
        log("error", repr(error)[:600])
        traceback.print_exc()
    log("wall_s", round(elapsed(), 1))
    save()
    print(f"\nwrote {save()}\n")
    print(table(), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
