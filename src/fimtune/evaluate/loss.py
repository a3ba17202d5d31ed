"""The loss task: held-out loss per token, base vs tuned, for each FIM format.

The validation split of the run's data config is tokenized and packed as training packs it
(same seed, sequence length and packing mode), three times:

    left_to_right   fim_rate 0                 plain documents
    psm             fim_rate 1, spm_rate 0      every document <fim_prefix> p <fim_suffix> s <fim_middle> m
    spm             fim_rate 1, spm_rate 1      every document <fim_prefix> <fim_suffix> s <fim_middle> p m

Base and tuned read the very same rows. The loss is the mean next-token cross-entropy over
all label tokens, computed as training's ``val_loss`` is (under the run's mixed precision:
bf16 autocast when it trained in bf16, which also halves the time on CPUs with bf16
units), with perplexity ``exp(loss)``; the interval
comes from the rows (:func:`~fimtune.evaluate.stats.ratio_estimate`), and the paired
difference tuned - base is estimated row by row. ``limit`` bounds the rows per format (rows
of ``seq_length`` tokens: on a CPU they are the task's cost, about a second per 512-token row
and variant for SmolLM2-135M).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from fimtune.config import RunConfig
from fimtune.errors import FimtuneError
from fimtune.evaluate.stats import ratio_estimate
from fimtune.evaluate.variants import VARIANTS, variant

FORMATS: dict[str, tuple[float, float]] = {  # name -> (fim_rate, spm_rate)
    "left_to_right": (0.0, 0.0),
    "psm": (1.0, 0.0),
    "spm": (1.0, 1.0),
}
IGNORE_INDEX = -100


@torch.no_grad()
def row_losses(model: Any, batch: dict[str, Any]) -> tuple[list[float], list[int]]:
    """Per row of a packed batch: (summed next-token cross-entropy, label tokens)."""
    from fimtune.train import forward_logits

    device = next(model.parameters()).device
    batch = {k: torch.as_tensor(v).to(device) for k, v in batch.items()}
    logits = forward_logits(model, batch)
    labels = batch["labels"][:, 1:]
    # a row at a time: one row's logits in fp32 (2048 x 49k: 0.4 GB) at once, not the batch's
    sums = torch.stack(
        [
            F.cross_entropy(row[:-1].float(), row_labels, ignore_index=IGNORE_INDEX, reduction="sum")
            for row, row_labels in zip(logits, labels, strict=True)
        ]
    )
    return sums.tolist(), (labels != IGNORE_INDEX).sum(1).tolist()


def format_batches(docs: Any, spec: Any, batch_size: int, limit: int | None) -> list[dict[str, Any]]:
    """The first ``limit`` packed validation rows of one format in batches, materialised once for both variants."""
    import itertools

    from fimtune.dataset import eval_batches
    from fimtune.packing import EvalRows

    rows = itertools.islice(iter(EvalRows(docs, spec)), limit)
    return list(eval_batches(rows, batch_size))


def compare(model: Any, batches: list[dict[str, Any]], progress: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Loss and perplexity of base and tuned on ``batches``, and the paired difference."""
    sums: dict[str, list[float]] = {}
    counts: list[int] = []
    for name in VARIANTS:
        sums[name], counts = [], []
        with variant(model, name):
            for batch in batches:
                s, c = row_losses(model, batch)
                sums[name] += s
                counts += c
                if progress is not None:
                    progress()
    out: dict[str, Any] = {"rows": len(counts), "tokens": int(sum(counts))}
    for name in VARIANTS:
        est = ratio_estimate(sums[name], counts)
        out[name] = {"loss": est.as_dict(), "perplexity": est.exp().as_dict()}
    diffs = [t - b for b, t in zip(sums["base"], sums["tuned"], strict=True)]
    out["delta"] = {"loss": ratio_estimate(diffs, counts).as_dict()}
    return out


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype training used for ``train.mixed_precision`` on ``device`` (None: full precision).

    >>> autocast_dtype("bf16", torch.device("cpu")), autocast_dtype("auto", torch.device("cpu"))
    (torch.bfloat16, None)
    """
    if mixed_precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        mixed_precision = "bf16" if cuda_bf16 else "no"
    if mixed_precision == "fp16" and device.type != "cuda":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)


def evaluate(
    model: Any, tokenizer: Any, cfg: RunConfig, limit: int | None = None, progress: Callable[[], Any] | None = None
) -> dict[str, Any]:
    """Base vs tuned held-out loss for each of :data:`FORMATS` on the first ``limit`` rows, in batches of
    ``cfg.train.batch_size`` rows (training's validation batches)."""
    from fimtune.dataset import load_splits
    from fimtune.packing import documents, pack_spec
    from fimtune.tokens import document_separator_id, ensure_fim_tokens

    split = load_splits(cfg.data, cfg.seed)["validation"]
    if len(split) == 0:
        raise FimtuneError(f"the validation split of '{cfg.data.path or cfg.data.hf}' is empty: rebuild the data with "
                           "a validation share (`fimtune data build --validation-fraction 0.1`)")  # fmt: skip
    fim_tokens, _ = ensure_fim_tokens(tokenizer)
    docs = documents(split, tokenizer, cfg, cfg.data.text_column, progress=False)
    spec = pack_spec(cfg, fim_tokens, document_separator_id(tokenizer), shuffle=False)
    device = next(model.parameters()).device
    dtype = autocast_dtype(cfg.train.mixed_precision, device)
    formats = {}
    for name, (fim_rate, spm_rate) in FORMATS.items():
        fmt_spec = dataclasses.replace(spec, fim_rate=fim_rate, spm_rate=spm_rate)
        batches = format_batches(docs, fmt_spec, cfg.train.batch_size, limit)
        if not batches:
            raise FimtuneError(
                f"the validation split packs into no row of {spec.seq_length} tokens: add validation files "
                f"or train with a smaller packing.seq_length"
            )
        with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            formats[name] = compare(model, batches, progress)
    precision = f"{str(dtype).removeprefix('torch.')} autocast" if dtype else "full"
    return {"seq_length": spec.seq_length, "batch_size": cfg.train.batch_size, "limit": limit,
            "precision": precision, "formats": formats}  # fmt: skip
