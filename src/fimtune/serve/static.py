"""The GPU fast path: a static KV cache per batch size, and a one-token step replayed as a CUDA graph.

On a GPU, a decoding step of a 1B model is well under a millisecond of kernels, but an eager
forward launches some 400 of them from Python (plain `generate`: ~340 ms for 32 tokens). A
CUDA graph replays all of a step's kernels at once; it needs fixed shapes and fixed addresses:

    bucket    batch sizes 1, 4, 16, ... up to `max_batch_size`; a batch of n rows is padded to
              the next bucket with copies of its first row (their outputs are dropped)
    cache     a transformers StaticCache per bucket, [B, kv heads, max_length, head dim] a layer,
              allocated once; rewound (`reset()`) for each batch
    prefill   eager, on the n real rows into a DynamicCache (as on a CPU); its keys and values
              are then written into slots 0..T-1 of the bucket's cache (T: the longest prompt)
    step      ids [B, 1], positions [B, 1], mask [B, 1, 1, max_length] -> logits [B, V]: three
              buffers filled in place, and a forward compiled with
              `torch.compile(mode="reduce-overhead")` (inductor kernels, replayed as CUDA graphs)

The mask is 4D, which transformers hands to attention as it is: no mask-building code, with
its host reads of tensor values, in the graph. Slot j of row b is open when it holds one of
b's tokens (prompts are left-padded)::

    slot      0  1  2  3 .. T-1 | T  T+1 ...            | ... max_length-1
    row b     0  0  1  1 ..  1  | 1  1  (opened a step   |  0 ...  0
              (b's padding)     |       at a time)      |

CUDA graph trees replay into the same output memory, so each step's logits are cloned before
the next replay, and `torch.compiler.cudagraph_mark_step_begin()` starts each step. Without
CUDA (the tests) the same code runs with another compile backend (`"eager"`), or uncompiled.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fimtune.fast import raise_recompile_limit
from fimtune.serve.kvcache import new_cache

log = logging.getLogger(__name__)

BUCKET_GROWTH = 4  # batch-size buckets: 1, 4, 16, ..., then max_batch_size
WARMUP_STEPS = 3  # CUDA graph trees: one warm-up run, one recording, then replays
WARMUP_PROMPT_TOKENS = 16
SLOT_ALIGN = 64  # cache slots are a multiple of this (fused attention kernels want aligned masks)
MASK_KINDS = ("sdpa", "eager")  # attention implementations whose 4D mask format is known here


def batch_buckets(max_batch_size: int) -> list[int]:
    """The batch sizes that get a cache and a graph.

    >>> batch_buckets(16), batch_buckets(8), batch_buckets(1)
    ([1, 4, 16], [1, 4, 8], [1])
    """
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= BUCKET_GROWTH
    return [*sizes, max_batch_size]


@dataclass
class _Bucket:
    """One batch size's cache and step inputs (fixed addresses for the graph)."""

    size: int
    cache: Any  # StaticCache
    ids: torch.Tensor  # [B, 1] the tokens the next step feeds
    positions: torch.Tensor  # [B, 1] their positions
    mask: torch.Tensor  # [B, 1, 1, max_length] slots each row attends to


