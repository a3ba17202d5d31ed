"""The GPU fast path: a static KV cache per batch size, and a one-token step replayed as a CUDA graph.

On a GPU, a decoding step of a 1B model is well under a millisecond of kernels, but an eager
forward launches some 400 of them from Python (plain `generate`: ~340 ms for 32 tokens). A
CUDA graph replays all of a step's kernels at once; it needs fixed shapes and fixed addresses:

    bucket    batch sizes 1, 4, 16, ... up to `max_batch_size`; a batch of n rows is padded to
              the next bucket with copies of its first row (their outputs are dropped)
    cache     a transformers StaticCache per bucket, [B, kv heads, max_length, head dim] a layer,
              allocated once; rewound (`reset()`) for each batch
    prefill   eager (or compiled: ``compile_prefill``), on the n real rows into a DynamicCache;
              its keys and values are then written into slots 0..T-1 of the bucket's cache
              (T: the longest prompt). A single prompt (a batch of one, or a row joining) of up
              to ``prefill_graph_tokens`` goes through a captured graph instead
              (``prefill_graphs``, below)
    step      ids [B, 1], positions [B, 1], mask [B, 1, 1, max_length] -> logits [B, V]: three
              buffers filled in place, and a forward compiled with
              `torch.compile(mode="reduce-overhead")` (inductor kernels, replayed as CUDA graphs)

The mask is 4D, which transformers hands to attention as it is: no mask-building code, with
its host reads of tensor values, in the graph. It holds SDPA's additive biases (0 open, -inf
shut), not booleans that each layer would turn into them (FlexAttention, below, reads
booleans). Slot j of row b is open (1 below) when it holds one of b's tokens (prompts are
left-padded)::

    slot      0  1  2  3 .. T-1 | T  T+1 ...            | ... max_length-1
    row b     0  0  1  1 ..  1  | 1  1  (opened a step   |  0 ...  0
              (b's padding)     |       at a time)      |

CUDA graph trees replay into the same output memory, so each step's logits are cloned before
the next replay, and `torch.compiler.cudagraph_mark_step_begin()` starts each step. Or
(``graphs="captured"``) the step is compiled without graph trees and captured here with
`torch.cuda.graph`, one graph per bucket and adapter state: a replay is then one call, with none
of the trees' checks of their inputs. Without CUDA (the tests) the same code runs with another
compile backend (`"eager"`), or uncompiled.

Continuous batching: a session's rows are slots of its bucket. Between two steps, new prompts
join the batch in flight (:meth:`StaticSession.admit`): each is prefilled (one alone through
its prefill graph) and written into a free slot's cache row at slots 0..w-1, with w no more than the slots filled so far, its
mask shut after its prompt and open again from the next step's slot on (positions are per
row, so the gap changes nothing). A session with too few free slots moves into the next bucket
first (:meth:`StaticSession.grow`: its cache rows, mask and positions are copied over).

Overlapped joins (`Decoder.run(overlap_joins=True)`; the server's default, `--no-overlap-joins`):
a joining prompt that fits a prefill graph is prefilled on a CUDA stream of its own
(:meth:`StaticSession.begin_admit`) while the batch goes on decoding, its slot decoding along
unused; it is put in (:meth:`StaticSession.finish_admit`) at the first step after its prefill
ended, or after `OVERLAP_MAX_STEPS` steps, the decoding stream then waiting for it. A step of a
batch of 16 leaves most of the GPU idle (small kernels), where a prefill's matrix products can run;
without it, every join stops the batch for the prefill (~7 ms on an H200). One join at a time,
of a prompt that waited alone: prompts that wait together join together, the batch waiting for
their prefill (:meth:`fimtune.serve.decoding.Decoder._admit`).
The steps run on a stream of the highest priority (:meth:`StaticDecoding.on_stream`), the
prefills on one of the lowest: as a prefill's thread blocks end, the GPU should start a step's
waiting blocks before the prefill's next ones (CUDA's priorities are a hint; not yet measured).

Prefill graphs (CUDA; ``prefill_graphs``): the eager prefill of one 1,024-token prompt is bound by
the host launching its ~500 kernels (an H200 did it in ~10 ms, where a batch of 4 took ~18 ms).
So a single prompt is right-padded to a length bucket (multiples of 128) and its eager forward
replayed as a CUDA graph captured per bucket: ids [1, L] and the index of its last real token
are filled in place; the graph writes the last token's logits and every layer's keys and values
into buffers shared by all buckets, and slots 0..w-1 are copied from them (the padding comes
after the prompt, so causal attention keeps it out of the prompt's keys and values). Each
capture is checked against the eager forward it replaces; a failure or a mismatch turns the
graphs off and the prefill stays eager. Without CUDA the same padded forward runs uncaptured.

Flex decoding (``flex=True``: :func:`flex_decoding`): the step's attention is PyTorch's
FlexAttention, which the compiler lowers to a decoding kernel that reads each key/value head
once for all the query heads it serves and splits the cached slots across thread blocks
(flash-decoding); the mask becomes its score modification. One-token steps only: prefills
keep SDPA.

Matrix-vector steps (``gemv``, on by default with inductor on CUDA): a batch of one's step
multiplies one row by each weight matrix. cuBLAS runs these as matrix products whose tiles leave
most of the GPU idle for the smaller weights (an H200's profile: 6.2 us for StarCoder's 2048 x 2304
`c_attn`, ~1.5 TB/s, against ~4.8 TB/s to read it). With ``gemv`` the step compiles through
:func:`gemv_backend`: one-row products, biased or not, become a multiply and a sum over the inner
dimension (:func:`fimtune.fast.product_decompositions`), which inductor writes as a reduction kernel with the
bias, and what follows, fused in; its coordinate-descent tuning picks the kernel's block sizes
(PyTorch's own rule for `mm`, which skips products with a bias). Larger buckets keep cuBLAS.

The step's attention (``attention``): transformers' SDPA (`"sdpa"`), which with a 4D mask repeats
grouped-query key/value heads to the query heads' number (StarCoder's single one as a view, Llama's
several as a copy of the cache in every layer and step); :func:`grouped_sdpa` (`"grouped"`), which folds the query heads that share a key/value head
into that head's query rows for one-token steps (slower on an H200: SDPA then runs one head's worth
of thread blocks; benchmarks/RESULTS.md); :func:`matmul_decoding` (`"matmul"`), two batched matrix
products around a soft-max, each cached key and value read once; FlexAttention (`"flex"`, above).
`"auto"` (the server's default) times SDPA, grouped SDPA and the matrix products on each batch
bucket's shapes before anything is compiled (:func:`time_decoding_attention`: one layer's attention
compiled as the step is, replayed over the model's layers as a CUDA graph) and gives each bucket
the fastest, where it beats SDPA by `AUTO_MARGIN` (:func:`chosen_decoding` routes by batch size).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fimtune.fast import (
    copy_to_device,
    inductor_backend,
    product_decompositions,
    raise_recompile_limit,
    register_attention,
    without_cudnn_attention,
)
from fimtune.model import base_model, forward_keywords, position_limit

log = logging.getLogger(__name__)

BUCKET_GROWTH = 4  # batch-size buckets: 1, 4, 16, ..., then max_batch_size
WARMUP_STEPS = 3  # CUDA graph trees: one warm-up run, one recording, then replays
WARMUP_PROMPT_TOKENS = 16
SLOT_ALIGN = 64  # cache slots are a multiple of this (fused attention kernels want aligned masks)
GROUPED = "fimtune_grouped_sdpa"  # the name of :func:`grouped_sdpa` in transformers' AttentionInterface
FLEX = "fimtune_flex_decoding"  # the name of :func:`flex_decoding` there
MATMUL = "fimtune_matmul_decoding"  # the name of :func:`matmul_decoding` there
CHOSEN = "fimtune_decoding"  # names of :func:`chosen_decoding` functions there start with this
DECODE_ATTENTIONS = ("auto", "sdpa", "grouped", "matmul", "flex")  # the step's attention (`attention=`)
AUTO_MARGIN = 0.05  # "auto" takes another attention than SDPA only where it is this share faster
AUTO_REPLAYS = 20  # replays of a candidate's graph timed (CUDA; a few calls elsewhere)
AUTO_CACHE_BYTES = 256 * 2**20  # the most cache memory a candidate's timing allocates (bucket 16 of a 1B model: 214 MB)
FLEX_MIN_HEAD_SIZE = 16  # FlexAttention's GPU kernels refuse smaller heads
MASK_KINDS = ("sdpa", GROUPED, MATMUL, CHOSEN, FLEX, "eager")  # attention implementations whose mask format is known
PREFILL_GRAPH_STEP = 128  # a single prompt is right-padded to a multiple of this for its prefill graph
PREFILL_GRAPH_TOKENS = 2048  # the longest prompt prefilled through a graph (longer ones keep the GPU busy anyway)
PREFILL_CHECK_TOLERANCE = 0.02  # a captured prefill's logits may differ from eager ones by this share of their range
GRAPH_KINDS = ("trees", "captured")  # CUDA graphs: torch.compile's graph trees, or captured here
OVERLAP_MAX_STEPS = 8  # an overlapped join's prefill is waited for after this many decoding steps
HIGHEST_PRIORITY = -(2**10)  # PyTorch maps a stream priority past its range to the nearest: its highest


def grouped_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except a one-token step of grouped-query attention with a mask.

    There, query [B, H, 1, D] becomes [B, KV, H/KV, D] (query head h = kv * H/KV + j, as
    transformers' `repeat_kv` pairs them), so each of the KV cached heads [B, KV, L, D] is read
    once for its H/KV query rows; the mask [B, 1, 1, L] broadcasts over them. Returns [B, 1, H, D].
    """
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    if kv_heads == heads or not _masked_step(query, attention_mask, dropout, kwargs):
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    folded = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2), None


