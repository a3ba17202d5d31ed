"""The fast training path: document-masked FlashAttention, a chunked loss, regional compile.

What a LoRA step on a GPU spends its time on, and what this module does about it::

    attention over packed rows   FlashAttention's variable-length kernel (PyTorch's own,
                                 `torch.nn.attention.varlen`): documents never see each
                                 other and no (T x T) mask is built or read; multi-query
                                 and grouped key/value heads go in as they are, not repeated
    the loss                     the vocabulary projection and cross-entropy a chunk of
                                 tokens at a time: (tokens x vocab) logits never exist in
                                 fp32 at once; for a frozen head the gradient is made in
                                 the same pass (one matmul saved)
    LoRA in bf16 autocast        no cast of every LoRA input to fp32 (PEFT's default
                                 when adapters are fp32); autocast casts the tiny weights
    everything else              `torch.compile` of each transformer block (one compile
                                 serves all blocks): layer norms, GELU, dropout, residual
                                 adds fuse into few kernels

Each piece computes the same function as the plain path (tests compare them on the CPU);
:func:`speed_up` applies them to a model about to train.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import itertools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

VARLEN = "fimtune_varlen"  # the name registered with transformers' AttentionInterface
IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------
# Document-masked attention through PyTorch's variable-length FlashAttention
# --------------------------------------------------------------------------------------


def varlen_supported(device: torch.device) -> bool:
    """Whether PyTorch's variable-length FlashAttention runs on ``device`` (CUDA, Ampere or newer)."""
    return (
        device.type == "cuda"
        and torch.cuda.is_available()
        and importlib.util.find_spec("torch.nn.attention.varlen") is not None
        and torch.cuda.get_device_capability(device)[0] >= 8
    )


def register_attention(name: str, attention: Any) -> str:
    """Register an attention function with transformers under ``name``, with SDPA's mask function
    (idempotent); return ``name``, for `attn_implementation` / `set_attn_implementation`."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def register_varlen() -> str:
    """Register :func:`varlen_attention` with transformers (idempotent); return its name.

    Its mask function is SDPA's: inference (a KV cache, padded batches) takes the SDPA
    path with that mask; training passes ``cu_seq_lens_q`` and takes the kernel.
    """
    return register_attention(VARLEN, varlen_attention)


def cu_seq_lens(position_ids: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """Cumulative document lengths over the flattened rows (int32, starts at 0, ends at batch * length).

    A document starts where the position id is 0 and at every row start; without position
    ids each row is one document.

    >>> cu_seq_lens(torch.tensor([[0, 1, 2, 0, 1], [3, 4, 0, 1, 2]]), 2, 5, torch.device("cpu")).tolist()
    [0, 3, 5, 7, 10]
    """
    if position_ids is None:
        return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)
    starts = position_ids.reshape(batch, length) == 0
    starts[:, 0] = True
    flat = torch.nonzero(starts.flatten()).flatten()
    end = torch.tensor([batch * length], device=flat.device, dtype=flat.dtype)
    return torch.cat([flat, end]).to(device=device, dtype=torch.int32)


def varlen_kwargs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The keyword arguments that take a packed batch through :func:`varlen_attention`.

    The documents' bounds are ``batch["cu_seq_lens"]`` (see :func:`with_cu_seq_lens`), else
    computed here from the position ids (on a GPU that reads the document count back: a wait).
    The maximum length is the row length, always: a fixed value keeps compiled blocks from
    recompiling for every batch (the kernel only uses it to size its grid). The attention mask
    is a 4D placeholder, which transformers hands to attention as it is (varlen attention
    ignores it): else transformers looks for packed documents in the position ids, reading them
    back from the GPU, and builds a block-diagonal mask nobody uses.
    """
    ids = batch["input_ids"]
    b, t = ids.shape
    cu = batch.get("cu_seq_lens")
    if cu is None:
        cu = cu_seq_lens(batch.get("position_ids"), b, t, ids.device)
    torch._dynamo.maybe_mark_dynamic(cu, 0)  # the document count changes every batch: no recompiles
    placeholder = ids.new_ones((1, 1, 1, 1), dtype=torch.bool)
    return {
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": t,
        "max_length_k": t,
        "attention_mask": placeholder,
    }


def with_cu_seq_lens(batch: dict[str, Any], padded: bool = False) -> dict[str, Any]:
    """A host batch with its documents' cumulative lengths (``cu_seq_lens``) added, computed here on
    the host, so that on a GPU nothing is read back to find them. ``padded``: through
    :func:`padded_bounds` (for CUDA graphs).

    >>> with_cu_seq_lens({"input_ids": [[5, 6, 7], [8, 9, 1]], "position_ids": [[0, 1, 0], [2, 0, 1]]})["cu_seq_lens"]
    tensor([0, 2, 3, 4, 6], dtype=torch.int32)
    """
    ids = torch.as_tensor(batch["input_ids"])
    positions = batch.get("position_ids")
    positions = None if positions is None else torch.as_tensor(positions)
    bounds = cu_seq_lens(positions, *ids.shape, torch.device("cpu"))
    return {**batch, "cu_seq_lens": padded_bounds(bounds) if padded else bounds}


