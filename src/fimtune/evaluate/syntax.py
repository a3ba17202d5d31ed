"""Syntax for the infill task: tree-sitter grammars, block candidates, parse checks, truncation.

Python is always available (`tree-sitter-python`); other languages join when their grammar
package is installed (`pip install tree-sitter-javascript`, ...). A *block* is a run of whole
lines that is one syntactic unit: a function body (``unit="body"``: all statements of the
body) or one statement such as an ``if``/``for`` block (``unit="statement"``).
"""

from __future__ import annotations

import ast
import functools
import importlib
from dataclasses import dataclass
from typing import Any

MAX_BLOCK_LINES = 12  # longer blocks are not cut as holes (bounded generation on a CPU)
MIN_BLOCK_LINES = 2  # a one-line statement is the single-line task's business


@dataclass(frozen=True)
class Grammar:
    """Where a language's tree-sitter grammar lives and which of its nodes make block holes."""

    module: str  # import name of the grammar package
    bodies: tuple[str, ...]  # node types whose `body` field's statements make one hole (unit "body")
    statements: tuple[str, ...]  # node types cut whole (unit "statement")
    function: str = "language"  # the module's function returning the language pointer


GRAMMARS: dict[str, Grammar] = {
    "python": Grammar(
        "tree_sitter_python",
        ("function_definition",),
        (
            "if_statement",
            "for_statement",
            "while_statement",
            "with_statement",
            "try_statement",
            "expression_statement",
            "return_statement",
            "raise_statement",
            "assert_statement",
        ),
    ),
    "javascript": Grammar(
        "tree_sitter_javascript",
        ("function_declaration", "method_definition"),
        (
            "if_statement",
            "for_statement",
            "for_in_statement",
            "while_statement",
            "try_statement",
            "expression_statement",
            "return_statement",
            "lexical_declaration",
        ),
    ),
    "go": Grammar(
        "tree_sitter_go",
        ("function_declaration", "method_declaration"),
        ("if_statement", "for_statement", "expression_statement", "return_statement", "short_var_declaration"),
    ),
    "java": Grammar(
        "tree_sitter_java",
        ("method_declaration", "constructor_declaration"),
        (
            "if_statement",
            "for_statement",
            "enhanced_for_statement",
            "while_statement",
            "try_statement",
            "expression_statement",
            "return_statement",
            "local_variable_declaration",
        ),
    ),
    "rust": Grammar(
        "tree_sitter_rust",
        ("function_item",),
        ("expression_statement", "let_declaration"),
    ),
}


@dataclass(frozen=True)
class Block:
    """A block hole candidate: lines ``[first_row, last_row]`` (0-based, inclusive) and its unit."""

    first_row: int
    last_row: int
    unit: str  # "body" | "statement"
    node_type: str
    start_col: int = 0  # tree-sitter columns (bytes) where the block starts and ends
    end_col: int = 0


@functools.cache
def parser_for(language: str) -> Any | None:
    """A tree-sitter parser for ``language``, or None when its grammar is not installed."""
    grammar = GRAMMARS.get(language)
    if grammar is None:
        return None
    try:
        module = importlib.import_module(grammar.module)
        from tree_sitter import Language, Parser
    except ImportError:
        return None
    return Parser(Language(getattr(module, grammar.function)()))


def supported_languages() -> list[str]:
    """Languages whose grammar is installed here (block holes and parse checks)."""
    return [lang for lang in GRAMMARS if parser_for(lang) is not None]


def parses(text: str, language: str) -> bool | None:
    """Whether ``text`` is syntactically valid ``language``; None when no grammar can tell.

    Python is checked with ``ast.parse`` (the interpreter's own grammar), the others with
    tree-sitter (no ERROR or MISSING node).

    >>> parses("def f(x):\\n    return x\\n", "python"), parses("def f(x):\\n    return (x\\n", "python")
    (True, False)
    >>> parses("x", "cobol") is None
    True
    """
    if language == "python":
        try:
            ast.parse(text)
        except (SyntaxError, ValueError, MemoryError, RecursionError):
            return False
        return True
    parser = parser_for(language)
    if parser is None:
        return None
    return not parser.parse(text.encode("utf-8")).root_node.has_error


