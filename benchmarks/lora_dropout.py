"""What LoRA dropout costs in one compiled transformer block: step time and kept activations.

    python benchmarks/lora_dropout.py                         # the CPU, 1,024 tokens
    python benchmarks/lora_dropout.py --device cuda --tokens 8192
    python benchmarks/lora_dropout.py --activation-memory 0.75  # as the GPU preset compiles
    python benchmarks/lora_dropout.py --shape tiny --steps 2  # a smoke run (tests)

One StarCoderBase-1B block (random weights, bf16; LoRA r=4 on c_attn, c_proj and c_fc, as the
fast path trains it: inputs not cast to the adapters' dtype), compiled with inductor, forward
and backward on one row of ``--tokens`` tokens, in three settings side by side, alternating:

    none     LoRA dropout 0
    torch    nn.Dropout(0.1) (PEFT's): Philox numbers drawn per element, a boolean mask kept
    hashed   fimtune.fast.HashedDropout(0.1): masks hashed from a seed, made again when needed

For each: the median step time, and the bytes of the tensors the block keeps for its backward
pass (through `torch.autograd.graph.saved_tensors_hooks`; the frozen weights are left out).
The block's own dropouts (GPTBigCode's 0.1 on residuals) are off, so only LoRA's are counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SETTINGS = ("none", "torch", "hashed")


def block(shape: str, setting: str, device: torch.device) -> tuple[Any, int, set[int]]:
    """A compiled block of a fresh one-layer model, its width, and where its weights are."""
    return lora_block(shape, device, 0.0 if setting == "none" else 0.1, hashed=setting == "hashed")


def lora_block(
    shape: str, device: torch.device, dropout: float, hashed: bool, pad: bool = False, backend: Any = "inductor"
) -> tuple[Any, int, set[int]]:
    """One block of a fresh one-layer model (bf16, LoRA r=4 with ``dropout``, hashed masks or
    PyTorch's, the rank padded to 8 or not; the model's own dropouts off) compiled with
    ``backend``: (the block, its width, where its weights are)."""
    from peft import LoraConfig, get_peft_model
    from train_throughput import TARGETS, model_config
    from transformers import AutoModelForCausalLM

    from fimtune import fast

    cfg = model_config(shape)
    cfg.n_layer = 1
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora, autocast_adapter_dtype=False)  # bf16 adapters: no input casts
    fast.disable_attention_dropout(model)
    for m in model.modules():
        if type(m) is torch.nn.Dropout and not _in_lora(model, m):
            m.p = 0.0
    if hashed:
        fast.hash_dropout(model)
    if pad:
        fast.pad_lora_rank(model)
    b = fast.transformer_blocks(model)[0].train()
    return torch.compile(b, backend=backend), cfg.n_embd, {q.data_ptr() for q in b.parameters()}


def _in_lora(model: torch.nn.Module, module: torch.nn.Module) -> bool:
    return any(module is d for m in model.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values())


def measure(fn: Any, width: int, weights: set[int], tokens: int, device: torch.device) -> tuple[float, int]:
    """One step's seconds and the bytes of the activations it keeps for the backward pass."""
    x = torch.randn(1, tokens, width, dtype=torch.bfloat16, device=device, requires_grad=True)
    pos = torch.arange(tokens, device=device)[None]
    kept: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in weights:  # activations, not the weights
            kept.append(t.numel() * t.element_size())
        return t

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x, position_ids=pos)
    out = out[0] if isinstance(out, tuple) else out
    out.float().square().mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, sum(kept)


def parser(description: str) -> argparse.ArgumentParser:
    """The arguments the LoRA block benchmarks share (this one and lora_products.py)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shape", default="starcoderbase-1b", choices=["starcoderbase-1b", "tiny"])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--steps", type=int, default=6, help="timed steps of each setting, after 2 warm-up steps")
    p.add_argument("--json", type=Path, help="write the figures here too")
    return p


def header(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The report's machine and workload, before its results."""
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": args.shape,
        "tokens": args.tokens,
    }


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument(
        "--activation-memory",
        type=float,
        default=1.0,
        help="the share of activations compiled blocks keep (train.activation_memory; the GPU preset's is 0.75)",
    )
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch._functorch.config as functorch_config

    functorch_config.activation_memory_budget = args.activation_memory
    device = torch.device(args.device)
    times, kept = alternate({s: block(args.shape, s, device) for s in SETTINGS}, args.steps, args.tokens, device)
    report = {
        **header(args, device),
        "activation_memory": args.activation_memory,
        "results": {
            s: {"step_ms": 1000 * statistics.median(times[s]), "kept_bytes_per_token": kept[s] / args.tokens}
            for s in SETTINGS
        },
    }
    show(report, f"{report['device']}, {args.tokens} tokens, activation memory {args.activation_memory:g}", args.json)
    return 0


def alternate(
    blocks: dict[str, tuple[Any, int, set[int]]], steps: int, tokens: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Each setting's step seconds (``steps`` of them, after 2 warm-up steps) and kept bytes, the
    settings taking turns: the machine's drift falls on all of them alike."""
    times: dict[str, list[float]] = {s: [] for s in blocks}
    kept: dict[str, int] = {}
    for step in range(steps + 2):
        for s, built in blocks.items():
            seconds, kept[s] = measure(*built, tokens, device)
            if step >= 2:
                times[s].append(seconds)
    return times, kept


def show(report: dict[str, Any], where: str, path: Path | None) -> None:
    """Print a row per setting (step time, kept activations); write the report to ``path`` too."""
    print(f"{'setting':<8} {'step ms':>9} {'kept KiB/token':>15}   ({where})")
    for s, r in report["results"].items():
        print(f"{s:<8} {r['step_ms']:>9.2f} {r['kept_bytes_per_token'] / 1024:>15.2f}")
    if path:
        path.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
