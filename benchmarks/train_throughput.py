"""LoRA training throughput on the StarCoderBase-1B shape (random weights): the recipe's regime,
naive bf16, fimtune's own training step, QLoRA. Figures go to RESULTS.md.

    python benchmarks/train_throughput.py --json out.json            # a CUDA GPU: every variant
    python benchmarks/train_throughput.py --variants c,c-ckpt         # some of them
    python benchmarks/train_throughput.py --shape tiny --length 64 --steps 2   # a smoke run on a CPU (tests)
    python benchmarks/train_throughput.py --shape narrow --length 16 --compile true --variants c,c-cpp-wrapper
                                     # the host's share: the 1B's 24 blocks and kernels, little work in each

Every variant trains LoRA r=4 (alpha 8, dropout 0.1) on c_attn, c_proj and c_fc with AdamW,
batch 4 x 2048 tokens, on a fresh model (same seed, same random weights):

(a) recipe   the seed's regime: fp32 weights, SDPA, gradient checkpointing; a plain PEFT loop
             (`model(input_ids, labels=...)`, `loss.backward()`, `optimizer.step()`)
(b) naive    fp32 weights under bf16 autocast, SDPA; the same plain PEFT loop
b-attn0      (b) without attention dropout, as (c) trains (its kernels have none)
(c) fimtune  `fimtune.train.prepare_model` + `fimtune.train.train_step`, defaults for a CUDA
             GPU: bf16 weights + autocast, `varlen` FlashAttention, the loss in chunks of
             4096 tokens, compiled blocks, hashed dropout masks, fused AdamW, FlashAttention-4
             where the flash-attn-4 package is installed; rows of one document (the work of a/b)
c-fa2        (c) with PyTorch's own flash kernels (FlashAttention-2), not FlashAttention-4
c-docs       (c) on rows packed from several documents (the boundary-aware packer's output)
c-ckpt       (c) with gradient checkpointing
c-mb2        (c) in two micro-batches of 2 rows (gradient accumulation): half the activations
c-mem        (c) keeping a share of the activations (`train.activation_memory`, 0.5 by default)
c-nodrop     (c) with LoRA dropout 0 (what the recipe's dropout costs)
c-eager      (c) without torch.compile (what compiling buys)
c-torch-dropout (c) with PyTorch's own dropout in the blocks (random masks kept for the backward
             pass), not hashed masks made again (what `train.hashed_dropout` saves)
c-lora-r4    (c) with LoRA's rank-4 products as they are, not padded to rank 8 (what padding saves:
             16-byte aligned matrix products)
c-lora-sums  (c) with LoRA's B applied to the rank-wide product (and its transpose in the backward
             pass) as 8 element-wise multiply-adds fused into the kernels that use them, not matrix
             products whose layer-wide outputs are written and read back (an option, measured here)
c-cpp-wrapper (c) with its compiled blocks run by C++ code inductor writes, not Python (inductor's
             `cpp_wrapper`, process-wide): the host's work to start each block's kernels (an option,
             measured here)
c-graphs    (c) with each compiled block's forward and backward graphs replayed as CUDA graphs
             (`train.cuda_graphs`: inductor's `reduce-overhead` mode): one launch a graph, not one
             a kernel and FlashAttention-4's Python per call (the host's time a step; measured here)
c-graphs-mem c-graphs keeping a share of the activations (as c-mem: the GPU preset's before run 11): the
             graphs' memory pool is its own, so the peak may differ from c-mem's
c-graphs-fp8 c-graphs with the frozen base's products in FP8 (as c-fp8): less GPU time and more
             host work than (c) in run 8, so measured where the host's work is replayed
c-graphs-fp8-mem c-graphs-fp8 keeping a share of the activations (as c-mem): the FP8 copies of
             the weights put c-graphs-fp8 over 16 GiB in run 10
c-fp8       (c) with the frozen base's products in FP8 (rowwise scales: `fast.fp8_frozen_products`):
             Hopper's FP8 rate against bf16's (an option, measured here); its loss on a fixed
             batch against the same model's in bf16 tells what the rounding costs
c-eager-loss (c) with the loss's soft-max and gradient eager (fp32 copies of each chunk's logits),
             not compiled (what compiling it saves)
c-repeat-kv  c-fa2 with StarCoder's one key/value head repeated for the 16 query heads, as on
             PyTorch 2.11 before its kernel was checked to take it as it is (what that saves,
             against c-fa2: FlashAttention-4 takes the head as it is anyway)
qlora        (c) on a 4-bit NF4 base (bitsandbytes, double quantization), gradient
             checkpointing, no compile

TFLOP/s counts the model's FLOPs a token (:func:`flop_per_token`: 5.08 GFLOP for the 1B shape at
2048 tokens; runs 1-9 counted 4.9, 3.6% too few): the forward, and the backward through activations
(no weight gradients of the frozen base); for `c-docs`, attention inside each document, as its
kernels attend (~4.73 GFLOP a token for its documents; whole rows were counted before). (c) trains
without attention dropout (its varlen kernels have none; the model's other dropouts stay), where (a)
and (b) keep StarCoder's 0.1 in SDPA: `b-attn0` is (b) without it, the like-for-like baseline.
Before (c) trains, its loss on a fixed batch is checked against plain transformers (SDPA, full logits).

Each variant also reports `queue_ms`: the host's time to queue a step (the median of the calls;
fimtune's step returns before the GPU ends it). Near `step_ms`, the host sets the pace, unless
it waited inside for a full launch queue. The `narrow` shape keeps StarCoderBase-1B's 24 blocks,
16 query heads and one key/value head at a width of 128 and a vocabulary of 512: the same kernels
and calls a step with little work in each, so its step time is mostly the host's.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SHAPE_NAMES = ["starcoderbase-1b", "tiny", "narrow"]
TARGETS = ["c_attn", "c_proj", "c_fc"]
TINY = {"vocab_size": 512, "n_positions": 256, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 128}
NARROW = {"vocab_size": 512, "n_embd": 128, "n_inner": 512}  # the 1B's 24 blocks and 16 heads, thin
SHAPES = {"tiny": TINY, "narrow": NARROW}
ALL = [
    "c",
    "b",
    "a",
    "b-attn0",
    "c-ckpt",
    "qlora",
    "c-mb2",
    "c-docs",
    "c-eager",
    "c-mem",
    "c-nodrop",
    "c-torch-dropout",
    "c-repeat-kv",
    "c-fa2",
    "c-eager-loss",
    "c-lora-r4",
    "c-lora-sums",
    "c-cpp-wrapper",
    "c-fp8",
    "c-graphs",
    "c-graphs-mem",
    "c-graphs-fp8",
    "c-graphs-fp8-mem",
]

GRAPHS = ("c-graphs", "c-graphs-mem", "c-graphs-fp8", "c-graphs-fp8-mem")  # train.cuda_graphs
FP8 = ("c-fp8", "c-graphs-fp8", "c-graphs-fp8-mem")  # the frozen base's products in FP8


def model_config(shape: str) -> Any:
    """StarCoderBase-1B's config (fimtune's shipped values), or a tiny one of the same family."""
    from fimtune.model import model_config as known_config

    config = known_config("bigcode/starcoderbase-1b")
    for key, value in SHAPES.get(shape, {}).items():
        setattr(config, key, value)
    return config


def random_model(
    shape: str, device: torch.device, dtype: torch.dtype, attn: str, attention_dropout: float | None = None
) -> Any:
    """The same random weights every time (initialised in fp32 on ``device``, then cast)."""
    from transformers import AutoModelForCausalLM

    config = model_config(shape)
    if attention_dropout is not None:
        config.attn_pdrop = attention_dropout
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    return model.to(dtype)


def flop_per_token(config: Any, length: int, context: float | None = None) -> float:
    """A training token's FLOPs for LoRA on a frozen GPT-BigCode: the forward (2 a weight of the
    matrix products, the head included, and causal attention's two products: QK^T and PV over half
    the row on average), and the backward through the activations (the products again, attention's
    four: dQ, dK, dV, dP); no gradient of the frozen weights, LoRA's own negligible.

    ``context``: the keys a token attends to on average, where rows hold several documents (the
    attention stays inside each: :func:`attention_context`); half the row by default.

    >>> round(flop_per_token(model_config("starcoderbase-1b"), 2048) / 1e9, 2)
    5.08
    >>> round(flop_per_token(model_config("starcoderbase-1b"), 2048, context=416.5) / 1e9, 2)  # c-docs's rows
    4.73
    """
    d, layers, vocab = config.n_embd, config.n_layer, config.vocab_size
    kv = d // config.n_head * (1 if getattr(config, "multi_query", True) else config.n_head)
    inner = config.n_inner or 4 * d
    weights = layers * (d * (d + 2 * kv) + d * d + 2 * d * inner) + d * vocab
    attention = layers * 2 * (2 * d * (length / 2 if context is None else context))
    return 4 * weights + 3 * attention


def attention_context(rows: list[dict]) -> float:
    """The keys a token attends to on average in these rows, causal attention inside each document
    (position ids restart at each): half of each document, as `length / 2` is of a row of one.

    >>> attention_context([{"position_ids": torch.arange(2048)[None]}])
    1024.0
    >>> attention_context([{"position_ids": torch.cat([torch.arange(1024), torch.arange(1024)])[None]}])
    512.0
    """
    return torch.cat([r["position_ids"].flatten() for r in rows]).double().mean().item() + 0.5


def batches(vocab: int, batch: int, length: int, device: torch.device, docs: bool, seed: int = 1):
    """Endless random packed batches; with ``docs`` the rows hold documents of code-file lengths."""
    g = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(5, vocab, (batch, length), generator=g)
        if docs:
            rows = []
            for _ in range(batch):
                lengths: list[int] = []
                while sum(lengths) < length:  # log-normal lengths, median ~400 tokens, as source files
                    lengths.append(max(8, int(math.exp(6.0 + 1.0 * torch.randn(1, generator=g).item()))))
                lengths[-1] -= sum(lengths) - length
                rows.append(torch.cat([torch.arange(n) for n in lengths if n > 0]))
            pos = torch.stack(rows)
        else:
            pos = torch.arange(length).expand(batch, length).clone()
        yield {"input_ids": ids.to(device), "position_ids": pos.to(device), "labels": ids.clone().to(device)}


def run_config(args: argparse.Namespace, *extra: str) -> Any:
    from fimtune.config import load_run_config

    return load_run_config(
        None,
        [
            "lora.r=4",
            "lora.alpha=8",
            "lora.dropout=0.1",
            f"lora.target_modules=[{','.join(TARGETS)}]",
            f"train.batch_size={args.batch}",
            f"packing.seq_length={args.length}",
            "train.learning_rate=5e-4",
            "train.weight_decay=0.01",
            "train.warmup_steps=30",
            "train.max_steps=100",
            *extra,
        ],
    )


# --------------------------------------------------------------------------------------
# (a), (b): plain PEFT loops
# --------------------------------------------------------------------------------------


def plain_peft(
    args: argparse.Namespace,
    device: torch.device,
    autocast: bool,
    checkpointing: bool,
    attention_dropout: float | None = None,
) -> dict:
    from peft import LoraConfig, get_peft_model

    model = random_model(args.shape, device, torch.float32, "sdpa", attention_dropout)
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS, task_type="CAUSAL_LM")
    )
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4, weight_decay=0.01)
    data = batches(model.config.vocab_size, args.batch, args.length, device, docs=False)

    def step() -> float:
        b = next(data)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=b["input_ids"], labels=b["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return timed(step, args, device)


# --------------------------------------------------------------------------------------
# (c) and friends: fimtune's own step
# --------------------------------------------------------------------------------------


def fimtune_step(args: argparse.Namespace, device: torch.device, variant: str) -> dict:
    from fimtune import fast
    from fimtune.model import attn_implementation
    from fimtune.train import Setup, make_accelerator, make_optimizer, prepare_model, train_step

    extra = ["train.mixed_precision=bf16" if device.type == "cuda" else "train.mixed_precision=no"]
    rows = args.batch
    if variant == "c-ckpt":
        extra.append("train.gradient_checkpointing=true")
    if variant == "c-mb2":
        if args.batch % 2:  # two halves of the batch: an odd one would train a row less than it counts
            raise ValueError(f"c-mb2 trains the batch in two halves: --batch {args.batch} is odd")
        rows = args.batch // 2
        extra += [f"train.batch_size={rows}", "train.gradient_accumulation_steps=2"]
    if variant == "c-eager":
        extra.append("train.compile=false")
    if variant in ("c-mem", "c-graphs-mem", "c-graphs-fp8-mem"):
        extra.append(f"train.activation_memory={args.activation_memory}")
    if variant == "c-nodrop":
        extra.append("lora.dropout=0.0")
    if variant == "c-torch-dropout":
        extra.append("train.hashed_dropout=false")
    if variant in GRAPHS:
        extra.append("train.cuda_graphs=true")
    fa2 = variant in ("c-fa2", "c-repeat-kv")
    if fa2:
        extra.append("train.attention_kernel=pytorch")
    if variant == "qlora":
        extra += ["model.quantization=4bit", "train.gradient_checkpointing=true"]
    if args.compile is not None and variant != "c-eager":
        extra.append(f"train.compile={str(args.compile).lower()}")
    cfg = run_config(args, *extra)
    acc = make_accelerator(cfg)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    attn = attn_implementation(None, device, training=True)
    result: dict[str, Any] = {"attention": attn}
    if variant == "qlora":
        model = quantized_model(args, device, dtype)
    else:
        model = random_model(args.shape, device, dtype, attn)
    on_gpu_varlen = device.type == "cuda" and attn == fast.VARLEN
    if on_gpu_varlen:  # the flash kernels this variant trains with check its loss too
        fast.select_flash_attention(device, "pytorch" if fa2 else "auto", fast._attention_shape(model.config))
    if variant in ("c", "c-docs"):
        result["check"] = check_loss(model, args, device, docs=variant == "c-docs")
    fast._GROUPED_AS_THEY_ARE.clear()  # each variant checks afresh (its blocks compile afresh too)
    if variant == "c-repeat-kv" and on_gpu_varlen:  # as before the check: StarCoder's key/value head repeated 16x
        fast._GROUPED_AS_THEY_ARE[torch.cuda.current_device()] = False
    model, chunk = prepare_model(model, cfg, acc, [])
    if variant == "c-eager-loss":
        fast._COMPILED_LOSS.clear()
    if variant == "c-lora-r4":
        fast.pad_lora_rank(model, 1)
    compiled = any(getattr(b, "_compiled_call_impl", None) for b in fast.transformer_blocks(model))
    graphs = cfg.train.cuda_graphs and compiled and device.type == "cuda"  # on a CPU: compiled, no graphs
    result["cuda_graphs"] = graphs
    if variant == "c-lora-sums" and compiled:
        fast.compile_blocks(model, narrow_max=fast.NARROW_PRODUCT_MAX)  # the same blocks, compiled anew
        result["narrow_products"] = fast.NARROW_PRODUCT_MAX
    if variant in FP8:
        before, logits = fixed_batch_loss(model, args, device, chunk)
        result["fp8_layers"] = fast.fp8_frozen_products(model)
        after, fp8_logits = fixed_batch_loss(model, args, device, chunk)
        result["fp8_check"] = {
            "loss_bf16": before,
            "loss_fp8": after,
            "rel_diff": abs(after - before) / before,
            "logits_rel_diff": relative_difference(fp8_logits, logits),
        }
        if compiled:  # the same blocks, compiled anew
            fast.compile_blocks(model, mode="reduce-overhead" if variant in GRAPHS else None)
    result["cpp_wrapper"] = bool(torch._inductor.config.cpp_wrapper)
    result["lora_rank_padded"] = any(isinstance(m, fast._RankPaddedA) for m in model.modules())
    result["loss_chunk_tokens"] = chunk
    result["compiled_loss"] = any(fast._COMPILED_LOSS.values())
    result["flash_attention"] = fast.current_flash_attention() if on_gpu_varlen else None
    if on_gpu_varlen:
        result["kv_heads_as_they_are"] = result["flash_attention"] == "FA4" or bool(  # FA4 takes them as they are
            fast._GROUPED_AS_THEY_ARE.get(torch.cuda.current_device())
        )
    optimizer, scheduler = make_optimizer(model, cfg, device, 100)
    model, optimizer = acc.prepare(model, optimizer)
    # Host rows, as `fimtune train` feeds the step: it counts their labels and bounds on the host and
    # copies them through pinned memory, queued. Rows made on the GPU would cost a wait for the
    # stream at each step (copies from pageable memory, the counts read back), so the host could not
    # queue a step while the GPU runs the one before, and queue_ms would include that wait.
    data = batches(model.config.vocab_size, rows, args.length, torch.device("cpu"), docs=variant == "c-docs")
    s = Setup(acc, model, None, optimizer, scheduler, data, None, 100, args.batch * args.length, chunk, graphs)
    counter = iter(range(10**6))
    model.train()

    def step() -> Any:  # the step queued: its loss is read later (as `fimtune train` does)
        return train_step(s, cfg.train, Path("."), next(counter))

    from torch._dynamo.utils import counters

    skips = counters["inductor"]["cudagraph_skips"]
    context = None
    if variant == "c-docs":  # attention inside each document: fewer FLOPs than over whole rows
        trained = batches(model.config.vocab_size, rows, args.length, torch.device("cpu"), docs=True)
        context = attention_context([next(trained) for _ in range(args.warmup + args.steps + 2)])
    result.update(timed(step, args, device, context))
    if graphs:  # graphs inductor ran without CUDA graphs (a reason is logged)
        result["cudagraph_skips"] = int(counters["inductor"]["cudagraph_skips"] - skips)
    profiled = args.profile_variants is None or variant in args.profile_variants.split(",")
    if args.profile and profiled and device.type == "cuda":
        result["profile"] = profile(step, args.profile / f"profile-{variant}.txt")
    return result


def cuda_graphs_profiled() -> None:
    """Start the profiler once before any CUDA graph is recorded: a profiler first started after
    graphs were captured can fault or hang as they replay (PyTorch's own helper for this)."""
    from torch.profiler import _utils

    if hasattr(_utils, "_init_for_cuda_graphs"):
        _utils._init_for_cuda_graphs()


def profile(step: Any, path: Path, steps: int = 2) -> str:
    """Two more steps under torch.profiler: the kernels by GPU time, then the operators by the host's
    own time (what it spends queueing them), to ``path``; returns the path."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    table = averages.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90)
    table += "\n\nBy the host's own time:\n" + averages.table(
        sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=90
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)
    print(table[:6000], flush=True)
    return str(path)


def quantized_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    """The random model saved once, loaded back through fimtune in 4-bit NF4."""
    from fimtune.config import ModelConfig
    from fimtune.model import load_base_model

    folder = Path(tempfile.mkdtemp(prefix="fimtune-bench-"))
    random_model(args.shape, device, dtype, "sdpa").save_pretrained(folder, safe_serialization=True)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return load_base_model(ModelConfig(name_or_path=str(folder), quantization="4bit"), device, training=True)


@torch.no_grad()
def check_loss(model: Any, args: argparse.Namespace, device: torch.device, docs: bool) -> dict:
    """fimtune's loss (its attention, chunked head) against plain transformers (SDPA, full logits)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fimtune.train import summed_loss

    b = next(batches(model.config.vocab_size, args.batch, args.length, device, docs=docs, seed=7))
    model.eval()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        fast, n = summed_loss(model, b, 4096)
        fast = fast.item() / n
        impl = model.config._attn_implementation
        model.set_attn_implementation("sdpa")
        pos = {"position_ids": b["position_ids"]} if docs else {}
        # No flash kernel: the reference shares no kernel with the path it checks.
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            logits = model(input_ids=b["input_ids"], use_cache=False, **pos).logits.float()
        ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten()).item()
        del logits
        model.set_attn_implementation(impl)
    model.train()
    return {"loss_fimtune": fast, "loss_transformers": ref, "rel_diff": abs(fast - ref) / ref}


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


