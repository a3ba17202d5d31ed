"""Closed-loop HTTP clients in a process of their own, for the server rows of latency_gpu.py.

    python benchmarks/load_clients.py < plan.json > results.json

plan.json: {"url": "http://127.0.0.1:PORT", "path": "/v1/completions", "bodies": [[body, ...], ...]},
one list of JSON bodies per client. Each client is a thread that sends its bodies one after another,
each as soon as the previous answer arrived, and times them. Prints
{"seconds": [...], "usages": [...], "timings": [...], "errors": [...], "wall_s": ...}: the answers'
`usage` objects, the seconds from the clients' start to the last answer (not this process's start),
and their timing headers (TGI's `x-validation-time`, `x-queue-time`, `x-inference-time`,
`x-total-time`, ms) as {"validation": ..., "queue": ..., "inference": ..., "total": ...}.

Editors are other processes than the server: clients running as threads of the server's own process
would take the interpreter lock from its event loop and its model worker, and add their time to
the latencies measured.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

TIMINGS = ("validation", "queue", "inference", "total")


def run_clients(url: str, path: str, bodies: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """One thread per client, each posting its bodies in turn: seconds, usages, timings and errors,
    all clients, and the load's wall seconds (``wall_s``)."""
    import httpx

    def one_client(mine: list[dict[str, Any]]) -> tuple[list[float], list[dict], list[dict], list[str]]:
        seconds, usages, timings, errors = [], [], [], []
        with httpx.Client(base_url=url, timeout=120) as http:
            for body in mine:
                start = time.perf_counter()
                try:
                    resp = http.post(path, json=body)
                    resp.raise_for_status()
                    seconds.append(time.perf_counter() - start)
                    usages.append(resp.json()["usage"])
                    timings.append({name: int(resp.headers.get(f"x-{name}-time", -1)) for name in TIMINGS})
                except Exception as e:
                    errors.append(f"{type(e).__name__}: {e}"[:300])
        return seconds, usages, timings, errors

    began = time.perf_counter()
    with ThreadPoolExecutor(max(1, len(bodies))) as pool:
        results = list(pool.map(one_client, bodies))
    wall_s = time.perf_counter() - began
    return {
        "seconds": [x for r in results for x in r[0]],
        "usages": [x for r in results for x in r[1]],
        "timings": [x for r in results for x in r[2]],
        "errors": [x for r in results for x in r[3]],
        "wall_s": wall_s,
    }


def main() -> int:
    plan = json.load(sys.stdin)
    json.dump(run_clients(plan["url"], plan["path"], plan["bodies"]), sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
