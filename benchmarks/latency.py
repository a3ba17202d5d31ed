"""Completion latency on the CPU: the serving engine against plain `model.generate` (figures go to RESULTS.md).

    .venv/bin/python benchmarks/latency.py                          # embedded SmolLM2-135M, fp32
    .venv/bin/python benchmarks/latency.py --threads 1 --quantize int8
    .venv/bin/python benchmarks/latency.py --target runs/mine --json
    python benchmarks/latency.py --device cuda --shape starcoderbase-1b --json latency.json   # GPU: latency_gpu.py

Scenarios, each beside plain `model.generate` on the same prompt ids, in the same process:

(a) one FIM request: a 512-token prompt and 16 new tokens; the engine cold (empty KV cache)
    and warm (the same request again);
(b) editor replay: 50 successive requests on one real source file (the standard library's
    `textwrap.py`) as a person types: the prefix grows 1-5 characters per request, the suffix
    stays. Requests go to a real server (uvicorn on loopback, TGI `POST /generate` with PSM
    `inputs`, as llm-vscode sends them); the server rebuilds them in SPM order, fits them to
    512 tokens in steps of 64 and reuses the KV cache. Replayed with 16 new tokens, and with
    the stop string "\\n" (single-line completions); PSM order once more for comparison.

Every engine completion is checked against the baseline's (greedy: they must be equal).
Target (b): p50 <= 300 ms on the 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

PROMPT_TOKENS = 512
NEW_TOKENS = 16
REQUESTS = 50
TYPED_CHARS = (1, 5)  # characters typed between two requests
HOLE_CHARS = 250  # the text being typed; the suffix starts after it
CURSOR_AT = 0.6  # the cursor starts at the first line after 60% of the file
TRIM_STEP = 64
REPEAT = 3
TARGET_P50_MS = 300.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --------------------------------------------------------------------------------------
# Setup: the model behind a real server, and the baseline on the same weights
# --------------------------------------------------------------------------------------


class Bench:
    """A loaded engine served on loopback, plus plain `generate` on the same model."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from fimtune.model import DTYPES
        from fimtune.serve.app import create_app
        from fimtune.serve.engine import Limits, load_engine

        limits = Limits(max_input_tokens=PROMPT_TOKENS, max_new_tokens=64, timeout_s=600, trim_step=TRIM_STEP)
        dtype = DTYPES[args.dtype]
        engine, prompter, mode = load_engine(args.target, [], limits, "spm", dtype, torch.device("cpu"), args.quantize)
        self.engine, self.prompter, self.model = engine, prompter, engine.model
        self.app = create_app(engine, prompter, mode)
        self.service = self.app.state.service
        self.fp32 = fp32_decoder(args.target) if args.quantize else None

    def fp32_text(self, ids: list[int], stops: list[str]) -> str:
        """The completion of the unquantized model (for int8 runs: how often int8 agrees with fp32)."""
        from fimtune.generate import GenerationParams
        from fimtune.serve.decoding import Row

        return self.fp32.run([Row(ids, GenerationParams(max_new_tokens=NEW_TOKENS, stop=stops))])[0].text

    def generate(self, ids: list[int], new_tokens: int, stops: list[str]) -> tuple[str, float]:
        """Plain `model.generate` (greedy): (post-processed text, seconds)."""
        import torch

        from fimtune.generate import GenerationParams, postprocess

        extra = {"stop_strings": stops, "tokenizer": self.prompter.tokenizer} if stops else {}
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=self.prompter.end_ids,
                pad_token_id=self.prompter.fim.pad,
                **extra,
            )
        seconds = time.perf_counter() - start
        new = out[0, len(ids) :].tolist()
        ends = set(self.prompter.end_ids)
        new = new[: next((i for i, t in enumerate(new) if t in ends), len(new))]
        return postprocess(self.prompter.decode(new), GenerationParams(stop=stops))[0], seconds