@torch.no_grad()
def fixed_batch_loss(model: Any, args: argparse.Namespace, device: torch.device, chunk: int) -> tuple[float, Any]:
    """A prepared model on a fixed batch, evaluated eagerly (no compile): the mean loss, and the
    logits of the first row's first 256 tokens (random weights give near-uniform logits, whose
    loss hardly moves: the logits tell how far a change moved the model's outputs)."""
    from fimtune.train import forward_logits, summed_loss

    b = next(batches(model.config.vocab_size, args.batch, args.length, device, docs=False, seed=7))
    model.eval()
    with torch.compiler.set_stance("force_eager"), torch.autocast(device.type, torch.bfloat16, device.type == "cuda"):
        loss, n = summed_loss(model, b, chunk)
        logits = forward_logits(model, {k: v[:1, :256] for k, v in b.items()}).float()
    model.train()
    return loss.item() / n, logits


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step: Any, args: argparse.Namespace, device: torch.device, context: float | None = None) -> dict:
    """Warm-up steps (compilation happens there), then timed steps, one after the other as in
    training: median seconds per step, from one step's end to the next's.

    ``step()`` returns the loss (a plain loop reads it, waiting for the step), or a function that
    reads it: fimtune's step is only queued, and its loss is read once the next step is queued.
    """

    def read(result: Any) -> float:
        return result()[0] if callable(result) else result

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        read(step())
    sync(device)
    warmup_s = time.perf_counter() - t0
    losses, reads, queues, queued = [], [], [], None
    while len(reads) <= args.steps:  # `args.steps` + 1 ends: `args.steps` intervals
        t = time.perf_counter()
        result = step()
        queues.append(time.perf_counter() - t)
        if not callable(result):  # a plain loop's step read its loss: it ended as it returned
            losses.append(result)
            reads.append(time.perf_counter())
            continue
        # A queued step's predecessor is read once it is queued, so each interval spans a step queued
        # while the one before runs; the last one too: the step after it is queued, then drained untimed
        # (read with nothing queued after it, its end came a host's queueing time early: ~0 on a CPU).
        if queued is not None:
            losses.append(read(queued))
            reads.append(time.perf_counter())
        queued = result
    if queued is not None:
        read(queued)  # the step queued after the last timed one
    sync(device)
    times = [b - a for a, b in zip(reads, reads[1:], strict=False)]  # `args.steps` steps, end to end
    sec = statistics.median(times)
    tokens = args.batch * args.length
    out = {
        "tokens_per_s": tokens / sec,
        "step_ms": 1000 * sec,
        "step_ms_min": 1000 * min(times),
        "step_ms_max": 1000 * max(times),
        "queue_ms": 1000 * statistics.median(queues),  # the host's time to queue a step
        "warmup_s": warmup_s,
        "last_loss": losses[-1],
    }
    if args.shape == "starcoderbase-1b":
        out["tflops"] = tokens / sec * flop_per_token(model_config(args.shape), args.length, context) / 1e12
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def run_variant(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    # Compile afresh (a variant's settings must not reuse another's graphs); this also lets go of the
    # last variant's CUDA graphs and their memory pool, before this one's peak is taken.
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if name == "a":
        return plain_peft(args, device, autocast=False, checkpointing=True)
    if name in ("b", "b-attn0"):
        attention_dropout = 0.0 if name == "b-attn0" else None
        return plain_peft(
            args, device, autocast=device.type == "cuda", checkpointing=False, attention_dropout=attention_dropout
        )
    if name == "qlora" and device.type != "cuda":
        return {"skipped": "needs a CUDA GPU (bitsandbytes)"}
    if name in GRAPHS and device.type != "cuda":
        return {"skipped": "needs a CUDA GPU (CUDA graphs; tests/test_train.py checks the option on a CPU)"}
    if name == "c-cpp-wrapper":
        # Process-wide for the variant, not `torch.compile(options=...)`: PyTorch 2.11 compiles a
        # backward graph after that option's scope has ended, and fails (pytorch/pytorch#178845).
        # No graph cache: a C++ graph of autograd read back from it failed on CUDA (#144609).
        with torch._inductor.config.patch(cpp_wrapper=True, fx_graph_cache=False):
            return fimtune_step(args, device, name)
    return fimtune_step(args, device, name)


def versions(device: torch.device) -> dict:
    import accelerate
    import peft
    import transformers

    v = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    }
    try:
        import bitsandbytes

        v["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    return v


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--variants", default=",".join(ALL), help=f"comma-separated, of {','.join(ALL)}")
    p.add_argument("--shape", choices=sorted(SHAPE_NAMES), default="starcoderbase-1b")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--compile", type=lambda s: s.lower() in ("1", "true", "yes"), default=None)
    p.add_argument("--json", type=Path, help="write the figures here too")
    p.add_argument("--activation-memory", type=float, default=0.5, help="c-mem: train.activation_memory")
    p.add_argument("--profile", type=Path, help="on CUDA: profile two more steps of each fimtune variant into DIR")
    p.add_argument(
        "--profile-variants", default=None, help="with --profile: only these (comma-separated; default: every one)"
    )
    p.add_argument("--budget-s", type=float, default=None, help="skip the variants left once this many seconds passed")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    warnings.filterwarnings("ignore")
    report: dict[str, Any] = {
        "versions": versions(device),
        "shape": args.shape,
        "batch": args.batch,
        "length": args.length,
        "results": {},
    }
    print(json.dumps(report["versions"]), flush=True)
    if args.profile and device.type == "cuda":
        cuda_graphs_profiled()
    start = time.perf_counter()
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        t = time.perf_counter()
        if args.budget_s is not None and t - start > args.budget_s:
            report["results"][name] = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
            continue
        if args.json:  # until its figures replace it: a run ended here (gpu_check.sh's timeout) says so
            report["results"][name] = {"error": "unfinished: the run ended during this variant"}
            args.json.write_text(json.dumps(report, indent=2))
        try:
            res = run_variant(name, args, device)
        except Exception as e:  # one failing variant must not lose the others
            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            if device.type == "cuda":
                res["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        res["wall_s"] = time.perf_counter() - t
        report["results"][name] = res
        print(name, json.dumps(res), flush=True)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    print_table(report)
    return 0


def print_table(report: dict) -> None:
    res = report["results"]
    print(
        f"\n{'variant':<8} {'tokens/s':>10} {'TFLOP/s':>8} {'peak GiB':>9} {'step ms':>8} {'queue ms':>8} "
        f"{'warm-up s':>9}  note"
    )
    for name, r in res.items():
        if "tokens_per_s" not in r:
            print(f"{name:<8} {r.get('error') or r.get('skipped')}")
            continue
        note = ""
        if "check" in r:
            note = f"loss vs transformers: {r['check']['rel_diff']:.1e} rel"
        if "fp8_check" in r:
            c8 = r["fp8_check"]
            note = f"vs bf16 products: loss {c8['rel_diff']:.1e}, logits {c8['logits_rel_diff']:.1e} rel"
        if r.get("flash_attention"):
            note += f"; {r['flash_attention']}"
        if r.get("cuda_graphs"):
            note += f"; CUDA graphs ({r.get('cudagraph_skips', 0)} skipped)"
        if "kv_heads_as_they_are" in r:
            note += "; key/value heads " + ("as they are" if r["kv_heads_as_they_are"] else "repeated")
        print(
            f"{name:<8} {r['tokens_per_s']:>10,.0f} {r.get('tflops', float('nan')):>8.1f} "
            f"{r.get('peak_gib', float('nan')):>9.2f} {r['step_ms']:>8.1f} {r['queue_ms']:>8.1f} "
            f"{r['warmup_s']:>9.1f}  {note}"
        )
    c = res.get("c", {}).get("tokens_per_s")
    for base in ("a", "b"):
        other = res.get(base, {}).get("tokens_per_s")
        if c and other:
            print(f"(c)/({base}) = {c / other:.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())
