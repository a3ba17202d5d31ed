"""Base and tuned from one model, and batched generation for the evaluation tasks.

A run loads as a ``peft.PeftModel``: *tuned* is the model as loaded (adapter merged for
speed), *base* is the same model inside ``disable_adapter()`` (LoRA off, added token rows at
their base values, biases an adapter trained at the base's). Both see exactly the same prompts.

Generation goes through :func:`fimtune.generate.complete_batch` (which ends each row at its
stop strings); here prompts are sorted by length before batching (less left padding).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from fimtune.generate import Completion, FimPrompter, GenerationParams, complete_batch, mergeable
from fimtune.model import as_base

VARIANTS = ("base", "tuned")
CONTEXT_ATTRS = ("max_position_embeddings", "n_positions")  # where configs keep their context length
MIN_INPUT_TOKENS = 8  # FimPrompter needs room for its 3 FIM tokens and some context


@contextlib.contextmanager
def variant(model: Any, name: str) -> Iterator[Any]:
    """``model`` as ``name``: "tuned" (adapters on) or "base" (adapters disabled).

    Tuned runs with the adapter merged into the weights where unmerging gives the base back
    (fp32 weights, not quantized: :func:`fimtune.generate.mergeable`): an unmerged LoRA (and a
    trainable-token layer over a tied 49k-row head) costs a multiple of the model's own time per
    generated token on a CPU. Base unmerges first (weights back to W, up to fp32 rounding) and
    disables the adapters. bf16 weights (a GPU's) stay unmerged: base is then exactly the base.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r} (variants: {', '.join(VARIANTS)})")
    merge = mergeable(model, exactly=True)
    if name == "tuned":
        if merge and not _merged(model):
            model.merge_adapter()
        yield model
        return
    if _merged(model):
        model.unmerge_adapter()
    with as_base(model):
        yield model


def _merged(model: Any) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) and m.merged for m in model.modules())


def context_length(model: Any) -> int | None:
    """The model's position limit, when its config states one."""
    config = getattr(model, "config", None)
    for attr in CONTEXT_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fit_params(model: Any, params: GenerationParams) -> GenerationParams:
    """``params`` fitted to the model's context: the prompt budget shrinks first, then the new tokens.

    New tokens keep at most half of a context too short for both.
    """
    limit = context_length(model)
    if limit is None or params.max_input_tokens + params.max_new_tokens <= limit:
        return params
    new = min(params.max_new_tokens, limit // 2)
    return replace(params, max_new_tokens=new, max_input_tokens=max(MIN_INPUT_TOKENS, limit - new))


def generate(
    model: Any,
    prompter: FimPrompter,
    holes: list[tuple[str, str]],
    params: GenerationParams,
    batch_size: int,
    progress: Callable[[int], Any] | None = None,
    done: Callable[[str], bool] | None = None,
) -> list[Completion]:
    """Complete every (prefix, suffix) in batches of ``batch_size``; results in the input order.

    ``progress``, when given, is called with the number of holes done after each batch;
    ``done(new_text)`` may end a row early (the caller post-processes the text anyway).
    """
    params = fit_params(model, params)
    order = sorted(range(len(holes)), key=lambda i: len(holes[i][0]) + len(holes[i][1]))
    out: list[Completion | None] = [None] * len(holes)
    for lo in range(0, len(order), batch_size):
        chunk = order[lo : lo + batch_size]
        for i, c in zip(chunk, complete_batch(model, prompter, [holes[i] for i in chunk], params, done), strict=True):
            out[i] = c
        if progress is not None:
            progress(len(chunk))
    return [c for c in out if c is not None]