def fp32_decoder(target: str) -> Any:
    import torch

    from fimtune.generate import FimPrompter, merge_adapter
    from fimtune.model import load_for_inference
    from fimtune.serve.decoding import Decoder

    loaded = load_for_inference(target, torch.device("cpu"), torch.float32)
    merge_adapter(loaded.model)
    return Decoder(loaded.model, FimPrompter(loaded.tokenizer))


def serve_in_thread(app: Any) -> tuple[str, Any]:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    for _ in range(3000):
        if server.started:
            break
        time.sleep(0.01)
    return f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", server


def psm_inputs(prefix: str, suffix: str) -> str:
    return f"<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"


def post(client: Any, prefix: str, suffix: str, new_tokens: int, stops: list[str]) -> tuple[str, float, int]:
    """One llm-vscode-shaped request: (text, seconds, new tokens)."""
    body = {
        "inputs": psm_inputs(prefix, suffix),
        "parameters": {"max_new_tokens": new_tokens, "do_sample": False, "stop": stops, "details": True},
    }
    start = time.perf_counter()
    r = client.post("/generate", json=body)
    seconds = time.perf_counter() - start
    r.raise_for_status()
    return r.json()["generated_text"], seconds, r.json()["details"]["generated_tokens"]


# --------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------


def single_request(bench: Bench, client: Any, text: str, cursor: int, baseline: bool = True) -> dict[str, Any]:
    """(a): one 512-token FIM request + 16 new tokens: baseline, engine cold, engine warm."""
    prefix, suffix = text[:cursor], text[cursor:]
    ids = bench.prompter.build(prefix, suffix, "spm", PROMPT_TOKENS)
    bench.generate(ids, NEW_TOKENS, [])  # warm-up
    base = [bench.generate(ids, NEW_TOKENS, []) for _ in range(REPEAT if baseline else 1)]
    bench.engine.limits.trim_step = 1  # the exact 512-token prompt the baseline gets
    cold, warm = [], []
    try:
        for _ in range(REPEAT):
            bench.engine.decoder.caches.clear()
            cold.append(post(client, prefix, suffix, NEW_TOKENS, []))
            warm.append(post(client, prefix, suffix, NEW_TOKENS, []))
    finally:
        bench.engine.limits.trim_step = TRIM_STEP
    return {
        "prompt_tokens": len(ids),
        "generate_ms": 1000 * statistics.median(r[1] for r in base),
        "engine_cold_ms": 1000 * statistics.median(r[1] for r in cold),
        "engine_warm_ms": 1000 * statistics.median(r[1] for r in warm),
        "identical": all(r[0] == base[0][0] for r in cold + warm),
        "new_tokens": cold[0][2],
    }


def keystrokes(text: str, cursor: int, requests: int = REQUESTS, seed: int = 0) -> list[tuple[str, str]]:
    """(prefix, suffix) of each request as a person types the text after ``cursor``."""
    rng = random.Random(seed)
    suffix, typed, out = text[cursor + HOLE_CHARS :], 0, []
    for _ in range(requests):
        out.append((text[: cursor + typed], suffix))
        typed += rng.randint(*TYPED_CHARS)
    return out


