"""Prompts tokenized in threads, with the interpreter lock held (`encode`) or let go (`encode_batch`).

    OMP_NUM_THREADS=1 python benchmarks/tokenize_threads.py --device cpu --shape tiny   # this machine
    python benchmarks/tokenize_threads.py --device cuda --rounds 2                      # a GPU

On a GPU the server tokenizes each request's prompt in a thread pool (`Service.prepare`), beside its
event loop and the engine's worker thread. `tokenizers`' `Tokenizer.encode` holds the interpreter
lock for the whole call; `encode_batch` lets it go while it runs, and gives the same ids. fimtune's
prompter tokenizes through `encode_batch`; "held" is the same server with its prompts tokenized
through `encode`, as before.

First, the lock itself: a thread counts in Python beside a thread that tokenizes latency.py's prompt
text (8,000 + 3,000 characters) over and over; printed, the counting rate as a share of its rate alone.
Then latency.py's load (16 clients in a process of their own, 10 OpenAI FIM requests each, 1,024
prompt + 32 new tokens) on one server with the engine in a thread (the default), its prompts
tokenized in threads, the two ways in turns, the order swapped every round. Each row: p50 and p95,
the engine's worker time a forward, and each part of the requests' time from the server's timing
headers (p50/p95 ms).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import latency_gpu  # noqa: E402  (this folder's modules)
from latency import serve_in_thread  # noqa: E402

import fimtune.generate  # noqa: E402

RELEASED = fimtune.generate._released


def held(backend: Any, texts: list[str]) -> list[list[int]]:
    """The prompter's tokenizing as it was: `encode`, a text at a time, the lock held."""
    return [backend.encode(text, add_special_tokens=False).ids for text in texts]


def counting_rate(work: Any = None, seconds: float = 1.0) -> int:
    """Python loop iterations a thread makes in ``seconds``, while ``work`` runs in a loop beside it."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            work()

    other = threading.Thread(target=loop) if work is not None else None
    if other is not None:
        other.start()
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        n += 1
    stop.set()
    if other is not None:
        other.join()
    return n


def lock_rows(s: latency_gpu.Setup) -> list[dict[str, Any]]:
    body = latency_gpu.request_body(s, 0, 0)
    backend = s.prompter._plain
    texts = [body["prompt"], body["suffix"]]
    alone = counting_rate()
    rows = []
    for name, fn in (("held", held), ("released", RELEASED)):
        rate = counting_rate(lambda fn=fn: fn(backend, texts)) / alone
        rows.append({"way": name, "python_rate": rate})
        print(f"lock {name:9s}: a counting thread beside the tokenizing runs at {rate:.0%} of its rate alone")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default="starcoderbase-1b", choices=["starcoderbase-1b", "tiny"])
    parser.add_argument("--tokenizer", metavar="DIR", help="a saved tokenizer (default: .gpu/tokenizer, else embedded)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds, each sending the load both ways")
    parser.add_argument(
        "--requests-per-client", type=int, default=latency_gpu.REQUESTS_PER_CLIENT, help="requests of each client"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args()
    args.no_cuda_graphs = False
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    from fimtune.serve.app import create_app

    s = latency_gpu.build(args)
    report: dict[str, Any] = {"machine": latency_gpu.machine(args), "lock": lock_rows(s), "rows": []}
    engine = latency_gpu.make_engine(s, args)
    app = create_app(engine, s.prompter, "psm")
    app.state.service.tokenize_in_threads = True  # the GPU's default, on any device here
    url, server = serve_in_thread(app)
    try:
        engine.ready.wait()
        latency_gpu.load(s, url, latency_gpu.CLIENTS, 1)  # one untimed request per client: the first batches
        for round_ in range(args.rounds):
            for way in ("held", "released")[:: 1 if round_ % 2 == 0 else -1]:
                fimtune.generate._released = held if way == "held" else RELEASED
                before, counted = engine.snapshot()
                got = latency_gpu.load(s, url, latency_gpu.CLIENTS, args.requests_per_client)
                stats, counters = engine.snapshot()
                forwards = max(1, stats.forwards - before.forwards)
                row = {"round": round_, "way": way, "errors": len(got.errors)}
                row |= latency_gpu.stats_ms(got.seconds) | {"split_ms": latency_gpu.time_split(got)}
                row["forward_ms"] = 1000 * (counters.busy_seconds - counted.busy_seconds) / forwards
                report["rows"].append(row)
                print(
                    f"round {round_} {way:9s} p50 {row['p50_ms']:.1f} p95 {row['p95_ms']:.1f} ms, errors "
                    f"{row['errors']}; worker {row['forward_ms']:.2f} ms a forward; ms p50/p95: "
                    + ", ".join(f"{k} {v['p50']:.0f}/{v['p95']:.0f}" for k, v in row["split_ms"].items()),
                    flush=True,
                )
    finally:
        fimtune.generate._released = RELEASED
        server.should_exit = True
        engine.stop()
    report["summary"] = {}
    for way in ("held", "released"):
        mine = [r for r in report["rows"] if r["way"] == way]
        report["summary"][way] = {q: statistics.median(r[f"{q}_ms"] for r in mine) for q in ("p50", "p95")}
        print(f"{way:9s} median of {len(mine)} rounds: p50 {report['summary'][way]['p50']:.1f} "
              f"p95 {report['summary'][way]['p95']:.1f} ms")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0 if not any(r["errors"] for r in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
