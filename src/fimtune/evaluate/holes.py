"""Holes cut deterministically in held-out files: a single line, a block of lines, a character span.

A hole is a character range ``[start, end)`` of a file; the model sees the text around it
(windowed) and writes the middle::

    text    "def f(x):\\n    y = x + 1\\n    return y\\n"
    line    [10, 23)  middle "    y = x + 1"                  (indentation in, newline out)
    block   [10, 37)  middle "    y = x + 1\\n    return y\\n"  (whole lines, unit "body")
    span    [14, 19)  middle "y = x"                           (any characters)

As in the SantaCoder/StarCoder single-line benchmark, a line hole is one non-blank line;
block holes (a function body, an if/for/... statement, a multi-line statement) are found
with tree-sitter (:mod:`fimtune.evaluate.syntax`), spans are uniform random ranges. The
same seed and files always give the same holes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fimtune.evaluate.syntax import Block, block_candidates, parser_for

KINDS = ("line", "block", "span")
LINE_MIN_CHARS = 4  # non-blank characters a line needs to be a hole
SPAN_MIN_CHARS, SPAN_MAX_CHARS = 4, 64  # length of a span hole, drawn uniformly
PREFIX_WINDOW_LINES = 24  # lines of context before the hole that the prompt shows (CPU-sized prompts)
SUFFIX_WINDOW_LINES = 12  # lines of context after it
DRAW_TRIES = 20  # attempts per hole before a kind is given up on
COMPOUND = {
    "if_statement",
    "for_statement",
    "for_in_statement",
    "enhanced_for_statement",
    "while_statement",
    "with_statement",
    "try_statement",
}  # block statements (the others are simple statements)
HOLE_STREAM = 5  # the generator is default_rng([seed, HOLE_STREAM])


@dataclass(frozen=True)
class SourceFile:
    """A held-out file: where it came from, its language (None if unknown) and its text."""

    path: str
    language: str | None
    text: str


@dataclass(frozen=True)
class Hole:
    """The range ``[start, end)`` of ``file.text`` to fill; ``unit`` says how block holes truncate."""

    kind: str  # "line" | "block" | "span"
    file: SourceFile
    start: int
    end: int
    unit: str = ""  # block holes: "body" | "statement"

    @property
    def prefix(self) -> str:
        return self.file.text[: self.start]

    @property
    def middle(self) -> str:
        return self.file.text[self.start : self.end]

    @property
    def suffix(self) -> str:
        return self.file.text[self.end :]

    def window(self, before: int = PREFIX_WINDOW_LINES, after: int = SUFFIX_WINDOW_LINES) -> tuple[str, str]:
        """(prefix, suffix) cut to ``before`` whole lines above the hole and ``after`` below it."""
        return window_prefix(self.prefix, before), window_suffix(self.suffix, after)

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "path": self.file.path, "start": self.start, "end": self.end, "unit": self.unit}


def window_prefix(prefix: str, lines: int) -> str:
    """The end of ``prefix``: its last partial line plus ``lines`` whole lines before it.

    >>> window_prefix("a\\nb\\nc\\n    x = ", 2)
    'b\\nc\\n    x = '
    """
    parts = prefix.split("\n")
    return "\n".join(parts[-(lines + 1) :])


def window_suffix(suffix: str, lines: int) -> str:
    """The start of ``suffix``: its first partial line plus ``lines`` whole lines after it.

    >>> window_suffix(")\\nd\\ne\\nf\\n", 2)
    ')\\nd\\ne'
    """
    parts = suffix.split("\n")
    return "\n".join(parts[: lines + 1])


def line_starts(text: str) -> list[int]:
    """Offset of the first character of every line (lines end at ``\\n``), plus ``len(text) + 1``.

    >>> line_starts("ab\\ncd\\n")
    [0, 3, 6, 7]
    """
    starts = [0]
    for i, ch in enumerate(text):
        if ch == "\n":
            starts.append(i + 1)
    return [*starts, len(text) + 1]


# --------------------------------------------------------------------------------------
# Cutting one hole
# --------------------------------------------------------------------------------------


def cut_line(text: str, rng: np.random.Generator) -> tuple[int, int] | None:
    """A random line with at least LINE_MIN_CHARS non-blank characters: (start, end), newline excluded.

    >>> rng = np.random.default_rng(0)
    >>> text = "import os\\n\\nx = 1\\nyy = 12\\n"
    >>> sorted({text[slice(*cut_line(text, rng))] for _ in range(20)})
    ['import os', 'yy = 12']
    """
    lines = text.split("\n")
    eligible = [i for i, line in enumerate(lines) if len("".join(line.split())) >= LINE_MIN_CHARS]
    if not eligible:
        return None
    row = eligible[int(rng.integers(len(eligible)))]
    start = line_starts(text)[row]
    return start, start + len(lines[row].rstrip("\r"))


def cut_block(text: str, language: str | None, rng: np.random.Generator) -> tuple[int, int, str] | None:
    """A random block of whole lines (tree-sitter): (start, end, unit); None without a grammar or block.

    The category (function body, compound statement, other statement) is drawn first, uniformly
    among those the file has, so that the many ``if`` blocks do not crowd out function bodies.
    """
    if language is None or parser_for(language) is None:
        return None
    groups: dict[str, list[Block]] = {}
    for b in block_candidates(text, language):
        groups.setdefault(_category(b), []).append(b)
    if not groups:
        return None
    group = groups[sorted(groups)[int(rng.integers(len(groups)))]]
    b = group[int(rng.integers(len(group)))]
    starts = line_starts(text)
    return starts[b.first_row], min(starts[b.last_row + 1], len(text)), b.unit


def _category(b: Block) -> str:
    if b.unit == "body":
        return "body"
    return "compound" if b.node_type in COMPOUND else "simple"


def cut_span(text: str, rng: np.random.Generator) -> tuple[int, int] | None:
    """A random character span of SPAN_MIN_CHARS..SPAN_MAX_CHARS holding some non-blank character."""
    if len(text.strip()) < SPAN_MIN_CHARS:
        return None
    for _ in range(DRAW_TRIES):
        length = int(rng.integers(SPAN_MIN_CHARS, min(SPAN_MAX_CHARS, len(text)) + 1))
        start = int(rng.integers(0, len(text) - length + 1))
        if text[start : start + length].strip():
            return start, start + length
    return None


def cut_hole(kind: str, f: SourceFile, rng: np.random.Generator) -> Hole | None:
    """One hole of ``kind`` in file ``f``, or None when the file has none of that kind."""
    if kind == "line":
        cut = cut_line(f.text, rng)
        return None if cut is None else Hole(kind, f, *cut)
    if kind == "block":
        block = cut_block(f.text, f.language, rng)
        return None if block is None else Hole(kind, f, *block)
    if kind == "span":
        cut = cut_span(f.text, rng)
        return None if cut is None else Hole(kind, f, *cut)
    raise ValueError(f"unknown hole kind {kind!r} (kinds: {', '.join(KINDS)})")


# --------------------------------------------------------------------------------------
# Drawing a benchmark
# --------------------------------------------------------------------------------------


def draw_holes(files: list[SourceFile], n: int, seed: int, kinds: tuple[str, ...] = KINDS) -> list[Hole]:
    """``n`` distinct holes, the kinds in turn (line, block, span, line, ...), files drawn uniformly.

    Block holes come only from files with an installed grammar; when no file offers a kind,
    its turns go to the other kinds. Deterministic in (files, n, seed).
    """
    rng = np.random.default_rng([seed, HOLE_STREAM])
    holes: list[Hole] = []
    seen: set[tuple[SourceFile, int, int]] = set()  # by file, not path: repositories share paths
    pools = {k: _pool(files, k) for k in kinds}
    live = [k for k in kinds if pools[k]]
    turn = 0
    while len(holes) < n and live:
        kind = live[turn % len(live)]
        hole = _draw_one(kind, pools[kind], rng, seen)
        if hole is None:
            live.remove(kind)
            continue
        seen.add((hole.file, hole.start, hole.end))
        holes.append(hole)
        turn += 1
    return holes


def _pool(files: list[SourceFile], kind: str) -> list[SourceFile]:
    """The files a hole of ``kind`` is drawn from: for blocks, those with a block to cut (a package's
    many `__init__.py` files would otherwise use up the draws, and the kind be given up on)."""
    if kind == "block":
        return [
            f
            for f in files
            if f.language is not None and parser_for(f.language) is not None and block_candidates(f.text, f.language)
        ]
    return files


def _draw_one(
    kind: str, pool: list[SourceFile], rng: np.random.Generator, seen: set[tuple[SourceFile, int, int]]
) -> Hole | None:
    for _ in range(DRAW_TRIES):
        hole = cut_hole(kind, pool[int(rng.integers(len(pool)))], rng)
        if hole is not None and (hole.file, hole.start, hole.end) not in seen:
            return hole
    return None
