r"""Jupyter notebooks -> the code a copilot should learn from.

The recipe's rule (hf-stack-v1): keep code cells only, and drop cells that start with
`!` (shell commands) or contain `%%capture`. Unlike the recipe, which ran cells into
each other, cells are joined by a blank line. Markdown cells may be kept as comments.

    >>> nb = r'''{"metadata": {"kernelspec": {"language": "python"}}, "cells": [
    ...   {"cell_type": "markdown", "source": ["# Title\n", "Some prose"]},
    ...   {"cell_type": "code", "source": "!pip install peft"},
    ...   {"cell_type": "code", "source": ["import peft\n", "print(peft)"]}]}'''
    >>> notebook_to_code(nb)
    ('import peft\nprint(peft)\n', 'python')
    >>> print(notebook_to_code(nb, keep_markdown=True)[0], end="")
    # # Title
    # Some prose
    <BLANKLINE>
    import peft
    print(peft)
"""

from __future__ import annotations

import json
from typing import Any

from fimtune.corpus.languages import canonical_language, line_comment

SHELL_PREFIX = "!"
CAPTURE_MAGIC = "%%capture"
DEFAULT_LANGUAGE = "python"
CELL_SEPARATOR = "\n\n"


class MalformedNotebook(ValueError):
    """The text is not a notebook we can read (bad JSON, no cell list, odd cells)."""


def notebook_to_code(raw: str, keep_markdown: bool = False) -> tuple[str, str]:
    """(code, language) of a notebook's JSON text; raises :class:`MalformedNotebook`.

    Code is "" when no cell is left, so the caller counts the notebook as empty.
    """
    nb = _parse(raw)
    language = notebook_language(nb)
    parts = []
    for cell in nb["cells"]:
        kind, source = _cell(cell)
        if kind == "code" and keep_code_cell(source):
            parts.append(source.strip("\n"))
        elif kind == "markdown" and keep_markdown and source.strip():
            parts.append(as_comment(source.strip("\n"), line_comment(language)))
    code = CELL_SEPARATOR.join(p for p in parts if p.strip())
    try:
        code.encode("utf-8")
    except UnicodeEncodeError:  # JSON escapes (`\\ud83d`) not in pairs: no text is made of them
        raise MalformedNotebook("a cell holds half of a UTF-16 surrogate pair") from None
    return (code + "\n" if code else ""), language


def keep_code_cell(source: str) -> bool:
    """The recipe's rule: no shell cells (`!...`), no `%%capture` cells, no blank cells.

    >>> keep_code_cell("!ls"), keep_code_cell("%%capture\\n!pip install x"), keep_code_cell("x = 1")
    (False, False, True)
    """
    stripped = source.lstrip()
    return bool(stripped) and not stripped.startswith(SHELL_PREFIX) and CAPTURE_MAGIC not in source


def as_comment(text: str, marker: str = "#") -> str:
    """Each line of ``text`` behind a line-comment ``marker`` (blank lines get the bare marker).

    >>> as_comment("Title\\n\\nprose", "//")
    '// Title\\n//\\n// prose'
    """
    return "\n".join(f"{marker} {line}".rstrip() for line in text.split("\n"))


def notebook_language(nb: dict[str, Any]) -> str:
    """The kernel's language (kernelspec, then language_info) as file suffixes name it; `python` by default.

    >>> notebook_language({"metadata": {"language_info": {"name": "R"}}}), notebook_language({})
    ('r', 'python')
    >>> notebook_language({"metadata": {"kernelspec": {"language": "C#"}}})
    'csharp'
    """
    meta = nb.get("metadata") if isinstance(nb.get("metadata"), dict) else {}
    for section, key in (("kernelspec", "language"), ("language_info", "name")):
        value = (meta.get(section) or {}).get(key) if isinstance(meta.get(section), dict) else None
        if isinstance(value, str) and value.strip():
            return canonical_language(value)
    return DEFAULT_LANGUAGE


def _parse(raw: str) -> dict[str, Any]:
    try:
        nb = json.loads(raw)
    except ValueError as e:
        raise MalformedNotebook(f"not JSON: {e}") from None
    except RecursionError:
        raise MalformedNotebook("not JSON that Python reads: nested too deep") from None
    if isinstance(nb, dict) and isinstance(nb.get("worksheets"), list) and "cells" not in nb:
        nb = {**nb, "cells": _worksheet_cells(nb["worksheets"])}
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise MalformedNotebook("no list of cells (nbformat 4, or nbformat 3 worksheets, is expected)")
    return nb


def _worksheet_cells(worksheets: list[Any]) -> list[Any]:
    """The cells of an nbformat 3 notebook (IPython 1-2), its worksheets' in order."""
    cells = []
    for sheet in worksheets:
        if not isinstance(sheet, dict) or not isinstance(sheet.get("cells"), list):
            raise MalformedNotebook("a worksheet has no list of cells")
        cells.extend(sheet["cells"])
    return cells


def _cell(cell: Any) -> tuple[str, str]:
    """(cell_type, source as one string) of a cell; its source (`input` in nbformat 3) may be a list of lines."""
    if not isinstance(cell, dict):
        raise MalformedNotebook("a cell is not an object")
    source = cell.get("source", cell.get("input", ""))  # nbformat 3 code cells hold `input`
    if isinstance(source, list) and all(isinstance(s, str) for s in source):
        source = "".join(source)
    if not isinstance(source, str):
        raise MalformedNotebook("a cell's source is neither text nor a list of lines")
    return str(cell.get("cell_type", "")), source
