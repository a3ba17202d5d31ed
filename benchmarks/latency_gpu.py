"""Completion latency on a GPU: StarCoderBase-1B's shape, random bf16 weights (`latency.py --device cuda`).

    python benchmarks/latency.py --device cuda --shape starcoderbase-1b --json $OUT/latency.json
    python benchmarks/latency.py --device cpu --shape tiny --json -     # a smoke run of this code on a CPU

Nothing is downloaded: the model is built from its config on the GPU with random weights; the
tokenizer is SmolLM2's (49,152 tokens, like StarCoder's) plus the StarCoder FIM tokens: from
`--tokenizer DIR` (default `.gpu/tokenizer` when present: a copy saved with
`load_tokenizer("embedded").save_pretrained`, for machines without the embedded package), else the
embedded package's. The end tokens' output rows are zeroed, so that every request
generates its 32 tokens (the rows report the mean). Rows, in this order:

    generate          plain `model.generate`, greedy, a 1,024-token PSM prompt cut from textwrap.py,
                      32 new tokens, batch 1
    engine warm-up    compiling the engine's decode step, one graph per batch bucket (1, 4, 16)
    engine            `Decoder.run` on the same prompt: static cache + CUDA graphs  (target p50 <= 50 ms)
    engine bN         per bucket: prefill of N prompts, and one decoding step      (diagnostics)
                      These rows come once per `--graphs` variant: `trees` (the compiler's CUDA
                      graph trees), `captured` (graphs captured per bucket), then modifiers:
                      `+eager-prefill` (the same engine, single prompts prefilled eagerly, not
                      through prefill graphs), `+prefill` (the same engine, its prefill compiled),
                      `+flex` (an engine whose steps use FlexAttention's decoding kernel),
                      `+sdpa` (steps on transformers' SDPA in every bucket: the default until the
                      engine timed its candidates at start-up and took the fastest),
                      `+cublas` (an engine whose batch-of-one steps multiply through cuBLAS, not
                      the default matrix-vector kernels; its bucket of 1 only)
    attention bN      (CUDA, --attention-rows; run 8 measured them, and the engine's warm-up times
                      its candidates itself) one step's attention over all layers' caches, replayed as a CUDA graph:
                      fimtune's grouped SDPA, compiled FlexAttention and two batched matrix products
                      (`matmul_decoding`) against transformers' SDPA,
                      which repeats StarCoder's single key/value head 16 times, with the engine's
                      additive mask and with a boolean one (its mask before)      (diagnostics)
    profile bN        (--profile-step DIR) 16 decoding steps of the first variant under torch.profiler,
                      at batch 1 and 16: kernel time per step against its wall time, kernels per
                      step, the largest kernels' shares; whole tables in DIR  (diagnostics)
    server ...        uvicorn on 127.0.0.1, 16 clients x 10 OpenAI `/v1/completions` FIM requests
                      (1,024 + 32 tokens each; --requests-per-client; target p95 <= 200 ms).
                      First a round of the server's defaults, reported apart (the first prompts of
                      each shape), then the compared rows (--passes N: N times, every other pass
                      in reverse order, the engine-process rows in the first only), each with its
                      eager prefills' host time on shapes seen before and on new ones: the
                      server's defaults (a batch starts 2 ms after its first request; on a GPU
                      rows join the batch in flight, one that joins alone prefilled beside the
                      decoding steps, and prompts are tokenized in threads); every join stalling
                      the batch (`--no-overlap-joins`); rows joining 4 at a time (or after 20 ms),
                      then the same stalling the batch; the engine in a process of its own
                      (`fimtune serve --engine-process`: built and warmed up there, then its
                      defaults and every join stalling, changed there by `set_batching`;
                      skipped with --no-engine-process-row); each batch run to its end;
                      batching that waits while requests arrive (up to 50 ms); (GPU) prompts
                      tokenized on the event loop, as in runs 1-6; other batching waits
                      (--batch-wait-variants) and switch intervals (--switch-interval-variants).
                      The clients are threads of another process (load_clients.py), as editors are;
                      `--clients-in-process`: threads of the server's own process (runs 1-6).
                      For the first variant only (`--server-all-variants`: for each)
    profile prefill   (--profile-prefill DIR) after the first variant's server rows: 8 prefills of
                      the prompt alone (through its length bucket's graph on CUDA) under
                      torch.profiler: as `profile bN`, plus the kernels under 10 us each, the
                      element-wise work a compiled prefill would fuse  (diagnostics)
    generate static   `generate(cache_implementation="static")`: transformers compiles its own step
                      (the first calls; their time is its warm-up)

Each row is its own try: a failure is printed and recorded, and the next row runs. The JSON file
is rewritten after every row, so a run cut short keeps what it measured. Rows are skipped once
`--budget-s` is spent (the run should fit 4 minutes, compiling included).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from latency import percentile, serve_in_thread

TINY = {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 128, "n_positions": 2048}  # on top of the 1B values
SAVED_TOKENIZER = Path(__file__).resolve().parent.parent / ".gpu" / "tokenizer"  # SmolLM2's, saved (carried)
PROMPT_TOKENS = 1024
NEW_TOKENS = 32
MAX_NEW_TOKENS = 64  # the server's limit (the static cache holds 1,024 + 64 tokens a row)
RUNS = 20
WARMUP_RUNS = 3
CLIENTS = 16
REQUESTS_PER_CLIENT = 10
MAX_BATCH = 16
BUCKET_STEPS = 16  # decoding steps timed per bucket
PROFILED_PREFILLS = 8  # single-prompt prefills under the profiler (--profile-prefill)
SMALL_KERNEL_US = 10  # a kernel shorter than this, on average, counts as small (mostly element-wise)
BUDGET_S = 220.0
TARGETS = {"engine": ("p50_ms", 50.0), "server": ("p95_ms", 200.0)}
ATTENTION_REPLAYS = 50
ARRIVALS_MAX_WAIT_MS = 50.0  # the server variant whose batching waits while requests arrive
PREFIX_CHARS, SUFFIX_CHARS = 8000, 3000  # more text than 1,024 tokens: the server fits it


# --------------------------------------------------------------------------------------
# Report: rows printed as they come, the JSON file rewritten after each
# --------------------------------------------------------------------------------------


class Report:
    def __init__(self, path: str | None, machine: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {"machine": machine, "rows": [], "errors": {}, "skipped": []}

    def add(self, row: dict[str, Any]) -> None:
        self.data["rows"].append(row)
        print(format_row(row), flush=True)
        self.save()

    def fail(self, name: str, error: BaseException) -> None:
        traceback.print_exc()
        self.data["errors"][name] = f"{type(error).__name__}: {error}"[:2000]
        print(f"!! {name} failed: {type(error).__name__}: {error}", flush=True)
        self.save()

    def save(self) -> None:
        if not self.path or self.path == "-":
            return
        tmp = Path(f"{self.path}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)


def attempt(report: Report, name: str, fn: Any, deadline: float, need_s: float = 0.0) -> Any:
    """Run one row: its result, or None when it failed or the budget is spent (recorded either way)."""
    left = deadline - time.monotonic()
    if left < need_s:
        report.data["skipped"].append(name)
        print(f"-- {name}: skipped ({left:.0f} s of the budget left)", flush=True)
        report.save()
        return None
    print(f"-- {name} ...", flush=True)
    try:
        return fn()
    except Exception as e:  # one row's failure must not lose the others
        report.fail(name, e)
        return None


def stats_ms(seconds: list[float]) -> dict[str, float]:
    ms = [1000 * s for s in seconds]
    return {
        "p50_ms": percentile(ms, 0.5),
        "p90_ms": percentile(ms, 0.9),
        "p95_ms": percentile(ms, 0.95),
        "max_ms": max(ms),
        "runs": len(ms),
    }


def format_row(row: dict[str, Any]) -> str:
    def ms(key: str) -> str:
        return f"{row[key]:8.1f}" if key in row else f"{'-':>8}"

    tokens = f"{row['new_tokens_mean']:5.1f}" if "new_tokens_mean" in row else f"{'-':>5}"
    seconds = f"{row['seconds']:6.1f}" if "seconds" in row else f"{'-':>6}"
    return (
        f"{row['scenario']:<40} {ms('p50_ms')} {ms('p90_ms')} {ms('p95_ms')} {tokens} {seconds}  {row.get('note', '')}"
    )


HEADER = f"{'scenario':<40} {'p50 ms':>8} {'p90 ms':>8} {'p95 ms':>8} {'new':>5} {'s':>6}  note"


# --------------------------------------------------------------------------------------
# Setup: the model, the tokenizer, the prompt
# --------------------------------------------------------------------------------------


@dataclass
class Setup:
    model: Any
    tokenizer: Any
    prompter: Any
    ids: list[int]  # the 1,024-token PSM prompt
    text: str
    cursor: int
    tokenizer_source: str


def tokenizer(folder: str | None) -> tuple[Any, str]:
    """The SmolLM2 tokenizer with FIM tokens added, else one trained here: (tokenizer, where from).

    From ``folder`` (a saved tokenizer: `.gpu/tokenizer` when there), else the embedded model's
    (its package is large, and missing on GPU machines).
    """
    from fimtune.tokens import ensure_fim_tokens

    if folder is None and SAVED_TOKENIZER.is_dir():
        folder = str(SAVED_TOKENIZER)
    try:
        if folder is not None:
            from transformers import AutoTokenizer

            tok, source = AutoTokenizer.from_pretrained(folder), f"{folder} + FIM tokens"
        else:
            from fimtune.hub import load_tokenizer

            tok, source = copy.deepcopy(load_tokenizer("embedded")), "embedded SmolLM2 + FIM tokens"
        ensure_fim_tokens(tok)
        return tok, source
    except Exception as e:
        raise SystemExit(
            f"no tokenizer ({type(e).__name__}: {e}): pass --tokenizer DIR, a folder holding SmolLM2's "
            "(`load_tokenizer('embedded').save_pretrained(DIR)` where the embedded model is installed)"
        ) from None


def build(args: argparse.Namespace) -> Setup:
    import torch
    from transformers import GPTBigCodeForCausalLM

    from fimtune.generate import FimPrompter
    from fimtune.model import model_config

    tok, source = tokenizer(args.tokenizer)
    config = model_config("bigcode/starcoderbase-1b")
    for key, value in (TINY if args.shape == "tiny" else {}).items():
        setattr(config, key, value)
    config.vocab_size = max(len(tok), config.vocab_size)
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(args.device):  # weights made and initialised on the GPU: seconds, not a minute
            model = GPTBigCodeForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model = model.to(device=args.device, dtype=torch.bfloat16).eval()
    model.set_attn_implementation("sdpa")
    prompter = FimPrompter(tok)
    with torch.no_grad():  # random weights would end early now and then: never end, generate all 32
        model.get_output_embeddings().weight[prompter.end_ids] = 0.0
    text = Path(textwrap.__file__).read_text()
    while len(text) < 3 * PREFIX_CHARS:
        text += text
    cursor = text.index("\n", PREFIX_CHARS) + 1
    ids = prompter.build(text[:cursor], text[cursor:], "psm", PROMPT_TOKENS)
    if len(ids) != PROMPT_TOKENS:
        raise RuntimeError(f"the prompt has {len(ids)} tokens, not {PROMPT_TOKENS}")
    return Setup(model, tok, prompter, ids, text, cursor, source)


def machine(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "device": args.device,
        "shape": args.shape,
        "dtype": "bf16",
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": NEW_TOKENS,
    }


# --------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------


def run_generate(s: Setup, runs: int, **extra: Any) -> tuple[list[float], list[list[int]]]:
    """Greedy `model.generate` on the prompt: (seconds per run, new tokens per run)."""
    import torch

    seconds, outputs = [], []
    ids = torch.tensor([s.ids], device=s.model.device)
    for _ in range(runs):
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            out = s.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=s.prompter.end_ids,
                pad_token_id=s.prompter.fim.pad,
                **extra,
            )
        new = out[0, len(s.ids) :].tolist()
        seconds.append(time.perf_counter() - start)
        outputs.append(new)
    return seconds, outputs


def generate_row(s: Setup, name: str, **extra: Any) -> tuple[dict[str, Any], list[int]]:
    began = time.perf_counter()
    warm, _ = run_generate(s, WARMUP_RUNS, **extra)
    seconds, outputs = run_generate(s, RUNS, **extra)
    row = {
        "scenario": name,
        **stats_ms(seconds),
        "new_tokens_mean": statistics.mean(len(o) for o in outputs),
        "warmup_s": sum(warm),
        "first_call_s": warm[0],
        "seconds": time.perf_counter() - began,
        "note": f"first call {warm[0]:.1f} s",
    }
    return row, outputs[0]


VARIANT_MODIFIERS = ("eager-prefill", "prefill", "flex", "sdpa", "cublas")


def parse_variant(variant: str) -> tuple[str, set[str]]:
    """`KIND[+MODIFIER...]` -> (kind, modifiers).

    >>> parse_variant("trees+flex+eager-prefill")
    ('trees', {'eager-prefill', 'flex'})
    """
    kind, *modifiers = variant.split("+")
    unknown = [m for m in modifiers if m not in VARIANT_MODIFIERS]
    if kind not in ("trees", "captured") or unknown:
        raise argparse.ArgumentTypeError(
            f"--graphs {variant!r}: trees or captured, then +MODIFIER from {', '.join(VARIANT_MODIFIERS)}"
        )
    return kind, set(modifiers)


def variant_attention(modifiers: set[str]) -> str:
    """The decoding steps' attention of a variant: `+flex`, `+sdpa` (SDPA in every bucket, the
    default of runs 1-7), else the server's default (auto: timed at start-up)."""
    from fimtune.serve.engine import Limits

    return next((kind for kind in ("flex", "sdpa") if kind in modifiers), Limits.decode_attention)