def block_candidates(text: str, language: str) -> list[Block]:
    """Every block of ``text`` that can be cut as a hole of whole lines.

    A candidate starts at the first non-blank character of its first line, ends at the end
    of its last line and spans MIN_BLOCK_LINES..MAX_BLOCK_LINES lines.

    >>> src = "def f(x):\\n    if x:\\n        y = 1\\n        return y\\n    return 0\\n"
    >>> [(b.first_row, b.last_row, b.unit, b.node_type) for b in block_candidates(src, "python")]
    [(1, 4, 'body', 'function_definition'), (1, 3, 'statement', 'if_statement')]
    """
    parser, grammar = parser_for(language), GRAMMARS.get(language)
    if parser is None or grammar is None:
        return []
    tree = parser.parse(text.encode("utf-8"))
    if tree.root_node.has_error:
        return []
    lines = text.split("\n")
    found: list[Block] = []
    for node in _walk(tree.root_node):
        if node.type in grammar.bodies:
            inner = _body_statements(node)
            if inner:
                found.append(_block(inner[0], inner[-1], "body", node.type))
        elif node.type in grammar.statements and not _is_docstring(node):
            found.append(_block(node, node, "statement", node.type))
    return [b for b in found if _whole_lines(b, lines)]


def _is_docstring(node: Any) -> bool:
    """A statement that is only a string literal (a docstring): prose, not code to infill."""
    kids = node.named_children
    return len(kids) == 1 and kids[0].type in ("string", "string_literal", "template_string")


def _block(first: Any, last: Any, unit: str, node_type: str) -> Block:
    start, end = first.start_point, last.end_point
    return Block(start.row, end.row, unit, node_type, start.column, end.column)


def _walk(node: Any) -> Any:
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(reversed(n.named_children))


def _body_statements(node: Any) -> list[Any]:
    """The nodes inside a definition's body, when they start below its header (else [])."""
    body = node.child_by_field_name("body")
    inner = list(body.named_children) if body is not None else []
    if len(inner) == 1 and inner[0].type == "statement_list":  # tree-sitter-go wraps a block's statements
        inner = list(inner[0].named_children)
    if not inner or inner[0].start_point.row <= node.start_point.row:
        return []
    return inner


def _whole_lines(block: Block, lines: list[str]) -> bool:
    """MIN..MAX_BLOCK_LINES lines, with only blanks before the block's start and after its end.

    Columns are tree-sitter's (bytes), so the lines are compared as UTF-8.
    """
    size = block.last_row - block.first_row + 1
    if not MIN_BLOCK_LINES <= size <= MAX_BLOCK_LINES or block.last_row >= len(lines):
        return False
    before = lines[block.first_row].encode("utf-8")[: block.start_col]
    after = lines[block.last_row].encode("utf-8")[block.end_col :]
    if before.strip() or after.strip():
        return False
    # A line left of the first (a string's or comment's text at column 0) would end the block for
    # the dedent rule that stops generation and scoring (cut_at_dedent): no answer could match.
    inner = lines[block.first_row + 1 : block.last_row + 1]
    if block.unit == "body" and not _dedents_after(block, lines, len(before)):
        return False
    return all(indent_of(line) >= len(before) for line in inner if line.strip())


def _dedents_after(block: Block, lines: list[str], indent: int) -> bool:
    """Whether the first non-blank line after ``block`` (if any) is left of ``indent``: the dedent
    rule tells where a body ends, and a brace language's unindented body has its `}` at its column."""
    below = next((line for line in lines[block.last_row + 1 :] if line.strip()), None)
    return below is None or indent_of(below) < indent


# --------------------------------------------------------------------------------------
# Syntax-aware truncation (SAFIM): keep the first syntactically complete unit
# --------------------------------------------------------------------------------------