def padded_bounds(cu: torch.Tensor) -> torch.Tensor:
    """Documents' bounds with empty documents added at the end, to a power of two of entries: a
    compiled block replayed as CUDA graphs records a graph for each shape it sees, and packed
    batches' document counts differ from batch to batch. The attention gives the same output.

    >>> padded_bounds(torch.tensor([0, 3, 5, 7, 10], dtype=torch.int32)).tolist()
    [0, 3, 5, 7, 10, 10, 10, 10]
    """
    n = cu.numel()
    size = 1 << max(n - 1, 1).bit_length()
    return torch.cat([cu, cu[-1:].expand(size - n)]) if size > n else cu


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: q [B, H, T, D], k/v [B, Hkv, T, D] -> [B, T, H, D].

    With ``cu_seq_lens_q`` (packed training rows) each document attends causally to itself
    only; without it (generation, padded batches), SDPA with transformers' mask.
    """
    if cu_seq_lens_q is None or query.shape[2] != key.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    b, h, t, d = query.shape
    q = query.transpose(1, 2).reshape(b * t, h, d)
    k = key.transpose(1, 2).reshape(b * t, key.shape[1], d)
    v = value.transpose(1, 2).reshape(b * t, value.shape[1], d)
    max_len = int(max_length_q or t)
    if q.is_cuda:
        dtype = q.dtype
        if dtype not in (torch.float16, torch.bfloat16):  # FlashAttention takes half precision only
            # (fp32 activations: k-bit models keep norms and embeddings in fp32)
            half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
            q, k, v = q.to(half), k.to(half), v.to(half)
        out = _flash_varlen(q, k, v, cu_seq_lens_q, max_len, scaling).to(dtype)
    else:  # the reference: SDPA per document (tests, CPUs)
        out = _sdpa_per_document(q, k, v, cu_seq_lens_q, scaling)
    return out.view(b, t, h, d), None


@functools.cache
def _varlen_params() -> frozenset[str]:
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _flash_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float | None
) -> torch.Tensor:
    if _FA4_ON.get(q.device.index, False):  # heads as they are: FlashAttention-4 serves groups itself
        # Contiguous here, in the compiled block, where the compiler can write them so in the kernel
        # that makes them; the operator's backward then gets them as saved (in run 4 the operator
        # copied q, k and v of the fused projection's output in its forward and again in its
        # backward: ~2.5 ms a step).
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        return fa4_varlen(q, k, v, cu, max_len, scale if scale is not None else q.shape[-1] ** -0.5)[0]
    grouped = k.shape[1] != q.shape[1]
    if grouped and "enable_gqa" not in _varlen_params() and not _GROUPED_AS_THEY_ARE.get(q.device.index, False):
        k, v = _repeat_heads(k, q.shape[1]), _repeat_heads(v, q.shape[1])  # the check below did not pass
    return _varlen(q, k, v, cu, max_len, scale)


def _varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float | None
) -> torch.Tensor:
    """`varlen_attn`, causal, with key/value heads as they are."""
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_params()
    kwargs: dict[str, Any] = {"scale": scale} if "scale" in params else {}
    if "window_size" in params:  # torch >= 2.11: causal is a window (everything left, nothing right)
        kwargs["window_size"] = (-1, 0)
    else:  # torch 2.10
        kwargs["is_causal"] = True
    if k.shape[1] != q.shape[1] and "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def _repeat_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def _cuda_index(device: torch.device | None) -> int | None:
    if device is None:
        return torch.cuda.current_device() if torch.cuda.is_available() else None
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


# CUDA device index -> whether varlen attention takes fewer key/value heads than query heads as they
# are (see grouped_heads_as_they_are); read by `_flash_varlen` (a constant to the compiler).
_GROUPED_AS_THEY_ARE: dict[int, bool] = {}


def grouped_heads_as_they_are(device: torch.device, shape: tuple[int, int, int] | None = None) -> bool:
    """Whether `varlen_attn` takes multi-query / grouped key-value heads as they are on ``device``;
    checked once a device, and remembered for the attention of training steps.

    FlashAttention-2 serves each key/value head to its group of query heads itself. PyTorch 2.12+
    says so with `enable_gqa`; PyTorch 2.11's `varlen_attn` has no such flag, so StarCoder's single
    key/value head was repeated 16 times in every layer: two (tokens x 16 x 128) copies written
    (64 MiB a layer for batch 4 x 2048 on the 1B model), kept or made again for the backward pass,
    and their gradients summed back. Here a small packed batch goes through the kernel with the
    heads as they are, forward and backward, and is compared with the same kernel on repeated
    heads; an error or a disagreement keeps the repetition. ``shape`` (query heads, key/value heads,
    head size: the model's) is the batch's; by default one key/value head and two, for 8 query heads.
    """
    if device.type != "cuda" or not varlen_supported(device):
        return False
    if "enable_gqa" in _varlen_params():
        return True
    index = _cuda_index(device)
    if index not in _GROUPED_AS_THEY_ARE:

        def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
            return _varlen(q, k, v, cu, _longest(cu), None)

        def repeated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
            return kernel(q, _repeat_heads(k, q.shape[1]), _repeat_heads(v, q.shape[1]), cu)

        here = torch.device("cuda", index)
        # The model's own shape (JIT-compiled kernels such as FlashAttention-4's are then the ones it
        # trains with), or one key/value head (StarCoder) and groups of 4 (Llama-style).
        shapes = [shape] if shape else [(8, 1, 64), (8, 2, 64)]
        _GROUPED_AS_THEY_ARE[index] = all(
            same_attention(kernel, repeated, here, torch.bfloat16, heads=h, kv_heads=kv, dim=d) for h, kv, d in shapes
        )
    return _GROUPED_AS_THEY_ARE[index]


def _attention_shape(config: Any) -> tuple[int, int, int] | None:
    """(query heads, key/value heads, head size) of a model config; None where it does not say."""
    heads, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    if not heads or not hidden:
        return None
    kv = 1 if getattr(config, "multi_query", False) else getattr(config, "num_key_value_heads", None) or heads
    return heads, kv, getattr(config, "head_dim", None) or hidden // heads


def _grouped_heads(config: Any) -> bool:
    """Whether a model config has fewer key/value heads than query heads (multi-query or grouped)."""
    shape = _attention_shape(config)
    return shape is not None and shape[1] < shape[0]


def _longest(cu: torch.Tensor) -> int:
    """The longest document's length, from the documents' bounds (a test batch's: read back)."""
    return int((cu[1:] - cu[:-1]).max())


def same_attention(
    attend: Callable[..., torch.Tensor],
    reference: Callable[..., torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    heads: int = 8,
    kv_heads: int = 1,
    dim: int = 64,
    lengths: tuple[int, ...] = (100, 37, 91),
    tolerance: float = 0.02,
) -> bool:
    """Whether ``attend(q, k, v, cu)`` gives ``reference``'s output and gradients (of q, k and v) on a
    random packed batch of documents of ``lengths`` tokens, with ``kv_heads`` key/value heads for
    ``heads`` query heads: each within ``tolerance`` of the reference's largest magnitude. An error
    in ``attend`` is a no (logged).
    """
    g = torch.Generator(device="cpu").manual_seed(0)
    total = sum(lengths)
    shapes = ((total, heads, dim), (total, kv_heads, dim), (total, kv_heads, dim))
    inputs = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
    grad_out = torch.randn(shapes[0], generator=g).to(device, dtype)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)

    def run(fn: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        out = fn(*leaves, cu)
        return [out.detach(), *torch.autograd.grad(out, leaves, grad_out)]

    want = run(reference)
    try:
        got = run(attend)
    except Exception as e:  # noqa: BLE001 - any failure means: do not use it
        log.info("attention with %d key/value heads for %d query heads failed: %s", kv_heads, heads, e)
        return False
    for name, a, b in zip(("output", "dq", "dk", "dv"), got, want, strict=True):
        scale = float(b.abs().max()) or 1.0
        if a.shape != b.shape or not float((a.float() - b.float()).abs().max()) <= tolerance * scale:
            log.info("attention with %d key/value heads disagrees with the reference in %s", kv_heads, name)
            return False
    return True


# --------------------------------------------------------------------------------------
# FlashAttention-4 for the packed-document attention
# --------------------------------------------------------------------------------------

ATTENTION_KERNELS = ("auto", "pytorch", "fa4")

# CUDA device index -> whether FlashAttention-4 serves the packed-document attention there; read by
# `_flash_varlen` (a constant to the compiler).
_FA4_ON: dict[int, bool] = {}
# CUDA device index -> whether FlashAttention-4 gave the reference's outputs and gradients there.
_FA4_AGREES: dict[int, bool] = {}
# The smallest head FlashAttention-4 serves. Heads of 64 and 128 trained as PyTorch's kernel on an
# H200; after the GPU tests ran its kernels for heads of 8 (whose gradients also matched), a later
# test in the same process failed with "unspecified launch failure", which it did not alone.
FA4_MIN_HEAD_SIZE = 64


@torch.library.custom_op("fimtune::fa4_varlen", mutates_args=())
def fa4_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention within each packed document through FlashAttention-4: q (tokens, heads, d),
    k/v (tokens, kv heads, d) with kv heads dividing heads, as they are; ``cu`` the documents'
    int32 bounds. Returns the output (like q) and the log-sum-exp (heads, tokens; fp32).

    An operator of fimtune's own, not PyTorch's flash attention registry: the registry's glue in
    PyTorch 2.11 cannot train through `varlen_attn` (its backward refuses the window sizes
    `varlen_attn` always passes, and it takes two results where `flash-attn-4` 4.0.0b36 returns
    five). Compiled blocks see one opaque call, as for PyTorch's own kernel.
    """
    from flash_attn.cute.interface import _flash_attn_fwd

    # contiguous: a model's key and value are often views into its fused projection
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out, lse = _flash_attn_fwd(q, k, v, return_lse=True, **_fa4_packed(cu, max_len, scale))[:2]
    return out, lse


def _fa4_packed(cu: torch.Tensor, max_len: int, scale: float) -> dict[str, Any]:
    """FlashAttention-4's arguments for causal attention within packed documents bounded by ``cu``."""
    return {
        "cu_seqlens_q": cu,
        "cu_seqlens_k": cu,
        "max_seqlen_q": max_len,
        "max_seqlen_k": max_len,
        "softmax_scale": scale,
        "causal": True,
    }


@fa4_varlen.register_fake
def _fa4_varlen_fake(q, k, v, cu, max_len, scale):  # noqa: ANN001, ANN202 - the op's signature
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fimtune::fa4_varlen_backward", mutates_args=())
def fa4_varlen_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu: torch.Tensor,
    max_len: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of :func:`fa4_varlen`'s output for q, k and v (k's and v's summed over their groups)."""
    from flash_attn.cute.interface import _flash_attn_bwd

    q, k, v, out, grad_out, lse = (x.contiguous() for x in (q, k, v, out, grad_out, lse))
    dq, dk, dv = _flash_attn_bwd(q, k, v, out, grad_out, lse, **_fa4_packed(cu, max_len, scale))[:3]
    return dq, dk, dv


@fa4_varlen_backward.register_fake
def _fa4_varlen_backward_fake(grad_out, q, k, v, out, lse, cu, max_len, scale):  # noqa: ANN001, ANN202
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as the kernel's


def _fa4_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, cu, max_len, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu)
    ctx.max_len, ctx.scale = max_len, scale


def _fa4_backward(ctx: Any, grad_out: torch.Tensor, grad_lse: torch.Tensor | None) -> tuple:
    q, k, v, out, lse, cu = ctx.saved_tensors
    dq, dk, dv = fa4_varlen_backward(grad_out, q, k, v, out, lse, cu, ctx.max_len, ctx.scale)
    return dq, dk, dv, None, None, None


fa4_varlen.register_autograd(_fa4_backward, setup_context=_fa4_setup_context)


def _fa4_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    return fa4_varlen(q, k, v, cu, _longest(cu), q.shape[-1] ** -0.5)[0]


def fa4_unavailable(device: torch.device) -> str | None:
    """Why FlashAttention-4 cannot serve on ``device``; None where it can be tried."""
    if device.type != "cuda":
        return f"it runs on CUDA GPUs, not on {device.type}"
    if not torch.cuda.is_available():
        return "this PyTorch sees no CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10):
        return f"the GPU's compute capability is {major}.{minor}; FlashAttention-4 runs on 9.x (Hopper) and 10.x"
    spec = importlib.util.find_spec("flash_attn")  # not imported here: FlashAttention-4's import takes seconds
    if spec is None or not any((Path(p) / "cute").is_dir() for p in spec.submodule_search_locations or ()):
        return "the flash-attn-4 package is not installed (pip install flash-attn-4)"
    return None


def current_flash_attention(device: torch.device | None = None) -> str:
    """Which FlashAttention serves the packed-document attention on ``device`` (default: the current
    CUDA device): "FA4" (FlashAttention-4) or "FA2" (PyTorch's own `varlen_attn`)."""
    index = _cuda_index(device)
    return "FA4" if index is not None and _FA4_ON.get(index, False) else "FA2"


def select_flash_attention(
    device: torch.device, kernel: str = "auto", shape: tuple[int, int, int] | None = None
) -> str:
    """Choose the FlashAttention of the packed-document attention on ``device`` as ``kernel`` asks
    (`auto`, `pytorch`, `fa4`); return the one that serves now ("FA4" or "FA2").

    PyTorch's `varlen_attn` runs FlashAttention-2, which predates Hopper's asynchronous matrix
    instructions: its backward ran at ~220 TFLOP/s in (c)'s profile. FlashAttention-4 (the
    `flash-attn-4` package) has Hopper and Blackwell kernels, forward and backward, for packed
    documents and grouped key/value heads. ``auto`` uses it where it is installed, the GPU is a
    Hopper or a Blackwell and the heads are of `FA4_MIN_HEAD_SIZE` or more, once a packed batch of
    documents in the model's ``shape`` (query heads, key/value heads, head size; by default 8, 1,
    64) went through it forward and backward and gave the outputs and gradients of SDPA in fp32,
    each within 2% of the largest value (so the kernels it compiles are the model's); otherwise
    PyTorch's own kernel stays, and the log says why.
    ``fa4`` is the same, and an error where it cannot serve; ``pytorch`` keeps PyTorch's own.
    """
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"train.attention_kernel must be one of {', '.join(ATTENTION_KERNELS)}, got {kernel!r}")
    index = _cuda_index(device)
    if index is not None:
        _FA4_ON[index] = False
    if kernel == "pytorch":
        return "FA2"
    heads, kv_heads, dim = shape or (8, 1, 64)
    if dim < FA4_MIN_HEAD_SIZE:
        why = f"the model's heads are of {dim}; it serves heads of {FA4_MIN_HEAD_SIZE} or more"
    else:
        why = fa4_unavailable(device)
    if why is None:
        if index not in _FA4_AGREES:
            here = torch.device("cuda", index)
            log.info("checking FlashAttention-4 on %s (its kernels compile at first use, once a process)", here)
            _FA4_AGREES[index] = same_attention(
                _fa4_attend, _sdpa_fp32, here, torch.bfloat16, heads=heads, kv_heads=kv_heads, dim=dim
            )
        if _FA4_AGREES[index]:
            _FA4_ON[index] = True
            return "FA4"
        why = "it failed or disagreed with SDPA on a packed batch on this GPU (the log's info line says which)"
        if kernel == "auto":
            log.warning("FlashAttention-4 is installed but not used (PyTorch's own kernel stays): %s", why)
            return "FA2"
    if kernel == "fa4":
        raise RuntimeError(f"train.attention_kernel=fa4: FlashAttention-4 cannot serve: {why}")
    log.info("FlashAttention-4 not used (PyTorch's own kernel stays): %s", why)
    return "FA2"


def _sdpa_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """The reference: SDPA per document, in fp32 (no flash kernel takes fp32)."""
    return _sdpa_per_document(q.float(), k.float(), v.float(), cu, None).to(q.dtype)


def _sdpa_per_document(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float | None
) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    outs = []
    bounds = cu.tolist()
    for start, end in zip(bounds, bounds[1:], strict=False):
        if end == start:  # an empty document (padded bounds)
            continue
        qs, ks, vs = (x[start:end].transpose(0, 1)[None] for x in (q, k, v))
        if groups > 1:
            ks, vs = ks.repeat_interleave(groups, dim=1), vs.repeat_interleave(groups, dim=1)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)[0].transpose(0, 1))
    return torch.cat(outs)


