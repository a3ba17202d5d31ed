"""Hole cutting on real Python source: determinism, the three kinds, windows; syntax-aware truncation."""

from __future__ import annotations

import ast

import numpy as np
import pytest
from eval_helpers import whole_files

from fimtune.evaluate.holes import (
    SPAN_MAX_CHARS,
    SPAN_MIN_CHARS,
    SourceFile,
    cut_block,
    cut_line,
    draw_holes,
)
from fimtune.evaluate.syntax import MAX_BLOCK_LINES, block_candidates, left_block, parses, truncate_block


@pytest.fixture(scope="module")
def files():
    return [SourceFile(f"mod{i}.py", "python", text) for i, text in enumerate(whole_files())]


def test_holes_are_deterministic_and_of_every_kind(files):
    a, b = draw_holes(files, 30, seed=0), draw_holes(files, 30, seed=0)
    assert [h.describe() for h in a] == [h.describe() for h in b]
    assert [h.describe() for h in draw_holes(files, 30, seed=1)] != [h.describe() for h in a]
    assert [h.kind for h in a[:6]] == ["line", "block", "span"] * 2
    assert len({(h.file.path, h.start, h.end) for h in a}) == 30  # distinct
    for h in a:  # prefix + middle + suffix is the file, whatever the kind
        assert h.prefix + h.middle + h.suffix == h.file.text and h.middle.strip()


def test_line_holes_are_one_whole_line(files):
    for h in (h for h in draw_holes(files, 30, seed=2) if h.kind == "line"):
        assert "\n" not in h.middle
        assert h.prefix == "" or h.prefix.endswith("\n")
        assert h.suffix == "" or h.suffix.startswith("\n")


def test_block_holes_are_whole_lines_of_one_syntactic_unit(files):
    blocks = [h for h in draw_holes(files, 60, seed=3) if h.kind == "block"]
    assert {h.unit for h in blocks} == {"body", "statement"}
    for h in blocks:
        assert h.prefix.endswith("\n") and h.middle.endswith("\n")
        assert 2 <= h.middle.count("\n") <= MAX_BLOCK_LINES
        lines = h.middle.splitlines()
        indent = len(lines[0]) - len(lines[0].lstrip())
        # The hole, dedented, is valid Python on its own: a complete unit.
        ast.parse("\n".join(line[indent:] for line in lines))


def test_block_candidates_find_bodies_and_compound_statements():
    src = (
        "def f(xs):\n"
        "    total = 0\n"
        "    for x in xs:\n"
        "        if x > 0:\n"
        "            total += x\n"
        "    return total  # done\n"
        "\n"
        "def g(): return 1\n"
    )
    found = {(b.node_type, b.first_row, b.last_row) for b in block_candidates(src, "python")}
    # The body of f, the for block, the if block; the one-line g and the commented last line are not cut.
    assert ("for_statement", 2, 4) in found and ("if_statement", 3, 4) in found
    assert not any(row == 7 for _, row, _ in found)
    assert block_candidates("def f(:\n    pass\n", "python") == []  # files that do not parse give no block
    assert cut_block(src, "cobol", np.random.default_rng(0)) is None


def test_span_holes_have_bounded_length(files):
    spans = [h for h in draw_holes(files, 60, seed=4) if h.kind == "span"]
    assert spans and all(SPAN_MIN_CHARS <= len(h.middle) <= SPAN_MAX_CHARS for h in spans)


def test_window_keeps_lines_near_the_hole(python_source):
    f = SourceFile("textwrap.py", "python", python_source)
    start, end = cut_line(python_source, np.random.default_rng(7))
    from fimtune.evaluate.holes import Hole

    prefix, suffix = Hole("line", f, start, end).window(before=3, after=2)
    assert python_source[:start].endswith(prefix) and prefix.count("\n") <= 3
    assert python_source[end:].startswith(suffix) and suffix.count("\n") <= 2


def test_files_without_grammar_give_line_and_span_holes_only():
    f = SourceFile("notes.txt", None, "first line of text\nsecond line here\nthird one\n" * 5)
    kinds = {h.kind for h in draw_holes([f], 9, seed=0)}
    assert kinds == {"line", "span"}


# --------------------------------------------------------------------------------------
# Syntax-aware truncation
# --------------------------------------------------------------------------------------

PREFIX = "def total(xs):\n    s = 0\n"
SUFFIX = "    return s\n\nprint(total([1, 2]))\n"


def test_truncation_keeps_the_first_statement_of_a_statement_hole():
    gen = "    for x in xs:\n        s += x\n    return s\n\nprint(total([1, 2]))\n"
    assert truncate_block(gen, PREFIX, SUFFIX, "statement", "python") == "    for x in xs:\n        s += x\n"


@pytest.mark.parametrize("blank", ["\n", "  \n", "\r\n"])
def test_a_statement_with_a_blank_line_is_kept_whole(blank):
    """A blank line shorter than the statement's indent stays a line when the statement is parsed
    alone, so its rows still match the text's: a perfect answer is kept whole."""
    statement = f"    for x in xs:\n        y = x + 1\n{blank}        s += y\n"
    assert truncate_block(statement + SUFFIX, PREFIX, SUFFIX, "statement", "python") == statement