def engine_limits(args: argparse.Namespace, cublas: bool = False) -> Any:
    from fimtune.serve.engine import Limits

    return Limits(
        max_input_tokens=PROMPT_TOKENS,
        max_new_tokens=MAX_NEW_TOKENS,
        # the cuBLAS engine only differs at batch 1 (larger buckets keep cuBLAS): one bucket, a third of the warm-up
        max_batch_size=1 if cublas else MAX_BATCH,
        queue_size=4 * CLIENTS,
        timeout_s=120.0,
        trim_step=1,
        cuda_graphs=not args.no_cuda_graphs,
    )


def make_engine(
    s: Setup, args: argparse.Namespace, graphs: str = "trees", attention: str = "auto", cublas: bool = False
) -> Any:
    from fimtune.generate import FimPrompter
    from fimtune.serve.decoding import Decoder
    from fimtune.serve.engine import Engine
    from fimtune.serve.static import StaticDecoding, static_decoding

    limits = engine_limits(args, cublas)
    static, length = None, limits.max_input_tokens + limits.max_new_tokens
    s.model.set_attn_implementation("sdpa")  # each engine sets its own (an earlier one may have changed it)
    if limits.cuda_graphs and args.device == "cuda":
        gemv = False if cublas else None
        static = static_decoding(s.model, length, limits.max_batch_size, graphs=graphs, attention=attention, gemv=gemv)
        if static is None:
            raise RuntimeError("static_decoding() gave no fast path for this model")
    elif limits.cuda_graphs:  # the CPU smoke run: the same code, through dynamo without inductor
        static = StaticDecoding(
            s.model, length, limits.max_batch_size, backend="eager", attention=attention, prefill_graphs=True
        )
    decoder = Decoder(s.model, FimPrompter(copy.deepcopy(s.tokenizer)), limits.cache_slots, static=static)
    name = f"{args.shape}-random"
    return Engine(decoder, {name: None}, name, limits)