class StaticDecoding:
    """Prefill a batch, then decode it a token at a time with a compiled step (see the module doc)."""

    def __init__(
        self,
        model: Any,
        max_length: int,
        max_batch_size: int,
        backend: str | None = "inductor",
        mode: str | None = "reduce-overhead",
    ) -> None:
        """``backend``: a torch.compile backend (`"eager"` on a CPU in tests), or None: no compiling."""
        self.model = base_model(model)
        self.max_length = -(-max_length // SLOT_ALIGN) * SLOT_ALIGN  # cache slots a row holds
        self.buckets = batch_buckets(max_batch_size)
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.cache_kw, self.keep_logits = forward_keywords(self.model)
        self.open, self.shut, self.mask_dtype = _mask_values(self.model.config._attn_implementation, self.dtype)
        self._buckets: dict[int, _Bucket] = {}
        self._step = _compiled(self._forward_one, backend, mode)
        self.warmup_s = 0.0
        self.warmup_by_bucket: dict[int, float] = {}  # seconds per batch size (compiling, mostly)
        self.batches = 0  # batches started (warm-up included)

    def fits(self, rows: int, prompt_tokens: int, new_tokens: int) -> bool:
        """Whether ``rows`` prompts of up to ``prompt_tokens`` and ``new_tokens`` new tokens fit the caches.

        (The last new token is fed too: the decoder starts each step before it reads the tokens.)
        """
        return rows <= self.buckets[-1] and prompt_tokens + new_tokens <= self.max_length

    @torch.inference_mode()
    def start(self, prompts: list[list[int]]) -> tuple[StaticSession, torch.Tensor]:
        """Prefill ``prompts``: a session to step, and the logits [n, V] after each prompt."""
        self.batches += 1
        n, width = len(prompts), max(len(p) for p in prompts)
        bucket = self._bucket(next(size for size in self.buckets if size >= n))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=self.device)
        real = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        positions = (real.cumsum(-1) - 1).clamp(min=0)
        cache = new_cache()
        kwargs: dict[str, Any] = {self.cache_kw: cache, "use_cache": True, "position_ids": positions}
        if any(len(p) < width for p in prompts):  # padding to shut (else the plain causal mask)
            kwargs["attention_mask"] = real
        if self.keep_logits:
            kwargs["logits_to_keep"] = 1
        logits = self.model(input_ids=ids, **kwargs).logits[:, -1, :]
        rows = torch.tensor([*range(n), *[0] * (bucket.size - n)], device=self.device)  # padding rows copy row 0
        bucket.cache.reset()
        for i, layer in enumerate(cache.layers):  # slots 0..width-1; advances the cache's length to width
            bucket.cache.update(layer.keys[rows], layer.values[rows], i)
        bucket.mask.fill_(self.shut)
        bucket.mask[:, 0, 0, :width] = torch.where(real[rows].bool(), self.open, self.shut)
        bucket.positions.copy_(positions[rows, -1:])  # each step adds 1 first
        return StaticSession(self, bucket, rows, n, width), logits

    def warmup(self, prompt_tokens: int = WARMUP_PROMPT_TOKENS, steps: int = WARMUP_STEPS) -> float:
        """Compile and record each bucket's step now, not at the first requests: the seconds it took."""
        for size in self.buckets:
            began = time.perf_counter()
            session, logits = self.start([[0] * prompt_tokens] * size)
            for _ in range(steps):
                logits = session.step(logits.argmax(-1))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.warmup_by_bucket[size] = time.perf_counter() - began
            log.info("CUDA-graph decoding: batch size %d ready in %.1f s", size, self.warmup_by_bucket[size])
        self.warmup_s = sum(self.warmup_by_bucket.values())
        return self.warmup_s

    def _bucket(self, size: int) -> _Bucket:
        if size not in self._buckets:
            from transformers import StaticCache

            self._buckets[size] = _Bucket(
                size=size,
                cache=StaticCache(config=self.model.config, max_cache_len=self.max_length),
                ids=torch.zeros((size, 1), dtype=torch.long, device=self.device),
                positions=torch.zeros((size, 1), dtype=torch.long, device=self.device),
                mask=torch.full((size, 1, 1, self.max_length), self.shut, dtype=self.mask_dtype, device=self.device),
            )
        return self._buckets[size]

    def _forward_one(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor:
        """The compiled region: one token per row -> logits [B, V]; writes its keys/values into ``cache``."""
        kwargs = {self.cache_kw: cache}
        out = self.model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True, **kwargs)
        return out.logits[:, -1, :]


