"""Load: 32 concurrent clients for 60 s over loopback, every API shape, streaming too.

No 5xx but the designed 503s (queue full), and memory stays flat. Bounded in count and time.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time

import httpx
import pytest
from serve_helpers import make_app, running

pytestmark = pytest.mark.slow
CLIENTS = 32
SECONDS = float(os.environ.get("FIMTUNE_LOAD_SECONDS", "60"))
MAX_REQUESTS = 20_000  # a bound on the loop whatever the speed
RSS_GROWTH_LIMIT_MB = 64


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def request_for(rng: random.Random) -> tuple[str, dict, bool]:
    prefix = f"def f(x):\n    y = x * {rng.randint(0, 99)}\n"
    shape = rng.choice(["tgi", "tgi_stream", "openai", "openai_stream", "infill", "infill_stream"])
    n = rng.randint(1, 12)
    if shape.startswith("tgi"):
        body = {"inputs": f"<fim_prefix>{prefix}<fim_suffix>\n<fim_middle>", "parameters": {"max_new_tokens": n}}
        return ("/generate_stream" if shape == "tgi_stream" else "/generate"), body, shape.endswith("stream")
    if shape.startswith("openai"):
        body = {
            "prompt": prefix,
            "suffix": "\n",
            "max_tokens": n,
            "stream": shape.endswith("stream"),
            "model": rng.choice(["run", "other"]),
        }
        return "/v1/completions", body, body["stream"]
    body = {
        "input_prefix": prefix,
        "input_suffix": "\n",
        "n_predict": n,
        "stream": shape.endswith("stream"),
        "input_extra": [{"filename": "a.py", "text": "import os\n"}],
    }
    return "/infill", body, body["stream"]


async def client_loop(url: str, seed: int, deadline: float, results: list, budget: list[int]) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        while time.monotonic() < deadline and budget[0] > 0:
            budget[0] -= 1
            route, body, stream = request_for(rng)
            t = time.perf_counter()
            if stream:
                async with c.stream("POST", route, json=body) as r:
                    async for _ in r.aiter_lines():
                        pass
                    status = r.status_code
            else:
                status = (await c.post(route, json=body)).status_code
            results.append((status, time.perf_counter() - t))


def test_32_clients_for_a_minute(tiny_run, other_adapter, capsys):
    app = make_app(tiny_run, [f"other={other_adapter}"], max_new_tokens=16)
    results: list[tuple[int, float]] = []
    with running(app) as url:
        start = time.monotonic()
        budget = [MAX_REQUESTS]

        async def main() -> float:
            warm = start + min(15.0, SECONDS / 4)
            tasks = [asyncio.create_task(client_loop(url, i, start + SECONDS, results, budget)) for i in range(CLIENTS)]
            while time.monotonic() < warm:
                await asyncio.sleep(0.5)
            rss_warm = rss_mb()
            await asyncio.gather(*tasks)
            return rss_warm

        rss_warm = asyncio.run(main())
        rss_end = rss_mb()
    statuses = [s for s, _ in results]
    bad = [s for s in statuses if s >= 500 and s != 503]
    ok = [t for s, t in results if s == 200]
    with capsys.disabled():
        print(
            f"\nload: {len(results)} requests in {SECONDS:.0f} s by {CLIENTS} clients; 200: {len(ok)}, "
            f"503: {statuses.count(503)}, other: {len(statuses) - len(ok) - statuses.count(503)}; "
            f"latency p50 {statistics.median(ok) * 1000:.0f} ms, p95 {statistics.quantiles(ok, n=20)[18] * 1000:.0f} ms; "
            f"RSS {rss_warm:.0f} -> {rss_end:.0f} MB"
        )
    assert results and not bad, f"unexpected 5xx: {sorted(set(bad))}"
    assert len(ok) > len(results) // 2
    assert rss_end - rss_warm < RSS_GROWTH_LIMIT_MB
