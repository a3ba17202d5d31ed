"""Packing: FIM'd documents, each followed by the separator, cut into rows of ``seq_length`` tokens.

Three documents, ``seq_length`` 8, separator ``E`` (``<|endoftext|>``)::

    after FIM        a a a a a | b b | c c c c c c c          (document a may be PSM/SPM: +3 tokens)
    joined           a a a a a E b b E c c c c c c c E         17 tokens
    rows             [a a a a a E b b] [E c c c c c c c]  E    2 rows; the tail (1 token) is dropped and reported
    rows shuffled by a generator of (seed, epoch)

    row              a a a a a E b b       E c c c c c c c
    input_ids        a a a a a E b b       E c c c c c c c
    labels           a a a a a E b b       E c c c c c c c     = input_ids (the model shifts them)
    position_ids     0 1 2 3 4 5 0 1       0 0 1 2 3 4 5 6     boundary-aware only: 0 at every document
                                                               start and at every row start

A separator belongs to the document before it. ``seed_exact`` rows hold ``input_ids`` and
``labels`` (the recipe); ``boundary_aware`` rows add ``position_ids``, from which packed
attention keeps each token inside its document.

One pass over the data (an *epoch*) draws FIM afresh with ``default_rng([seed, epoch, 0])``
and shuffles rows with ``default_rng([seed, epoch, 1])``, so any epoch can be rebuilt on its
own (exact resume). ``seed_exact`` keeps the recipe's semantics, not its random stream: the
recipe draws from one ``RandomState`` for its whole endless stream, shuffles with Python's
``random``, and packs buffers of about 5M characters with a tail dropped per buffer; here the
whole split is one buffer, with one tail per epoch. Training rows run forever (:class:`TrainRows`, resumable at any row
from ``{"epoch", "offset"}``); evaluation rows run once (:class:`EvalRows`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fimtune.errors import FimtuneError
from fimtune.fim import Cuts, FimTokens, cut_text, draw_cuts

if TYPE_CHECKING:
    from fimtune.config import RunConfig

TOKEN_DTYPE = np.int32  # the joined stream; rows come out as int64
ROW_DTYPE = np.int64
BLOCK_TOKENS = 1 << 22  # documents are joined in blocks of about this many tokens (bounded memory)
TEXT_BLOCK_DOCS = 256  # `fim.unit: char`: documents re-tokenized per batch
ENCODE_BLOCK_TEXTS = 1024  # texts per tokenizer call (its encodings hold tens of bytes a token)
FIM_STREAM, SHUFFLE_STREAM = 0, 1  # the two generators of an epoch: [seed, epoch, stream]


@dataclass(frozen=True)
class PackSpec:
    """Everything that turns a tokenized split into an epoch of rows (plain values)."""

    tokens: FimTokens
    separator: int
    seq_length: int = 2048
    boundary_aware: bool = True
    fim_rate: float = 0.5
    spm_rate: float = 0.5
    unit: str = "token"  # "token" | "char"
    spans: str = "uniform"  # "uniform" | "line"
    line_end_rate: float = 0.0  # unit char, spans line: share of middles that leave their last newline to the suffix
    shuffle: bool = True
    seed: int = 0


@dataclass
class Documents:
    """A tokenized split (``tokens[offsets[d]:offsets[d + 1]]`` is document d), plus what some modes need."""

    tokens: np.ndarray  # int32 [n_tokens]
    offsets: np.ndarray  # int64 [n_docs + 1]
    newline_mask: np.ndarray | None = None  # unit token, spans line: newline_mask[token id]
    texts: Any = None  # unit char: texts[lo:hi] -> list[str]
    # unit char: (texts, whether each goes on from text before it) -> (ids, lengths)
    encode: Callable[[list[str], bool], tuple[np.ndarray, np.ndarray]] | None = None
    continued: np.ndarray | None = None  # unit char: bool [n_docs], whether each goes on from text before it
    chars: int = 0  # characters of all documents (for chars per token)


@dataclass(frozen=True)
class EpochStats:
    """What one epoch of packing did."""

    epoch: int
    documents: int
    fim: int
    spm: int
    tokens: int  # the joined stream: document tokens + FIM tokens + separators
    rows: int
    tail: int  # tokens after the last full row, dropped

    @property
    def psm(self) -> int:
        return self.fim - self.spm

    @property
    def plain(self) -> int:
        return self.documents - self.fim


# --------------------------------------------------------------------------------------
# Joining FIM'd documents (vectorized: no Python work per token)
# --------------------------------------------------------------------------------------


def gather_segments(src: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenate ``src[starts[i]:starts[i] + lengths[i]]`` for all i, with one gather.

    >>> gather_segments(np.arange(10, 20), np.array([5, 0, 9]), np.array([2, 3, 0])).tolist()
    [15, 16, 10, 11, 12]
    """
    out_starts = np.cumsum(lengths) - lengths
    index = np.repeat(starts - out_starts, lengths) + np.arange(int(lengths.sum()))
    return src[index]


