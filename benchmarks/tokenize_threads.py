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

import json
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
    args = latency_gpu.ab_parse(latency_gpu.ab_arguments(__doc__, "the load both ways"))
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
                row = latency_gpu.ab_row(s, url, args.requests_per_client, round_, way)
                stats, counters = engine.snapshot()
                forwards = max(1, stats.forwards - before.forwards)
                row["forward_ms"] = 1000 * (counters.busy_seconds - counted.busy_seconds) / forwards
                print(f"  the engine's worker: {row['forward_ms']:.2f} ms a forward", flush=True)
                report["rows"].append(row)
    finally:
        fimtune.generate._released = RELEASED
        server.should_exit = True
        engine.stop()
    report["summary"] = latency_gpu.ab_summary(report["rows"])
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0 if not any(r["errors"] for r in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