def warmup_row(engine: Any) -> dict[str, Any]:
    from torch._dynamo.utils import counters

    began = time.perf_counter()
    logs = _set_logs(graph_breaks=True, recompiles=True, perf_hints=True)  # why a graph would be skipped
    try:
        seconds = engine.decoder.warmup()
    finally:
        if logs:
            _set_logs()
    static = engine.decoder.static
    if static is None:
        raise RuntimeError("the warm-up failed and turned the fast path off (see the log above)")
    skips = dict(counters["inductor"]).get("cudagraph_skips", 0)
    breaks = sum(counters["graph_break"].values())
    by_bucket = {str(k): round(v, 1) for k, v in static.warmup_by_bucket.items()}
    return {
        "scenario": f"engine warm-up, {_graphs(engine)}",
        "seconds": time.perf_counter() - began,
        "warmup_s": seconds,
        "by_bucket_s": by_bucket,
        "graph_breaks": breaks,
        "cudagraph_skips": skips,
        "unique_graphs": counters["stats"]["unique_graphs"],
        # the steps' attention per bucket, and (auto) each candidate's ms a step, compiled, as timed at start-up
        "decode_attention": {str(k): v for k, v in static.decode_attention.items()},
        "attention_ms": {str(k): v for k, v in static.attention_ms.items()},
        "attention_errors": {str(k): v for k, v in static.attention_errors.items() if v},
        "attention_s": static.attention_s,  # timing them (part of warmup_s)
        "note": f"buckets {by_bucket} s; graph breaks {breaks}; cudagraph skips {skips}; attention "
        f"timed in {static.attention_s:.1f} s: "
        + ", ".join(
            f"b{k} {v}" + (f" ({_ms_list(static.attention_ms[k])})" if k in static.attention_ms else "")
            for k, v in static.decode_attention.items()
        ),
    }


def _ms_list(times: dict[str, float]) -> str:
    return ", ".join(f"{kind} {ms:.3f}" for kind, ms in times.items())


def engine_row(s: Setup, engine: Any, expected: list[int] | None) -> dict[str, Any]:
    from fimtune.generate import GenerationParams
    from fimtune.serve.decoding import Row

    decoder, params = engine.decoder, GenerationParams(max_new_tokens=NEW_TOKENS)
    static_before = decoder.static.batches if decoder.static is not None else 0
    single_before = decoder.static.single_prefills if decoder.static is not None else 0
    seconds, outputs = [], []
    for i in range(WARMUP_RUNS + RUNS):
        got: list[int] = []
        sync()
        start = time.perf_counter()
        decoder.run([Row(s.ids, params, on_token=lambda t, piece, end, got=got: got.append(t))])
        if i >= WARMUP_RUNS:
            seconds.append(time.perf_counter() - start)
            outputs.append(got)
    agree = _common_prefix(outputs[0], expected) if expected is not None else None
    used = (decoder.static.batches - static_before) if decoder.static is not None else 0
    single = (decoder.static.single_prefills - single_before) if decoder.static is not None else 0
    met = percentile([1000 * x for x in seconds], 0.5) <= TARGETS["engine"][1]
    return {
        "scenario": f"engine (CUDA graphs, {_graphs(engine)})" if decoder.static is not None else "engine (eager)",
        **stats_ms(seconds),
        "new_tokens_mean": statistics.mean(len(o) for o in outputs),
        "fast_path_batches": used,
        "bucketed_prefills": single,  # prompts prefilled padded to a length bucket (through its graph on CUDA)
        "same_tokens_as_generate": agree,
        "target_p50_ms": TARGETS["engine"][1],
        "target_met": met,
        "note": f"target p50 <= 50 ms: {'met' if met else 'MISSED'}; first {agree} tokens as generate's",
    }