def _layout(whole: tuple, parts: tuple, fim: np.ndarray, spm: np.ndarray, const: np.ndarray) -> tuple:
    """Seven (start, length) segments per document, flattened in output order.

    ``whole`` and each of ``parts`` (prefix, middle, suffix) are (starts, lengths) arrays in
    ``src``; ``const`` holds the src positions of the P, S, M and separator tokens.
    """
    (x0, xl), (p0, pl), (m0, ml), (s0, sl) = whole, *parts
    n = len(x0)
    P, S, M, E = (np.full(n, c, np.int64) for c in const)
    one, zero = np.ones(n, np.int64), np.zeros(n, np.int64)
    psm = np.stack([P, p0, S, s0, M, m0, E], 1), np.stack([one, pl, one, sl, one, ml, one], 1)
    spm_ = np.stack([P, S, s0, M, p0, m0, E], 1), np.stack([one, one, sl, one, pl, ml, one], 1)
    plain = np.stack([x0, E, zero, zero, zero, zero, zero], 1), np.stack([xl, one, zero, zero, zero, zero, zero], 1)
    f, s = fim[:, None], spm[:, None]
    starts = np.where(f, np.where(s, spm_[0], psm[0]), plain[0])
    lengths = np.where(f, np.where(s, spm_[1], psm[1]), plain[1])
    return starts.ravel(), lengths.ravel()


def _const(tokens: FimTokens, separator: int) -> np.ndarray:
    return np.array([tokens.prefix, tokens.suffix, tokens.middle, separator], dtype=TOKEN_DTYPE)


def _doc_blocks(offsets: np.ndarray, block_tokens: int) -> Iterator[tuple[int, int]]:
    """Consecutive document ranges [d0, d1) of about ``block_tokens`` tokens (at least one document)."""
    n, d0 = len(offsets) - 1, 0
    while d0 < n:
        d1 = int(np.searchsorted(offsets, offsets[d0] + block_tokens, side="right")) - 1
        d1 = min(max(d1, d0 + 1), n)
        yield d0, d1
        d0 = d1


