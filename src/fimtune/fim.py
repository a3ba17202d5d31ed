"""Fill-in-the-middle (FIM) permutations: pure functions on token ids (Bavarian et al. 2022).

A document is cut at two points into prefix / middle / suffix and re-ordered, so that a
left-to-right model learns to write the middle after having seen both sides::

    document   a b c d e f g        cut points 2 and 5: prefix [a b], middle [c d e], suffix [f g]
    PSM        <P> a b <S> f g <M> c d e
    SPM        <P> <S> f g <M> a b c d e       (prefix and middle stay adjacent)

No truncation, no padding: a FIM'd document grows by exactly 3 tokens.

Random draws, per document and in this order (the recipe's `permute`, with a numpy
``Generator`` in place of ``RandomState``)::

    1. rng.random() < fim_rate                         always drawn: FIM this document?
    2. sorted(rng.integers(0, n_points, size=2))       only when FIM: the two cut points
    3. rng.random() < spm_rate                         only when FIM: SPM rather than PSM?

``n_points`` is ``len(ids) + 1`` (any cut, parts may be empty) unless ``cut_points`` limits
the cuts, e.g. to line starts (:func:`token_line_starts`, :func:`text_line_starts`): then the
two draws pick among those points and the middle is whole lines. One generator serves a
whole pass over the data; the corpus-level version is :func:`draw_cuts`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

SPANS = ("uniform", "line")
NEWLINE = "\n"


@dataclass(frozen=True)
class FimTokens:
    """Ids of the FIM sentinel tokens (resolve them with :func:`fimtune.tokens.ensure_fim_tokens`)."""

    prefix: int
    middle: int
    suffix: int
    pad: int


class Cut(NamedTuple):
    """One FIM decision: cut point indices ``lo <= hi`` (into the cut points) and the layout."""

    lo: int
    hi: int
    spm: bool


# --------------------------------------------------------------------------------------
# Draws
# --------------------------------------------------------------------------------------


def draw_cut(rng: np.random.Generator, n_points: int, fim_rate: float, spm_rate: float) -> Cut | None:
    """The draws for one document of ``n_points`` possible cut points (None: left as is).

    >>> draw_cut(np.random.default_rng(0), n_points=8, fim_rate=1.0, spm_rate=0.5)
    Cut(lo=2, hi=4, spm=True)
    >>> draw_cut(np.random.default_rng(0), n_points=8, fim_rate=0.0, spm_rate=0.5) is None
    True
    """
    if rng.random() >= fim_rate:
        return None
    lo, hi = sorted(rng.integers(low=0, high=n_points, size=2).tolist())
    return Cut(lo, hi, bool(rng.random() < spm_rate))


@dataclass
class Cuts:
    """The draws for many documents, as arrays (``lo``/``hi`` are 0 where ``fim`` is False)."""

    fim: np.ndarray  # bool [n_docs]
    spm: np.ndarray  # bool [n_docs]
    lo: np.ndarray  # int64 [n_docs], index into the document's cut points
    hi: np.ndarray  # int64 [n_docs]


def draw_cuts(rng: np.random.Generator, n_points: np.ndarray, fim_rate: float, spm_rate: float) -> Cuts:
    """:func:`draw_cut` for each document in order: the same draws as calling :func:`permute` on each.

    >>> c = draw_cuts(np.random.default_rng(0), np.array([8, 8, 8]), fim_rate=0.5, spm_rate=0.5)
    >>> c.fim.tolist(), c.lo.tolist(), c.hi.tolist(), c.spm.tolist()
    ([False, True, False], [0, 0, 0], [0, 2, 0], [False, True, False])
    """
    n = len(n_points)
    fim, spm = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    lo, hi = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    random, integers = rng.random, rng.integers  # bound once: this loop is the per-document cost
    for d, high in enumerate(n_points.tolist()):
        if random() >= fim_rate:
            continue
        a, b = integers(low=0, high=high, size=2).tolist()
        fim[d], spm[d] = True, random() < spm_rate
        lo[d], hi[d] = (a, b) if a <= b else (b, a)
    return Cuts(fim, spm, lo, hi)


# --------------------------------------------------------------------------------------
# Cut points at line starts (`fim.spans: line`)
# --------------------------------------------------------------------------------------


def token_line_starts(ids: np.ndarray, newline_mask: np.ndarray) -> np.ndarray:
    """Cut points at line starts, in tokens: 0, every token after one holding a newline, and len(ids).

    ``newline_mask[t]`` says whether token id ``t`` contains a newline
    (:func:`fimtune.tokens.newline_mask`). A byte-level token such as ``"\\n    "`` holds a
    newline and the next line's indentation, so the cut lands after the indentation:
    in tokens, a middle is whole lines up to that indentation.

    >>> mask = np.array([False, True, False])    # token 1 is "\\n"
    >>> token_line_starts(np.array([0, 0, 1, 2, 1, 0]), mask).tolist()
    [0, 3, 5, 6]
    """
    ids = np.asarray(ids)
    after_newline = np.flatnonzero(newline_mask[ids[:-1]]) + 1 if len(ids) > 1 else np.zeros(0, np.int64)
    return np.unique(np.concatenate([[0], after_newline, [len(ids)]]).astype(np.int64))


def text_line_starts(text: str) -> np.ndarray:
    """Cut points at line starts, in characters: 0, after every newline, and len(text).

    >>> text_line_starts("ab\\ncd\\n\\nef").tolist()
    [0, 3, 6, 7, 9]
    """
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    after_newline = np.flatnonzero(codes == ord(NEWLINE)) + 1
    return np.unique(np.concatenate([[0], after_newline, [len(text)]]).astype(np.int64))


# --------------------------------------------------------------------------------------
# Token unit
# --------------------------------------------------------------------------------------


def assemble(prefix: np.ndarray, middle: np.ndarray, suffix: np.ndarray, spm: bool, tokens: FimTokens) -> np.ndarray:
    """The FIM layout of three parts: SPM ``[P, S] suffix [M] prefix middle`` or PSM ``[P] prefix [S] suffix [M] middle``.

    >>> t = FimTokens(prefix=1, middle=2, suffix=3, pad=4)
    >>> assemble(np.array([10]), np.array([11, 12]), np.array([13]), spm=False, tokens=t).tolist()
    [1, 10, 3, 13, 2, 11, 12]
    >>> assemble(np.array([10]), np.array([11, 12]), np.array([13]), spm=True, tokens=t).tolist()
    [1, 3, 13, 2, 10, 11, 12]
    """
    dtype = np.result_type(prefix, middle, suffix, np.int32)
    p, s, m = (np.array([x], dtype=dtype) for x in (tokens.prefix, tokens.suffix, tokens.middle))
    if spm:
        return np.concatenate([p, s, suffix, m, prefix, middle]).astype(dtype, copy=False)
    return np.concatenate([p, prefix, s, suffix, m, middle]).astype(dtype, copy=False)


def permute_array(
    ids: np.ndarray,
    rng: np.random.Generator,
    tokens: FimTokens,
    fim_rate: float = 0.5,
    spm_rate: float = 0.5,
    cut_points: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`permute` on a numpy array, returning an array (the input itself when not FIM'd)."""
    ids = np.asarray(ids)
    n_points = len(ids) + 1 if cut_points is None else len(cut_points)
    cut = draw_cut(rng, n_points, fim_rate, spm_rate)
    if cut is None:
        return ids
    a, b = (cut.lo, cut.hi) if cut_points is None else (int(cut_points[cut.lo]), int(cut_points[cut.hi]))
    return assemble(ids[:a], ids[a:b], ids[b:], cut.spm, tokens)