def bucket_rows(s: Setup, engine: Any) -> list[dict[str, Any]]:
    """Per bucket: the eager prefill of N prompts, and a compiled decoding step (diagnostics)."""
    static, rows = engine.decoder.static, []
    for size in static.buckets:
        times: dict[str, list[float]] = {"prefill": [], "step": [], "host": []}
        for _ in range(3):
            sync()
            start = time.perf_counter()
            session, logits = static.start([s.ids] * size)
            tokens = logits.argmax(-1)
            sync()
            times["prefill"].append(time.perf_counter() - start)
            start, host = time.perf_counter(), 0.0
            for _ in range(BUCKET_STEPS):
                call = time.perf_counter()
                logits = session.step(tokens)
                host += time.perf_counter() - call
                tokens = logits.argmax(-1)
            sync()
            times["step"].append((time.perf_counter() - start) / BUCKET_STEPS)
            times["host"].append(host / BUCKET_STEPS)
        prefill, step, host = (1000 * min(times[k]) for k in ("prefill", "step", "host"))
        rows.append(
            {
                "scenario": f"engine b{size}: prefill/step, {_graphs(engine)}",
                "prefill_ms": prefill,
                "step_ms": step,
                "host_ms": host,
                "note": f"prefill {size} x {PROMPT_TOKENS}: {prefill:.1f} ms; one step: {step:.2f} ms "
                f"(host {host:.2f} ms in the call)",
            }
        )
    return rows


def profile_rows(s: Setup, engine: Any, folder: Path) -> list[dict[str, Any]]:
    """Where a decoding step's time goes, per bucket (1 and the largest): ``BUCKET_STEPS`` steps under
    torch.profiler. On CUDA: the kernels' time per step (against the step's wall time: the rest is the
    GPU waiting between kernels), kernels per step, and the kernels by share; on a CPU the same for
    operators. The whole table goes to ``folder``. Diagnostics."""
    static, rows = engine.decoder.static, []
    for size in sorted({static.buckets[0], static.buckets[-1]}):
        session, logits = static.start([s.ids] * size)
        tokens = logits.argmax(-1)
        for _ in range(3):  # warm: the step's graph exists
            tokens = session.step(tokens).argmax(-1)

        def steps(session: Any = session, tokens: Any = tokens) -> None:
            for _ in range(BUCKET_STEPS):
                tokens = session.step(tokens).argmax(-1)

        name = f"step-b{size}-{_graphs(engine)}"
        row = _profiled(steps, BUCKET_STEPS, static.device.type == "cuda", folder / f"profile-{name}.txt")
        rows.append({"scenario": f"profile b{size}: one step, {_graphs(engine)}", **row})
    return rows


def prefill_profile_row(s: Setup, engine: Any, folder: Path) -> dict[str, Any]:
    """Where a single prompt's prefill time goes (the 1,024-token prompt, through its length bucket's
    graph on CUDA): as :func:`profile_rows`, plus the kernels under `SMALL_KERNEL_US` each, the
    element-wise work that a compiled prefill would fuse. Diagnostics."""
    import torch

    static = engine.decoder.static
    if not static.prefill_graphs_on:
        raise RuntimeError("the engine's prefill graphs are off")

    @torch.inference_mode()  # as the engine runs it (its buffers are inference tensors)
    def prefills(calls: int = PROFILED_PREFILLS) -> None:
        for _ in range(calls):
            static.run_prefill([s.ids])

    prefills(2)  # warm: the length bucket's graph exists

    path = folder / f"profile-prefill-{_graphs(engine)}.txt"
    row = _profiled(prefills, PROFILED_PREFILLS, static.device.type == "cuda", path)
    return {"scenario": f"profile prefill of {len(s.ids)} tokens, {_graphs(engine)}", **row}


