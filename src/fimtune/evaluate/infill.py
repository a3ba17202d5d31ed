"""The infill task: holes in held-out files, filled by base and tuned, greedy, scored three ways.

For each hole (:mod:`fimtune.evaluate.holes`) the prompt is the model's FIM format around a
window of the file; generation is greedy and stops at end-of-text or any FIM token. Then:

- line holes keep the text before the first newline (single-line mode);
- block holes keep their first syntactically complete unit (:func:`~fimtune.evaluate.syntax.truncate_block`);
- span holes keep the text as generated.

Metrics, per hole kind and over all holes (the SantaCoder/StarCoder FIM benchmark reports
exact match; edit similarity and parse rate follow CodeXGLUE and SAFIM):

- exact match of the hole's lines filled (from the start of its first line to the end of its
  last: a span glued to the code beside it differs) after layout normalisation (each line's
  indentation as its nesting level, other whitespace runs as one space, blank lines dropped:
  a block whose statements moved in or out of a loop differs, a tab for four spaces does not);
- edit similarity ``difflib.SequenceMatcher.ratio`` on the normalised completion and reference
  (1 = identical);
- parse rate: the share of filled files (the whole file with the completion in the hole) that
  still parse, among holes in files of a language with a parser whose original text parses.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from fimtune.errors import FimtuneError
from fimtune.evaluate.holes import KINDS, LINE_MIN_CHARS, SPAN_MIN_CHARS, Hole, SourceFile, draw_holes
from fimtune.evaluate.stats import mean_estimate, paired_difference, proportion
from fimtune.evaluate.syntax import cut_at_dedent, left_block, parser_for, parses, truncate_block
from fimtune.evaluate.variants import VARIANTS, generate, variant
from fimtune.generate import FimPrompter, GenerationParams

MAX_NEW_TOKENS = {"line": 48, "block": 128, "span": 48}  # bounded: holes are at most 12 lines
MAX_INPUT_TOKENS = 384  # the windowed prompt is cut to this many tokens (far ends first): CPU-sized
ALL = "all"


def normalise(text: str) -> str:
    """``text``'s layout reduced to what changes its meaning in most languages: each non-blank
    line's indentation becomes its nesting level (the rank of its width among the text's widths,
    a tab counting 4 columns), its other whitespace runs one space; blank lines are dropped.

    >>> normalise("  if x:\\n\\t  return  y \\n\\n  z()\\n")
    'if x:\\n  return y\\nz()'
    """
    lines = [line.expandtabs(4).rstrip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    widths = [len(line) - len(line.lstrip()) for line in lines]
    level = {w: i for i, w in enumerate(sorted(set(widths)))}
    return "\n".join("  " * level[w] + " ".join(line.split()) for line, w in zip(lines, widths, strict=True))


def exact_match(prediction: str, reference: str) -> bool:
    """Equal after :func:`normalise`.

    >>> exact_match("return  x\\n", "    return x"), exact_match("return x", "return y")
    (True, False)
    >>> exact_match("for x in xs:\\n    s += x\\nreturn s", "for x in xs:\\n    s += x\\n    return s")
    False
    """
    return normalise(prediction) == normalise(reference)


def filled_lines(hole: Hole, completion: str) -> str:
    """The lines of ``hole`` with ``completion`` in it: from the start of the hole's first line
    to the end of its last, so that what the completion makes of the code beside it counts. A
    block's lines start at a line start, so for a block also the nearest non-blank line above and
    below it: they show its depth, and a block filled at another depth differs."""
    text = hole.file.text
    start = text.rfind("\n", 0, hole.start) + 1
    end = hole.end
    if hole.kind == "block":
        above = text[:start].rstrip()
        start = text.rfind("\n", 0, len(above)) + 1 if above else 0
        end = len(text) - len(text[end:].lstrip())  # the next non-blank line's first character
    end = text.find("\n", end)
    return text[start : hole.start] + completion + text[hole.end : len(text) if end < 0 else end]


def edit_similarity(prediction: str, reference: str) -> float:
    """``difflib`` ratio (2·matches / total length) of the normalised texts; 1.0 when both are empty.

    >>> edit_similarity("return x", "return x"), round(edit_similarity("return x", "return y"), 4)
    (1.0, 0.875)
    >>> edit_similarity("", "")
    1.0
    """
    a, b = normalise(prediction), normalise(reference)
    if not a and not b:
        return 1.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def parse_rate(filled: list[bool | None]) -> tuple[int, int]:
    """(files that parse, files that could be checked): None marks a hole that cannot be checked.

    >>> parse_rate([True, False, None, True])
    (2, 3)
    """
    checked = [p for p in filled if p is not None]
    return sum(checked), len(checked)


def postprocess(hole: Hole, text: str) -> str:
    """The completion as scored: single line, first complete block unit, or as generated."""
    if hole.kind == "line":
        return text.split("\n", 1)[0]
    if hole.kind == "block":
        lang = hole.file.language
        if lang is not None and parser_for(lang) is not None:
            return truncate_block(text, hole.prefix, hole.suffix, hole.unit, lang)
        return cut_at_dedent(text)
    return text


def filled_parses(hole: Hole, completion: str, original_parses: Callable[[SourceFile], bool | None]) -> bool | None:
    """Whether the file with ``completion`` in the hole parses; None when that cannot be told."""
    lang = hole.file.language
    if lang is None or original_parses(hole.file) is not True:
        return None
    return parses(hole.prefix + completion + hole.suffix, lang)


def parse_checker() -> Callable[[SourceFile], bool | None]:
    """Whether a file parses as it is (None: no grammar for its language), each file checked once.
    Files are told apart by their text too, not by path alone: repositories share paths (setup.py)."""
    cache: dict[SourceFile, bool | None] = {}

    def original_parses(f: SourceFile) -> bool | None:
        if f not in cache:
            cache[f] = parses(f.text, f.language) if f.language else None
        return cache[f]

    return original_parses


def score(hole: Hole, completion: str, original_parses: Callable[[SourceFile], bool | None]) -> dict[str, Any]:
    return {
        "exact_match": exact_match(filled_lines(hole, completion), filled_lines(hole, hole.middle)),
        "edit_similarity": edit_similarity(completion, hole.middle),
        "parses": filled_parses(hole, completion, original_parses),
    }


def summarise(scores: list[dict[str, Any]]) -> dict[str, dict[str, object]]:
    """Exact match and parse rate (Wilson intervals), edit similarity (mean ± 1.96 SE)."""
    ok, checked = parse_rate([s["parses"] for s in scores])
    return {
        "exact_match": proportion(sum(s["exact_match"] for s in scores), len(scores)).as_dict(),
        "edit_similarity": mean_estimate([s["edit_similarity"] for s in scores], bounds=(0.0, 1.0)).as_dict(),
        "parse_rate": proportion(ok, checked).as_dict(),
    }


def paired_deltas(base: list[dict[str, Any]], tuned: list[dict[str, Any]]) -> dict[str, dict[str, object]]:
    """tuned - base over the same holes, so the pairs cancel noise: exact match and parse rate with
    Newcombe's interval for paired rates (parse rate over the holes that can be checked: the same for
    both, as the file decides), edit similarity per hole with mean ± 1.96 SE."""
    pairs = list(zip(base, tuned, strict=True))
    checked = [(b["parses"], t["parses"]) for b, t in pairs if b["parses"] is not None and t["parses"] is not None]
    return {
        "exact_match": paired_difference([b["exact_match"] for b in base], [t["exact_match"] for t in tuned]).as_dict(),
        "edit_similarity": mean_estimate([t["edit_similarity"] - b["edit_similarity"] for b, t in pairs]).as_dict(),
        "parse_rate": paired_difference([b for b, _ in checked], [t for _, t in checked]).as_dict(),
    }


def complete_holes(
    model: Any, prompter: FimPrompter, holes: list[Hole], mode: str, batch_size: int, progress: Any = None
) -> list[str]:
    """Post-processed completions of ``holes``, kind by kind (each kind has its own limits)."""
    out = [""] * len(holes)
    for kind in KINDS:
        idx = [i for i, h in enumerate(holes) if h.kind == kind]
        if not idx:
            continue
        params = GenerationParams(
            max_new_tokens=MAX_NEW_TOKENS[kind],
            single_line=kind == "line",
            mode=mode,
            max_input_tokens=MAX_INPUT_TOKENS,
        )
        stop = left_block if kind == "block" else None
        done = generate(model, prompter, [holes[i].window() for i in idx], params, batch_size, progress, stop)
        for i, c in zip(idx, done, strict=True):
            out[i] = postprocess(holes[i], c.text)
    return out


def evaluate(
    model: Any,
    prompter: FimPrompter,
    files: list[SourceFile],
    n_holes: int,
    seed: int,
    batch_size: int,
    mode: str = "psm",
    progress: Callable[[str, int, int], Any] | None = None,
) -> dict[str, Any]:
    """Cut ``n_holes`` holes in ``files``, fill them with base and tuned, score and summarise.

    Returns ``{"holes", "mode", "kinds": {kind|all: {"n", "base", "tuned", "delta"}}, "samples"}``.
    """
    holes = draw_holes(files, n_holes, seed)
    if not holes:  # a report without a figure would pass for one of no difference
        raise FimtuneError(
            f"no infill hole could be cut in the {len(files)} validation file(s): a line hole needs a line of "
            f"{LINE_MIN_CHARS} non-blank characters, a span {SPAN_MIN_CHARS}: add longer validation files"
        )
    original_parses = parse_checker()

    completions, scores = {}, {}
    for name in VARIANTS:
        tick = (lambda k, name=name: progress(name, k, len(holes))) if progress else None
        with variant(model, name):
            completions[name] = complete_holes(model, prompter, holes, mode, batch_size, tick)
        scores[name] = [score(h, c, original_parses) for h, c in zip(holes, completions[name], strict=True)]
    kinds = {}
    for kind in (*KINDS, ALL):
        idx = [i for i, h in enumerate(holes) if kind in (ALL, h.kind)]
        if not idx:
            continue
        base, tuned = [scores["base"][i] for i in idx], [scores["tuned"][i] for i in idx]
        kinds[kind] = {
            "n": len(idx),
            "base": summarise(base),
            "tuned": summarise(tuned),
            "delta": paired_deltas(base, tuned),
        }
    samples = [
        {**h.describe(), "middle": h.middle, **{f"{v}_completion": completions[v][i] for v in VARIANTS},
         **{f"{v}_{m}": scores[v][i][m] for v in VARIANTS for m in ("exact_match", "parses")}}
        for i, h in enumerate(holes)
    ]  # fmt: skip
    return {"holes": len(holes), "mode": mode, "kinds": kinds, "samples": samples}


def held_out_files(split: Any, text_column: str) -> list[SourceFile]:
    """The split's non-empty files as :class:`SourceFile`.

    Paths and languages come from the columns `fimtune data build` reads in a Hub dataset
    (`file_path`/`path`/..., `language`/`lang`), languages named as the grammars name them
    ("Python" -> "python"), else from the file name. Code that spells a special token
    (``<fim_prefix>``...) stays: prompts encode code as plain text.
    """
    from fimtune.corpus.languages import canonical_language, language_of
    from fimtune.corpus.sources import LANGUAGE_COLUMNS, PATH_COLUMNS

    columns = split.column_names
    texts = split[text_column]
    path_column = next((c for c in PATH_COLUMNS if c in columns), None)
    paths = split[path_column] if path_column else [f"file{i}" for i in range(len(texts))]
    language_column = next((c for c in LANGUAGE_COLUMNS if c in columns), None)
    langs = split[language_column] if language_column else [None] * len(texts)
    return [
        SourceFile(str(path), canonical_language(lang) if lang else language_of(str(path)), text)
        for path, lang, text in zip(paths, langs, texts, strict=True)
        if text and text.strip()
    ]