def replay(bench: Bench, client: Any, holes: list[tuple[str, str]], stops: list[str], mode: str, baseline: bool):
    """(b): the requests one after another, on a fresh cache; engine (and baseline) latencies."""
    bench.service.mode = mode
    bench.engine.decoder.caches.clear()
    stats = bench.engine.decoder.stats
    engine_s, base_s, fed, same, new, as_fp32, forwards = [], [], [], 0, [], 0, []
    for prefix, suffix in holes:
        before, forwards_before = stats.fed_tokens, stats.forwards
        got, seconds, n_new = post(client, prefix, suffix, NEW_TOKENS, stops)
        forwards.append(stats.forwards - forwards_before)
        engine_s.append(seconds)
        fed.append(stats.fed_tokens - before)
        new.append(n_new)
        ids = bench.prompter.build(prefix, suffix, mode, PROMPT_TOKENS, trim_step=TRIM_STEP)
        if bench.fp32 is not None:
            as_fp32 += got == bench.fp32_text(ids, stops)
        if baseline:
            expected, seconds = bench.generate(ids, NEW_TOKENS, stops)
            base_s.append(seconds)
            same += got == expected
    out = {
        "mode": mode,
        "stop": stops,
        "engine_p50_ms": 1000 * percentile(engine_s, 0.5),
        "engine_p95_ms": 1000 * percentile(engine_s, 0.95),
        "fed_tokens_median": statistics.median(fed[1:]),
        "new_tokens_mean": statistics.mean(new),
        "forwards_mean": statistics.mean(forwards),
    }
    if bench.fp32 is not None:
        out["same_as_fp32"] = f"{as_fp32}/{len(holes)}"
    if baseline:
        out |= {
            "generate_p50_ms": 1000 * percentile(base_s, 0.5),
            "generate_p95_ms": 1000 * percentile(base_s, 0.95),
            "identical": f"{same}/{len(holes)}",
        }
    return out


