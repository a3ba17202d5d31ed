"""One chunk of the training loss: its soft-max and gradient eager against compiled.

fimtune's loss runs a chunk of tokens at a time (`train.loss_chunk_tokens`, 4096 on a GPU): the
chunk's logits against the frozen output head, their cross-entropy, and the gradient for the
logits (soft-max less the one-hot target). Eagerly that is an fp32 copy of the logits written and
read several times (log-sum-exp, subtract, exp, scatter, mask, cast: ~8 GB of memory traffic for
4096 tokens of a 49k vocabulary); compiled (`torch.compile`, what the GPU path runs), one reduction
and one element-wise pass over the logits in their dtype. Prints each one's median time, and on a
GPU its peak memory above the logits.

    .venv/bin/python benchmarks/loss_chunk.py                       # CPU, fp32
    python benchmarks/loss_chunk.py --device cuda --dtype bf16      # the GPU path's shape and dtype
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fimtune import fast  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    gen = torch.Generator(device=device).manual_seed(0)
    logits = 3 * torch.randn(args.tokens, args.vocab, device=device, dtype=dtype, generator=gen)
    labels = torch.randint(0, args.vocab, (args.tokens,), device=device, generator=gen)
    valid = torch.rand(args.tokens, device=device, generator=gen) > 0.05
    target = torch.where(valid, labels, 0)
    compiled = torch.compile(fast.loss_chunk_and_logit_grads, dynamic=False, fullgraph=True)
    ways = {
        # in fp32 the eager one writes over its input (a fresh product in training): a copy here
        "eager (fp32 copy, in place)": lambda: fast.eager_loss_chunk(
            logits.clone() if dtype == torch.float32 else logits, target, valid
        ),
        "compiled (fused)": lambda: compiled(logits, target, valid),
    }
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"{args.tokens} tokens x {args.vocab} vocabulary, {args.dtype}, {device.type}")
    results = {}
    for name, fn in ways.items():
        fn()  # warm-up (the compile)
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        times = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            out = fn()
            sync()
            times.append(time.perf_counter() - began)
            del out
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else float("nan")
        results[name] = fn()
        print(f"  {name:<28} {1000 * statistics.median(times):9.2f} ms   peak above the logits {peak:6.2f} GiB")
    (l1, g1), (l2, g2) = results.values()
    print(
        f"  losses {l1.item():.4f} / {l2.item():.4f}; gradients' largest difference {(g1.float() - g2.float()).abs().max().item():.2e}"
    )


if __name__ == "__main__":
    main()