def permute(
    ids: Sequence[int] | np.ndarray,
    rng: np.random.Generator,
    tokens: FimTokens,
    fim_rate: float = 0.5,
    spm_rate: float = 0.5,
    *,
    cut_points: Sequence[int] | np.ndarray | None = None,
) -> list[int]:
    """With probability ``fim_rate``, cut ``ids`` into prefix/middle/suffix and lay them out SPM or PSM.

    The two cut points are sorted uniform draws in ``[0, len(ids)]`` (or among ``cut_points``,
    e.g. :func:`token_line_starts`); any part may be empty. The draw order is in the module
    docstring. Otherwise ``ids`` come back unchanged.

    >>> t = FimTokens(prefix=1, middle=2, suffix=3, pad=4)
    >>> doc = [10, 11, 12, 13, 14, 15, 16]
    >>> permute(doc, np.random.default_rng(0), t, fim_rate=1.0, spm_rate=0.0)  # cuts at 2 and 4: PSM
    [1, 10, 11, 3, 14, 15, 16, 2, 12, 13]
    >>> permute(doc, np.random.default_rng(0), t, fim_rate=1.0, spm_rate=1.0)  # same cuts: SPM
    [1, 3, 14, 15, 16, 2, 10, 11, 12, 13]
    >>> permute(doc, np.random.default_rng(0), t, fim_rate=0.0)
    [10, 11, 12, 13, 14, 15, 16]
    """
    points = None if cut_points is None else np.asarray(cut_points, dtype=np.int64)
    out = permute_array(np.asarray(ids, dtype=np.int64), rng, tokens, fim_rate, spm_rate, points)
    return out.tolist()