def machine(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "target": args.target,
        "dtype": args.dtype,
        "quantize": args.quantize,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(args)
    text = Path(textwrap.__file__).read_text()
    cursor = text.index("\n", int(len(text) * CURSOR_AT)) + 1
    url, server = serve_in_thread(bench.app)
    report: dict[str, Any] = {"machine": machine(args), "file": textwrap.__file__, "requests": args.requests}
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            report["single"] = single_request(bench, client, text, cursor, baseline=not args.engine_only)
            holes = keystrokes(text, cursor, args.requests)
            baseline = not args.engine_only
            report["replay"] = [
                replay(bench, client, holes, [], "spm", baseline),
                replay(bench, client, holes, ["\n"], "spm", baseline),
                replay(bench, client, holes, ["\n"], "psm", baseline=False),
            ]
    finally:
        server.should_exit = True
    return report


def markdown(report: dict[str, Any]) -> str:
    m, a = report["machine"], report["single"]
    lines = [
        f"threads {m['threads']}, {m['dtype']}{', int8' if m['quantize'] else ''}, target `{m['target']}`",
        "",
        "| (a) one request | prompt tokens | new tokens | plain generate | engine, cold cache | engine, warm | identical |",
        "|---|---|---|---|---|---|---|",
        f"| 512 + 16 | {a['prompt_tokens']} | {a['new_tokens']} | {a['generate_ms']:.0f} ms | "
        f"{a['engine_cold_ms']:.0f} ms | {a['engine_warm_ms']:.0f} ms | {a['identical']} |",
        "",
        f"| (b) replay, {report['requests']} requests | stop | new tokens (mean) | forwards (mean) "
        "| fed tokens (median) | plain generate p50 / p95 | engine p50 / p95 | identical | same as fp32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["replay"]:
        base = f"{r['generate_p50_ms']:.0f} / {r['generate_p95_ms']:.0f} ms" if "generate_p50_ms" in r else "-"
        lines.append(
            f"| {r['mode'].upper()} | {json.dumps(r['stop'])} | {r['new_tokens_mean']:.1f} | {r['forwards_mean']:.1f} "
            f"| {r['fed_tokens_median']:.0f} | {base} | **{r['engine_p50_ms']:.0f}** / {r['engine_p95_ms']:.0f} ms "
            f"| {r.get('identical', '-')} | {r.get('same_as_fp32', '-')} |"
        )
    return "\n".join(lines)


def graph_variants(text: str) -> list[str]:
    """`--graphs`: comma-separated variants, each checked (latency_gpu.parse_variant)."""
    from latency_gpu import parse_variant

    variants = [x for x in text.split(",") if x]
    for variant in variants:
        parse_variant(variant)
    return variants


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="embedded", help="a run folder or a base model")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--quantize", choices=["int8"], help="int8 weights (the engine and the baseline both)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--requests", type=int, default=REQUESTS, help="requests in the replay")
    parser.add_argument("--engine-only", action="store_true", help="skip the replay's plain-generate baseline")
    parser.add_argument(
        "--json", nargs="?", const="-", metavar="PATH", help="print the report as JSON (GPU mode: write it to PATH)"
    )
    gpu = parser.add_argument_group("GPU mode (latency_gpu.py): a model shape with random weights")
    gpu.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: the GPU mode")
    gpu.add_argument("--shape", choices=["starcoderbase-1b", "tiny"], help="model shape (default with cuda: 1B)")
    gpu.add_argument("--tokenizer", metavar="DIR", help="a saved tokenizer (default: .gpu/tokenizer, else embedded)")
    gpu.add_argument("--budget-s", type=float, default=220.0, help="rows are skipped once this is spent")
    gpu.add_argument("--no-cuda-graphs", action="store_true", help="the engine decodes eagerly")
    gpu.add_argument(
        "--graphs",
        type=graph_variants,
        default=["trees", "trees+sdpa", "trees+cublas"],
        metavar="KIND,KIND",
        help="engine variants measured in turn: trees (the compiler's CUDA graphs), captured (per bucket), "
        "then +eager-prefill (single prompts prefilled eagerly, not through graphs), +prefill (the prefill "
        "compiled), +flex (FlexAttention decoding steps), +sdpa (SDPA decoding steps in every bucket, not "
        "the attention timed fastest at start-up), +cublas (a batch of one's products through cuBLAS); "
        "default: trees,trees+sdpa,trees+cublas",
    )
    gpu.add_argument(
        "--requests-per-client",
        type=int,
        help="the server rows' requests of each of the 16 clients (default 10: each row's p95 rests on 8 of 160)",
    )
    gpu.add_argument(
        "--passes",
        type=int,
        default=1,
        help="the server rows this many times, every other pass in reverse order (after a first round "
        "of the defaults, reported apart)",
    )
    gpu.add_argument(
        "--server-all-variants",
        action="store_true",
        help="the server rows for every --graphs variant (default: the first)",
    )
    gpu.add_argument(
        "--no-engine-process-row",
        action="store_true",
        help="skip the server row with the engine in a process of its own (`fimtune serve --engine-process`)",
    )
    gpu.add_argument(
        "--clients-in-process",
        action="store_true",
        help="the server rows' 16 clients run as threads of the server's process (default: their own process)",
    )
    gpu.add_argument("--no-generate-static", action="store_true", help="skip generate(cache_implementation=static)")
    gpu.add_argument(
        "--attention-rows",
        action="store_true",
        help="(CUDA) time one step's attention of each kind at batch 1, 4 and 16 before the server rows",
    )
    gpu.add_argument(
        "--profile-step",
        type=Path,
        metavar="DIR",
        help="profile decoding steps of the first --graphs variant (batch 1 and 16) into DIR",
    )
    gpu.add_argument(
        "--profile-prefill",
        type=Path,
        metavar="DIR",
        help="profile a single prompt's prefill of the first --graphs variant into DIR, after its server rows",
    )
    for flag, what in (
        ("--batch-wait-variants", "batching waits (batch_wait_ms)"),
        ("--switch-interval-variants", "interpreter switch intervals (switch_interval_ms)"),
    ):
        gpu.add_argument(
            flag,
            type=lambda text: [float(x) for x in text.split(",") if x],
            default=[],
            metavar="MS,MS",
            help=f"server runs again with these {what}; default: none",
        )
    args = parser.parse_args()
    if args.device == "cuda" or args.shape:
        import latency_gpu

        args.shape = args.shape or "starcoderbase-1b"
        report = latency_gpu.run(args)
        if args.json == "-":
            print(json.dumps(report, indent=2, default=str))
        return 0 if not report["errors"] else 1
    report = run(args)
    print(json.dumps(report, indent=2) if args.json else markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