def _profiled(work: Any, calls: int, cuda: bool, path: Path) -> dict[str, Any]:
    """``work`` (``calls`` calls of what is profiled) under torch.profiler: the time and count of the
    kernels (CPU: operators) a call, its wall time, the largest ones' shares; the table to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    path.parent.mkdir(parents=True, exist_ok=True)
    sync()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        work()
        sync()
        wall_ms = 1000 * (time.perf_counter() - start) / calls
    events = prof.key_averages()
    if cuda:
        timed = [e for e in events if e.self_device_time_total > 0 and e.device_type.name == "CUDA"]
        us = {e.key: e.self_device_time_total for e in timed}
    else:  # the CPU smoke run: operators (aten::...), not their Python wrappers
        timed = [e for e in events if e.key.startswith("aten::") and e.self_cpu_time_total > 0]
        us = {e.key: e.self_cpu_time_total for e in timed}
    total_us = sum(us.values())
    busy_ms = total_us / 1000 / calls
    per_call = sum(e.count for e in timed) / calls
    small = [e for e in timed if us[e.key] / e.count < SMALL_KERNEL_US]  # by their mean time a launch
    small_ms = sum(us[e.key] for e in small) / 1000 / calls
    small_per_call = sum(e.count for e in small) / calls
    top = sorted(us.items(), key=lambda kv: -kv[1])[:6]
    shares = {name[:70]: round(100 * t / max(total_us, 1e-9), 1) for name, t in top}
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    path.write_text(events.table(sort_by=sort, row_limit=60, max_name_column_width=100))
    what = "kernels" if cuda else "operators"
    return {
        "wall_ms": wall_ms,
        "busy_ms": busy_ms,
        "per_step": per_call,
        "small_ms": small_ms,
        "small_per_step": small_per_call,
        "top_percent": shares,
        "table": str(path),
        "note": f"{what}: {busy_ms:.2f} ms a call of {wall_ms:.2f} (profiled), {per_call:.0f} a call "
        f"({small_per_call:.0f} under {SMALL_KERNEL_US} us each: {small_ms:.2f} ms); "
        + ", ".join(f"{name[:40]} {pct}%" for name, pct in list(shares.items())[:3]),
    }


def attention_rows(s: Setup, engine: Any) -> list[dict[str, Any]]:
    """One decoding step's attention, every layer with its own cache, captured in a CUDA graph:
    fimtune's grouped SDPA, FlexAttention and matrix products against transformers' SDPA
    (key/value heads repeated). Diagnostics."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from fimtune.serve.static import _Heads, flex_decoding, graph_ms, grouped_sdpa, kv_groups, matmul_decoding

    config, length = s.model.config, engine.decoder.static.max_length
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    dim, groups = config.hidden_size // heads, kv_groups(config)
    module = _Heads(groups)
    rows = []
    for batch in (1, MAX_BATCH):
        opts = {"device": "cuda", "dtype": torch.bfloat16}
        query = torch.randn(batch, heads, 1, dim, **opts)
        caches = [[torch.randn(batch, heads // groups, length, dim, **opts) for _ in range(2)] for _ in range(layers)]
        mask = torch.zeros(batch, 1, 1, length, dtype=torch.bool, device="cuda")
        mask[..., : PROMPT_TOKENS + NEW_TOKENS // 2] = True
        bias = torch.zeros(mask.shape, **opts).masked_fill_(~mask, -float("inf"))  # the engine's SDPA mask
        times, errors = {}, {}
        kinds = (
            ("grouped", grouped_sdpa, bias),
            ("repeated", sdpa_attention_forward, bias),
            ("repeated_bool", sdpa_attention_forward, mask),  # the engine's mask before: a where kernel a layer
            ("flex", flex_decoding, mask),
            ("matmul", matmul_decoding, bias),  # a candidate: the key/value head read once, by cuBLAS
        )
        for name, fn, m in kinds:
            step = functools.partial(_attention_step, fn, module, query, caches, m, dim**-0.5)
            try:  # FlexAttention is compiled (uncompiled, it is a reference implementation)
                times[name] = graph_ms(torch.compile(step) if name == "flex" else step, ATTENTION_REPLAYS)
            except Exception as e:  # one kind's failure keeps the others' figures
                errors[name] = f"{type(e).__name__}: {e}"[:500]
        ms = {name: f"{t:.3f}" for name, t in times.items()} | {name: "failed" for name in errors}
        rows.append(
            {
                "scenario": f"attention b{batch}: {layers} layers",
                **{f"{name}_ms": t for name, t in times.items()},
                "errors": errors,
                "note": f"grouped SDPA {ms['grouped']} ms, heads repeated {ms['repeated']} ms "
                f"(boolean mask {ms['repeated_bool']} ms), compiled FlexAttention {ms['flex']} ms, "
                f"matrix products {ms['matmul']} ms a step",
            }
        )
    return rows


def _attention_step(fn: Any, module: Any, query: Any, caches: list, mask: Any, scale: float) -> list:
    # the outputs are returned: compiled, a step whose results go nowhere is optimized away (run 7
    # timed FlexAttention at 0.002 ms that way, over an empty CUDA graph)
    return [fn(module, query, key, value, mask, scaling=scale)[0] for key, value in caches]


def request_body(s: Setup, client: int, request: int) -> dict[str, Any]:
    """An OpenAI FIM request; each client's cursor moves through the file (different prompts)."""
    cursor = s.cursor + (client * 211 + request * 37) % (len(s.text) - s.cursor - SUFFIX_CHARS)
    cursor = s.text.index("\n", cursor) + 1 if "\n" in s.text[cursor:] else cursor
    return {
        "prompt": s.text[max(0, cursor - PREFIX_CHARS) : cursor],
        "suffix": s.text[cursor : cursor + SUFFIX_CHARS],
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
    }


class Load(NamedTuple):
    """What ``load``'s clients got: each answer's seconds (as its client timed it), `usage`, and
    timing headers (load_clients.py), the errors, and the seconds from the clients' start to the last
    answer (without the client process's start-up)."""

    seconds: list[float]
    usages: list[dict]
    timings: list[dict]
    errors: list[str]
    wall_s: float


def load(s: Setup, url: str, clients: int, per_client: int, in_process: bool = False) -> Load:
    """``clients`` clients, each sending ``per_client`` requests one after another. They run as
    threads of another process (load_clients.py), as editors would; or (``in_process``) of this
    one, the server's, where they share its interpreter lock."""
    from load_clients import run_clients

    bodies = [[request_body(s, c, r) for r in range(per_client)] for c in range(clients)]
    if in_process:
        got = run_clients(url, "/v1/completions", bodies)
    else:
        plan = json.dumps({"url": url, "path": "/v1/completions", "bodies": bodies})
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("load_clients.py"))],
            input=plan,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"the client process failed: {proc.stderr[-1000:]}")
        got = json.loads(proc.stdout)
    return Load(got["seconds"], got["usages"], got["timings"], got["errors"], got["wall_s"])


def time_split(got: Load) -> dict[str, dict[str, float]]:
    """p50 and p95 of each part of the requests' times (ms): the server's timing headers
    (tokenizing, the queue, inference: prefill, decoding and the way back to the handler, and their
    total), and what the client timed beyond that total (HTTP, JSON, uvicorn, the loopback)."""
    parts = {name: [t[name] for t in got.timings] for name in ("validation", "queue", "inference", "total")}
    parts["outside"] = [1000 * sec - t["total"] for sec, t in zip(got.seconds, got.timings, strict=True)]
    return {name: {"p50": percentile(v, 0.5), "p95": percentile(v, 0.95)} for name, v in parts.items() if v}


def ab_arguments(description: str, rounds: str) -> argparse.ArgumentParser:
    """The arguments of the benchmarks that send this load to servers in turns, a round at a time
    (engine_process_ab.py, tokenize_threads.py); ``rounds`` says what a round sends."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default="starcoderbase-1b", choices=["starcoderbase-1b", "tiny"])
    parser.add_argument("--tokenizer", metavar="DIR", help="a saved tokenizer (default: .gpu/tokenizer, else embedded)")
    parser.add_argument("--rounds", type=int, default=4, help=f"rounds, each sending {rounds}")
    parser.add_argument(
        "--requests-per-client", type=int, default=REQUESTS_PER_CLIENT, help="requests of each client a round"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    return parser


def ab_parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    args.no_cuda_graphs = False
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    return args


def ab_row(s: Setup, url: str, per_client: int, round_: int, name: str) -> dict[str, Any]:
    """One round's load on the server at ``url``, as a row named ``name`` (printed)."""
    got = load(s, url, CLIENTS, per_client)
    row = {"round": round_, "name": name, "errors": len(got.errors)}
    row |= stats_ms(got.seconds) | {"split_ms": time_split(got)}
    print(
        f"round {round_} {name:16s} p50 {row['p50_ms']:.1f} p90 {row['p90_ms']:.1f} p95 {row['p95_ms']:.1f} ms, "
        f"errors {row['errors']}; ms p50/p95: "
        + ", ".join(f"{k} {v['p50']:.0f}/{v['p95']:.0f}" for k, v in row["split_ms"].items()),
        flush=True,
    )
    return row


def ab_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each name's median of the rounds' p50 and p95 (printed)."""
    summary = {}
    for name in dict.fromkeys(r["name"] for r in rows):
        mine = [r for r in rows if r["name"] == name]
        summary[name] = {q: statistics.median(r[f"{q}_ms"] for r in mine) for q in ("p50", "p95")}
        print(
            f"{name:16s} median of {len(mine)} rounds: p50 {summary[name]['p50']:.1f} p95 {summary[name]['p95']:.1f} ms"
        )
    return summary


def engine_for_process(args: argparse.Namespace, key: tuple[str, str, bool]) -> tuple[Any, Any, str]:
    """Run in the engine's process (`fimtune serve --engine-process`): the same model (seeded) and engine."""
    s = build(args)
    return make_engine(s, args, *key), s.prompter, "psm"


@contextlib.contextmanager
def process_server(
    args: argparse.Namespace, key: tuple[str, str, bool], deadline: float
) -> Iterator[tuple[Any, Any, str, float]]:
    """A server with the engine in a process of its own (`fimtune serve --engine-process`), built and
    warmed up there (the compiler's caches on disk, filled by this process's engine, shorten that
    warm-up): (engine, app, URL, seconds until ready). Stopped on the way out, its GPU memory freed."""
    from fimtune.serve.app import create_app
    from fimtune.serve.process import EngineProcess

    began = time.perf_counter()
    engine = EngineProcess(functools.partial(engine_for_process, args, key), engine_limits(args, key[2]))
    try:
        prompter, mode = engine.launch()
        app = create_app(engine, prompter, mode)
        url, server = serve_in_thread(app)
        try:
            if not engine.ready.wait(timeout=max(1.0, deadline - time.monotonic())) or not engine.alive():
                raise RuntimeError(f"the engine's process did not finish its warm-up in time ({engine.exitcode})")
            yield engine, app, url, time.perf_counter() - began
        finally:
            server.should_exit = True
    finally:
        engine.stop()


@contextlib.contextmanager
def batching(engine: Any, changes: dict[str, Any]) -> Iterator[None]:
    """``engine`` (an Engine or an EngineProcess) with its batching limits changed (`set_batching`)
    inside the block, restored after it."""
    before = {name: getattr(engine.limits, name) for name in changes}
    engine.set_batching(**changes)
    try:
        yield
    finally:
        engine.set_batching(**before)


def skip_row(name: str, skipped: list[str] | None) -> None:
    """A server row the budget leaves out: said, and named in ``skipped`` (the report's)."""
    print(f"-- {name}: skipped (budget)", flush=True)
    if skipped is not None:
        skipped.append(name)


def process_server_rows(
    s: Setup,
    args: argparse.Namespace,
    key: tuple[str, str, bool],
    graphs: str,
    deadline: float,
    variants: list[dict[str, Any]],
    label: str = "",
    skipped: list[str] | None = None,
) -> list[dict[str, Any]]:
    """The server with the engine in a process of its own: a row for each of ``variants`` (batching
    limits changed in the engine's process, `set_batching`), as the budget allows (the others named
    in ``skipped``); ``label`` as :func:`server_run`'s."""
    rows = []
    with process_server(args, key, deadline) as (engine, app, url, ready_s):
        load(s, url, CLIENTS, 1, args.clients_in_process)  # one untimed request per client: first batches
        threads = app.state.service.tokenize_in_threads
        for changes in variants:
            if rows and time.monotonic() > deadline - 10:
                skip_row(f"server {changes}, engine process{', ' + label if label else ''}", skipped)
                continue
            with batching(engine, changes):
                rows.append(server_run(s, engine, url, ready_s, args, threads, f"{graphs}, engine process", label))
    return rows


def server_rows(
    s: Setup,
    engine: Any,
    args: argparse.Namespace,
    deadline: float,
    key: tuple[str, str, bool] = ("trees", "auto", False),
    skipped: list[str] | None = None,
) -> list[dict[str, Any]]:
    """The server rows (``engine`` behind uvicorn); the names of those the budget leaves out go to
    ``skipped`` (the report's, beside the rows ``attempt`` skips)."""
    from fimtune.serve.app import create_app

    app = create_app(engine, s.prompter, "psm")
    url, server = serve_in_thread(app)
    rows = []
    try:
        began = time.perf_counter()
        if not engine.ready.wait(timeout=max(1.0, deadline - time.monotonic())):
            raise RuntimeError("the engine's worker did not finish its warm-up in time")
        ready_s = time.perf_counter() - began
        load(s, url, CLIENTS, 1, args.clients_in_process)  # one untimed request per client: first batches
        svc = app.state.service
        threads = svc.tokenize_in_threads
        # The defaults' whole load once before the compared rows, reported apart: what the first
        # prompts of each shape cost (kernels that build a plan per new shape, such as cuDNN's
        # attention, in eager prefills) shows there, not in whichever row comes first (in runs 9
        # and 10 the first row was the slowest, whatever its setting)
        rows.append(server_run(s, engine, url, ready_s, args, threads, _graphs(engine), "first round"))
        # limits changed per run: the server's defaults (rows join the batch in flight, a row that
        # joins alone prefilled beside the steps; on a GPU prompts tokenized in threads); every join
        # stalling the batch (the default before run 9); rows joining 4 at a time (or after 20 ms),
        # then that with every join stalling the batch (run 9's best); each batch run to its end;
        # that, waiting while requests arrive; then other batching waits (as the budget allows)
        no_joins = {"continuous_batching": False}
        arrivals = {**no_joins, "batch_max_wait_ms": ARRIVALS_MAX_WAIT_MS}
        in_line = {"continuous_batching": True, "overlap_joins": False}
        groups = {"continuous_batching": True, "join_min_rows": 4, "join_wait_ms": 20.0}
        apart = {"engine_process": True}  # the defaults, the model in a process of its own
        variants: list[dict[str, Any]] = [{}, in_line, groups, {**groups, **in_line}, apart, no_joins, arrivals]
        if args.no_engine_process_row:
            variants.remove(apart)
        if threads:  # and as in runs 1-6: prompts tokenized on the event loop
            variants.append({"tokenize_in_threads": False})
        variants += [{"batch_wait_ms": ms} for ms in args.batch_wait_variants]
        variants += [{"switch_interval_ms": ms} for ms in args.switch_interval_variants]
        # --passes: the rows again, every other pass in reverse order (the engine in a process of
        # its own in the first only), so that no setting always runs first or last
        order = [(1, changes) for changes in variants]
        for number in range(2, args.passes + 1):
            order += [(number, c) for c in (variants if number % 2 else variants[::-1]) if c != apart]
        for number, changes in order:
            label = f"pass {number}" if args.passes > 1 else ""
            need_s = 60 if changes == apart and args.device == "cuda" else 10  # there: a build and a warm-up
            if time.monotonic() > deadline - need_s:
                skip_row(f"server {changes}{', ' + label if label else ''}", skipped)
                continue
            if changes == apart:  # the defaults, then every join stalling the batch: one engine for both
                rows += process_server_rows(s, args, key, _graphs(engine), deadline, [{}, in_line], label, skipped)
                continue
            # the engine's limits through `set_batching`; where prompts are tokenized is the server's
            limits = {name: value for name, value in changes.items() if name != "tokenize_in_threads"}
            svc.tokenize_in_threads = tokenize = changes.get("tokenize_in_threads", threads)
            try:
                with batching(engine, limits):
                    rows.append(server_run(s, engine, url, ready_s, args, tokenize, _graphs(engine), label))
            finally:
                svc.tokenize_in_threads = threads
    finally:
        server.should_exit = True
    return rows


def server_run(
    s: Setup,
    engine: Any,
    url: str,
    ready_s: float,
    args: argparse.Namespace,
    threads: bool,
    graphs: str,
    label: str = "",
) -> dict[str, Any]:
    """16 clients x 10 requests (`--requests-per-client`) on the server at ``url``; ``engine`` is an
    Engine or an EngineProcess; ``label`` (e.g. "pass 2") ends the row's scenario."""
    in_process, per_client = args.clients_in_process, args.requests_per_client or REQUESTS_PER_CLIENT
    lim = engine.limits
    before, counted = engine.snapshot()
    static = getattr(getattr(engine, "decoder", None), "static", None)  # in this process only
    eager_before = (list(static.eager_prefills), list(static.eager_prefill_s)) if static is not None else None
    got = load(s, url, CLIENTS, per_client, in_process)
    seconds, usages, errors = got.seconds, got.usages, got.errors
    wall = got.wall_s  # the load's, from its first request: the client process's start-up is no server time
    stats, counters = engine.snapshot()
    joins = f"joins {lim.join_min_rows}/{lim.join_wait_ms:g}ms" if lim.continuous_batching else "no joins"
    joins += " overlapped" if lim.continuous_batching and lim.overlap_joins else ""
    row: dict[str, Any] = {
        "scenario": f"server 16, {graphs}, wait {lim.batch_wait_ms:g}/{lim.batch_max_wait_ms:g}ms, "
        f"{joins}, tokenize {'threads' if threads else 'loop'}, switch {lim.switch_interval_ms:g}ms"
        + (", clients in-process" if in_process else "")
        + (f", {label}" if label else ""),
        "label": label,
        "batch_max_wait_ms": lim.batch_max_wait_ms,
        "tokenize_in_threads": threads,
        "clients_in_process": in_process,
        "batch_wait_ms": lim.batch_wait_ms,
        "continuous_batching": lim.continuous_batching,
        "join_min_rows": lim.join_min_rows,
        "join_wait_ms": lim.join_wait_ms,
        "overlap_joins": lim.overlap_joins,
        "switch_interval_ms": lim.switch_interval_ms,
        "engine_process": graphs.endswith("engine process"),
        "joined": stats.joined - before.joined,
        "joins": stats.joins - before.joins,  # each prefilled its rows together: joined / joins rows a join
        "requests": CLIENTS * per_client,
        "errors": len(errors),
        "error_samples": errors[:3],
        "seconds": wall,
        "worker_ready_s": ready_s,
        "batches": stats.batches - before.batches,
        "forwards": stats.forwards - before.forwards,
        # the worker's time inside batches: near the wall time, a batch takes that long; far below, it idles
        "busy_s": counters.busy_seconds - counted.busy_seconds,
        # of which prefilling (batches' and joins'), and waiting for the GPU's picks (its steps): the rest
        # is the host's (queuing steps, stops, streaming, and the interpreter lock)
        "prefill_s": stats.prefill_s - before.prefill_s,
        "device_wait_s": stats.device_wait_s - before.device_wait_s,
        "cuda_graphs_active": engine.describe()["cuda_graphs_active"],
    }
    if eager_before is not None:  # batches of prompts prefilled eagerly, on shapes seen before and new ones
        calls = [now - then for now, then in zip(static.eager_prefills, eager_before[0], strict=True)]
        host = [now - then for now, then in zip(static.eager_prefill_s, eager_before[1], strict=True)]
        row["eager_prefills"] = {
            kind: {"calls": n, "host_ms": 1000 * sec / max(1, n)}
            for kind, n, sec in zip(("seen_shape", "new_shape"), calls, host, strict=True)
        }
    if seconds:
        row["split_ms"] = split = time_split(got)
        row |= stats_ms(seconds)
        row["new_tokens_mean"] = statistics.mean(u["completion_tokens"] for u in usages)
        row["prompt_tokens_mean"] = statistics.mean(u["prompt_tokens"] for u in usages)
        row["tokens_per_s"] = sum(u["completion_tokens"] for u in usages) / wall
        row["mean_batch"] = (len(seconds) - row["joined"]) / max(1, row["batches"])
        met = row["p95_ms"] <= TARGETS["server"][1] and not errors
        row["target_met"] = met
        row["note"] = (
            f"target p95 <= 200 ms: {'met' if met else 'MISSED'}; errors {len(errors)}; batches {row['batches']}, "
            f"{row['joined']} joined in flight in {row['joins']} joins; prompt {row['prompt_tokens_mean']:.0f} tokens; worker busy "
            f"{row['busy_s'] / wall:.0%}, {1000 * row['busy_s'] / max(1, row['batches']):.0f} ms a batch, "
            f"{1000 * row['busy_s'] / max(1, row['forwards']):.2f} ms a forward; of its busy time "
            f"{row['prefill_s'] / max(row['busy_s'], 1e-9):.0%} prefilling, "
            f"{row['device_wait_s'] / max(row['busy_s'], 1e-9):.0%} waiting for the GPU's steps; ms p50/p95: "
            + ", ".join(f"{name} {v['p50']:.0f}/{v['p95']:.0f}" for name, v in split.items())
        )
        if "eager_prefills" in row:
            seen, new = row["eager_prefills"]["seen_shape"], row["eager_prefills"]["new_shape"]
            row["note"] += (
                f"; eager prefills: {seen['calls']} of shapes seen before ({seen['host_ms']:.1f} ms of host each), "
                f"{new['calls']} of new ones ({new['host_ms']:.1f} ms)"
            )
    else:
        row["note"] = f"no request succeeded: {errors[:1]}"
    return row


def _graphs(engine: Any) -> str:
    static = engine.decoder.static
    if static is None:
        return "eager"
    name = "captured" if static.captured else "trees"
    if static.attention in ("flex", "sdpa"):
        name += f"+{static.attention}"
    if not static.gemv and static.device.type == "cuda":
        name += "+cublas"
    if static.prefill_compiled:
        name += "+prefill"
    elif not static.prefill_graphs_on:
        name += "+eager-prefill"
    return name


def prefill_row(engine: Any) -> dict[str, Any]:
    seconds = engine.decoder.static.compile_prefill()
    return {"scenario": f"prefill compile, {_graphs(engine)}", "seconds": seconds, "note": "dynamic shapes, 3 graphs"}


def _set_logs(**kinds: bool) -> bool:
    import torch

    try:
        torch._logging.set_logs(**kinds)
        return True
    except Exception as e:  # a torch without these log kinds: go on without them
        print(f"(torch logs not set: {e})", flush=True)
        return False


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    deadline = time.monotonic() + args.budget_s
    if args.device == "cuda" and (args.profile_step or args.profile_prefill):
        from train_throughput import cuda_graphs_profiled

        cuda_graphs_profiled()  # before the engine captures its graphs
    report = Report(args.json, machine(args))
    print(json.dumps(report.data["machine"]), flush=True)
    print(HEADER, flush=True)
    setup_began = time.perf_counter()
    s = attempt(report, "setup", lambda: build(args), deadline)
    if s is None:
        return report.data
    report.data["machine"]["tokenizer"] = s.tokenizer_source
    report.data["machine"]["vocab_size"] = s.model.config.vocab_size
    report.add({"scenario": "setup (model on the GPU)", "seconds": time.perf_counter() - setup_began})

    expected = None
    result = attempt(report, "generate", lambda: generate_row(s, "generate (plain)"), deadline, 30)
    if result is not None:
        report.add(result[0])
        expected = result[1]
    engines: dict[tuple[str, str, bool], Any] = {}
    prefill_graphs: dict[tuple[str, str, bool], bool] = {}  # per engine: its prefill graphs after the warm-up
    for i, variant in enumerate(args.graphs):
        graphs, modifiers = parse_variant(variant)
        key = (graphs, variant_attention(modifiers), "cublas" in modifiers)
        engine = engines.get(key)  # "+prefill", "+eager-prefill": the same engine (its graphs compiled)
        if engine is None:
            name = graphs + ("" if key[1] == "auto" else f"+{key[1]}") + ("+cublas" if key[2] else "")
            engine = attempt(report, f"engine setup, {name}", lambda k=key: make_engine(s, args, *k), deadline)
            if engine is None:
                continue
            engines[key] = engine
            if engine.decoder.static is not None:
                row = attempt(report, f"engine warm-up, {name}", lambda e=engine: warmup_row(e), deadline)
                if row is not None:
                    report.add(row)
        static = engine.decoder.static  # None: decoding eagerly (no CUDA graphs, or a failed warm-up)
        prefill_graphs.setdefault(key, static is not None and static.prefill_graphs_on)  # off if a capture failed
        if static is not None:  # this variant's prefill: graphs (the default on a GPU), eager, or compiled
            static.prefill_graphs_on = prefill_graphs.get(key, False) and not modifiers & {"eager-prefill", "prefill"}
        if "prefill" in modifiers and static is not None and not static.prefill_compiled:
            row = attempt(report, f"prefill compile, {variant}", lambda e=engine: prefill_row(e), deadline, 10)
            if row is None:
                continue
            report.add(row)
        row = attempt(report, f"engine, {variant}", lambda e=engine: engine_row(s, e, expected), deadline, 5)
        if row is not None:
            report.add(row)
        if engine.decoder.static is not None:
            for row in attempt(report, f"buckets, {variant}", lambda e=engine: bucket_rows(s, e), deadline, 10) or []:
                report.add(row)
            if args.device == "cuda" and i == 0 and args.attention_rows:
                for row in attempt(report, "attention", lambda e=engine: attention_rows(s, e), deadline, 10) or []:
                    report.add(row)
            if args.profile_step and i == 0:
                profiled = attempt(
                    report, "profile", lambda e=engine: profile_rows(s, e, args.profile_step), deadline, 10
                )
                for row in profiled or []:
                    report.add(row)
        if i > 0 and not args.server_all_variants:
            continue
        rows = attempt(
            report,
            f"server, {variant}",
            lambda e=engine, k=key: server_rows(s, e, args, deadline, k, report.data["skipped"]),
            deadline,
            15,
        )
        for row in rows or []:
            report.add(row)
        if args.profile_prefill and engine.decoder.static is not None:
            profiled = attempt(
                report, "profile prefill", lambda e=engine: prefill_profile_row(s, e, args.profile_prefill), deadline, 5
            )
            if profiled is not None:
                report.add(profiled)
    if args.no_generate_static:
        return _finish(report)
    result = attempt(
        report,
        "generate static",
        lambda: generate_row(s, "generate (static cache)", cache_implementation="static"),
        deadline,
        45,
    )
    if result is not None:
        report.add(result[0])
    return _finish(report)


def _finish(report: Report) -> dict[str, Any]:
    summary(report)
    return report.data


def summary(report: Report) -> None:
    m = report.data["machine"]
    print(
        f"\n{m['gpu']}  torch {m['torch']} (CUDA {m['cuda']})  transformers {m['transformers']}  {m.get('tokenizer')}"
    )
    print(HEADER)
    for row in report.data["rows"]:
        print(format_row(row))
    for name, error in report.data["errors"].items():
        print(f"FAILED {name}: {error[:300]}")
    for name in report.data["skipped"]:
        print(f"SKIPPED {name} (budget)")
    sys.stdout.flush()
