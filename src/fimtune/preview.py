"""`fimtune data inspect`: packed FIM samples of a dataset, decoded, exactly as training will see them.

dataset folder -> tokenizer (+ the FIM tokens training will add) -> tokens (cached)
    -> FIM + packing with the run config's fim, packing and seed (epoch 0)
    -> a summary, then n rows decoded with the FIM tokens highlighted
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fimtune.config import DataConfig, RunConfig
from fimtune.errors import DataError

ANSI = {"prefix": "1;36", "suffix": "1;35", "middle": "1;33", "separator": "2;37"}  # bold cyan/magenta/yellow, dim
ANSI_RESET = "\x1b[0m"
BRACKETS = "⟦{}⟧"
RULE = "─" * 3


def inspect_dataset(
    path: Path, model: str, n: int, cfg: RunConfig, split: str = "train", *, color: bool | None = None
) -> str:
    """The `data inspect` report: summary lines, then ``n`` packed rows of ``split`` decoded.

    FIM tokens are coloured when ``color`` (default: stdout is a terminal), else bracketed
    like ``⟦<fim_prefix>⟧``. The train split shows training's first rows (shuffled, epoch 0);
    other splits show evaluation's rows, in order.
    """
    from fimtune.hub import load_tokenizer
    from fimtune.packing import documents, eval_rows, train_rows
    from fimtune.tokens import document_separator_id, ensure_fim_tokens, find_fim_tokens, missing_fim_tokens

    ds = load_split(Path(path), split, cfg.data.text_column)
    tokenizer = copy.deepcopy(load_tokenizer(model))  # the cached one must not gain tokens
    to_add = missing_fim_tokens(tokenizer)
    fim_tokens, _ = ensure_fim_tokens(tokenizer)
    separator = document_separator_id(tokenizer)
    docs = documents(ds, tokenizer, cfg, cfg.data.text_column)
    rows = (
        train_rows(docs, cfg, fim_tokens, separator)
        if split == "train"
        else eval_rows(docs, cfg, fim_tokens, separator)
    )
    packed = rows.packed(0) if split == "train" else rows.packed
    names = find_fim_tokens(tokenizer)
    marks = _marks(tokenizer, names, fim_tokens, separator)
    color = sys.stdout.isatty() if color is None else color
    fim_line = _fim_tokens_line(tokenizer, to_add, names)
    lines = _summary(
        f"{path} [{split}]: {len(ds):,} documents",
        f"{model}: {fim_line}",
        f"{marks[separator][1]} (id {separator})",
        docs,
        cfg,
        packed,
    )
    if split == "train" and cfg.packing.shuffle:
        lines[-1] += "; rows shuffled"
    for k in range(min(n, len(packed))):
        ids, starts = packed.row(k)["input_ids"], _row_starts_document(k, packed)
        lines += ["", _row_title(k, n, packed), render_ids(ids, tokenizer, marks, color, starts=starts)]
    return "\n".join(lines)


def load_split(path: Path, split: str, column: str = "content") -> Any:
    """Split ``split`` of a `fimtune data build` folder (a DataError naming the folder otherwise)."""
    from fimtune.corpus.sources import TABLE_SUFFIXES
    from fimtune.dataset import load_splits

    if path.is_file():
        build = f"{path} --out data/{path.stem}" if path.suffix.lower() in TABLE_SUFFIXES else "SOURCE --out DIR"
        raise DataError(f"'{path}' is a file, not a dataset folder: build one with `fimtune data build {build}`")
    if not path.is_dir():
        raise DataError(
            f"dataset folder '{path}' does not exist: build one with `fimtune data build SOURCE --out {path}`"
        )
    splits = load_splits(DataConfig(path=str(path), text_column=column))
    if split not in splits:
        raise DataError(f"dataset '{path}' has no split '{split}' (splits: {', '.join(splits)}); pass --split")
    return splits[split]


def _summary(dataset: str, model: str, separator: str, docs: Any, cfg: RunConfig, packed: Any) -> list[str]:
    s, n_tokens = packed.stats, int(docs.offsets[-1])
    pct = 100 * s.fim / max(1, s.documents)
    units = "pieces" if cfg.fim.piece_tokens else "documents"  # what FIM and packing count
    pieces = f" ({s.documents:,} pieces, fim.piece_tokens {cfg.fim.piece_tokens})" if cfg.fim.piece_tokens else ""
    lines = [
        f"dataset    {dataset}{pieces}, {n_tokens:,} tokens, {docs.chars / max(1, n_tokens):.2f} chars per token",
        f"model      {model}",
        f"separator  {separator} after every {units[:-1]}",
        f"FIM        fim_rate {cfg.fim.fim_rate}, spm_rate {cfg.fim.spm_rate}, unit {cfg.fim.unit}, "
        f"spans {cfg.fim.spans}{f', line_end_rate {cfg.fim.line_end_rate}' if cfg.fim.line_end_rate else ''}, "
        f"seed {cfg.seed}, epoch 0: {s.fim:,} of {s.documents:,} {units} FIM'd ({pct:.1f}%): "
        f"SPM {s.spm:,}, PSM {s.psm:,}; plain {s.plain:,}",
        f"packing    {cfg.packing.mode}, seq_length {packed.seq_length}: {s.rows:,} rows, "
        f"{s.tail:,} tail tokens dropped (of {s.tokens:,} after FIM and separators)",
    ]
    if s.rows == 0:
        lines.insert(
            len(lines) - 1,
            f"note       no full row: {s.tokens:,} tokens < seq_length {packed.seq_length}; "
            "add data or lower it, e.g. packing.seq_length=512",
        )
    return lines


def _marks(tokenizer: Any, names: Any, fim_tokens: Any, separator: int) -> dict[int, tuple[str, str]]:
    """Token id -> (kind, name) for the ids to highlight."""
    return {
        fim_tokens.prefix: ("prefix", names.prefix),
        fim_tokens.suffix: ("suffix", names.suffix),
        fim_tokens.middle: ("middle", names.middle),
        separator: ("separator", tokenizer.convert_ids_to_tokens(separator)),
    }


def _fim_tokens_line(tokenizer: Any, to_add: list[str], names: Any) -> str:
    vocab = tokenizer.get_vocab()
    if to_add:
        ids = ", ".join(f"{t}={vocab[t]}" for t in to_add)
        return f"no FIM tokens in its vocabulary; training WILL ADD {len(to_add)} special tokens: {ids}"
    found = ", ".join(f"{t}={vocab[t]}" for t in names.names())
    return f"FIM tokens of the {names.family} family: {found}"


def _row_title(k: int, n: int, packed: Any) -> str:
    start = int(packed.order[k]) * packed.seq_length
    starts = packed.doc_starts
    inside = int(((starts >= start) & (starts < start + packed.seq_length)).sum())
    return f"{RULE} sample {k + 1} of {min(n, len(packed))}: row {int(packed.order[k])} of {len(packed)}, {inside} document start(s) {RULE}"


def _row_starts_document(k: int, packed: Any) -> bool:
    """Whether the k-th row served begins with a document's first token (else inside a document)."""
    start = int(packed.order[k]) * packed.seq_length
    i = int(np.searchsorted(packed.doc_starts, start))
    return i < len(packed.doc_starts) and int(packed.doc_starts[i]) == start