def flex_decoding(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A one-token step's attention through FlexAttention, with the 4D boolean mask as its score
    modification and grouped-query heads read once (``enable_gqa``); anything else: SDPA.

    Compiled, it becomes FlexAttention's decoding kernel; uncompiled (the CPU tests) its reference
    implementation, which gives the same values. Returns [B, 1, H, D]. Heads smaller than 16 on a
    GPU (tiny test models) go to SDPA: FlexAttention's GPU kernels take no smaller.
    """
    from torch.nn.attention.flex_attention import flex_attention

    if (
        not _masked_step(query, attention_mask, dropout, kwargs)
        or attention_mask.dtype != torch.bool
        or (query.is_cuda and query.shape[-1] < FLEX_MIN_HEAD_SIZE)
    ):
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    mask = attention_mask[:, 0, 0, : key.shape[2]]

    def shut_slots(score: torch.Tensor, b: Any, h: Any, q: Any, kv: Any) -> torch.Tensor:
        return torch.where(mask[b, kv], score, -float("inf"))

    out = flex_attention(
        query, key, value, score_mod=shut_slots, enable_gqa=key.shape[1] != query.shape[1], scale=scaling
    )
    return out.transpose(1, 2).contiguous(), None


def matmul_decoding(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A one-token step's attention as two batched matrix products around a soft-max (fp32), the
    query heads that share a key/value head as the rows of one product (as :func:`grouped_sdpa`
    folds them): each cached key and value is read once, by products that cuBLAS spreads over the
    GPU, where SDPA's kernel (run 7's profile: 26 us a layer at batch 16) likely runs a thread block
    per row and head. The mask: additive biases or booleans [B, 1, 1, L]. Anything else: SDPA. A
    candidate, timed by `benchmarks/latency.py`'s attention rows; no engine uses it yet."""
    if not _masked_step(query, attention_mask, dropout, kwargs):
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    batch, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    folded = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(folded, key.transpose(-1, -2)).float() * (dim**-0.5 if scaling is None else scaling)
    mask = attention_mask[..., :length]
    scores = scores.masked_fill(~mask, -float("inf")) if mask.dtype == torch.bool else scores + mask.float()
    out = torch.matmul(scores.softmax(-1).to(value.dtype), value)  # [B, KV, H/KV, D]
    return out.reshape(batch, heads, 1, dim).transpose(1, 2), None


DECODING_FUNCTIONS: dict[str, Callable[..., tuple[torch.Tensor, None]]] = {}  # filled below: kind -> function


def chosen_decoding(choices: dict[int, str]) -> Callable[..., tuple[torch.Tensor, None]]:
    """An attention function that gives a batch of B rows the attention ``choices[B]`` (`"sdpa"`,
    `"grouped"` or `"matmul"`), and any other batch SDPA. The batch size is fixed in each compiled
    step, so the compiler sees one function per bucket, and none of this routing."""
    table = {size: DECODING_FUNCTIONS[kind] for size, kind in choices.items()}

    def attend(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        attention = table.get(query.shape[0], _sdpa)
        return attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)

    return attend


def chosen_name(choices: dict[int, str]) -> str:
    """The name :func:`chosen_decoding` for ``choices`` is registered under (the same choices, the same name).

    >>> chosen_name({16: "matmul", 1: "sdpa"})
    'fimtune_decoding_1sdpa_16matmul'
    """
    return "_".join([CHOSEN, *(f"{size}{kind}" for size, kind in sorted(choices.items()))])


class _Heads(torch.nn.Module):
    """What the attention functions read of an attention layer, for timing them apart from the model."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


def time_decoding_attention(
    config: Any,
    batch: int,
    length: int,
    kinds: list[str],
    device: torch.device,
    dtype: torch.dtype,
    backend: str | None = None,
    replays: int = AUTO_REPLAYS,
) -> tuple[dict[str, float], dict[str, str]]:
    """Milliseconds one decoding step's attention takes with each of ``kinds`` (a batch of ``batch``
    rows over ``length`` cache slots, the model's layers), and the error of each kind that failed.

    One layer's attention is compiled with ``backend`` as the step would compile it (None: not
    compiled) and called once per layer, each on a cache of its own (up to `AUTO_CACHE_BYTES` of
    them, then taken again), with the engine's additive mask (a prompt's slots and some new ones
    open). On CUDA the calls are captured as a CUDA graph and its replays timed (:func:`graph_ms`);
    elsewhere the calls themselves (the median of ``replays`` // 4 + 1 runs).
    """
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    groups = kv_groups(config)
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    gen = torch.Generator(device=device).manual_seed(0)
    opts: dict[str, Any] = {"device": device, "dtype": dtype, "generator": gen}
    query = torch.randn(batch, heads, 1, dim, **opts)
    per_layer = 2 * batch * (heads // groups) * length * dim * dtype.itemsize
    caches = [
        [torch.randn(batch, heads // groups, length, dim, **opts) for _ in range(2)]
        for _ in range(max(1, min(layers, AUTO_CACHE_BYTES // per_layer)))
    ]
    mask = torch.full((batch, 1, 1, length), -float("inf"), device=device, dtype=dtype)
    mask[..., : max(1, length * 3 // 4)] = 0.0
    module, scale = _Heads(groups), dim**-0.5
    times, errors = {}, {}
    for kind in kinds:
        attention = DECODING_FUNCTIONS[kind]

        def layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: torch.Tensor, fn: Any = attention) -> Any:
            return fn(module, q, k, v, m, scaling=scale)[0]

        one = _compiled(layer, backend, None)

        def step(one: Any = one) -> list[torch.Tensor]:  # the outputs returned: none is optimized away
            return [one(query, *caches[i % len(caches)], mask) for i in range(layers)]

        try:
            if device.type == "cuda":
                with torch.cuda.device(device):  # its streams and graph on the model's GPU
                    times[kind] = graph_ms(step, replays)
            else:
                times[kind] = _call_ms(step, replays // 4 + 1)
        except Exception as e:  # a kind that fails to compile or capture is not chosen
            errors[kind] = f"{type(e).__name__}: {e}"[:300]
    return times, errors


def fastest(times: dict[str, float], margin: float = AUTO_MARGIN) -> str:
    """The kind of the fewest milliseconds in ``times``, where it beats SDPA's by ``margin`` (a
    share); else (or without SDPA's time) `"sdpa"`.

    >>> fastest({"sdpa": 1.0, "matmul": 0.9}), fastest({"sdpa": 1.0, "matmul": 0.97}), fastest({"matmul": 0.5})
    ('matmul', 'sdpa', 'sdpa')
    """
    if "sdpa" not in times:
        return "sdpa"
    best = min(times, key=times.__getitem__)
    return best if times[best] < (1 - margin) * times["sdpa"] else "sdpa"


@contextlib.contextmanager
def capture(graph: Any, pool: Any = None) -> Iterator[None]:
    """Capture CUDA work into ``graph`` (``torch.cuda.graph``), cuBLAS's cached workspaces let go of first.

    cuBLAS keeps a workspace for each handle and stream, and a captured product keeps its address.
    Graphs captured on one stream (``torch.cuda.graph``'s own, unless told another) would share the
    workspace cached for it: a prefill graph replayed beside a step graph (an overlapped join)
    would write the same scratch memory at the same time; and whatever lets go of the cache later
    (inductor's CUDA graph trees, at each recording; PyTorch, when a graph captured on that stream
    is destroyed) frees memory the graphs captured before still write into, which PyTorch may then
    hand to other tensors (pytorch/pytorch#193402). Let go of first, the capture's products get a
    workspace of their own inside the graph's memory pool, whose memory only later captures into
    the same pool reuse (inductor's CUDA graph trees do the same around each recording).
    """
    torch._C._cuda_clearCublasWorkspaces()
    with torch.cuda.graph(graph, pool=pool):
        yield


def graph_ms(step: Callable[[], Any], replays: int) -> float:
    """Milliseconds a replay of ``step`` captured as a CUDA graph takes (after a warm-up run on a
    side stream, where compiled code compiles)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with capture(graph):
        step()
    graph.replay()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / replays


def _call_ms(step: Callable[[], Any], runs: int) -> float:
    step()  # compiles, where compiled
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        step()
        times.append((time.perf_counter() - began) * 1e3)
    return sorted(times)[len(times) // 2]


def _masked_step(query: torch.Tensor, mask: torch.Tensor | None, dropout: float, kwargs: dict[str, Any]) -> bool:
    """Whether attention is a one-token step with a [B, 1, 1, L] mask and nothing else (no dropout,
    no position bias): the case :func:`grouped_sdpa`, :func:`flex_decoding` and :func:`matmul_decoding`
    take over."""
    return (
        query.shape[2] == 1
        and mask is not None
        and mask.shape[1:3] == (1, 1)
        and dropout == 0
        and kwargs.get("position_bias") is None
    )


def _sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


DECODING_FUNCTIONS.update(sdpa=_sdpa, grouped=grouped_sdpa, matmul=matmul_decoding)


def prefill_lengths(max_length: int, limit: int, positions: int | None) -> list[int]:
    """The length buckets of single-prompt prefill graphs: multiples of `PREFILL_GRAPH_STEP` up to
    the longest prompt that fits (``max_length``, ``limit``, the model's ``positions``), which ends
    the list when it is no multiple.

    >>> prefill_lengths(1088, 2048, 8192), prefill_lengths(300, 2048, 256), prefill_lengths(100, 2048, None)
    ([128, 256, 384, 512, 640, 768, 896, 1024, 1088], [128, 256], [100])
    """
    top = min(max_length, limit, positions or max_length)
    return [*range(PREFILL_GRAPH_STEP, top, PREFILL_GRAPH_STEP), top] if top > 0 else []


def kv_groups(config: Any) -> int:
    """Query heads per key/value head (1: plain multi-head attention)."""
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    if getattr(config, "multi_query", False):
        return heads
    return heads // (getattr(config, "num_key_value_heads", None) or heads)


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


@dataclass
class _Single:
    """The buffers of single-prompt prefills, shared by every length bucket's graph (fixed addresses)."""

    ids: torch.Tensor  # [1, longest bucket] the prompt, then whatever the last longer one left (never read)
    positions: torch.Tensor  # [1, longest bucket] 0, 1, 2, ...
    keep: torch.Tensor  # [1] the index of the prompt's last token
    logits: torch.Tensor | None = None  # [1, V] after it (allocated by the first forward)
    states: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # each layer's keys, values [1, kv, longest, D]


@dataclass
class Admission:
    """A joining prompt being prefilled beside the batch's decoding (:meth:`StaticSession.begin_admit`)."""

    slot: int
    logits: torch.Tensor  # [1, V] after the prompt (the shared single-prompt buffers)
    states: list[tuple[torch.Tensor, torch.Tensor]]
    positions: torch.Tensor  # [1, w]
    done: Any = None  # the CUDA event recorded after the prefill on its stream (None: done already)

    def ready(self) -> bool:
        return self.done is None or bool(self.done.query())


class StaticDecoding:
    """Prefill a batch, then decode it a token at a time with a compiled step (see the module doc)."""

    def __init__(
        self,
        model: Any,
        max_length: int,
        max_batch_size: int,
        backend: str | None = "inductor",
        mode: str | None = "reduce-overhead",
        attention: str = "sdpa",
        graphs: str = "trees",
        compile_prefill: bool = False,
        prefill_graphs: bool | None = None,
        prefill_graph_tokens: int = PREFILL_GRAPH_TOKENS,
        gemv: bool | None = None,
    ) -> None:
        """``backend``: a torch.compile backend (`"eager"` on a CPU in tests), or None: no compiling.

        ``attention``: the steps' attention in an SDPA model, one of :data:`DECODE_ATTENTIONS` (see
        the module doc): `"grouped"` takes effect with grouped-query attention only; `"auto"` times
        the candidates on each bucket's shapes at the warm-up or the first batch (:meth:`choose_attention`).
        ``graphs`` (CUDA): `"trees"`, the compiler's CUDA graph trees (``mode``); or `"captured"`:
        the step compiled without them and captured here, one `torch.cuda.CUDAGraph` per bucket and
        adapter state, replayed with no per-call checks. ``compile_prefill``: the prefill is
        compiled too (dynamic shapes: one graph for every prompt length) by :meth:`warmup`.
        ``prefill_graphs``: single prompts of up to ``prefill_graph_tokens`` are prefilled through
        CUDA graphs, one per length bucket (None: on a CUDA device, unless the prefill is compiled;
        True without CUDA: the same padded forward, uncaptured).
        ``gemv``: a batch of one's step does its matrix products as reductions (:func:`gemv_backend`;
        None: with inductor on CUDA; True elsewhere too, for tests). Should compiling them fail, the
        warm-up falls back to the plain step, with a warning.
        """
        if graphs not in GRAPH_KINDS:
            raise ValueError(f"graphs={graphs!r}: one of {', '.join(GRAPH_KINDS)}")
        if attention not in DECODE_ATTENTIONS:
            raise ValueError(f"attention={attention!r}: one of {', '.join(DECODE_ATTENTIONS)}")
        self.model = base_model(model)
        self.max_length = -(-max_length // SLOT_ALIGN) * SLOT_ALIGN  # cache slots a row holds
        # ... and those a session may fill: the slots of finished rows decode on until it ends, and
        # past learned positions (GPT-BigCode's `wpe`) a forward fails
        limit, learned = position_limit(self.model)
        self.room = min(self.max_length, limit) if learned and limit else self.max_length
        self.buckets = batch_buckets(max_batch_size)
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.attention_ms: dict[int, dict[str, float]] = {}  # "auto": each bucket's candidates timed
        self.attention_errors: dict[int, dict[str, str]] = {}  # ... and those that failed
        self.decode_attention: dict[int, str] = {}  # bucket -> the kind its steps use ("auto": once timed)
        self.attention_s = 0.0  # seconds "auto" spent timing (compiling, mostly)
        self.attention = self._set_attention(attention)  # as asked for ("sdpa" where it cannot apply)
        self.cache_kw, self.keep_logits = forward_keywords(self.model)
        self.open, self.shut, self.mask_dtype = _mask_values(self.model.config._attn_implementation, self.dtype)
        self._buckets: dict[int, _Bucket] = {}
        self.captured = graphs == "captured" and self.device.type == "cuda"
        if gemv is None:
            gemv = backend == "inductor" and self.device.type == "cuda"
        self.gemv = gemv and backend == "inductor"
        self._mode = None if self.captured else mode
        self._step = _compiled(self._forward_one, backend, self._mode, self.device.type if self.gemv else None)
        self._graphs: dict[tuple[int, int], tuple[Any, torch.Tensor]] = {}  # (bucket, state) -> graph, output
        self._pool: Any = None  # one memory pool for every captured graph (they never run at once)
        self._state = 0  # the adapter state of the session in flight (see `_adapter_state`)
        self._backend = backend
        self.compile_prefill_at_warmup = compile_prefill and backend is not None
        self.prefill_compiled = False
        self.prefill_warmup_s = 0.0
        self._prefill = self._forward_prefill
        if prefill_graphs is None:
            prefill_graphs = self.device.type == "cuda" and not self.compile_prefill_at_warmup
        self.prefill_lengths = (  # the length buckets of single-prompt prefills (tensor `logits_to_keep` needed)
            prefill_lengths(self.max_length, prefill_graph_tokens, limit) if prefill_graphs and self.keep_logits else []
        )
        self.prefill_graphs_on = bool(self.prefill_lengths)  # False once a capture failed (or switched off)
        self._single: _Single | None = None  # the buffers every single-prompt prefill shares
        self._prefill_graphs: dict[tuple[int, int], Any] = {}  # (length bucket, adapter state) -> graph
        self._prefill_pool: Any = None
        self._side: Any = None  # the CUDA stream of overlapped joins' prefills (the lowest priority, PyTorch's default)
        # the CUDA stream of everything else (:meth:`on_stream`): the highest priority
        self.stream = torch.cuda.Stream(self.device, priority=HIGHEST_PRIORITY) if self.device.type == "cuda" else None
        self.prefill_graphs_s = 0.0  # seconds spent capturing them
        self.single_prefills = 0  # prompts prefilled padded to a length bucket (through its graph on CUDA)
        # Batches of prompts prefilled eagerly, by shape (rows, width): kernels that build a plan per
        # new shape (cuDNN's attention) pay it on a shape's first call; the host's seconds in those
        # calls against the others tell (latency_gpu.py's server rows)
        self.eager_shapes: set[tuple[int, int]] = set()
        self.eager_prefills = [0, 0]  # calls: on a shape seen before, on a new one
        self.eager_prefill_s = [0.0, 0.0]  # the host's seconds in them, the same way
        self.warmup_s = 0.0
        self.warmup_by_bucket: dict[int, float] = {}  # seconds per batch size (compiling, mostly)
        self.batches = 0  # batches started (warm-up included)

    def _set_attention(self, attention: str) -> str:
        """Switch an SDPA model's attention to ``attention`` ("auto": at :meth:`choose_attention`);
        return the kind that applies."""
        config = self.model.config
        if attention != "sdpa" and config._attn_implementation != "sdpa":
            log.info(
                "decoding attention %r: the model attends through %r, which stays",
                attention,
                config._attn_implementation,
            )
            attention = "sdpa"
        elif attention == "grouped" and kv_groups(config) == 1:
            log.info("decoding attention 'grouped': the model has a key/value head per query head; SDPA decodes")
            attention = "sdpa"
        if attention == "auto":
            return attention
        names = {"grouped": (GROUPED, grouped_sdpa), "matmul": (MATMUL, matmul_decoding), "flex": (FLEX, flex_decoding)}
        if attention in names:
            self.model.set_attn_implementation(register_attention(*names[attention]))
        self.decode_attention = dict.fromkeys(self.buckets, attention)
        return attention

    def choose_attention(self) -> dict[int, str]:
        """For "auto", time the candidates on each bucket's shapes and route each bucket's steps to
        its fastest: once, before the model first runs here (the warm-up, or the first batch), since a
        compiled step would compile again after a switch. Returns the kind each bucket's steps use."""
        if self.decode_attention:
            return self.decode_attention
        began, config = time.perf_counter(), self.model.config
        kinds = ["sdpa", "matmul", *(["grouped"] if kv_groups(config) > 1 else [])]
        for size in self.buckets:
            try:
                times, errors = time_decoding_attention(
                    config, size, self.max_length, kinds, self.device, self.dtype, self._backend
                )
            except Exception as e:  # no memory for its caches, a model config read otherwise, ...: SDPA
                times, errors = {}, {"timing": f"{type(e).__name__}: {e}"[:300]}
            self.attention_ms[size], self.attention_errors[size] = times, errors
            for kind, error in errors.items():
                log.warning("decoding attention %r failed its timing at batch size %d: %s", kind, size, error)
        choices = {size: fastest(self.attention_ms[size]) for size in self.buckets}
        log.info(
            "decoding attention, by batch size: %s (timed in %.1f s)",
            ", ".join(
                f"{size}: {choices[size]} ({', '.join(f'{k} {t:.3f} ms' for k, t in self.attention_ms[size].items())})"
                for size in self.buckets
            ),
            time.perf_counter() - began,
        )
        if set(choices.values()) != {"sdpa"}:
            self.model.set_attn_implementation(register_attention(chosen_name(choices), chosen_decoding(choices)))
        self.decode_attention, self.attention_s = choices, time.perf_counter() - began
        return choices

    def fits(self, rows: int, prompt_tokens: int, new_tokens: int) -> bool:
        """Whether ``rows`` prompts of up to ``prompt_tokens`` and ``new_tokens`` new tokens fit the caches.

        (The last new token is fed too: the decoder starts each step before it reads the tokens.)
        """
        return rows <= self.buckets[-1] and prompt_tokens + new_tokens <= self.room

    @torch.inference_mode()
    def start(self, prompts: list[list[int]]) -> tuple[StaticSession, torch.Tensor]:
        """Prefill ``prompts`` into the smallest bucket that holds them: a session to step, and
        the logits [bucket size, V] after each prompt (rows past the prompts copy the first one's).
        """
        self.batches += 1
        self.choose_attention()
        if self.captured or self._capturing_prefills:
            self._state = _adapter_state(self.model)
        n, width = len(prompts), max(len(p) for p in prompts)
        bucket = self._bucket(next(size for size in self.buckets if size >= n))
        rows = padded_rows(n, bucket.size, self.device)
        bucket.cache.reset()
        for layer in bucket.cache.layers:
            layer.cumulative_length.fill_(width)  # the next step writes slot `width`
        bucket.mask.fill_(self.shut)
        session = StaticSession(self, bucket, width)
        logits = session._prefill(prompts, torch.arange(bucket.size, device=self.device), rows)
        return session, logits

    @contextlib.contextmanager
    def on_stream(self) -> Iterator[None]:
        """Queue the block's CUDA work on the decoding stream, of the highest priority: where an
        overlapped join's prefill (on a stream of PyTorch's default priority, the lowest) shares
        the GPU with the steps, the GPU should start the steps' thread blocks first as its cores
        free up (a captured graph runs at the priority of the stream it is replayed on). The
        stream waits for the caller's work first, and the caller's stream for the block's after
        it. No-op without CUDA, or on the stream already."""
        caller = None if self.stream is None else torch.cuda.current_stream(self.device)
        if caller is None or caller == self.stream:
            yield
            return
        self.stream.wait_stream(caller)
        try:
            with torch.cuda.stream(self.stream):
                yield
        finally:
            caller.wait_stream(self.stream)

    def warmup(self, prompt_tokens: int = WARMUP_PROMPT_TOKENS, steps: int = WARMUP_STEPS) -> float:
        """Compile and record each bucket's step now, not at the first requests: the seconds it took
        (the attention's timing included), on the decoding stream (:meth:`on_stream`)."""
        with self.on_stream():
            return self._warmup(prompt_tokens, steps)

    def _warmup(self, prompt_tokens: int, steps: int) -> float:
        self.choose_attention()
        if self.compile_prefill_at_warmup and not self.prefill_compiled:
            self.compile_prefill(prompt_tokens)
        if self._capturing_prefills:
            self.capture_prefills()
        try:
            self._warm_steps(prompt_tokens, steps)
        except Exception:
            if not self.gemv:
                raise
            log.warning("the matrix-vector decoding step failed to compile or run; using the plain step", exc_info=True)
            self.gemv = False
            self._step = _compiled(self._forward_one, self._backend, self._mode)
            self._graphs.clear()
            self._warm_steps(prompt_tokens, steps)
        self.warmup_s = (
            self.attention_s + self.prefill_warmup_s + self.prefill_graphs_s + sum(self.warmup_by_bucket.values())
        )
        return self.warmup_s

    def _warm_steps(self, prompt_tokens: int, steps: int) -> None:
        for size in self.buckets:
            began = time.perf_counter()
            session, logits = self.start([[0] * prompt_tokens] * size)
            for _ in range(steps):
                logits = session.step(logits.argmax(-1))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.warmup_by_bucket[size] = time.perf_counter() - began
            log.info("CUDA-graph decoding: batch size %d ready in %.1f s", size, self.warmup_by_bucket[size])

    @property
    def _capturing_prefills(self) -> bool:
        return self.prefill_graphs_on and self.device.type == "cuda"

    @torch.inference_mode()
    def capture_prefills(self) -> float:
        """Capture the prefill graph of every length bucket now (for the adapter state in place), not
        at the first prompts of each length: the seconds it took (part of the warm-up)."""
        self.choose_attention()
        began = time.perf_counter()
        self._state = _adapter_state(self.model)
        for length in self.prefill_lengths:
            if not self.prefill_graphs_on:
                break
            self._single_graph(length)
        torch.cuda.synchronize(self.device)
        self.prefill_graphs_s = time.perf_counter() - began
        log.info(
            "prefill graphs: %d lengths ready in %.1f s%s",
            len(self._prefill_graphs),
            self.prefill_graphs_s,
            "" if self.prefill_graphs_on else " (turned off: see the warning above)",
        )
        return self.prefill_graphs_s

    def run_prefill(
        self, prompts: list[list[int]]
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor | None]:
        """Prefill ``prompts`` (left-padded to one width w): (last logits [n, V], each layer's (keys,
        values) [n, kv heads, >= w, head dim] (slots w.. are padding), positions [n, w], the mask
        [n, w] of real tokens or None when none is padded).

        A single prompt that fits a length bucket goes through that bucket's graph (on CUDA; the
        same padded forward, uncaptured, elsewhere); any other batch through the eager (or compiled)
        forward.
        """
        if len(prompts) == 1 and prompts[0] and self.prefill_graphs_on:
            length = next((n for n in self.prefill_lengths if n >= len(prompts[0])), None)
            if length is not None:
                return self._prefill_single(prompts[0], length)
        began = time.perf_counter()
        ids, positions, mask = prefill_inputs(prompts, self.device)
        with without_cudnn_attention():  # its plan per new shape costs more than its kernel saves
            logits, states = self._prefill(ids, positions, mask)
        shape = (ids.shape[0], ids.shape[1])
        new = shape not in self.eager_shapes
        self.eager_shapes.add(shape)
        self.eager_prefills[new] += 1
        self.eager_prefill_s[new] += time.perf_counter() - began
        return logits, states, positions, mask

    def _prefill_single(
        self, prompt: list[int], length: int
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, None]:
        """One prompt right-padded to ``length``, through its graph (or uncaptured): see :meth:`run_prefill`."""
        single = self._single_buffers()
        width = len(prompt)
        self.single_prefills += 1
        host = torch.tensor(prompt, dtype=torch.long)
        cuda = self.device.type == "cuda"
        single.ids[0, :width].copy_(host.pin_memory() if cuda else host, non_blocking=cuda)
        single.keep.fill_(width - 1)
        graph = self._single_graph(length) if cuda else None
        if graph is not None:
            graph.replay()
        else:
            self._forward_single(length)
        return single.logits, single.states, single.positions[:, :width], None

    def _single_buffers(self) -> _Single:
        if self._single is None:
            top = self.prefill_lengths[-1]
            self._single = _Single(
                ids=torch.zeros((1, top), dtype=torch.long, device=self.device),
                positions=torch.arange(top, device=self.device)[None],
                keep=torch.zeros(1, dtype=torch.long, device=self.device),
            )
        return self._single

    def _forward_single(self, length: int) -> None:
        """The captured region: the shared ids [:, :length] -> the shared logits and keys/values."""
        single = self._single_buffers()
        logits, states = self._forward_prefill(
            single.ids[:, :length], single.positions[:, :length], None, keep=single.keep
        )
        if single.logits is None:  # the first run (eager, never under capture): the buffers to fill
            top = self.prefill_lengths[-1]
            single.logits = torch.empty_like(logits)
            single.states = [
                (k.new_empty((*k.shape[:2], top, k.shape[3])), v.new_empty((*v.shape[:2], top, v.shape[3])))
                for k, v in states
            ]
        single.logits.copy_(logits)
        for (keys, values), (k, v) in zip(single.states, states, strict=True):
            keys[:, :, :length].copy_(k)
            values[:, :, :length].copy_(v)

    def _single_graph(self, length: int) -> Any:
        """The graph of length bucket ``length`` for the adapter state in place, captured now if it is
        new; None once prefill graphs are off (a capture failed: the prefill stays eager)."""
        key = (length, self._state)
        graph = self._prefill_graphs.get(key)
        if graph is not None or not self.prefill_graphs_on:
            return graph
        try:
            graph = self._capture_single(length)
        except Exception as e:  # an operation that cannot be captured, a mismatch: eager from now on
            self.prefill_graphs_on = False
            log.warning("prefill graphs turned off: capturing the %d-token prefill failed (%s)", length, e)
            return None
        self._prefill_graphs[key] = graph
        return graph

    def _capture_single(self, length: int) -> Any:
        """Run the padded forward eagerly on a side stream, capture it, replay it: the replay must
        give the eager run's logits, keys and values (the graph is returned), else RuntimeError."""
        single = self._single_buffers()
        stream, side = torch.cuda.current_stream(self.device), torch.cuda.Stream(self.device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            self._forward_single(length)
        stream.wait_stream(side)
        expected = [single.logits.clone(), *(t[:, :, :length].clone() for t in single.states[-1])]
        if self._prefill_pool is None:
            self._prefill_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with capture(graph, self._prefill_pool):
            self._forward_single(length)
        for t in (single.logits, *single.states[-1]):
            t.zero_()
        graph.replay()
        got = [single.logits, *(t[:, :, :length] for t in single.states[-1])]
        for name, a, b in zip(("logits", "keys", "values"), got, expected, strict=True):
            gap, scale = (a.float() - b.float()).abs().max().item(), b.float().abs().max().item()
            if not gap <= PREFILL_CHECK_TOLERANCE * scale + 1e-3:
                raise RuntimeError(
                    f"its replay's {name} differ from the eager forward's by {gap:.3g} (range {scale:.3g})"
                )
        return graph

    @torch.inference_mode()
    def compile_prefill(self, prompt_tokens: int = WARMUP_PROMPT_TOKENS) -> float:
        """Compile the prefill (dynamic shapes) and run its three graphs once: one prompt, several of
        one length, several padded to one length. The seconds it took."""
        self.choose_attention()
        began = time.perf_counter()
        self._prefill = torch.compile(self._forward_prefill, backend=self._backend or "inductor", dynamic=True)
        one, short = [0] * prompt_tokens, [0] * (prompt_tokens // 2)
        with without_cudnn_attention():  # as `run_prefill` runs it
            for prompts in ([one], [one, one], [one, short]):
                self._prefill(*prefill_inputs(prompts, self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.prefill_compiled = True
        self.prefill_warmup_s = time.perf_counter() - began
        log.info("compiled prefill ready in %.1f s", self.prefill_warmup_s)
        return self.prefill_warmup_s

    def _forward_prefill(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Prompts [n, w] (``mask``: 1 on real tokens, None: no padding) -> (logits [n, V] after the
        last token (``keep``: after token ``keep[0]``), each layer's (keys, values) [n, kv heads, w, head dim])."""
        from transformers import DynamicCache

        cache = DynamicCache()  # plain (not kvcache.new_cache's growing layers): copied out at once
        kwargs: dict[str, Any] = {self.cache_kw: cache, "use_cache": True, "position_ids": positions}
        if mask is not None:
            kwargs["attention_mask"] = padded_causal_mask(mask, self.open, self.shut, self.mask_dtype)
        if self.keep_logits:
            kwargs["logits_to_keep"] = 1 if keep is None else keep
        logits = self.model(input_ids=ids, **kwargs).logits[:, -1, :]
        return logits, [(layer.keys, layer.values) for layer in cache.layers]

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

    def _replay(self, b: _Bucket) -> torch.Tensor:
        """One step of bucket ``b`` (its buffers filled): the logits [B, V], a copy the next replay keeps."""
        if not self.captured:
            torch.compiler.cudagraph_mark_step_begin()
            return self._step(b.ids, b.positions, b.mask, b.cache).clone()
        key = (b.size, self._state)
        graph, out = self._graphs.get(key) or self._capture(b, key)
        graph.replay()
        return out.clone()

    def _capture(self, b: _Bucket, key: tuple[int, int]) -> tuple[Any, torch.Tensor]:
        """Compile (two runs on a side stream) and capture bucket ``b``'s step; the cache is left as it was."""
        lengths = [layer.cumulative_length.clone() for layer in b.cache.layers]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(b.ids, b.positions, b.mask, b.cache)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with capture(graph, self._pool):
            out = self._step(b.ids, b.positions, b.mask, b.cache)
        for layer, length in zip(b.cache.layers, lengths, strict=True):  # the warm-up runs wrote a slot each
            layer.cumulative_length.copy_(length)
        self._graphs[key] = (graph, out)
        return graph, out

    def _forward_one(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor:
        """The compiled region: one token per row -> logits [B, V]; writes its keys/values into ``cache``."""
        kwargs = {self.cache_kw: cache}
        out = self.model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True, **kwargs)
        return out.logits[:, -1, :]


class StaticSession:
    """One batch being decoded in a bucket, a row per slot: feed one token per slot, get the next logits.

    Rows may join between steps (:meth:`admit`), moving the session to a larger bucket
    (:meth:`grow`) when it has too few slots; the caller keeps track of which slots are free.
    """

    def __init__(self, owner: StaticDecoding, bucket: _Bucket, length: int) -> None:
        self.owner, self.bucket = owner, bucket
        self.length = length  # cache slots filled (or being filled by the step in flight)

    @property
    def size(self) -> int:
        return self.bucket.size

    def can_admit(self, prompt_tokens: int, new_tokens: int) -> bool:
        """Whether a prompt joins now: it fits into the slots filled so far, and its new tokens after them."""
        return prompt_tokens <= self.length and self.length + new_tokens <= self.owner.room

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` [size] (one per slot, on the device); the logits [size, V] after them."""
        owner, b = self.owner, self.bucket
        if self.length >= owner.room:
            raise RuntimeError(f"a session fills {owner.room} slots of the static cache; check `fits` first")
        b.ids.copy_(tokens[:, None])
        b.positions.add_(1)
        b.mask[:, 0, 0, self.length] = owner.open
        self.length += 1
        return owner._replay(b)

    @torch.inference_mode()
    def admit(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Prefill ``prompts`` into ``slots`` (free ones; each prompt passed `can_admit`): their logits [n, V].

        Their first new token goes into the next step, at the slot every row writes next.
        """
        if len(prompts) != len(slots) or not all(self.can_admit(len(p), 0) for p in prompts):
            raise ValueError("each joining prompt needs a slot and must fit into the slots filled so far")
        self.owner.batches += 1
        index = copy_to_device(slots, self.owner.device)
        _shut_rows(self.bucket.mask, index, self.owner.shut)
        return self._prefill(prompts, index, torch.arange(len(prompts), device=self.owner.device))

    @torch.inference_mode()
    def grow(self, size: int) -> torch.Tensor:
        """Move into the bucket of ``size`` slots (one of the owner's, larger): slots keep their
        numbers, the new ones copy slot 0 (their outputs are not used until a row joins there).
        Returns the old slot each new slot copies (to carry per-slot tensors over likewise).
        """
        owner, old = self.owner, self.bucket
        new = owner._bucket(size)
        rows = padded_rows(old.size, size, owner.device)
        for source, target in zip(old.cache.layers, new.cache.layers, strict=True):
            _initialize(target, source.keys, source.values, size)
            target.keys.copy_(source.keys[rows])
            target.values.copy_(source.values[rows])
            target.cumulative_length.copy_(source.cumulative_length)
        new.mask.copy_(old.mask[rows])
        new.positions.copy_(old.positions[rows])
        self.bucket = new
        return rows

    def can_overlap(self, prompt_tokens: int, new_tokens: int) -> bool:
        """Whether a prompt can join through :meth:`begin_admit`: a single prompt whose prefill graph
        is ready (or, without CUDA, the same padded forward), with room for its new tokens after
        the steps its prefill may take."""
        owner = self.owner
        length = next((n for n in owner.prefill_lengths if n >= prompt_tokens), None)
        ready = owner.device.type != "cuda" or (length, owner._state) in owner._prefill_graphs
        return (
            owner.prefill_graphs_on
            and length is not None
            and ready
            and self.can_admit(prompt_tokens, new_tokens + OVERLAP_MAX_STEPS)
        )

    @torch.inference_mode()
    def begin_admit(self, prompt: list[int], slot: int) -> Admission:
        """Start prefilling ``prompt`` (it passed :meth:`can_overlap`) for free ``slot`` on a stream of
        its own, so that it runs beside the next decoding steps; :meth:`finish_admit` puts it in.
        Until then the slot decodes along unused, its cache row and mask as they were."""
        owner = self.owner
        owner.batches += 1
        if owner.device.type != "cuda":
            logits, states, positions, _ = owner.run_prefill([prompt])
            return Admission(slot, logits, states, positions)
        if owner._side is None:
            owner._side = torch.cuda.Stream(owner.device)
        owner._side.wait_stream(torch.cuda.current_stream(owner.device))  # the shared buffers' last readers
        with torch.cuda.stream(owner._side):
            logits, states, positions, _ = owner.run_prefill([prompt])
            done = torch.cuda.Event()
            done.record(owner._side)
        return Admission(slot, logits, states, positions, done)

    @torch.inference_mode()
    def finish_admit(self, admission: Admission) -> torch.Tensor:
        """Put a prefill of :meth:`begin_admit` into its slot (the decoding stream waits for it, if it
        has not ended): the slot's keys, values, mask and position; the logits [1, V] of its first pick."""
        if admission.done is not None:
            torch.cuda.current_stream(self.owner.device).wait_event(admission.done)
        slots = copy_to_device([admission.slot], self.owner.device)
        _shut_rows(self.bucket.mask, slots, self.owner.shut)
        rows = torch.arange(1, device=self.owner.device)
        return self._place(slots, rows, admission.logits, admission.states, admission.positions, None)

    def _prefill(self, prompts: list[list[int]], slots: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Prefill ``prompts`` (left-padded to one width w); write prompt ``rows[i]``'s keys, values,
        mask and last position into slot ``slots[i]`` (cache slots 0..w-1); its logits [len(rows), V].
        """
        logits, states, positions, mask = self.owner.run_prefill(prompts)
        return self._place(slots, rows, logits, states, positions, mask)

    def _place(
        self,
        slots: torch.Tensor,
        rows: torch.Tensor,
        logits: torch.Tensor,
        states: list[tuple[torch.Tensor, torch.Tensor]],
        positions: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Write prefilled prompt ``rows[i]`` into slot ``slots[i]`` (see :meth:`_prefill`)."""
        owner, b = self.owner, self.bucket
        width = positions.shape[1]
        for layer, (keys, values) in zip(b.cache.layers, states, strict=True):
            if _initialize(layer, keys, values, b.size):  # the bucket's first batch
                layer.cumulative_length.fill_(self.length)
            layer.keys[slots, :, :width] = keys[rows, :, :width]
            layer.values[slots, :, :width] = values[rows, :, :width]
        real = positions.new_ones((len(rows), width), dtype=torch.bool) if mask is None else mask[rows].bool()
        b.mask[slots, 0, 0, :width] = torch.where(real, owner.open, owner.shut).to(owner.mask_dtype)
        b.positions[slots] = positions[rows, -1:]  # each step adds 1 first
        return logits[rows]


def _shut_rows(mask: torch.Tensor, rows: torch.Tensor, shut: Any) -> None:
    """Shut every position of ``mask``'s ``rows`` (indices on its device), queued without a wait.

    Not ``mask[rows] = shut``: for a CUDA tensor PyTorch makes the number a host tensor, and
    ``index_put_`` copies it from pageable memory, waiting for the stream (the step queued ahead).
    """
    mask.index_fill_(0, rows, shut)


def padded_rows(n: int, size: int, device: torch.device) -> torch.Tensor:
    """Row indices 0..n-1, then 0 up to ``size``: a batch padded to its bucket with copies of row 0."""
    return copy_to_device([*range(n), *[0] * (size - n)], device)


def prefill_inputs(
    prompts: list[list[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Prompts left-padded to one width: (ids [n, w], positions [n, w], mask [n, w]: 1 on real
    tokens, or None when no prompt is padded: the plain causal mask)."""
    width = max(len(p) for p in prompts)
    ids = copy_to_device([[0] * (width - len(p)) + p for p in prompts], device)
    real = copy_to_device([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device)
    positions = (real.cumsum(-1) - 1).clamp(min=0)
    return ids, positions, (real if any(len(p) < width for p in prompts) else None)


def padded_causal_mask(real: torch.Tensor, open_: Any, shut: Any, dtype: torch.dtype) -> torch.Tensor:
    """The 4D mask [n, 1, w, w] of left-padded prompts (``real`` [n, w]: 1 on real tokens), in an
    attention's format (``open_``/``shut`` values of ``dtype``, as :func:`_mask_values` gives them):
    each token sees the real tokens up to itself, a padding token itself only (a row that sees
    nothing would make NaN). transformers hands a 4D mask to attention as it is; given the 2D one, it
    reads from the device whether any token is padding (the host waits for the queued steps)."""
    width = real.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=real.device).tril()
    seen = (causal & real.bool()[:, None, :]) | torch.eye(width, dtype=torch.bool, device=real.device)
    return torch.where(seen, open_, shut).to(dtype)[:, None]


def _initialize(layer: Any, keys: torch.Tensor, values: torch.Tensor, batch: int) -> bool:
    """Allocate a StaticCache layer's tensors for ``batch`` rows, shaped as ``keys``, ``values`` (False: it had them)."""
    if layer.is_initialized:
        return False
    layer.lazy_initialization(
        keys.new_empty((batch, keys.shape[1], 1, keys.shape[-1])),
        values.new_empty((batch, values.shape[1], 1, values.shape[-1])),
    )
    return True


def _adapter_state(model: torch.nn.Module) -> int:
    """A fingerprint of the LoRA layers' state (merged adapters, disabled, active): a captured graph
    replays the computation of the state it was captured in."""
    state = [
        (tuple(m.merged_adapters), bool(m.disable_adapters), tuple(m.active_adapters))
        for m in model.modules()
        if hasattr(m, "merged_adapters") and hasattr(m, "disable_adapters")
    ]
    return hash(tuple(state))


def _mask_values(attn: str | None, dtype: torch.dtype) -> tuple[Any, Any, torch.dtype]:
    """(open, shut, mask dtype) in the 4D mask format of attention ``attn``.

    SDPA takes biases (0, -inf) in the model's dtype: given booleans, it turns them into those
    biases itself, which the compiled step then does once per layer, a kernel each time.
    FlexAttention takes booleans (its score modification reads them); eager attention biases.
    """
    if attn == FLEX:
        return True, False, torch.bool
    if attn in ("sdpa", GROUPED, MATMUL) or (attn or "").startswith(CHOSEN):
        return 0.0, -float("inf"), dtype
    if attn == "eager":
        return 0.0, torch.finfo(dtype).min, dtype
    raise ValueError(f"no static decoding for attention {attn!r} (only {', '.join(MASK_KINDS)})")


def _compiled(
    fn: Callable[..., torch.Tensor], backend: str | None, mode: str | None, gemv_device: str | None = None
) -> Callable[..., torch.Tensor]:
    """``fn`` compiled with ``backend`` (and inductor's ``mode``); ``gemv_device``: through
    :func:`gemv_backend`, its one-row products on that device type as reductions."""
    if backend is None:
        return fn
    raise_recompile_limit()  # graphs of one step function: a bucket x an adapter state (merged, disabled, ...)
    options: dict[str, Any] = {"backend": backend, "dynamic": False}  # one graph per bucket shape
    if backend == "inductor" and gemv_device is not None:
        options["backend"] = gemv_backend(mode, (gemv_device,))
    elif backend == "inductor" and mode:
        options["mode"] = mode
    return torch.compile(fn, **options)


def gemv_backend(mode: str | None, devices: tuple[str, ...] = ("cuda",)) -> Callable[..., Any]:
    """A torch.compile backend: inductor with ``mode``'s settings and one-row products on
    ``devices`` as reductions (:func:`fimtune.fast.product_decompositions`); the graphs that have
    such products (a batch of one's step) are compiled with coordinate-descent tuning too (its
    matrix-vector kernels reach their bandwidth only with it, per PyTorch's own note), the others
    (larger buckets) without: it only adds to their compile time."""
    return inductor_backend(mode, None, product_decompositions(row_devices=devices), tune_rows=True)


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
