"""Completions: FIM prompts, context fitting, sampling, stopping and post-processing.

Prompt layouts (the training layouts, cut at the cursor; the model writes the middle)::

    PSM   <fim_prefix> prefix <fim_suffix> suffix <fim_middle>   -> middle
    SPM   <fim_prefix> <fim_suffix> suffix <fim_middle> prefix   -> middle

Long contexts are fitted to ``max_input_tokens`` by dropping the far ends: the start of
the prefix and the end of the suffix; the text nearest the cursor is kept. Other files
given as context go before the prefix and are trimmed first. With ``trim_step`` > 1 the
cuts move in whole steps, so that the prompt's start stays put while a person types
(what lets the server reuse its KV cache; see :mod:`fimtune.serve.decoding`).

Generation stops at the end-of-text token, at any FIM token, at a user stop string, or
(single-line mode) at the first newline.

At a cursor after a line's indentation (the line holds only spaces and tabs so far, where an
editor puts it after Enter), an answer that starts with one space before its code loses that
space (:func:`after_indent`, :func:`indent_cut`). A byte-level BPE model reads the typed spaces
as one token, newline and indentation; in the code it learned from, the last space of an
indentation went with the first word (" return"), so it wrote " return x", one space too many::

    prefix "def f(x):\\n    "   model " return x"   answer "return x"

More whitespace than one space is the model's own indentation, deeper than the typed one, and
stays (" " * 3 + " y": 4 more spaces, written as a whitespace token and " y").

(Prompting at the line's start instead, where fimtune's training cuts its holes, measured
worse on the demo run: most answers came back empty. `benchmarks/cursor_indent.py`.)

``fimtune complete RUN --prefix TEXT`` prints one completion (:func:`main`).
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from fimtune.errors import FimtuneError
from fimtune.fim import FimTokens

SUFFIX_SHARE = 4  # when both sides are too long, the suffix keeps at least 1/4 of the budget
FIM_OVERHEAD = 3  # the three FIM tokens of a prompt
DEFAULT_MAX_INPUT_TOKENS = 2048
REPLACEMENT_CHAR = "\ufffd"  # what a decoder shows for an incomplete UTF-8 sequence
INDENT_CHARS = " \t"  # what a line's indentation is made of
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MERGED_INFO = "fimtune.json"  # what `fimtune merge` keeps of the run: the prompt layout `auto` picks


@dataclass
class GenerationParams:
    """How to complete: length, sampling and stopping."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    single_line: bool = False
    mode: Literal["psm", "spm"] = "psm"
    max_input_tokens: int = DEFAULT_MAX_INPUT_TOKENS
    trim_step: int = 1  # long contexts are cut in multiples of this many tokens
    seed: int | None = None  # sampling seed (None: random)
    # the cursor follows only indentation on its line (:func:`after_indent`): one space before
    # the answer's code goes (:func:`indent_cut`); set per prompt
    after_indent: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class Completion:
    """One completion: the text for the hole, token counts and why it ended."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]
    cached_tokens: int = 0  # prompt tokens whose KV cache came from an earlier request
    stop_string: str = ""  # the stop string (or single-line's line end) it stopped at; "": an end token or the limit
    first_token_at: float | None = None  # time.monotonic() when the server's decoder took its first token


class FimPrompter:
    """Builds FIM prompts from text and knows which token ids end a completion.

    Safe to use from several threads at once (the server tokenizes requests in a thread pool while
    its worker decodes): it never changes a tokenizer's settings, but keeps two `tokenizers` backends
    of its own (copies that never pad or truncate), one that reads special-token strings as text
    (code, as training saw it) and one that reads them as the tokens (prompts a client formatted)."""

    def __init__(self, tokenizer: Any) -> None:
        from fimtune.tokenization import backend_copy, continuation
        from fimtune.tokens import document_separator_id, find_fim_tokens

        names = find_fim_tokens(tokenizer)
        if names is None:
            raise FimtuneError("this tokenizer has no FIM tokens: serve a run folder, or a model trained with FIM")
        vocab = tokenizer.get_vocab()
        pad = vocab.get(names.pad, document_separator_id(tokenizer)) if names.pad else document_separator_id(tokenizer)
        self.tokenizer = tokenizer
        self.names = names
        self._formatted = backend_copy(tokenizer, special_tokens_as_text=False)
        self._plain = backend_copy(tokenizer, special_tokens_as_text=True)
        self._continued = continuation(self._plain)  # a suffix goes on from the code before the hole
        self.fim = FimTokens(
            prefix=vocab[names.prefix], middle=vocab[names.middle], suffix=vocab[names.suffix], pad=pad
        )
        ends = {document_separator_id(tokenizer), self.fim.prefix, self.fim.middle, self.fim.suffix, self.fim.pad}
        if tokenizer.eos_token_id is not None:
            ends.add(int(tokenizer.eos_token_id))
        self.end_ids = sorted(ends)

    def encode(self, text: str) -> list[int]:
        """Code as plain text, as training saw it: a `<fim_prefix>` written in the code is text, not a token."""
        return self.encode_many([text])[0]

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """Each of ``texts`` as :meth:`encode` gives it, in one call."""
        return _released(self._plain, texts)

    def encode_continued(self, text: str) -> list[int]:
        """Code that goes on from code before it (a hole's suffix), as training saw it: for a
        SentencePiece-style tokenizer, without the "▁" it puts before each text it encodes."""
        return _released(self._continued, [text])[0]

    def encode_formatted(self, text: str) -> list[int]:
        """A prompt a client formatted itself: special-token strings in it are the special tokens."""
        return _released(self._formatted, [text])[0]

    def starts_document(self, prompt: list[int]) -> bool:
        """Whether a completion of ``prompt`` starts its document: no prefix and no context, so
        ``<fim_prefix><fim_suffix> suffix <fim_middle>`` (PSM and SPM alike). Training encodes such a
        middle as a document's start: a SentencePiece-style tokenizer's dummy "▁" before it."""
        return len(prompt) >= 2 and prompt[1] == self.fim.suffix and prompt[-1] == self.fim.middle

    def decode(self, ids: list[int], starts: bool = False) -> str:
        """A completion's text: it goes on from the code before the hole, so its leading spaces are
        its own (a SentencePiece-style tokenizer's decoder would drop the first one), unless it
        ``starts`` its document (:meth:`starts_document`): then that first space is the dummy prefix
        training put before it, and is dropped. A character
        still unfinished at the end shows as U+FFFD, and only it: a byte-fallback decoder makes a
        whole run of byte tokens U+FFFD when its last character is unfinished, so the tokens of
        that character (a UTF-8 character's first 3 bytes at most) are decoded apart."""
        text = self._decode(ids, starts)
        if text.endswith(REPLACEMENT_CHAR):
            for k in range(1, min(4, len(ids))):
                head = self._decode(ids[:-k], starts)
                if not head.endswith(REPLACEMENT_CHAR):
                    return head + self._decode(ids[-k:])
        return text

    def _decode(self, ids: list[int], starts: bool = False) -> str:
        if self._continued is not self._plain and not starts:
            return self._continued.decode(ids, skip_special_tokens=False)
        # code keeps its spaces before punctuation: no "clean-up" (a config's `clean_up_tokenization_spaces`,
        # StarCoder's among them, would make `f(a , b)` into `f(a, b)` where transformers applies it)
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def build(
        self,
        prefix: str,
        suffix: str,
        mode: str = "psm",
        max_input_tokens: int = DEFAULT_MAX_INPUT_TOKENS,
        context: str = "",
        trim_step: int = 1,
    ) -> list[int]:
        """Prompt ids for the hole between ``prefix`` and ``suffix``, fitted to ``max_input_tokens``.

        ``context`` (other files) goes before the prefix and gets only the room the hole leaves.
        """
        return self.build_fitted(prefix, suffix, mode, max_input_tokens, context, trim_step)[0]

    def build_fitted(
        self,
        prefix: str,
        suffix: str,
        mode: str = "psm",
        max_input_tokens: int = DEFAULT_MAX_INPUT_TOKENS,
        context: str = "",
        trim_step: int = 1,
    ) -> tuple[list[int], bool]:
        """:meth:`build`'s ids, and whether fitting them cut any of the prefix, suffix or context."""
        budget = max_input_tokens - FIM_OVERHEAD
        # after context the prefix goes on from it (for a SentencePiece-style tokenizer, no "▁" before it)
        whole_p = self.encode_continued(prefix) if context else self.encode(prefix)
        whole_s = self.encode_continued(suffix)
        p, s = fit_context(whole_p, whole_s, budget, trim_step)
        truncated = len(p) + len(s) < len(whole_p) + len(whole_s)
        if context:
            whole_c = self.encode(context)
            c = trim_start(whole_c, budget - len(p) - len(s), trim_step)
            p, truncated = c + p, truncated or len(c) < len(whole_c)
        f = self.fim
        if mode == "spm":
            return [f.prefix, f.suffix, *s, f.middle, *p], truncated
        return [f.prefix, *p, f.suffix, *s, f.middle], truncated

    def split(self, text: str) -> tuple[str, str] | None:
        """(prefix, suffix) of a prompt already in this model's PSM or SPM form, else None.

        With StarCoder names, ``<fim_prefix>a<fim_suffix>b<fim_middle>`` gives ``('a', 'b')``.
        """
        p, s, m = self.names.prefix, self.names.suffix, self.names.middle
        if any(text.count(t) != 1 for t in (p, s, m)) or not text.startswith(p):
            return None
        if text.endswith(m) and text.index(s) < text.index(m):  # PSM
            prefix, suffix = text[len(p) : -len(m)].split(s)
            return prefix, suffix
        if text.startswith(p + s):  # SPM
            suffix, prefix = text[len(p + s) :].split(m)
            return prefix, suffix
        return None

    def template(self) -> dict[str, str]:
        """The prompt layouts, for clients (`/info`)."""
        n = self.names
        return {
            "psm": f"{n.prefix}{{prefix}}{n.suffix}{{suffix}}{n.middle}",
            "spm": f"{n.prefix}{n.suffix}{{suffix}}{n.middle}{{prefix}}",
        }


def _released(backend: Any, texts: list[str]) -> list[list[int]]:
    """``texts``' ids through a `tokenizers` backend's `encode_batch`, which lets the interpreter lock
    go while it runs; its `encode` (the same ids) holds the lock, ~2.5 ms for a 1,024-token prompt's
    8,000 + 3,000 characters on a 2-core EPYC, while the server's other threads (the event loop, the
    engine's worker) wait."""
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def trim_start(ids: list[int], room: int, step: int = 1) -> list[int]:
    """Drop tokens from the start of ``ids`` until it fits ``room``, in whole ``step`` s.

    >>> trim_start([1, 2, 3, 4, 5], 4, step=2)
    [3, 4, 5]
    """
    if len(ids) <= room:
        return ids
    return ids[min(len(ids), _round_up(len(ids) - max(room, 0), step)) :]


def fit_context(prefix: list[int], suffix: list[int], budget: int, step: int = 1) -> tuple[list[int], list[int]]:
    """Keep the end of ``prefix`` and the start of ``suffix`` within ``budget`` tokens.

    Cuts move in whole ``step`` s (the kept suffix length rounds down, the prefix's dropped
    length rounds up), so a prefix that grows by a token rarely moves either cut.

    >>> fit_context([1, 2, 3, 4, 5, 6], [7, 8, 9, 10], 6)
    ([2, 3, 4, 5, 6], [7])
    >>> fit_context([1, 2], [7, 8, 9, 10], 6)
    ([1, 2], [7, 8, 9, 10])
    >>> fit_context(list(range(20)), list(range(20, 30)), 16, step=4)
    ([8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], [20, 21, 22, 23])
    """
    if budget <= 0:
        raise FimtuneError(f"max_input_tokens leaves no room for the prompt (budget {budget})")
    if len(prefix) + len(suffix) <= budget:
        return prefix, suffix
    keep_suffix = min(len(suffix), max(budget - len(prefix), budget // SUFFIX_SHARE))
    if keep_suffix < len(suffix):
        keep_suffix = max(keep_suffix // step * step, min(budget // SUFFIX_SHARE, keep_suffix))
    return trim_start(prefix, budget - keep_suffix, step), suffix[:keep_suffix]


# --------------------------------------------------------------------------------------
# A cursor after indentation
# --------------------------------------------------------------------------------------


def after_indent(prefix: str) -> bool:
    r"""Whether a cursor at the end of ``prefix`` follows only indentation on its line (spaces and
    tabs, at least one).

    >>> after_indent("def f(x):\n    "), after_indent("def f(x):\n    y = "), after_indent("x = 1\n")
    (True, False, False)
    """
    line = prefix[prefix.rfind("\n") + 1 :]
    return bool(line) and not line.strip(INDENT_CHARS)


def indent_cut(text: str) -> int:
    r"""How many leading characters of ``text``, a completion at a cursor after indentation, go:
    the one space before its code, which a word token brought (" return"), 1; none when it starts
    with more whitespace (its own, deeper indentation) or with code. A lone space is cut: an
    answer of one space is empty, and whatever follows keeps the answer already given (what lets
    a stream send it piece by piece).

    >>> [indent_cut(t) for t in (" return x", " ", " \nx", "    x = 1", " \tx", "\tx", "return x", "\n x")]
    [1, 1, 1, 0, 0, 0, 0, 0]
    """
    return 1 if text[:1] == " " and text[1:2] not in (" ", "\t") else 0


# --------------------------------------------------------------------------------------
# Stopping and streaming
# --------------------------------------------------------------------------------------


def postprocess(text: str, params: GenerationParams) -> tuple[str, str]:
    """Cut ``text`` at the first stop string (or line end in single-line mode, CRLF whole):
    (text, the stop string it was cut at, "" when none).

    >>> postprocess("return x\\ny = 1", GenerationParams(single_line=True))
    ('return x', '\\n')
    >>> postprocess("return x\\r\\ny = 1", GenerationParams(single_line=True, stop=["y"]))
    ('return x', '\\r\\n')
    """
    cuts = [(i, s) for i, s in ((text.find(s), s) for s in params.stop if s) if i >= 0]
    if params.single_line and "\n" in text:
        end = text.index("\n")
        cuts.append((end - 1, "\r\n") if text[:end].endswith("\r") else (end, "\n"))
    if not cuts:
        return text, ""
    end, stop = min(cuts, key=lambda cut: cut[0])
    return text[:end], stop


def holdback(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` may still turn into a stop string (or a character).

    >>> holdback("x = 1\\n", ["\\n#", "\\n\\n"])
    1
    """
    # a character still coming shows as U+FFFD: it is held, and whatever may start a stop before it
    whole = text.rstrip(REPLACEMENT_CHAR)
    held = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(whole)), held, -1):
            if whole.endswith(stop[:n]):
                held = n
                break
    return held + len(text) - len(whole)


class TextTracker:
    """Decodes one row's new tokens as they come: the text so far, and whether a stop string ended it.

    Stop strings are found in the model's text; with ``params.after_indent`` its one space before
    code then goes (:func:`indent_cut`)."""

    def __init__(self, prompter: FimPrompter, params: GenerationParams, starts: bool = False) -> None:
        self.prompter = prompter
        self.params = params
        self.starts = starts  # the completion starts its document (FimPrompter.starts_document)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters handed out by `push` and `flush`
        self.stopped = ""  # the stop string it stopped at

    def push(self, token: int) -> str:
        """Add a generated (non-end) token; return the new text that is safe to show."""
        self.ids.append(token)
        text, self.stopped = postprocess(self.prompter.decode(self.ids, self.starts), self.params)
        cut = indent_cut(text) if self.params.after_indent else 0
        self.text = text[cut:]
        # single-line: a trailing CR may be a CRLF line end's start
        stops = [*self.params.stop, *(["\r\n"] if self.params.single_line else [])]
        end = len(self.text) if self.stopped else len(text) - holdback(text, stops) - cut
        piece = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece

    def flush(self) -> str:
        """The text held back so far (at the end of generation)."""
        piece, self.sent = self.text[self.sent :], len(self.text)
        return piece


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------


def pick_tokens(
    logits: torch.Tensor, params: GenerationParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]: argmax, or temperature/top-k/top-p sampling."""
    if params.greedy:
        return logits.argmax(dim=-1)
    # less their largest first (the same soft-max): a tiny temperature would make the largest inf, then NaN
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        probs = ordered.softmax(dim=-1)
        # drop a token when the tokens before it already hold top_p of the mass (the first always stays)
        drop = probs.cumsum(dim=-1) - probs > params.top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    # torch.multinomial's draw of one sample (the arg max of probs / Exp(1) noise: the same tokens for a
    # seed) without its check of the probabilities, a device-side assert on a GPU: a NaN from the model
    # would end the process's use of the GPU for every later request
    return probs.div(torch.empty_like(probs).exponential_(generator=generator)).argmax(dim=-1)


# --------------------------------------------------------------------------------------
# Batched completion with `generate` (evaluation, `fimtune complete`)
# --------------------------------------------------------------------------------------


class TextStop:
    """A transformers ``StoppingCriteria``: row r is done once its new text (after the first
    ``width`` tokens) holds one of ``stops`` or ``done(text)`` holds."""

    def __init__(self, tokenizer: Any, width: int, stops: list[str], done: Callable[[str], bool] | None) -> None:
        self.tokenizer, self.width, self.stops, self.done = tokenizer, width, stops, done

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.width :], skip_special_tokens=False)
        flags = [any(s in t for s in self.stops) or (self.done is not None and self.done(t)) for t in texts]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def complete_batch(
    model: Any,
    prompter: FimPrompter,
    holes: list[tuple[str, str]],
    params: GenerationParams,
    done: Callable[[str], bool] | None = None,
) -> list[Completion]:
    """Complete each (prefix, suffix) hole; the batch is left-padded and generated at once.

    A row stops generating once its new text holds a stop string (a newline, single-line) or
    ``done(new_text)`` holds, so a batch ends with its last row rather than at ``max_new_tokens``;
    the text is cut at the stop afterwards. Greedy batches shrink as their rows finish (:func:`_greedy_rows`).
    At a cursor after indentation, one space before the answer's code goes (:func:`indent_cut`).
    """
    prompts = [prompter.build(p, s, params.mode, params.max_input_tokens, trim_step=params.trim_step) for p, s in holes]
    return complete_prompts(model, prompter, prompts, params, done, [after_indent(p) for p, _ in holes])


@torch.no_grad()
def complete_prompts(
    model: Any,
    prompter: FimPrompter,
    prompts: list[list[int]],
    params: GenerationParams,
    done: Callable[[str], bool] | None = None,
    after_indents: list[bool] | None = None,
) -> list[Completion]:
    """:func:`complete_batch` on prompt ids; ``after_indents[i]``: prompt i's cursor follows only
    indentation on its line (``params.after_indent`` for each, by default)."""
    from transformers import StoppingCriteriaList

    from fimtune.fast import without_cudnn_attention

    after_indents = after_indents if after_indents is not None else [params.after_indent] * len(prompts)
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    pad = prompter.fim.pad
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    sample = params.temperature > 0
    stops = [*(stop for stop in params.stop if stop), *(["\n"] if params.single_line else [])]  # "" stops nothing
    criteria = [TextStop(prompter.tokenizer, width, stops, done)] if stops or done is not None else []
    options = dict(
        max_new_tokens=params.max_new_tokens,
        do_sample=sample,
        temperature=params.temperature if sample else None,
        top_p=params.top_p if sample else None,
        top_k=params.top_k if sample else None,
        eos_token_id=prompter.end_ids,
        pad_token_id=pad,
    )
    # each batch's width, and each step's keys, a new shape
    with without_cudnn_attention(), transformers_defaults(model):
        if sample:  # one call: the rows draw from one random stream, which a smaller batch would shift
            stopping = StoppingCriteriaList(criteria)
            with seeded(params.seed, device):
                out = model.generate(input_ids=ids, attention_mask=mask, stopping_criteria=stopping, **options)
            news = [row[width:].tolist() for row in out]
        else:
            news = _greedy_rows(model, ids, mask, criteria, prompter.end_ids, options)
    return [
        _completion(prompter, new, len(p), replace(params, after_indent=indent), prompter.starts_document(p))
        for new, p, indent in zip(news, prompts, after_indents, strict=True)
    ]


@contextlib.contextmanager
def transformers_defaults(model: Any) -> Iterator[None]:
    """``generate`` with transformers' defaults for what it is not told: it fills those from the model's
    `generation_config` (a base's repetition penalty, no-repeat n-gram size, minimum length, suppressed
    tokens), which the server's decoder applies none of, so `complete` and `eval` answered otherwise
    than the server on such a base."""
    from transformers import GenerationConfig

    from fimtune.model import base_model

    inner = base_model(model)  # a PEFT model generates through the transformers model's `generate`
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """``generate``'s draws from ``seed`` (None: from torch's random stream as it is); the stream is
    left as it was, so a seeded call changes no later draw."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


class RowsDone:
    """A ``StoppingCriteria`` that keeps which rows are done (an end token, or one of ``criteria``)
    in ``done``, and ends the whole call once at least ``share`` of the rows are."""

    def __init__(self, criteria: list[Any], end_ids: list[int], rows: int, share: float = 0.5) -> None:
        self.criteria, self.end_ids, self.share = criteria, torch.tensor(end_ids), share
        self.done = torch.zeros(rows, dtype=torch.bool)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        ended = torch.isin(input_ids[:, -1].cpu(), self.end_ids)
        for criterion in self.criteria:
            ended |= criterion(input_ids, scores, **kwargs).cpu()
        self.done |= ended
        if self.done.sum() >= self.share * len(self.done):
            return torch.ones_like(ended, device=input_ids.device)
        return self.done.to(input_ids.device)


def _greedy_rows(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, criteria: list[Any], end_ids: list[int], options: dict
) -> list[list[int]]:
    """Greedy new tokens of each row of ``ids``; each time half the rows are done, ``generate`` goes on
    with the others only (and their KV cache), so that a row that runs to ``max_new_tokens`` does not
    keep the finished rows computing. The same tokens as one call: greedy rows do not depend on each other."""
    from transformers import DynamicCache, StoppingCriteriaList

    from fimtune.model import forward_keywords

    width, rows, prompt_mask = ids.shape[1], list(range(len(ids))), mask
    news: list[list[int]] = [[] for _ in rows]
    kv, keyword = DynamicCache(), forward_keywords(model)[0]  # `cache` from transformers 5.24, `past_key_values` before
    while rows:
        left = options["max_new_tokens"] - (ids.shape[1] - width)
        stop = RowsDone(criteria, end_ids, len(rows))
        call = {**options, "max_new_tokens": left, keyword: kv}
        ids = model.generate(input_ids=ids, attention_mask=mask, stopping_criteria=StoppingCriteriaList([stop]), **call)
        for r, row in zip(rows, ids, strict=True):
            news[r] = row[width:].tolist()
        if ids.shape[1] - width >= options["max_new_tokens"]:
            break
        keep = (~stop.done).nonzero().flatten().to(ids.device)
        rows = [rows[i] for i in keep.tolist()]
        kv.batch_select_indices(keep)
        ids = ids[keep]
        # the prompts' left padding, then every new token
        mask = torch.cat([prompt_mask[rows], prompt_mask.new_ones(len(rows), ids.shape[1] - width)], dim=1)
    return news


def _completion(
    prompter: FimPrompter, new: list[int], n_prompt: int, params: GenerationParams, starts: bool = False
) -> Completion:
    ends = set(prompter.end_ids)
    end = next((i for i, t in enumerate(new) if t in ends), None)
    body = new if end is None else new[:end]
    text, stopped = postprocess(prompter.decode(body, starts), params)
    text = text[indent_cut(text) :] if params.after_indent else text
    reason = "stop" if end is not None or stopped else "length"
    return Completion(text, n_prompt, len(body) + (end is not None), reason, stop_string=stopped)


# --------------------------------------------------------------------------------------
# Loading for completion (safetensors only) and `fimtune complete`
# --------------------------------------------------------------------------------------


def require_safetensors(folder: Path, what: str) -> None:
    """Refuse a weights folder that holds pickled weights (.bin, .pt) but no safetensors.

    Pickle files can run code when loaded; fimtune loads safetensors only.
    """
    if not folder.is_dir() or any(folder.glob("*.safetensors")) or any(folder.glob("*.gguf")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise FimtuneError(
            f"{what} '{folder}' holds only pickled weights ({', '.join(pickled)}); fimtune loads safetensors only: "
            "convert them (e.g. load and `save_pretrained(DIR, safe_serialization=True)` where you trust them)"
        )


def check_weights(target: str | Path) -> None:
    """Check that ``target`` (a run folder or a base model) and its base load from safetensors."""
    from fimtune.hub import EMBEDDED, local_snapshot
    from fimtune.model import is_run_dir

    base = str(target)
    if is_run_dir(target):
        from fimtune.config import load_run_config

        adapter = Path(target) / "adapter"
        require_safetensors(adapter, "adapter folder")
        if not (adapter / "adapter_model.safetensors").is_file():
            raise FimtuneError(f"adapter folder '{adapter}' has no adapter_model.safetensors")
        base = load_run_config(Path(target) / "config.yaml").model.name_or_path
    if base == EMBEDDED or base.endswith(".gguf"):
        return
    path = Path(base).expanduser()
    if path.is_dir():
        require_safetensors(path, "model folder")
    elif base.count("/") == 1 and (snap := local_snapshot(base)) is not None:
        require_safetensors(snap, f"cached Hub model {base}")


def mergeable(model: Any, exactly: bool = False) -> bool:
    """Whether LoRA may be folded into ``model``'s weights: never into quantized ones (PEFT
    dequantizes, adds and quantizes again, and 4-bit steps are larger than most of a LoRA's
    change, which is then lost; unmerging does not give the weights back). ``exactly``: fp32
    weights only, where unmerging gives the base back up to fp32 rounding (500 switches between two
    tiny runs moved no weight by more than ~10 fp32 steps, 4.5e-7, and no greedy token; in bf16,
    W + dW - dW moves some ~8% of the elements of W by a bf16 step each time). Nor into tied embeddings (a run trained before fimtune refused
    LoRA on them): folded into the one shared matrix, the change would reach both embeddings."""
    from fimtune.model import lora_on_tied_embeddings

    if not hasattr(model, "merge_adapter") or getattr(model.config, "quantization_config", None) is not None:
        return False
    if lora_on_tied_embeddings(model):
        return False
    return not exactly or all(p.dtype == torch.float32 for p in model.parameters() if p.is_floating_point())


def merge_adapter(model: Any, name: str | None = None) -> None:
    """Fold the LoRA weights of adapter ``name`` (default: the active one) into the base weights,
    where :func:`mergeable`; a quantized model keeps them apart.

    A merged model runs at the base model's speed (unmerged LoRA layers cost ~2x on a CPU).
    """
    if mergeable(model):
        model.merge_adapter(adapter_names=[name] if name else None)


def _read_text(text: str | None, path: str | None, flag: str) -> str:
    """``text``, or the file at ``path`` as the corpus reads code (UTF-8, a BOM dropped, line ends kept)."""
    from fimtune.corpus.filters import decode

    if path is None:
        return text or ""
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()  # `-`: the standard input
    except OSError as e:
        raise FimtuneError(f"{flag} {path}: cannot read it ({e.strerror or type(e).__name__})") from None
    read, why = decode(data)
    if read is None:
        raise FimtuneError(f"{flag} {path}: cannot read it as UTF-8 text ({why})")
    return read


def split_at(text: str, line: int, column: int | None = None) -> tuple[str, str]:
    r"""``text`` cut at a cursor: (before, after). ``line`` and ``column`` count from 1 (an editor's
    status bar); without ``column``, the cursor is at the start of ``line``. Lines end at ``\n``
    (a CRLF line's ``\r`` is not a column). Raises ValueError naming what is out of range.

    >>> split_at("a = 1\nb = 2\n", 2)
    ('a = 1\n', 'b = 2\n')
    >>> split_at("a = 1\r\nb = 2", 1, 6)
    ('a = 1', '\r\nb = 2')
    """
    starts = [0, *(i + 1 for i, ch in enumerate(text) if ch == "\n")]
    if not 1 <= line <= len(starts):
        raise ValueError(f"line {line} is not in it (lines 1 to {len(starts)})")
    start = starts[line - 1]
    end = starts[line] - 1 if line < len(starts) else len(text)  # before the line's "\n"
    if end > start and text[end - 1] == "\r" and end < len(text):
        end -= 1
    if column is None:
        column = 1
    if not 1 <= column <= end - start + 1:
        raise ValueError(f"line {line} has no column {column} (columns 1 to {end - start + 1})")
    return text[: start + column - 1], text[start + column - 1 :]


def _read_at(at: str) -> tuple[str, str]:
    """`--at FILE:LINE[:COL]` -> (prefix, suffix)."""
    found = re.fullmatch(r"(.+?):(\d+)(?::(\d+))?", at)
    if found is None:
        raise FimtuneError(f"--at {at}: give FILE:LINE or FILE:LINE:COL (LINE and COL count from 1)")
    path, line, column = found.group(1), int(found.group(2)), found.group(3)
    text = _read_text(None, path, "--at")
    try:
        return split_at(text, line, None if column is None else int(column))
    except ValueError as e:
        raise FimtuneError(f"--at {at}: {path}: {e}") from None


def merged_info(model_dir: str | Path) -> dict[str, Any]:
    """What `fimtune merge` kept of the run in ``model_dir`` (its `fimtune.json`: the prompt layout,
    the base model); {} for a folder it did not write. A damaged file is an error."""
    merged = Path(model_dir) / MERGED_INFO
    if not merged.is_file():
        return {}
    try:
        info = json.loads(merged.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FimtuneError(
            f"cannot read '{merged}' ({e}): write it again with `fimtune merge`, or pass --mode"
        ) from None
    return info if isinstance(info, dict) else {}


def prompt_mode(choice: str, run_dir: Path | None, model_dir: str | Path | None = None) -> str:
    """`auto`: SPM for a run that trained on SPM examples (its cache reuse is far better), else PSM:
    `fimtune complete` and `fimtune serve` lay out a run's prompts alike, and a model folder that
    `fimtune merge` wrote of a run (``model_dir``) as that run."""
    if choice != "auto":
        return choice
    if run_dir is None:
        info = merged_info(model_dir) if model_dir is not None else {}
        return "spm" if info.get("prompt_mode") == "spm" else "psm"
    from fimtune.config import load_run_config

    fim = load_run_config(run_dir / "config.yaml").fim
    return "spm" if fim.fim_rate > 0 and fim.spm_rate > 0 else "psm"


def params_from_args(ns: Any) -> GenerationParams:
    """`fimtune complete` flags -> :class:`GenerationParams`, checked."""
    max_input_tokens = getattr(ns, "max_input_tokens", None)  # 0 is a value (refused below), not "unset"
    params = GenerationParams(
        max_new_tokens=ns.max_new_tokens,
        temperature=ns.temperature,
        top_p=ns.top_p,
        top_k=getattr(ns, "top_k", 0) or 0,
        stop=list(ns.stop or []),
        single_line=ns.single_line,
        mode=ns.mode,
        max_input_tokens=DEFAULT_MAX_INPUT_TOKENS if max_input_tokens is None else max_input_tokens,
        seed=getattr(ns, "seed", None),
    )
    checks = [
        (params.max_new_tokens >= 1, "--max-new-tokens must be at least 1"),
        (params.temperature >= 0, "--temperature must be 0 (greedy) or more"),
        (0 < params.top_p <= 1, "--top-p must be in (0, 1]"),
        (params.top_k >= 0, "--top-k must be 0 (off) or more"),
        (params.max_input_tokens > FIM_OVERHEAD, f"--max-input-tokens must be more than {FIM_OVERHEAD}"),
        (params.seed is None or 0 <= params.seed < 2**63, "--seed must be 0 or more, below 2**63"),
    ]
    for ok, message in checks:
        if not ok:
            raise FimtuneError(message)
    return params


def main(ns: Any) -> int:
    """`fimtune complete`: print one completion of the hole between --prefix and --suffix."""
    from fimtune.evaluate.variants import context_length, fit_params
    from fimtune.model import is_run_dir, load_for_inference

    if getattr(ns, "compare_base", False) and not is_run_dir(ns.target):
        raise FimtuneError(
            f"--compare-base: '{ns.target}' is not a run folder (a merged or base model has no adapter to "
            "turn off): pass the run folder, or drop --compare-base"
        )
    if getattr(ns, "at", None):
        if ns.suffix or ns.suffix_file:
            raise FimtuneError("--at takes the suffix from its file (the code after the cursor): drop --suffix")
        prefix, suffix = _read_at(ns.at)
    else:
        if ns.prefix_file == ns.suffix_file == "-":
            raise FimtuneError("--prefix-file - and --suffix-file -: there is one standard input; give a file for one")
        prefix = _read_text(ns.prefix, ns.prefix_file, "--prefix-file")
        suffix = _read_text(ns.suffix, ns.suffix_file, "--suffix-file")
    params = params_from_args(ns)
    check_weights(ns.target)
    loaded = load_for_inference(ns.target)
    fitted = fit_params(loaded.model, params)  # past learned positions a forward fails
    if fitted != params:
        print(
            f"--max-input-tokens {fitted.max_input_tokens}, --max-new-tokens {fitted.max_new_tokens}: "
            f"lowered to fit the model's {context_length(loaded.model)} positions",
            file=sys.stderr,
        )
        params = fitted
    params = replace(params, mode=prompt_mode(ns.mode, loaded.run_dir, ns.target))
    prompter = FimPrompter(loaded.tokenizer)
    if getattr(ns, "compare_base", False) and hasattr(loaded.model, "disable_adapter"):
        from fimtune.model import as_base

        with as_base(loaded.model):  # before merging: the base is the weights without the adapter
            [base] = complete_batch(loaded.model, prompter, [(prefix, suffix)], params)
        print(f"--- base ({loaded.model.peft_config['default'].base_model_name_or_path or 'adapter disabled'}) ---")
        print(base.text)
        print(f"--- tuned ({ns.target}) ---")
    merge_adapter(loaded.model)
    [done] = complete_batch(loaded.model, prompter, [(prefix, suffix)], params)
    print(done.text)
    print(
        f"[{done.prompt_tokens} prompt tokens, {done.completion_tokens} new tokens, {done.finish_reason}]",
        file=sys.stderr,
    )
    return 0