class StaticSession:
    """One batch being decoded in a bucket: feed one token per row, get the next logits."""

    def __init__(self, owner: StaticDecoding, bucket: _Bucket, rows: torch.Tensor, n: int, length: int) -> None:
        self.owner, self.bucket, self.rows, self.n = owner, bucket, rows, n
        self.length = length  # cache slots filled

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` [n] (one per row, on the device); the logits [n, V] after them."""
        owner, b = self.owner, self.bucket
        if self.length >= owner.max_length:
            raise RuntimeError(f"the static cache holds {owner.max_length} tokens; check `fits` first")
        b.ids.copy_(tokens[self.rows][:, None])
        b.positions.add_(1)
        b.mask[:, 0, 0, self.length] = owner.open
        self.length += 1
        torch.compiler.cudagraph_mark_step_begin()
        logits = owner._step(b.ids, b.positions, b.mask, b.cache)
        return logits[: self.n].clone()  # the graph's output memory is overwritten by the next replay


def copy_to_host(tokens: torch.Tensor) -> Callable[[], list[int]]:
    """Start copying ``tokens`` to the host; the function returned waits for that copy only.

    So the GPU can run the next step (queued after the copy) while the host reads these tokens.
    """
    if tokens.device.type != "cuda":
        values = tokens.tolist()
        return lambda: values
    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    host.copy_(tokens, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> list[int]:
        copied.synchronize()
        return host.tolist()

    return wait


def base_model(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper (its LoRA layers, merged or not, included)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def forward_keywords(model: Any) -> tuple[str, bool]:
    """(the cache keyword of ``model``'s forward, whether it takes ``logits_to_keep``).

    transformers 5.24 renamed ``past_key_values`` to ``cache``; the PEFT wrapper's forward
    takes ``**kwargs``, so the inner model's signature is read.
    """
    forward = inspect.signature(base_model(model).forward).parameters
    return ("cache" if "cache" in forward else "past_key_values"), "logits_to_keep" in forward


def _mask_values(attn: str | None, dtype: torch.dtype) -> tuple[Any, Any, torch.dtype]:
    """(open, shut, mask dtype) in the 4D mask format of attention ``attn``: booleans for SDPA, biases for eager."""
    if attn == "sdpa":
        return True, False, torch.bool
    if attn == "eager":
        return 0.0, torch.finfo(dtype).min, dtype
    raise ValueError(f"no static decoding for attention {attn!r} (only {', '.join(MASK_KINDS)})")


def _compiled(fn: Callable[..., torch.Tensor], backend: str | None, mode: str | None) -> Callable[..., torch.Tensor]:
    if backend is None:
        return fn
    raise_recompile_limit()  # graphs of one step function: a bucket x an adapter state (merged, disabled, ...)
    options: dict[str, Any] = {"backend": backend, "dynamic": False}  # one graph per bucket shape
    if backend == "inductor" and mode:
        options["mode"] = mode
    return torch.compile(fn, **options)


def quantized(model: Any) -> bool:
    """Whether ``model``'s weights are quantized (int8 here, bitsandbytes, ...): those stay on the eager path."""
    inner = base_model(model)
    if getattr(inner, "hf_quantizer", None) is not None or getattr(inner, "is_quantized", False):
        return True
    return any(type(m).__name__ in ("Int8Linear", "Linear8bitLt", "Linear4bit") for m in inner.modules())


def static_decoding(model: Any, max_length: int, max_batch_size: int, **compile_options: Any) -> StaticDecoding | None:
    """The fast path for ``model`` when it is on a CUDA device, unquantized, with plain full attention; else None."""
    param = next(model.parameters())
    if param.device.type != "cuda" or quantized(model):
        return None
    try:
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        config = base_model(model).config
        layers = StaticCache(config=config, max_cache_len=max_length).layers  # allocates nothing yet
        if not all(type(layer) is StaticLayer for layer in layers):  # sliding windows, linear attention, ...
            log.info("no CUDA graphs: this model's cache layers are not all full attention")
            return None
        return StaticDecoding(model, max_length, max_batch_size, **compile_options)
    except (ValueError, TypeError, ImportError, AttributeError) as e:
        log.warning("no CUDA graphs for this model (%s); decoding eagerly", e)
        return None