def indent_of(line: str) -> int:
    """Width of a line's leading whitespace (a tab counts as one).

    >>> indent_of("    return x"), indent_of("\\treturn"), indent_of("x")
    (4, 1, 0)
    """
    return len(line) - len(line.lstrip(" \t"))


def lines_of(text: str) -> list[str]:
    """``text``'s lines, each with its ``\\n``: split at ``\\n`` only, as tree-sitter counts rows
    (``str.splitlines`` also splits at a form feed, NEL or U+2028 inside a string).

    >>> lines_of("a\\r\\nb\\x0cc\\n  ")
    ['a\\r\\n', 'b\\x0cc\\n', '  ']
    """
    parts = text.split("\n")
    return [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def cut_at_dedent(text: str) -> str:
    """Whole lines of ``text`` up to the first non-blank line indented less than its first line.

    A block's lines never leave its first line's indentation: a dedent starts the suffix's code.

    >>> cut_at_dedent("    a = 1\\n    if a:\\n        b()\\nreturn a\\n")
    '    a = 1\\n    if a:\\n        b()\\n'
    """
    lines = lines_of(text)
    code = [i for i, line in enumerate(lines) if line.strip()]
    if not code:
        return ""
    base = indent_of(lines[code[0]])
    end = next((i for i in code[1:] if indent_of(lines[i]) < base), len(lines))
    return "".join(lines[:end])


def left_block(text: str) -> bool:
    """Whether ``text`` has started a line indented less than its first line (the block is over).

    >>> left_block("    a = 1\\n    b = 2\\n"), left_block("    a = 1\\nre"), left_block("    a = 1\\n  ")
    (False, True, False)
    """
    kept = cut_at_dedent(text)
    return bool(text[len(kept) :].strip())


def first_statement(text: str, language: str) -> str:
    """The whole lines of the first statement of ``text`` (dedented to parse it alone).

    >>> first_statement("    if a:\\n        b()\\n    else:\\n        c()\\n    d()\\n", "python")
    '    if a:\\n        b()\\n    else:\\n        c()\\n'

    When the text does not parse as statements, it is returned unchanged.
    """
    parser = parser_for(language)
    lines = lines_of(text)
    code = [line for line in lines if line.strip()]
    if parser is None or not code:
        return text
    base = indent_of(code[0])
    dedented = "".join(_dedented(line, base) for line in lines)  # one line for each line: rows match
    root = parser.parse(dedented.encode("utf-8")).root_node
    stmts = [c for c in root.named_children if c.type != "comment"]
    if not stmts or stmts[0].has_error or stmts[0].type == "ERROR":
        return text
    return "".join(lines[: stmts[0].end_point.row + 1])


def _dedented(line: str, base: int) -> str:
    """``line`` without ``base`` leading spaces; a blank line stays a line (its newline kept)."""
    if not line.strip():
        return line[len(line.rstrip("\r\n")) :]
    return line[base:] if line[:base].strip() == "" else line


def truncate_block(completion: str, prefix: str, suffix: str, unit: str, language: str) -> str:
    """Keep the first syntactically complete unit of a block completion.

    1. cut at the first line that dedents below the completion's first line (the block ended);
    2. a statement hole keeps its first statement (a body keeps all of its statements);
    3. drop trailing lines until ``prefix + kept + suffix`` parses (never below one line);
       when no whole-line prefix parses, the result of step 2 is kept (ending in a newline).

    >>> prefix, suffix = "def f(x):\\n", "    return y\\n"
    >>> truncate_block("    y = x + 1\\n    return y\\nprint(f(1))\\n", prefix, suffix, "statement", "python")
    '    y = x + 1\\n'
    """
    kept = cut_at_dedent(completion)
    if unit == "statement":
        kept = first_statement(kept, language)
    lines = lines_of(kept)
    for end in range(len(lines), 0, -1):
        candidate = "".join(lines[:end])
        if not candidate.strip():
            break
        if parses(prefix + _with_newline(candidate) + suffix, language):
            return _with_newline(candidate)
    return _with_newline(kept) if kept.strip() else kept


def _with_newline(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"