def split_documents(offsets: np.ndarray, max_tokens: int) -> np.ndarray:
    """Offsets of the pieces of every document cut into near-equal pieces of at most ``max_tokens``.

    >>> split_documents(np.array([0, 10, 13, 13]), 4).tolist()
    [0, 3, 6, 10, 13, 13]
    """
    if max_tokens < 1:
        raise FimtuneError(f"fim.piece_tokens={max_tokens}: a piece needs at least 1 token (0 turns pieces off)")
    lengths = np.diff(offsets)
    pieces = np.maximum(1, -(-lengths // max_tokens))  # ceil, and one (empty) piece for an empty document
    doc = np.repeat(np.arange(len(lengths)), pieces)
    k = np.arange(len(doc)) - np.repeat(np.cumsum(pieces) - pieces, pieces)  # piece index in its document
    starts = offsets[:-1][doc] + (lengths[doc] * k) // pieces[doc]
    return np.concatenate([starts, offsets[-1:]]).astype(np.int64)


def line_cut_points(tokens: np.ndarray, offsets: np.ndarray, newline_mask: np.ndarray) -> tuple:
    """Every document's cut points at line starts (see :func:`fimtune.fim.token_line_starts`).

    Returns (points, first, count): document d's points are ``points[first[d]:first[d] + count[d]]``,
    absolute positions in ``tokens``, ending with the document's end.
    """
    n_docs = len(offsets) - 1
    flag = np.zeros(len(tokens), dtype=bool)
    flag[1:] = newline_mask[tokens[:-1]]
    flag[offsets[:-1][np.diff(offsets) > 0]] = True  # documents start a line; empty ones have no token
    flagged = np.flatnonzero(flag)
    doc = np.searchsorted(offsets, flagged, side="right") - 1  # the (non-empty) document holding each
    n_flag = np.bincount(doc, minlength=n_docs)
    count = n_flag + 1
    first = np.cumsum(count) - count
    points = np.empty(int(count.sum()), np.int64)
    rank = np.arange(len(flagged)) - (np.cumsum(n_flag) - n_flag)[doc]
    points[first[doc] + rank] = flagged
    points[first + n_flag] = offsets[1:]
    return points, first, count


def join_tokens(docs: Documents, cuts: Cuts, a: np.ndarray, b: np.ndarray, spec: PackSpec) -> np.ndarray:
    """Documents after FIM at token cuts ``a <= b`` (absolute positions), each followed by the separator."""
    offsets = docs.offsets
    lengths = np.diff(offsets) + 3 * cuts.fim + 1
    out = np.empty(int(lengths.sum()), dtype=TOKEN_DTYPE)
    out_starts = np.concatenate([[0], np.cumsum(lengths)])
    const = _const(spec.tokens, spec.separator)
    for d0, d1 in _doc_blocks(offsets, BLOCK_TOKENS):
        t0, t1 = int(offsets[d0]), int(offsets[d1])
        src = np.concatenate([docs.tokens[t0:t1], const])
        s, e = offsets[d0:d1] - t0, offsets[d0 + 1 : d1 + 1] - t0
        ca, cb = a[d0:d1] - t0, b[d0:d1] - t0
        parts = (s, ca - s), (ca, cb - ca), (cb, e - cb)
        starts, lens = _layout((s, e - s), parts, cuts.fim[d0:d1], cuts.spm[d0:d1], t1 - t0 + np.arange(4))
        out[out_starts[d0] : out_starts[d1]] = gather_segments(src, starts, lens)
    return out


def fim_tokens_epoch(docs: Documents, rng: np.random.Generator, spec: PackSpec, points: tuple | None) -> tuple:
    """`fim.unit: token`: draw every document's cut, then join. Returns (joined ids, cuts, joined lengths)."""
    starts, lengths = docs.offsets[:-1], np.diff(docs.offsets)
    if points is None:
        cuts = draw_cuts(rng, lengths + 1, spec.fim_rate, spec.spm_rate)
        a, b = starts + cuts.lo, starts + cuts.hi
    else:
        pts, first, count = points
        cuts = draw_cuts(rng, count, spec.fim_rate, spec.spm_rate)
        a, b = pts[first + cuts.lo], pts[first + cuts.hi]
    return join_tokens(docs, cuts, a, b, spec), cuts, lengths + 3 * cuts.fim + 1


def fim_text_epoch(docs: Documents, rng: np.random.Generator, spec: PackSpec) -> tuple:
    """`fim.unit: char`: cut each text at characters, re-tokenize the parts, join. Returns (ids, cuts, lengths)."""
    if docs.texts is None or docs.encode is None:
        raise FimtuneError("fim.unit=char needs the documents' texts and the tokenizer")
    n, offsets, const = len(docs.offsets) - 1, docs.offsets, _const(spec.tokens, spec.separator)
    going_on = np.zeros(n, bool) if docs.continued is None else np.asarray(docs.continued, bool)
    fim, spm, lengths, blocks = np.zeros(n, bool), np.zeros(n, bool), np.diff(offsets) + 1, []
    for d0 in range(0, n, TEXT_BLOCK_DOCS):
        d1 = min(n, d0 + TEXT_BLOCK_DOCS)
        text_cuts = [
            cut_text(t, rng, spec.fim_rate, spec.spm_rate, spec.spans, spec.line_end_rate) for t in docs.texts[d0:d1]
        ]
        fim[d0:d1] = [c is not None for c in text_cuts]
        spm[d0:d1] = [c is not None and c.spm for c in text_cuts]
        cuts = [c for c in text_cuts if c is not None]
        part_ids, part_lens = _encode_parts(docs.encode, cuts, going_on[d0:d1][fim[d0:d1]])
        lengths[d0:d1][fim[d0:d1]] = part_lens.reshape(-1, 3).sum(1) + 4
        t0, t1 = int(offsets[d0]), int(offsets[d1])
        src = np.concatenate([docs.tokens[t0:t1], part_ids.astype(TOKEN_DTYPE), const])
        blocks.append(gather_segments(src, *_text_layout(offsets[d0 : d1 + 1] - t0, part_lens, fim[d0:d1], spm[d0:d1])))
    joined = np.concatenate(blocks) if blocks else np.zeros(0, TOKEN_DTYPE)
    return joined, Cuts(fim, spm, np.zeros(n, np.int64), np.zeros(n, np.int64)), lengths


def _encode_parts(
    encode: Callable[[list[str], bool], tuple], cuts: list, going_on: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The ids of each cut's prefix, middle and suffix, in that order, and each part's length. The
    first part with text starts its document, unless the document goes on from text before it
    (``going_on``: a piece after the first of its text); the parts after it go on from that text, so
    they are encoded without a SentencePiece-style dummy prefix (:func:`fimtune.tokenization.continuation`)."""
    parts = [part for c in cuts for part in (c.prefix, c.middle, c.suffix)]
    begun = [
        (g, g or bool(c.prefix), g or bool(c.prefix or c.middle)) for c, g in zip(cuts, going_on.tolist(), strict=True)
    ]
    return encode_texts(encode, parts, np.array(begun, bool).reshape(-1))


def encode_texts(
    encode: Callable[[list[str], bool], tuple], texts: list[str], continued: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``texts`` encoded in order, each going on from text before it or not (``continued``): (ids, lengths).

    A block of ``ENCODE_BLOCK_TEXTS`` at a time: `fim.unit: char` pieces re-tokenize a whole split."""
    blocks = [
        _encode_block(encode, texts[i : i + ENCODE_BLOCK_TEXTS], continued[i : i + ENCODE_BLOCK_TEXTS])
        for i in range(0, len(texts), ENCODE_BLOCK_TEXTS)
    ]
    if not blocks:
        return _encode_block(encode, [], continued[:0])
    return np.concatenate([ids for ids, _ in blocks]), np.concatenate([lens for _, lens in blocks])


def _encode_block(
    encode: Callable[[list[str], bool], tuple], texts: list[str], continued: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    ids, lens, starts = [], np.zeros(len(texts), np.int64), np.zeros(len(texts), np.int64)
    base = 0
    for flag in (False, True):
        (where,) = np.nonzero(continued == flag)
        group_ids, group_lens = encode([texts[i] for i in where], flag)
        lens[where], starts[where] = group_lens, base + np.cumsum(group_lens) - group_lens
        ids.append(np.asarray(group_ids, TOKEN_DTYPE))
        base += len(group_ids)
    return gather_segments(np.concatenate(ids), starts, lens), lens


def _text_layout(offsets: np.ndarray, part_lens: np.ndarray, fim: np.ndarray, spm: np.ndarray) -> tuple:
    """Segments of one block: plain documents from the cached tokens, FIM'd ones from re-tokenized parts."""
    n, base = len(fim), int(offsets[-1])  # parts follow the block's cached tokens in src
    part_starts = base + np.cumsum(part_lens) - part_lens
    k = np.cumsum(fim) - 1  # index of each FIM'd document among the block's FIM'd ones
    parts = []
    for j in range(3):  # prefix, middle, suffix of FIM'd documents; zeros elsewhere
        starts, lens = np.zeros(n, np.int64), np.zeros(n, np.int64)
        starts[fim], lens[fim] = part_starts[3 * k[fim] + j], part_lens[3 * k[fim] + j]
        parts.append((starts, lens))
    const = base + int(part_lens.sum()) + np.arange(4)
    return _layout((offsets[:-1], np.diff(offsets)), tuple(parts), fim, spm, const)


# --------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------


def position_ids(doc_starts: np.ndarray, row_start: int, seq_length: int) -> np.ndarray:
    """Positions of the row ``[row_start, row_start + seq_length)``: 0 at each document start and at the row start.

    ``doc_starts`` is sorted: the starts inside the row are looked up, not scanned for (a row's cost
    does not grow with the split's documents).

    >>> position_ids(np.array([0, 6, 9]), row_start=8, seq_length=8).tolist()
    [0, 0, 1, 2, 3, 4, 5, 6]
    """
    lo = np.searchsorted(doc_starts, row_start, side="right")
    hi = np.searchsorted(doc_starts, row_start + seq_length, side="left")
    inside = doc_starts[lo:hi] - row_start
    reset = np.zeros(seq_length, np.int64)
    reset[inside] = inside
    return np.arange(seq_length, dtype=np.int64) - np.maximum.accumulate(reset)


@dataclass
class PackedEpoch:
    """One epoch: the joined stream, where its documents start, and the order of its rows."""

    ids: np.ndarray  # int32 [stats.tokens]
    doc_starts: np.ndarray  # int64 [n_docs]
    order: np.ndarray  # int64 [rows]: the k-th row served is row order[k]
    seq_length: int
    boundary_aware: bool
    stats: EpochStats

    def __len__(self) -> int:
        return len(self.order)

    @property
    def rows(self) -> np.ndarray:
        """All full rows, in stream order: int32 [rows, seq_length] (a view)."""
        return self.ids[: self.stats.rows * self.seq_length].reshape(self.stats.rows, self.seq_length)

    @property
    def tail(self) -> np.ndarray:
        return self.ids[self.stats.rows * self.seq_length :]

    def row(self, k: int) -> dict[str, np.ndarray]:
        """The k-th row served: ``input_ids``, ``labels`` (a copy) and, boundary-aware, ``position_ids``."""
        start = int(self.order[k]) * self.seq_length
        ids = self.ids[start : start + self.seq_length].astype(ROW_DTYPE)
        row = {"input_ids": ids, "labels": ids.copy()}
        if self.boundary_aware:
            row["position_ids"] = position_ids(self.doc_starts, start, self.seq_length)
        return row


def pack_epoch(docs: Documents, spec: PackSpec, epoch: int, points: tuple | None = None) -> PackedEpoch:
    """FIM every document with the epoch's generator, join with the separator, cut rows, shuffle them.

    ``points``: line cut points from :func:`line_cut_points` (`fim.spans: line`, token unit).
    """
    rng = np.random.default_rng([spec.seed, epoch, FIM_STREAM])
    if spec.unit == "char":
        ids, cuts, doc_lengths = fim_text_epoch(docs, rng, spec)
    else:
        ids, cuts, doc_lengths = fim_tokens_epoch(docs, rng, spec, points)
    n_rows = len(ids) // spec.seq_length
    order = np.arange(n_rows, dtype=np.int64)
    if spec.shuffle:
        order = np.random.default_rng([spec.seed, epoch, SHUFFLE_STREAM]).permutation(n_rows)
    stats = EpochStats(
        epoch,
        len(cuts.fim),
        int(cuts.fim.sum()),
        int(cuts.spm.sum()),
        len(ids),
        n_rows,
        len(ids) - n_rows * spec.seq_length,
    )
    return PackedEpoch(ids, np.cumsum(doc_lengths) - doc_lengths, order, spec.seq_length, spec.boundary_aware, stats)


def is_conserved(tokens_in: np.ndarray, rows: np.ndarray, tail: np.ndarray) -> bool:
    """Whether the multiset of ``tokens_in`` equals that of the rows plus the tail.

    >>> is_conserved(np.array([3, 1, 2, 1, 5]), np.array([[1, 1], [2, 3]]), np.array([5]))
    True
    """
    out = np.concatenate([np.ravel(rows), np.ravel(tail)])
    size = int(max(tokens_in.max(initial=0), out.max(initial=0))) + 1
    return bool(np.array_equal(np.bincount(np.ravel(tokens_in), minlength=size), np.bincount(out, minlength=size)))


# --------------------------------------------------------------------------------------
# Iteration: training forever (resumable), evaluation once
# --------------------------------------------------------------------------------------


MAX_EMPTY_EPOCHS = 8  # training epochs in a row that pack into no row for each process, before it is an error


class TrainRows:
    """Training rows, epoch after epoch, forever: ``next(rows)`` is a row dict of numpy arrays.

    Each epoch re-draws FIM and re-shuffles (see the module docstring). ``state_dict()`` is
    ``{"epoch", "offset"}`` (rows served so far in the epoch, by this process); after
    ``load_state_dict(state)`` the rows continue exactly as an uninterrupted iterator's would.
    With ``world_size`` > 1, process ``rank`` serves every ``world_size``-th row of the epoch's
    order, all processes the same number (up to ``world_size - 1`` rows an epoch go unused).
    """

    def __init__(self, docs: Documents, spec: PackSpec, rank: int = 0, world_size: int = 1) -> None:
        self.docs, self.spec, self.rank, self.world_size = docs, spec, rank, world_size
        self.epoch, self.offset = 0, 0
        self._points = _line_points(docs, spec)
        self._packed: PackedEpoch | None = None
        self._fingerprint: str | None = None

    def packed(self, epoch: int) -> PackedEpoch:
        """The packed rows of ``epoch`` (the current one is kept)."""
        if self._packed is None or self._packed.stats.epoch != epoch:
            self._packed = pack_epoch(self.docs, self.spec, epoch, self._points)
        return self._packed

    def rows_per_epoch(self, epoch: int | None = None) -> int:
        """Rows this process serves in ``epoch`` (default: the current one)."""
        return len(self.packed(self.epoch if epoch is None else epoch)) // self.world_size

    def __iter__(self) -> TrainRows:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        empty = 0  # epochs in a row with no row for each process
        while self.offset >= self.rows_per_epoch():
            if self.rows_per_epoch() == 0:
                # FIM adds tokens to some epochs and not others, so a split near one row a process
                # can pack into none in one epoch after rows in the last: that epoch is skipped (by
                # every process alike: they pack the same rows). Only epochs in a row with none fail.
                empty += 1
                if empty >= MAX_EMPTY_EPOCHS:
                    raise _too_few_rows(self.packed(self.epoch).stats, self.spec.seq_length, self.world_size)
            self.epoch, self.offset = self.epoch + 1, 0
        row = self.packed(self.epoch).row(self.offset * self.world_size + self.rank)
        self.offset += 1
        return row

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def split_size(self) -> dict[str, Any]:
        """The documents, tokens and a hash of the token ids of the split the rows come from (a resumed
        run checks they are the same: files edited or reordered keep the counts, not the rows)."""
        if self._fingerprint is None:
            h = hashlib.blake2b(digest_size=16)
            h.update(np.ascontiguousarray(self.docs.offsets, np.int64))
            h.update(np.ascontiguousarray(self.docs.tokens, TOKEN_DTYPE))
            self._fingerprint = h.hexdigest()
        n_docs, n_tokens = len(self.docs.offsets) - 1, int(self.docs.offsets[-1])
        return {"documents": n_docs, "tokens": n_tokens, "fingerprint": self._fingerprint}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


class EvalRows:
    """Evaluation rows: each ``for`` loop runs over the split's packed rows once (FIM drawn once, epoch 0).

    With ``world_size`` > 1, process ``rank`` takes rows ``rank, rank + world_size, ...``: together the
    processes cover every row exactly once (the caller sums losses and token counts across them).
    """

    def __init__(self, docs: Documents, spec: PackSpec, rank: int = 0, world_size: int = 1) -> None:
        self.packed = pack_epoch(docs, spec, 0, _line_points(docs, spec))
        self.rank, self.world_size = rank, world_size

    @property
    def stats(self) -> EpochStats:
        return self.packed.stats

    def __len__(self) -> int:
        """Rows of this process: every row is evaluated once, so counts may differ by one across ranks."""
        return len(range(self.rank, len(self.packed), self.world_size))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for k in range(self.rank, len(self.packed), self.world_size):
            yield self.packed.row(k)


def _line_points(docs: Documents, spec: PackSpec) -> tuple | None:
    if spec.unit != "token" or spec.spans != "line":
        return None
    if docs.newline_mask is None:
        raise FimtuneError("fim.spans=line needs the tokenizer's newline tokens (Documents.newline_mask)")
    return line_cut_points(docs.tokens, docs.offsets, docs.newline_mask)


def _too_few_rows(stats: EpochStats, seq_length: int, world_size: int) -> FimtuneError:
    return FimtuneError(
        f"the training split packs into {stats.rows} rows of {seq_length} tokens ({stats.tokens:,} tokens), "
        f"fewer than the {world_size} process(es): add data or lower packing.seq_length"
    )


def stack_rows(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A batch from rows: each key stacked to [batch, seq_length]."""
    return {key: np.stack([r[key] for r in rows]) for key in rows[0]}


# --------------------------------------------------------------------------------------
# Builders: config -> plain arguments
# --------------------------------------------------------------------------------------


def pack_spec(cfg: RunConfig, tokens: FimTokens, separator: int, *, shuffle: bool | None = None) -> PackSpec:
    """The :class:`PackSpec` of a :class:`~fimtune.config.RunConfig` (its fim, packing and seed)."""
    return PackSpec(
        tokens=tokens,
        separator=separator,
        seq_length=cfg.packing.seq_length,
        boundary_aware=cfg.packing.mode == "boundary_aware",
        fim_rate=cfg.fim.fim_rate,
        spm_rate=cfg.fim.spm_rate,
        unit=cfg.fim.unit,
        spans=cfg.fim.spans,
        line_end_rate=cfg.fim.line_end_rate,
        shuffle=cfg.packing.shuffle if shuffle is None else shuffle,
        seed=cfg.seed,
    )


def documents(ds: Any, tokenizer: Any, cfg: RunConfig, column: str = "content", progress: bool = True) -> Documents:
    """Tokenize split ``ds`` (cached) and gather what ``cfg.fim`` needs besides the tokens."""
    from fimtune.tokenization import TextColumn, encode_flat, tokenize_split
    from fimtune.tokens import newline_mask

    split = tokenize_split(ds, tokenizer, column, progress=progress)
    docs = Documents(split.tokens, split.offsets, chars=split.chars)
    if cfg.fim.unit == "token" and cfg.fim.spans == "line":
        docs.newline_mask = newline_mask(tokenizer)
    if cfg.fim.unit == "char":
        docs.texts, docs.encode = (
            TextColumn(ds, column),
            lambda texts, continued: encode_flat(tokenizer, texts, continued),
        )
    if cfg.fim.piece_tokens and cfg.fim.unit == "token":
        docs.offsets = split_documents(docs.offsets, cfg.fim.piece_tokens)
    elif cfg.fim.piece_tokens:  # char unit: pieces of whole lines, re-tokenized
        chars_per_token = split.chars / max(1, len(split.tokens))
        max_chars = max(1, round(cfg.fim.piece_tokens * chars_per_token))
        texts, continued = split_texts(docs.texts[0 : len(docs.texts)], max_chars)
        continued = np.array(continued, bool)  # a piece after the first of its text: no dummy prefix before it
        ids, lengths = encode_texts(docs.encode, texts, continued)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        docs = Documents(ids, offsets, texts=texts, encode=docs.encode, continued=continued)
        docs.chars = split.chars
    return docs


def split_texts(texts: list[str], max_chars: int) -> tuple[list[str], list[bool]]:
    """Each text cut at line ends into pieces of at most ``max_chars`` characters (a longer line is a
    piece of its own); an empty text stays one empty piece. Also returns, for each piece, whether it
    goes on from text before it (every piece but its text's first).

    >>> split_texts(["a\\nbb\\nccc\\n", ""], 5)
    (['a\\nbb\\n', 'ccc\\n', ''], [False, True, False])
    """
    pieces: list[str] = []
    continued: list[bool] = []
    for text in texts:
        current, size, first = [], 0, len(pieces)
        for line in text.splitlines(keepends=True):
            if current and size + len(line) > max_chars:
                pieces.append("".join(current))
                current, size = [], 0
            current.append(line)
            size += len(line)
        pieces.append("".join(current))
        continued += [k > first for k in range(first, len(pieces))]
    return pieces, continued


def train_rows(
    docs: Documents, cfg: RunConfig, tokens: FimTokens, separator: int, rank: int = 0, world_size: int = 1
) -> TrainRows:
    """Training rows of ``cfg`` (shuffled per ``packing.shuffle``, forever)."""
    return TrainRows(docs, pack_spec(cfg, tokens, separator), rank, world_size)


def eval_rows(
    docs: Documents, cfg: RunConfig, tokens: FimTokens, separator: int, rank: int = 0, world_size: int = 1
) -> EvalRows:
    """Evaluation rows of ``cfg`` (in stream order, once)."""
    return EvalRows(docs, pack_spec(cfg, tokens, separator, shuffle=False), rank, world_size)
