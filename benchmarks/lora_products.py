"""LoRA's rank-wide products in one compiled transformer block: cuBLAS-style products, or sums fused.

    python benchmarks/lora_products.py                          # the CPU, 1,024 tokens
    python benchmarks/lora_products.py --device cuda --tokens 8192
    python benchmarks/lora_products.py --shape tiny --steps 2   # a smoke run (tests)

One StarCoderBase-1B block (random weights, bf16; LoRA r=4 on c_attn, c_proj and c_fc, dropout 0.1
with hashed masks, the rank padded to 8: as the fast path trains on a GPU), compiled with inductor,
forward and backward on one row of ``--tokens`` tokens, in two settings side by side, alternating:

    mm       B applied to the rank-wide product, and its transpose in the backward pass, as matrix
             products (a kernel each, whose output is as wide as the layer's, then read again)
    sums     the same as 8 element-wise multiply-adds that inductor fuses into the kernels that use
             them (`fimtune.fast.product_decompositions`; an option, off until a GPU measures it)

For each: the median step time and the bytes the block keeps for its backward pass.
"""

from __future__ import annotations

import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SETTINGS = ("mm", "sums")


def block(shape: str, setting: str, device: torch.device) -> tuple[Any, int, set[int]]:
    """A compiled block of a fresh one-layer model, its width, and where its weights are."""
    from lora_dropout import lora_block

    from fimtune import fast

    narrow = fast.NARROW_PRODUCT_MAX if setting == "sums" else 0
    backend = fast.inductor_backend(decompositions=fast.product_decompositions(narrow_max=narrow))
    return lora_block(shape, device, 0.1, hashed=True, pad=True, backend=backend)


def main(argv: list[str] | None = None) -> int:
    from lora_dropout import alternate, header, parser, show

    args = parser(__doc__.split("\n")[0]).parse_args(argv)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    times, kept = alternate({s: block(args.shape, s, device) for s in SETTINGS}, args.steps, args.tokens, device)
    report = {
        **header(args, device),
        "results": {
            s: {
                "step_ms": 1000 * statistics.median(times[s]),
                "step_ms_all": [round(1000 * t, 2) for t in times[s]],
                "kept_bytes_per_token": kept[s] / args.tokens,
            }
            for s in SETTINGS
        },
    }
    show(report, f"{report['device']}, {args.tokens} tokens", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
