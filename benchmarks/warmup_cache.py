"""A server's warm-up at its first start and at its next: inductor's graph cache between the two.

    OMP_NUM_THREADS=1 python benchmarks/warmup_cache.py --device cpu --shape tiny
    python benchmarks/warmup_cache.py --device cuda                         # the 1B shape on a GPU

Each start is a fresh process (as `fimtune serve` is) that builds latency.py's model (random bf16
weights; StarCoderBase-1B's shape, or a tiny one) and warms up the serving engine's decoding steps:
one graph per batch bucket (1, 4, 16), compiled by inductor with the matrix-vector products of a
batch of one (`gemv`, the default on a GPU; forced on a CPU here, where inductor writes C++). Both
starts share a fresh cache folder (`TORCHINDUCTOR_CACHE_DIR`); each prints its warm-up's seconds
and inductor's graph-cache counters: the first compiles (misses), the second should read them (hits).
On a CPU no CUDA graphs are recorded; on a GPU the warm-up also records them and captures the
prefill graphs, which no cache keeps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
BUCKETS_MAX = 16
LENGTH = 1024 + 64


def start(args: argparse.Namespace) -> dict:
    """One start: build the model, warm the engine up; its seconds and cache counters."""
    sys.path.insert(0, str(HERE))
    import latency_gpu
    from torch._dynamo.utils import counters

    from fimtune.serve.static import StaticDecoding

    s = latency_gpu.build(argparse.Namespace(device=args.device, shape=args.shape, tokenizer=args.tokenizer))
    began = time.perf_counter()
    static = StaticDecoding(s.model, LENGTH, BUCKETS_MAX, attention="sdpa", gemv=True)
    static.warmup()
    seconds = time.perf_counter() - began
    cache = {k.removeprefix("fxgraph_cache_"): v for k, v in counters["inductor"].items() if k.startswith("fxgraph")}
    return {"warmup_s": seconds, "fx_graph_cache": cache}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default="starcoderbase-1b", choices=["starcoderbase-1b", "tiny"])
    parser.add_argument("--tokenizer", metavar="DIR", help="a saved tokenizer (default: .gpu/tokenizer, else embedded)")
    parser.add_argument("--starts", type=int, default=2)
    parser.add_argument("--json", metavar="PATH", help="also write the starts as JSON")
    parser.add_argument("--one-start", action="store_true", help=argparse.SUPPRESS)  # a start's own process
    args = parser.parse_args()
    if args.one_start:
        print(json.dumps(start(args)))
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="fimtune-inductor-cache-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        for i in range(args.starts):
            cmd = [sys.executable, __file__, "--one-start", "--device", args.device, "--shape", args.shape]
            cmd += ["--tokenizer", args.tokenizer] if args.tokenizer else []
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                raise SystemExit(f"start {i + 1} failed:\n{proc.stderr[-3000:]}")
            row = {"start": i + 1, **json.loads(proc.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(
                f"start {row['start']}: warm-up {row['warmup_s']:.1f} s, inductor's graph cache {row['fx_graph_cache']}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "shape": args.shape, "starts": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
