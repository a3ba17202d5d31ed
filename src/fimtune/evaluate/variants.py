"""Base and tuned from one model, and batched generation for the evaluation tasks.

A run loads as a ``peft.PeftModel``: *tuned* is the model as loaded (adapter merged for
speed), *base* is the same model inside ``disable_adapter()`` (LoRA off, added token rows at
their base values). Both see exactly the same prompts.

Generation goes through :func:`fimtune.generate.complete_batch`; here prompts are sorted
by length before batching (less left padding), and a stopping criterion ends each row as
soon as its new text holds a stop string (or a newline, for single-line completions), so
a batch ends when its last row does rather than at ``max_new_tokens``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch

from fimtune.generate import Completion, FimPrompter, GenerationParams, complete_batch

VARIANTS = ("base", "tuned")
CONTEXT_ATTRS = ("max_position_embeddings", "n_positions")  # where configs keep their context length
MIN_INPUT_TOKENS = 8  # FimPrompter needs room for its 3 FIM tokens and some context


@contextlib.contextmanager
def variant(model: Any, name: str) -> Iterator[Any]:
    """``model`` as ``name``: "tuned" (adapters on) or "base" (adapters disabled).

    Tuned runs with the adapter merged into the weights where that is exact enough (not on
    quantized weights): an unmerged LoRA (and a trainable-token layer over a tied 49k-row
    head) costs a multiple of the model's own time per generated token on a CPU. Base
    unmerges first (weights back to W, up to float rounding) and disables the adapters.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r} (variants: {', '.join(VARIANTS)})")
    mergeable = hasattr(model, "merge_adapter") and getattr(model.config, "quantization_config", None) is None
    if name == "tuned":
        if mergeable and not _merged(model):
            model.merge_adapter()
        yield model
        return
    if mergeable and _merged(model):
        model.unmerge_adapter()
    with model.disable_adapter():
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


class _TextStop:
    """A ``StoppingCriteria``: row r is done once its new text holds a stop string or ``done(text)`` holds."""

    def __init__(self, tokenizer: Any, width: int, stops: list[str], done: Callable[[str], bool] | None) -> None:
        self.tokenizer, self.width, self.stops, self.done = tokenizer, width, stops, done

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.width :], skip_special_tokens=False)
        flags = [any(s in t for s in self.stops) or (self.done is not None and self.done(t)) for t in texts]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


class StopOnText:
    """``model`` for :func:`complete_batch`, with generation ending per row at stop strings.

    ``complete_batch`` cuts its text at stop strings afterwards; this only saves the tokens
    a row would generate past them (and past the point where ``done(new_text)`` holds).
    """

    def __init__(self, model: Any, tokenizer: Any, stops: list[str], done: Callable[[str], bool] | None = None) -> None:
        self.model, self.tokenizer, self.stops, self.done = model, tokenizer, stops, done

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.model.parameters()

    def generate(self, **kwargs: Any) -> torch.Tensor:
        from transformers import StoppingCriteriaList

        if not self.stops and self.done is None:
            return self.model.generate(**kwargs)
        stop = _TextStop(self.tokenizer, kwargs["input_ids"].shape[1], self.stops, self.done)
        return self.model.generate(**kwargs, stopping_criteria=StoppingCriteriaList([stop]))


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
    stops = [*params.stop, *(["\n"] if params.single_line else [])]
    runner = StopOnText(model, prompter.tokenizer, stops, done)
    order = sorted(range(len(holes)), key=lambda i: len(holes[i][0]) + len(holes[i][1]))
    out: list[Completion | None] = [None] * len(holes)
    for lo in range(0, len(order), batch_size):
        chunk = order[lo : lo + batch_size]
        for i, c in zip(chunk, complete_batch(runner, prompter, [holes[i] for i in chunk], params), strict=True):
            out[i] = c
        if progress is not None:
            progress(len(chunk))
    return [c for c in out if c is not None]