# --------------------------------------------------------------------------------------
# The loss a chunk of tokens at a time
# --------------------------------------------------------------------------------------


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``labels``, chunk by chunk.

    The head is frozen, so its only gradient is the one of ``hidden``: it is computed in the
    forward pass, chunk by chunk ((softmax - one-hot) @ weight), and kept, instead of the logits.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        kind = hidden.device.type
        # The matmuls run in the autocast dtype when autocast is on (hidden states leave the
        # final norm in fp32 there), else in the hidden states' dtype.
        compute = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype
        weight = weight.to(compute)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        index = _cuda_index(hidden.device)
        fused = grad is not None and index is not None and _COMPILED_LOSS.get(index, False)
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start : start + chunk].to(compute), labels[start : start + chunk]
            valid = y != IGNORE_INDEX
            target = torch.where(valid, y, 0)
            logits = h @ weight.T
            if fused:  # one reduction and one element-wise pass over the logits, in their dtype
                loss, logit_grad = compiled_loss_chunk(logits, target, valid, index)
            else:
                loss, logit_grad = eager_loss_chunk(logits, target, valid, grad is not None)
            total += loss
            if grad is not None:
                grad[start : start + chunk] = logit_grad @ weight
        ctx.save_for_backward(grad if grad is not None else hidden.new_empty(0))
        ctx.had_grad = grad is not None
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (grad,) = ctx.saved_tensors
        if not ctx.had_grad:
            return None, None, None, None
        return grad * grad_out.to(grad.dtype), None, None, None