def test_truncation_keeps_a_whole_body_and_stops_at_the_dedent():
    prefix, suffix = "def total(xs):\n", "\nprint(total([1, 2]))\n"
    gen = "    s = 0\n    for x in xs:\n        s += x\n    return s\ndef other():\n    pass\n"
    assert (
        truncate_block(gen, prefix, suffix, "body", "python")
        == "    s = 0\n    for x in xs:\n        s += x\n    return s\n"
    )


def test_truncation_drops_an_unfinished_last_line():
    gen = "    for x in xs:\n        s += x\n        s += (x"
    kept = truncate_block(gen, PREFIX, SUFFIX, "statement", "python")
    assert kept == "    for x in xs:\n        s += x\n"
    assert parses(PREFIX + kept + SUFFIX, "python")


def test_truncation_keeps_the_text_when_nothing_parses():
    gen = "    for x in xs\n        s += x\n"  # a syntax error on the first line
    assert truncate_block(gen, PREFIX, SUFFIX, "statement", "python") == gen


def test_block_holes_come_from_the_files_that_have_blocks():
    """A package's many `__init__.py` files have no block to cut: block holes are drawn from the
    files that have one, so the kind is not given up on after a run of misses."""
    core = SourceFile(
        "pkg/core.py",
        "python",
        "def f(x):\n    if x:\n        y = x + 1\n        return y\n    return 0\n\n"
        "def g(xs):\n    for x in xs:\n        print(x)\n    return len(xs)\n",
    )
    inits = [
        SourceFile(f"pkg/m{i}/__init__.py", "python", f"from .m import t{i}\n__all__ = ['t{i}']\n") for i in range(30)
    ]
    for seed in range(10):
        kinds = [h.kind for h in draw_holes([core, *inits], 12, seed)]
        assert kinds.count("block") >= 3, (seed, kinds)  # core.py has 4 blocks


def test_no_block_hole_holds_a_line_left_of_its_first():
    """A string's text at column 0 inside a block would end it for the dedent rule that stops
    generation and scoring, so no answer could match: such blocks are not cut."""
    text = 'def f(x):\n    if x:\n        msg = """\\\nhello\n"""\n        return msg\n    return 0\n'
    assert parses(text, "python")
    blocks = block_candidates(text, "python")
    assert all(not b.first_row < 3 <= b.last_row for b in blocks), blocks
    assert block_candidates("def f(x):\n    if x:\n        y = 1\n        return y\n    return 0\n", "python")


def test_go_function_bodies_are_block_holes():
    """tree-sitter-go wraps a block's statements in a `statement_list`: a body is its statements,
    not the list (which ends on the closing brace's line, so no Go body was ever cut)."""
    pytest.importorskip("tree_sitter_go")
    text = (
        'package main\n\nimport "fmt"\n\n'
        "// Größe returns the size of a name.\n"
        "func Größe(name string) int {\n"
        "\tn := len(name)\n"
        "\tif n > 10 {\n"
        '\t\tfmt.Println("lang: «", name, "»")\n'
        "\t\treturn n * 2\n"
        "\t}\n"
        "\treturn n\n"
        "}\n"
    )
    blocks = [(b.first_row, b.last_row, b.unit) for b in block_candidates(text, "go")]
    assert (6, 11, "body") in blocks, blocks
    assert (7, 10, "statement") in blocks, blocks


@pytest.mark.parametrize("separator", ["\x0c", "\x85", "\u2028"])
def test_a_line_separator_inside_a_string_does_not_end_a_block(separator):
    """Lines end at `\\n` only, as tree-sitter counts rows: `str.splitlines` also splits at a form
    feed, NEL or U+2028 inside a string, whose text then looked dedented and ended the block."""
    prefix, suffix = "def f(x):\n", "    return 0\n"
    middle = f'    if x:\n        s = "a{separator}b"\n        return s\n'
    assert parses(prefix + middle + suffix, "python")
    assert not left_block(middle)
    assert truncate_block(middle + suffix + "print(f(1))\n", prefix, suffix, "statement", "python") == middle


def test_a_body_not_indented_past_its_closing_brace_is_not_cut():
    """A body ends where the dedent rule (cut_at_dedent) says: an unindented body in a brace language
    (a UMD wrapper's functions) has its `}` at its own column, so an answer that goes on past the
    body was kept whole up to some later line that still parses, and a right body scored wrong."""
    pytest.importorskip("tree_sitter_javascript")
    text = (
        "(function () {\n'use strict';\n\n"
        "function sum(xs) {\nvar s = 0;\nfor (var i = 0; i < xs.length; i++) {\n  s += xs[i];\n}\nreturn s;\n}\n\n"
        "function twice(x) {\nreturn sum([x, x]);\n}\n\nmodule.exports = { sum: sum, twice: twice };\n})();\n"
    )
    blocks = [(b.first_row, b.last_row, b.unit) for b in block_candidates(text, "javascript")]
    assert blocks == [(5, 7, "statement")]  # the `for` statement; not sum's body (rows 4..8)
    indented = text.replace("\nvar s", "\n  var s").replace("\nfor", "\n  for").replace("  s +=", "    s +=")
    indented = indented.replace("\n}\nreturn s;", "\n  }\n  return s;")
    assert (4, 8, "body") in [(b.first_row, b.last_row, b.unit) for b in block_candidates(indented, "javascript")]
