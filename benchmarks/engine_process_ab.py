"""The engine in a thread of the server's process against the engine in a process of its own, in turns.

    python benchmarks/engine_process_ab.py --device cuda --rounds 4 --json $OUT/engine_process_ab.json
    OMP_NUM_THREADS=1 python benchmarks/engine_process_ab.py --device cpu --shape tiny   # this machine

Two servers with the defaults of `fimtune serve` run side by side, one with the engine's worker in a
thread of its process (the default) and one with `--engine-process` (the engine built and warmed up in a
spawned process; on a GPU it finds the compiler's caches the first engine filled). Each round sends
latency.py's load (16 clients in a process of their own, 10 OpenAI FIM requests each, 1,024 prompt +
32 new tokens) to one server, then to the other, the order swapped every round, so that a drift of
the machine falls on both. The model is latency.py's: StarCoderBase-1B's shape with random bf16
weights on a GPU, a tiny one with `--shape tiny`. Prints a row per round and server, then each
server's median of the rounds' p50 and p95. `--overlap-joins` runs both servers with a row that joins
alone prefilled beside the decoding steps (the default) and with every join stalling the batch
(`fimtune serve --no-overlap-joins`), set on the same engines between loads by `set_batching`: four
configurations a round, their order reversed every round.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import latency_gpu  # noqa: E402  (this folder's modules)
from latency import serve_in_thread  # noqa: E402


def main() -> int:
    parser = latency_gpu.ab_arguments(__doc__, "the load to both servers")
    parser.add_argument(
        "--overlap-joins",
        action="store_true",
        help="both servers with joins prefilled beside the decoding steps and without (4 configurations a round)",
    )
    args = latency_gpu.ab_parse(parser)
    from fimtune.serve.app import create_app

    began = time.perf_counter()
    s = latency_gpu.build(args)
    key = ("trees", "auto", False)  # the server's defaults
    engine = latency_gpu.make_engine(s, args, *key)
    url_thread, thread_server = serve_in_thread(create_app(engine, s.prompter, "psm"))
    engine.ready.wait()
    thread_ready = time.perf_counter() - began
    rows: list[dict[str, Any]] = []
    servers = [("thread", url_thread, engine)]
    overlapped = [("+overlap", {"overlap_joins": True}), ("+in-line", {"overlap_joins": False})]
    batchings = overlapped if args.overlap_joins else [("", {})]
    try:
        with latency_gpu.process_server(args, key, time.monotonic() + 3600) as (apart, _, url_process, process_ready):
            print(f"ready: thread {thread_ready:.1f} s, process {process_ready:.1f} s", flush=True)
            servers.append(("process", url_process, apart))
            for _, url, _ in servers:  # one untimed request per client: the first batches
                latency_gpu.load(s, url, latency_gpu.CLIENTS, 1)
            configurations = [(server, batching) for server in servers for batching in batchings]
            for round_ in range(args.rounds):
                for (name, url, serving), (suffix, changes) in configurations[:: 1 if round_ % 2 == 0 else -1]:
                    with latency_gpu.batching(serving, changes):
                        rows.append(latency_gpu.ab_row(s, url, args.requests_per_client, round_, name + suffix))
    finally:
        thread_server.should_exit = True
    summary = latency_gpu.ab_summary(rows)
    if args.json:
        machine = latency_gpu.machine(args)
        report = {"machine": machine, "ready_s": {"thread": thread_ready, "process": process_ready}, "rows": rows}
        Path(args.json).write_text(json.dumps(report | {"summary": summary}, indent=2, default=str))
    return 0 if not any(r["errors"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