# CUDA device index -> whether the loss's soft-max and gradient of each chunk run compiled there
# (set by `speed_up` with `compile`); read by `_FrozenHeadCrossEntropy`.
_COMPILED_LOSS: dict[int, bool] = {}


def loss_chunk_and_logit_grads(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's summed cross-entropy (fp32) and its gradient for ``logits`` (in their dtype):
    soft-max less the one-hot target, zero on ignored rows. Out of place, for the compiler, which
    makes it one reduction and one element-wise pass over the logits (the eager path writes and
    reads fp32 copies of them several times: ~8 GB of memory traffic a 4096-token chunk of a
    49k vocabulary)."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    picked = x.gather(1, target[:, None])[:, 0]
    loss = ((lse - picked) * valid).sum()
    hit = torch.arange(x.shape[1], device=x.device)[None, :] == target[:, None]
    grad = (torch.exp(x - lse[:, None]) - hit.to(x.dtype)) * valid[:, None]
    return loss, grad.to(logits.dtype)


def eager_loss_chunk(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, want_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What :func:`loss_chunk_and_logit_grads` computes, eagerly and with one fp32 copy of the
    logits reused in place (the soft-max is written over it)."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    picked = x.gather(1, target[:, None])[:, 0]
    loss = ((lse - picked) * valid).sum()
    if not want_grad:
        return loss, None
    probs = torch.exp(x.sub_(lse[:, None]))  # softmax, in place of the fp32 logits
    probs.scatter_add_(1, target[:, None], -torch.ones_like(probs[:, :1]))
    probs.mul_(valid[:, None])
    return loss, probs.to(logits.dtype)


@functools.cache
def _compiled_loss_chunk() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    return torch.compile(loss_chunk_and_logit_grads, dynamic=False, fullgraph=True)


def compiled_loss_chunk(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, index: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`loss_chunk_and_logit_grads` compiled; where compiling or running it fails (other
    than for memory), the eager chunk, from then on for device ``index``, with a warning."""
    try:
        return _compiled_loss_chunk()(logits, target, valid)
    except torch.OutOfMemoryError:
        raise
    except Exception:
        log.warning("the compiled loss failed; it runs eagerly from now on", exc_info=True)
        if index is not None:
            _COMPILED_LOSS[index] = False
        loss, grad = eager_loss_chunk(logits, target, valid)
        assert grad is not None
        return loss, grad


def chunked_cross_entropy(
    hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Sum over label tokens of the cross-entropy of ``head(hidden)`` against ``labels``.

    ``hidden`` [N, H] and ``labels`` [N] are aligned (the label of position i is the token
    that follows it; -100 is ignored). A frozen plain linear head takes the fused path; any
    other head (trainable rows of added tokens, a bias) recomputes each chunk's logits in
    the backward pass, so memory stays one chunk's logits in either case.
    """
    weight = getattr(head, "weight", None)
    if (
        type(head) is torch.nn.Linear
        and head.bias is None
        and weight is not None
        and not weight.requires_grad
        and weight.shape[0] > 0
    ):
        return _FrozenHeadCrossEntropy.apply(hidden, weight, labels, chunk)
    from torch.utils.checkpoint import checkpoint

    def piece(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h).float(), y, ignore_index=IGNORE_INDEX, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start : start + chunk], labels[start : start + chunk]
        total = total + (checkpoint(piece, h, y, use_reentrant=False) if hidden.requires_grad else piece(h, y))
    return total


def logit_softcap(model: Any) -> float | None:
    """The cap ``model`` puts on its logits after its output head (``cap * tanh(logits / cap)``:
    Gemma 2's `final_logit_softcapping`), or None. The chunked loss cannot take such a model's
    logits: with the head bypassed, its forward would cap the hidden states instead."""
    config = getattr(getattr(model, "module", model), "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "final_logit_softcapping", None) or None


@contextlib.contextmanager
def head_bypassed(model: Any) -> Iterator[torch.nn.Module]:
    """Within the block the model's output head is the identity (its forward returns hidden
    states in place of logits); yields the real head. Works through DDP and PEFT wrappers."""
    inner = model
    while hasattr(inner, "module") and isinstance(getattr(inner, "module", None), torch.nn.Module):
        inner = inner.module  # DDP
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    head = base.get_output_embeddings()
    name = next(n for n, m in base.named_children() if m is head)
    setattr(base, name, torch.nn.Identity())
    try:
        yield head
    finally:
        setattr(base, name, head)


# --------------------------------------------------------------------------------------
# Putting it together
# --------------------------------------------------------------------------------------


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated decoder blocks (transformers' `GradientCheckpointingLayer`s, outermost only)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks: list[torch.nn.Module] = []
    seen: set[int] = set()
    for _, m in model.named_modules():
        if isinstance(m, GradientCheckpointingLayer) and id(m) not in seen:
            blocks.append(m)
            seen.update(id(s) for s in m.modules())
    return blocks


RECOMPILE_LIMIT = 64  # graphs dynamo keeps per compiled function before it runs it eagerly


def raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    """Let dynamo keep at least ``limit`` graphs of one function (past its limit it silently runs
    the function eagerly); the setting's name changed across torch versions."""
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))


def compile_blocks(
    model: torch.nn.Module, backend: Any = "inductor", narrow_max: int = 0, mode: str | None = None
) -> int:
    """`torch.compile` each decoder block in place (regional compilation); return how many.

    Identical blocks share one compiled graph, so compiling costs about one block's time. With
    inductor and ``narrow_max`` (e.g. :data:`NARROW_PRODUCT_MAX`), products whose inner dimension
    is that or less (LoRA's rank) are element-wise sums (:func:`product_decompositions`): an
    option until a GPU measures it (`benchmarks/train_throughput.py`, variant `c-lora-sums`).
    ``mode``: inductor's (``"reduce-overhead"``: each block's forward and backward graphs replayed
    as CUDA graphs, one launch each; the caller marks each training step's start with
    `torch.compiler.cudagraph_mark_step_begin()`): measured by `train_throughput.py`'s `c-graphs`.
    """
    blocks = transformer_blocks(model)
    # One graph serves all blocks, but training and evaluation, checkpointing and a last short
    # batch each add a variant: leave room, so no block silently falls back to eager.
    raise_recompile_limit()
    options: dict[str, Any] = {}
    if backend == "inductor" and narrow_max:  # one backend for all blocks: they share its graphs
        backend = inductor_backend(mode, decompositions=product_decompositions(narrow_max=narrow_max))
    elif backend == "inductor" and mode:
        options["mode"] = mode
    for block in blocks:
        block.compile(backend=backend, **options)
    return len(blocks)


# --------------------------------------------------------------------------------------
# Matrix products written by the compiler as element-wise work or reductions
# --------------------------------------------------------------------------------------

# LoRA's rank as its products run (padded: LORA_RANK_MULTIPLE): products this narrow inside are sums
NARROW_PRODUCT_MAX = 8
PRODUCT_COUNTS = {"row": 0, "narrow": 0}  # products :func:`product_decompositions` rewrote (when traced)


def product_decompositions(row_devices: tuple[str, ...] = (), narrow_max: int = 0) -> dict[Any, Callable[..., Any]]:
    """Inductor's decomposition table, with two more rules for ``mm`` and ``addmm`` (a biased
    `nn.Linear` traces as the latter), each in fp32 and cast back, as cuBLAS accumulates:

    - ``row_devices``: one row times a matrix (a batch of one's decoding step), on those device
      types, becomes a multiply and a sum over the inner dimension: a reduction kernel that
      reads the weights once, the bias and what follows fused in (inductor's own rule for ``mm``
      under coordinate-descent tuning, there not for ``addmm``);
    - ``narrow_max``: a product whose inner dimension is at most this (LoRA's B applied to the
      rank-wide product, and its transpose in the backward pass) becomes that many element-wise
      multiply-adds, which inductor fuses into the kernel that uses the result (the add to the
      frozen layer's output, the dropout mask): the full-width result is never written and read
      back. As a cuBLAS product, each is a kernel of its own whose output is as large as the
      layer's (one 8192 x 8192 for StarCoder's c_fc at 8,192 tokens).

    Other products keep inductor's rules."""
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    aten = torch.ops.aten
    table = dict(select_decomp_table())
    inner_mm, inner_addmm = table.get(aten.mm.default), table.get(aten.addmm.default)

    def rule(mat1: torch.Tensor, mat2: torch.Tensor) -> str | None:
        if mat1.dtype != mat2.dtype or not mat1.dtype.is_floating_point or mat1.dim() != 2 or mat2.dim() != 2:
            return None
        if mat1.device.type in row_devices and statically_known_true(mat1.shape[0] == 1):
            return "row"
        inner = mat1.shape[1]
        if type(inner) is int and 0 < inner <= narrow_max:
            return "narrow"
        return None

    def product(kind: str, mat1: torch.Tensor, mat2: torch.Tensor) -> torch.Tensor:  # fp32
        PRODUCT_COUNTS[kind] += 1
        if kind == "row":  # [1, K] @ [K, N]
            return (mat1.unsqueeze(2).float() * mat2.unsqueeze(0).float()).sum(dim=1)
        out = mat1[:, :1].float() * mat2[:1, :].float()
        for k in range(1, mat1.shape[1]):
            out = out + mat1[:, k : k + 1].float() * mat2[k : k + 1, :].float()
        return out

    def mm(mat1: torch.Tensor, mat2: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs and (kind := rule(mat1, mat2)):
            return product(kind, mat1, mat2).to(mat1.dtype)
        return inner_mm(mat1, mat2, *args, **kwargs) if inner_mm is not None else NotImplemented

    def addmm(bias: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        plain = not args and set(kwargs) <= {"beta", "alpha"} and kwargs.get("beta", 1) == kwargs.get("alpha", 1) == 1
        if plain and bias.dtype == mat1.dtype and (kind := rule(mat1, mat2)):
            return (product(kind, mat1, mat2) + bias.float()).to(mat1.dtype)
        return inner_addmm(bias, mat1, mat2, *args, **kwargs) if inner_addmm is not None else NotImplemented

    table[aten.mm.default] = mm
    table[aten.addmm.default] = addmm
    return DecompositionTable(table, row_devices, narrow_max)


class DecompositionTable(dict):
    """A :func:`product_decompositions` table that pickles as the call that made it.

    Inductor (torch 2.13) puts the decompositions given to `compile_fx` into the key of its graph
    cache, and its own rules do not pickle (nor these closures): every graph compiled with such a
    table would bypass the cache, and a server's warm-up (~45-115 s on an H200) would compile again
    at every start. Pickled, this table is its arguments, the torch version and a digest of this
    module's code (the rules' source), which is all that makes it what it is."""

    def __init__(self, table: dict, row_devices: tuple[str, ...], narrow_max: int) -> None:
        super().__init__(table)
        self.arguments = (tuple(row_devices), narrow_max)

    def __reduce__(self) -> tuple[Any, ...]:
        return _decomposition_table, (*self.arguments, torch.__version__, _source_digest())


def _decomposition_table(row_devices: tuple[str, ...], narrow_max: int, *_key: str) -> dict[Any, Callable[..., Any]]:
    return product_decompositions(row_devices, narrow_max)


@functools.cache
def _source_digest() -> str:
    import hashlib

    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def inductor_backend(
    mode: str | None = None,
    options: dict[str, Any] | None = None,
    decompositions: dict | None = None,
    tune_rows: bool = False,
) -> Any:
    """A torch.compile backend: inductor as ``torch.compile(mode=mode, options=options)`` sets it
    up (CUDA graph trees and the profiler settings they need), with ``decompositions`` (e.g.
    :func:`product_decompositions`) instead of its own. AOTAutograd's cache leaves the
    decompositions out of its key, so it is off for these compiles; inductor's own cache of the
    compiled graphs stays on (its key has the graph after decomposing, and from torch 2.13 the
    table: a :class:`DecompositionTable`, or the cache is bypassed). ``tune_rows``:
    coordinate-descent tuning for the graphs that multiply one row (:func:`one_row_products`) and
    for those alone: it times every kernel's block sizes, which took an H200 ~20 s more for each
    batch size's decoding step."""
    import torch._functorch.config as functorch_config
    from torch._inductor.compile_fx import compile_fx

    class Inductor(torch._TorchCompileInductorWrapper):
        decomposing = decompositions

        def __eq__(self, other: object) -> bool:  # dynamo reuses graphs of an equal backend only
            return (
                super().__eq__(other)
                and getattr(other, "decomposing", None) is self.decomposing
                and getattr(other, "tune_rows", None) == self.tune_rows
            )

        def patches(self, model_: torch.fx.GraphModule, config_patches: Any = None) -> dict[str, Any]:
            """Inductor's settings for the graph ``model_``."""
            patches = {**self.config, **(config_patches or {})}
            if self.tune_rows and one_row_products(model_):
                patches["coordinate_descent_tuning"] = True
            return patches

        def __call__(self, model_: torch.fx.GraphModule, inputs_: list[Any], *, config_patches: Any = None) -> Any:
            patches = self.patches(model_, config_patches)
            no_cache = hasattr(functorch_config, "enable_autograd_cache")
            with functorch_config.patch(enable_autograd_cache=False) if no_cache else contextlib.nullcontext():
                return compile_fx(model_, inputs_, config_patches=patches, decompositions=decompositions)

    backend = Inductor(mode, options, False)
    backend.tune_rows = tune_rows
    return backend


def one_row_products(gm: torch.fx.GraphModule) -> int:
    """How many matrix products of a Dynamo graph take a single row (a batch of one's decoding
    step: ``linear`` of a [1, 1, width] input, say), read from the nodes' example values."""
    import operator

    products = {torch._C._nn.linear, F.linear, torch.matmul, operator.matmul, torch.mm, torch.addmm}
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in products or len(node.args) < 2:
            continue
        x = node.args[1] if node.target is torch.addmm else node.args[0]
        value = x.meta.get("example_value") if isinstance(x, torch.fx.Node) else None
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[-1] != 0:
            rows = value.numel() // value.shape[-1]
            count += type(rows) is int and rows == 1
    return count


# --------------------------------------------------------------------------------------
# Dropout with masks made again, not kept
# --------------------------------------------------------------------------------------

_LOWBIAS_M1 = 0x7FEB352D
_LOWBIAS_M2 = 0x846CA68B - (1 << 32)  # as an int32


def _lowbias32(x: torch.Tensor, twin: bool = False) -> torch.Tensor:
    """Wellons' `lowbias32` integer hash on int32 tensors (multiplies wrap, shifts are logical).

    ``twin`` computes the same values through other operations (its first shift in two steps), so
    that the compiler does not merge the backward pass's mask with the forward's: merged, the mask
    is one value used by both passes, which the compiler then keeps (a byte an element) instead
    of making it again.
    """
    x = x ^ ((((x >> 8) >> 8) if twin else (x >> 16)) & 0xFFFF)
    x = x * _LOWBIAS_M1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _LOWBIAS_M2
    return x ^ ((x >> 16) & 0xFFFF)


def hashed_keep_mask(seed: torch.Tensor, shape: torch.Size, p: float, twin: bool = False) -> torch.Tensor:
    """Which elements of a tensor of ``shape`` dropout keeps: each with probability ``1 - p`` (in steps
    of 2^-24), from a hash of its index and ``seed`` (an int32 tensor of one element, on the device);
    the same seed gives the same mask (``twin`` too: see :func:`_lowbias32`)."""
    n = 1
    for d in shape:
        n *= d
    index = torch.arange(n, device=seed.device, dtype=torch.int64 if n >= 1 << 31 else torch.int32)
    bits = _lowbias32(_lowbias32(index.to(torch.int32), twin) ^ seed) & 0xFFFFFF
    return (bits >= round(p * (1 << 24))).view(shape)


class _HashedDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
        ctx.save_for_backward(seed)
        ctx.p = p
        return torch.where(hashed_keep_mask(seed, x.shape, p), x * (1.0 / (1.0 - p)), 0.0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (seed,) = ctx.saved_tensors
        keep = hashed_keep_mask(seed, grad.shape, ctx.p, twin=True)  # made again from the seed
        return torch.where(keep, grad * (1.0 / (1.0 - ctx.p)), 0.0), None, None


class HashedDropout(torch.nn.Module):
    """`nn.Dropout` whose mask is a hash of each element's index and a seed drawn per call: the
    backward pass makes the mask again from the seed instead of keeping it.

    The same distribution as `nn.Dropout` (each element zeroed with probability ``p``, the rest
    scaled by 1/(1-p), independently); a different random stream. For compiled blocks: the
    compiler fuses the hash into the kernels around it, where `nn.Dropout` draws Philox numbers
    per element and keeps a boolean mask of each dropped tensor for the backward pass (for
    StarCoderBase-1B at batch 4 x 2048: LoRA's four inputs and two residuals a layer, 18,432
    values a token, ~3.4 GiB).
    Eager, its integer ops would each write a whole tensor: it is meant for compiled blocks only.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        seed = torch.randint(-(1 << 31), (1 << 31) - 1, (1,), dtype=torch.int32, device=x.device)
        return _HashedDropout.apply(x, seed, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, masks hashed"


_HASHED_DROPOUT_WORKS: dict[str, bool] = {}


def hashed_dropout_works(device: torch.device) -> bool:
    """Whether :class:`HashedDropout` compiles and runs right on ``device``; checked once a device.

    A small compiled forward and backward pass: its mask must be the eager one for the same seed,
    drop about its rate, and the gradient must pass where the output does. Any error or mismatch
    is a no (logged), and training keeps PyTorch's dropout.
    """
    key = str(device)
    if key not in _HASHED_DROPOUT_WORKS:
        try:
            seed = torch.tensor([20240611], dtype=torch.int32, device=device)
            compiled_mask = torch.compile(hashed_keep_mask, backend="inductor", fullgraph=True)
            same = torch.equal(compiled_mask(seed, torch.Size([32, 96]), 0.25), hashed_keep_mask(seed, (32, 96), 0.25))
            drop = HashedDropout(0.25).train()
            x = torch.ones(32, 96, device=device, requires_grad=True)
            y = torch.compile(drop, backend="inductor", fullgraph=True)(x)
            y.backward(torch.ones_like(y))
            kept = (y != 0).float().mean().item()
            ok = same and 0.6 < kept < 0.9 and torch.equal(x.grad != 0, y != 0)
            if not ok:
                log.warning("hashed dropout disagrees with itself compiled on %s: PyTorch's dropout stays", device)
        except Exception as e:  # noqa: BLE001 - any failure means: keep PyTorch's dropout
            log.warning("hashed dropout does not compile on %s (%s): PyTorch's dropout stays", device, e)
            ok = False
        _HASHED_DROPOUT_WORKS[key] = ok
    return _HASHED_DROPOUT_WORKS[key]


def _block_dropouts(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Dropout]]:
    """(parent, name, module) of each `nn.Dropout` with a rate inside the transformer blocks."""
    return [
        (parent, name, child)
        for block in transformer_blocks(model)
        for parent in block.modules()
        for name, child in parent.named_children()
        if type(child) is torch.nn.Dropout and child.p > 0
    ]


def hash_dropout(model: torch.nn.Module, dropouts: list | None = None) -> int:
    """Replace each `nn.Dropout` inside the transformer blocks (LoRA's, and the model's own on
    residuals) with :class:`HashedDropout` of the same rate; return how many. Dropouts outside the
    blocks (on the embeddings), which are not compiled, stay."""
    dropouts = _block_dropouts(model) if dropouts is None else dropouts
    for parent, name, child in dropouts:
        hashed = HashedDropout(child.p)
        hashed.train(child.training)
        setattr(parent, name, hashed)
    return len(dropouts)


def skip_lora_input_casts(model: torch.nn.Module) -> int:
    """Stop PEFT from casting every LoRA input to the adapter's dtype; return the layers changed.

    Only under autocast: it casts the (tiny) adapter weights to the input's dtype instead of
    copying each (tokens x hidden) input to fp32 and back.
    """
    n = 0
    for m in model.modules():
        if hasattr(m, "cast_input_dtype_enabled"):
            m.cast_input_dtype_enabled = False
            n += 1
    return n


LORA_RANK_MULTIPLE = 8  # bf16 rows of 8 values are 16 bytes: the alignment Hopper's GEMM kernels want


class _RankPaddedA(torch.nn.Linear):
    """LoRA's A (rank x in) whose product has zero rows added up to a rank of a multiple of 8.

    With the recipe's rank 4 every LoRA product (x A^T, then B applied to it, and the four of the
    backward pass) has a dimension of 4 values, 8 bytes: too narrow for the 16-byte alignment of
    cuBLAS's Hopper kernels, so it ran older kernels (sm80 "align2": ~17 ms of a 109 ms step in an
    H200 profile, where the memory traffic of these products takes ~10 ms). The added rows are zero
    and stay out of the parameters: the outputs and gradients are those of the rank itself.
    """

    pad: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.pad(self.weight, (0, 0, 0, self.pad)))


class _RankPaddedB(torch.nn.Linear):
    """LoRA's B (out x rank), taking the padded product of :class:`_RankPaddedA` (zero columns added)."""

    pad: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.pad(self.weight, (0, self.pad)), self.bias)


def pad_lora_rank(model: torch.nn.Module, multiple: int = LORA_RANK_MULTIPLE) -> int:
    """Run plain LoRA adapters' products at a rank padded to ``multiple`` (1: as they are again);
    return how many adapters pad now. The parameters, their names and shapes do not change."""
    n = 0
    for m in model.modules():
        lora_a, lora_b, ranks = getattr(m, "lora_A", None), getattr(m, "lora_B", None), getattr(m, "r", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or not isinstance(ranks, dict):
            continue
        for name, a in lora_a.items():
            b = lora_b[name]
            plain = type(a) in (torch.nn.Linear, _RankPaddedA) and type(b) in (torch.nn.Linear, _RankPaddedB)
            if not plain or name in getattr(m, "lora_variant", {}):  # DoRA and the like: as PEFT runs them
                continue
            pad = -ranks[name] % multiple
            a.__class__, b.__class__ = (_RankPaddedA, _RankPaddedB) if pad else (torch.nn.Linear, torch.nn.Linear)
            a.pad = b.pad = pad
            n += pad > 0
    return n


# --------------------------------------------------------------------------------------
# The frozen base's products in FP8 (an option)
# --------------------------------------------------------------------------------------

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def rowwise_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [M, K] as e4m3 values and an fp32 scale per row [M, 1]: ``x ~= values * scale``.

    Each scale is the power of two that brings the row's largest magnitude to at most 448 (the
    format's largest value): dividing by it is exact, so only the values' 3 mantissa bits round.
    """
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-30)
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


# What the FP8 products write: row-wise scaled products take bf16 outputs only in PyTorch's CUTLASS
# kernels (sm89, and CUDA builds before 12.9: "Only bf16 high precision output types are supported
# for row-wise scaling"); other weight dtypes (fp32, fp16) get the product cast after.
FP8_PRODUCT_OUT = torch.bfloat16


class _Float8Product(torch.autograd.Function):
    """``x W^T`` of a frozen weight through FP8 products (rowwise scales): the forward pass on
    ``x`` and W's FP8 copy, the backward pass (``x``'s gradient only: W is frozen) on the
    output's gradient and W^T's FP8 copy. Nothing of ``x`` is kept for the backward pass."""

    @staticmethod
    def forward(  # noqa: ANN205 - autograd's signature
        ctx: Any,
        x: torch.Tensor,
        w8: torch.Tensor,
        w_scale: torch.Tensor,
        wt8: torch.Tensor,
        wt_scale: torch.Tensor,
        out_dtype: torch.dtype,
    ):
        x2 = x.reshape(-1, x.shape[-1])
        x8, x_scale = rowwise_fp8(x2)
        out = torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale.t(), out_dtype=FP8_PRODUCT_OUT)
        ctx.save_for_backward(wt8, wt_scale)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return out.reshape(*x.shape[:-1], out.shape[-1]).to(out_dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        wt8, wt_scale = ctx.saved_tensors
        g8, g_scale = rowwise_fp8(grad.reshape(-1, grad.shape[-1]))
        gx = torch._scaled_mm(g8, wt8.t(), scale_a=g_scale, scale_b=wt_scale.t(), out_dtype=FP8_PRODUCT_OUT)
        return gx.reshape(ctx.x_shape).to(ctx.x_dtype), None, None, None, None, None


class _Float8Frozen(torch.nn.Linear):
    """A frozen `nn.Linear` whose product runs in FP8 (see :func:`fp8_frozen_products`); its
    weight and bias stay as they were (the state dict, merging and saving see no change)."""

    fp8: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _Float8Product.apply(x, *self.fp8, self.weight.dtype)
        return out if self.bias is None else out + self.bias

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        """``.to()``, ``.cuda()``, ...: the FP8 copies follow the weight's device, never its dtype."""
        super()._apply(fn, recurse)
        self.fp8 = tuple(t.to(self.weight.device) for t in self.fp8)  # type: ignore[assignment]
        return self


def fp8_frozen_products(model: torch.nn.Module) -> int:
    """Run the frozen base layers under LoRA adapters (PEFT's ``base_layer``) as FP8 products: the
    input and the output's gradient quantized a row at a time (e4m3, power-of-two scales, as
    torchao's "rowwise" recipe), against two FP8 copies of the weight made once (one scaled per
    output row, one per input column; ~2 bytes a parameter more memory). Return the layers changed.

    An option (off): Hopper's FP8 products run at about twice the bf16 rate, which would cut the
    largest part of a step (the frozen base's products, ~60%), but the outputs round to 3 mantissa
    bits, so the loss is no longer the bf16 loss (`benchmarks/train_throughput.py`, variant
    `c-fp8`, measures both). The copies are not updated: a frozen weight must stay frozen.
    Dimensions must be multiples of 16 (cuBLAS's FP8 kernels).
    """
    n = 0
    for m in model.modules():
        base = getattr(m, "base_layer", None)
        if type(base) is not torch.nn.Linear or base.weight.requires_grad:
            continue
        out_features, in_features = base.weight.shape
        if out_features % 16 or in_features % 16:
            continue
        with torch.no_grad():
            w8, w_scale = rowwise_fp8(base.weight)
            wt8, wt_scale = rowwise_fp8(base.weight.t().contiguous())
        base.__class__ = _Float8Frozen
        base.fp8 = (w8, w_scale, wt8, wt_scale)
        n += 1
    return n


def disable_attention_dropout(model: torch.nn.Module) -> float:
    """Set attention-probability dropout to 0 (the varlen kernel has none); return the old rate.

    GPTBigCode configs (StarCoder) carry `attn_pdrop=0.1`; Llama-style ones 0.
    """
    old = 0.0
    for m in model.modules():
        for name in ("attn_dropout", "attention_dropout"):
            value = getattr(m, name, None)
            if isinstance(value, float) and value > 0:
                old = max(old, value)
                setattr(m, name, 0.0)
    config = getattr(model, "config", None)
    for name in ("attn_pdrop", "attention_dropout"):
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)
    return old


def speed_up(
    model: torch.nn.Module,
    compile: bool,
    autocast: bool,
    activation_memory: float = 1.0,
    hashed_dropout: bool | None = None,
    attention_kernel: str = "auto",
    fp8: bool = False,
    cuda_graphs: bool = False,
) -> list[str]:
    """Apply the fast path's model changes to a PEFT model about to train; return what was done.

    ``hashed_dropout`` (default: with ``compile``) puts :class:`HashedDropout` in the blocks' dropouts;
    ``attention_kernel`` picks the flash attention implementation (:func:`select_flash_attention`);
    ``fp8``: the frozen base's products in FP8 (:func:`fp8_frozen_products`); ``cuda_graphs``: the
    compiled blocks replayed as CUDA graphs (:func:`compile_blocks`'s ``mode``).
    """
    done = []
    device = next(model.parameters()).device
    wanted = compile if hashed_dropout is None else hashed_dropout
    if wanted and (dropouts := _block_dropouts(model)) and hashed_dropout_works(device):
        n = hash_dropout(model, dropouts)
        done.append(f"dropout masks hashed from a seed and made again for the backward pass ({n} dropouts)")
    config = getattr(model, "config", None)
    varlen = getattr(config, "_attn_implementation", None) == VARLEN and varlen_supported(device)
    if attention_kernel == "fa4" and not varlen:
        raise RuntimeError(
            "train.attention_kernel=fa4 needs the packed-document attention on a CUDA GPU "
            f"(model.attn_implementation={VARLEN}); this run has {getattr(config, '_attn_implementation', None)} "
            f"on {device.type}"
        )
    shape = _attention_shape(config)
    fa4 = varlen and select_flash_attention(device, attention_kernel, shape) == "FA4"
    if fa4:
        done.append("FlashAttention-4 (flash-attn-4) serves the packed-document attention, key/value heads as they are")
    if varlen and not fa4 and _grouped_heads(config) and "enable_gqa" not in _varlen_params():
        as_they_are = grouped_heads_as_they_are(device, shape)
        how = "as they are" if as_they_are else "repeated (this PyTorch's kernel disagreed)"
        done.append(f"grouped key/value heads go to FlashAttention {how}")
    if autocast and (n := skip_lora_input_casts(model)):
        done.append(f"LoRA inputs stay in the autocast dtype ({n} layers)")
    if device.type == "cuda" and (n := pad_lora_rank(model)):
        done.append(f"LoRA products run at a rank padded to a multiple of {LORA_RANK_MULTIPLE} ({n} adapters)")
    if fp8:
        n = fp8_frozen_products(model)
        done.append(
            f"the frozen base's products in FP8, scaled a row at a time ({n} layers)"
            if n
            else "no frozen layer under LoRA takes FP8 products (quantized, or sizes not multiples of 16)"
        )
    index = _cuda_index(device)
    if index is not None:
        _COMPILED_LOSS[index] = compile
        if compile:
            done.append("the loss's soft-max and gradient compiled (one reduction and one pass a chunk)")
    if compile:
        import torch._functorch.config as functorch_config

        # Below 1 the compiler's partitioner recomputes the cheapest activations in the backward
        # pass until the saved ones fit this share of what it would keep (a process-wide setting).
        functorch_config.activation_memory_budget = activation_memory
        if activation_memory < 1.0:
            done.append(f"compiled blocks keep {activation_memory:.0%} of their activations")
        graphs = cuda_graphs and device.type == "cuda"
        if n := compile_blocks(model, mode="reduce-overhead" if graphs else None):
            done.append(f"torch.compile on {n} blocks" + (", each pass replayed as a CUDA graph" if graphs else ""))
    return done


@contextlib.contextmanager
def without_cudnn_attention() -> Iterator[None]:
    """SDPA without cuDNN's attention inside the block (flash, memory-efficient or math instead),
    as the process had it after.

    For attention calls whose shapes keep changing: eager prefills of batches (rows x width) and
    `generate`'s padded batches. PyTorch 2.11 sends SDPA to cuDNN first on Hopper and later GPUs,
    masked calls included, and cuDNN builds an execution plan for each new shape: in run 11 (H200) a
    batch's eager prefill of a shape not seen before held the host 75-81 ms against 14-21 ms for a
    shape seen before (RESULTS.md). Shapes fixed at start-up (captured prefills and steps) keep it.
    The switch is process-wide (PyTorch's flag): the block should be the only attention running.
    """
    if not torch.backends.cuda.cudnn_sdp_enabled():
        yield
        return
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


def copy_to_device(values: list, device: torch.device) -> torch.Tensor:
    """``values`` (ints, or lists of them) as a long tensor on ``device``, queued without waiting.

    ``torch.tensor(values, device=cuda)`` copies from pageable memory, and PyTorch waits for the
    stream after such a copy (``memcpy_and_sync``): for all the work queued before it, e.g. the
    decoding step the host queued ahead. Through pinned memory the copy is queued like a kernel.
    """
    host = torch.tensor(values, dtype=torch.long)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def copy_to_host(values: torch.Tensor) -> Callable[[], list]:
    """Start copying ``values`` to the host; the function returned waits for that copy only.

    So the GPU runs the work queued after the copy (the next decoding step, the next training
    step) while the host reads these values. Without CUDA they are read at once.
    """
    if values.device.type != "cuda":
        read = values.tolist()
        return lambda: read
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(values.device))  # where the copy runs, whichever device is current

    def wait() -> list:
        copied.synchronize()
        return host.tolist()

    return wait