def unpermute(ids: Sequence[int] | np.ndarray, tokens: FimTokens) -> list[int]:
    """The document a :func:`permute` output came from (prefix + middle + suffix).

    Assumes the document itself holds no FIM token (document text is tokenized as plain text,
    see :mod:`fimtune.tokenization`). PSM with an empty prefix and SPM look alike; both invert
    the same way, so the result is exact either way.

    >>> t = FimTokens(prefix=1, middle=2, suffix=3, pad=4)
    >>> unpermute([1, 10, 3, 12, 13, 2, 11], t), unpermute([1, 3, 12, 13, 2, 10, 11], t)
    ([10, 11, 12, 13], [10, 11, 12, 13])
    >>> unpermute([10, 11], t)
    [10, 11]
    """
    ids = list(np.asarray(ids).tolist())
    if not ids or ids[0] != tokens.prefix:
        return ids
    s = ids.index(tokens.suffix)
    m = ids.index(tokens.middle, s)
    if s == 1:  # SPM (or PSM with an empty prefix): [P, S] suffix [M] prefix middle
        return ids[m + 1 :] + ids[2:m]
    return ids[1:s] + ids[m + 1 :] + ids[s + 1 : m]  # PSM: [P] prefix [S] suffix [M] middle


# --------------------------------------------------------------------------------------
# Character unit (`fim.unit: char`): cut the text, tokenize each part
# --------------------------------------------------------------------------------------


class TextCut(NamedTuple):
    """The three parts of a text cut at character positions, and the layout."""

    prefix: str
    middle: str
    suffix: str
    spm: bool


def cut_text(
    text: str,
    rng: np.random.Generator,
    fim_rate: float = 0.5,
    spm_rate: float = 0.5,
    spans: str = "uniform",
    line_end_rate: float = 0.0,
) -> TextCut | None:
    """Draw a FIM cut of ``text`` at character positions (line starts when ``spans="line"``).

    Same draws as :func:`permute`, over ``len(text) + 1`` positions (or the line starts). With
    ``spans="line"`` and ``line_end_rate`` > 0, one more draw for each cut: with that probability
    a middle that ends in a newline leaves it (with a CRLF's "\\r") to the suffix, as an editor's
    hole at the end of a line does (the middle ends at its last line's end).

    >>> cut_text("ab\\ncd\\nef\\n", np.random.default_rng(0), fim_rate=1.0, spans="line")
    TextCut(prefix='ab\\n', middle='cd\\n', suffix='ef\\n', spm=True)
    >>> cut_text("ab\\ncd\\nef\\n", np.random.default_rng(0), fim_rate=1.0, spans="line", line_end_rate=1.0)
    TextCut(prefix='ab\\n', middle='cd', suffix='\\nef\\n', spm=True)
    """
    if spans not in SPANS:
        raise ValueError(f"spans must be one of {SPANS}, not {spans!r}")
    points = text_line_starts(text) if spans == "line" else None
    cut = draw_cut(rng, len(text) + 1 if points is None else len(points), fim_rate, spm_rate)
    if cut is None:
        return None
    a, b = (cut.lo, cut.hi) if points is None else (int(points[cut.lo]), int(points[cut.hi]))
    if points is not None and line_end_rate > 0 and rng.random() < line_end_rate and b > a and text[b - 1] == NEWLINE:
        b -= 2 if text[a : b - 1].endswith("\r") else 1  # a CRLF line's end is before its "\r"
    return TextCut(text[:a], text[a:b], text[b:], cut.spm)


def permute_text(
    text: str,
    rng: np.random.Generator,
    tokens: FimTokens,
    encode: Callable[[str], Sequence[int]],
    fim_rate: float = 0.5,
    spm_rate: float = 0.5,
    spans: str = "uniform",
    encode_continued: Callable[[str], Sequence[int]] | None = None,
    line_end_rate: float = 0.0,
) -> list[int]:
    """FIM at the character level: cut ``text`` (see :func:`cut_text`), then encode each part alone:
    the first part with text by ``encode``, the parts after it by ``encode_continued`` (default
    ``encode``), which goes on from text before it (for a SentencePiece-style tokenizer, no "▁"
    before it: :func:`fimtune.tokenization.continuation`).

    No token ever straddles a cut, so the model never sees a token split in two, and
    decoding the three parts gives back the text exactly. A text left as is comes back as
    ``encode(text)``.

    >>> t = FimTokens(prefix=1, middle=2, suffix=3, pad=4)
    >>> encode = lambda s: [ord(c) for c in s]   # one token per character
    >>> permute_text("ab\\ncd\\nef\\n", np.random.default_rng(0), t, encode, 1.0, 0.0, "line")
    [1, 97, 98, 10, 3, 101, 102, 10, 2, 99, 100, 10]
    """
    cut = cut_text(text, rng, fim_rate, spm_rate, spans, line_end_rate)
    if cut is None:
        return list(encode(text))
    later = encode_continued or encode
    begun = (False, bool(cut.prefix), bool(cut.prefix or cut.middle))  # whether text came before each part
    texts = (cut.prefix, cut.middle, cut.suffix)
    parts = [np.asarray((later if b else encode)(t), dtype=np.int64) for t, b in zip(texts, begun, strict=True)]
    return assemble(*parts, cut.spm, tokens).tolist()