def render_ids(
    ids: np.ndarray, tokenizer: Any, marks: dict[int, tuple[str, str]], color: bool, *, starts: bool = True
) -> str:
    """Decode ``ids``, showing each marked id (FIM tokens, separator) as a highlighted name.

    A run of text that starts a text (a row's first when ``starts``: the row begins a document;
    after a separator; a prefix: PSM's after its mark, SPM's after the middle mark) decodes as a
    text; the others (a suffix, PSM's middle, the first run of a row that begins inside a document)
    go on from text before them, as training encoded them, so they decode with their leading spaces
    (a SentencePiece-style decoder drops a text's first space).
    """
    from fimtune.tokenization import continuation_text_backend

    going_on = continuation_text_backend(tokenizer)
    out: list[str] = []
    run: list[int] = []
    last, spm = None, False  # the last mark's kind; whether this example is laid out SPM

    def flush() -> None:
        if run:
            begins = (last is None and starts) or last in ("separator", "prefix") or (last == "middle" and spm)
            out.append(
                tokenizer.decode(run, clean_up_tokenization_spaces=False)  # code's spaces as they are
                if begins
                else going_on.decode(run, skip_special_tokens=False)
            )
            run.clear()

    for t in np.asarray(ids).tolist():
        if t not in marks:
            run.append(t)
            continue
        kind, name = marks[t]
        laid_out_spm = kind == "suffix" and last == "prefix" and not run  # <PRE><SUF>: SPM
        flush()
        spm, last = laid_out_spm or (spm and kind != "prefix"), kind
        out.append(f"\x1b[{ANSI[kind]}m{name}{ANSI_RESET}" if color else BRACKETS.format(name))
    flush()
    return "".join(out)
