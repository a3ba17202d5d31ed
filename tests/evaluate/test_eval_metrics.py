"""Infill metrics: exact match, edit similarity, parse rate; scoring a real hole."""

from __future__ import annotations

import pytest

from fimtune.evaluate.holes import Hole, SourceFile
from fimtune.evaluate.infill import edit_similarity, exact_match, held_out_files, parse_rate, score, summarise


def test_exact_match_ignores_whitespace_only():
    assert exact_match("  return   a+b \n", "return a+b")
    assert exact_match("if x:\n\treturn 1\n", "if x:\n    return 1")
    assert not exact_match("return a + b", "return a+b")  # tokens differ, not only whitespace
    assert not exact_match("", "x")


def test_edit_similarity_values():
    assert edit_similarity("abcd", "abcd") == 1.0
    assert edit_similarity("abcd", "wxyz") == 0.0
    assert edit_similarity("abcd", "abce") == pytest.approx(0.75)  # 2 * 3 matches / 8 characters
    assert edit_similarity("ab", "abcd") == pytest.approx(2 * 2 / 6)
    assert edit_similarity("x  =  1", "x = 1") == 1.0


def test_parse_rate_counts_only_checkable_files():
    assert parse_rate([True, True, False, None]) == (2, 3)
    assert parse_rate([None, None]) == (0, 0)


def test_score_and_summary_on_a_real_hole():
    text = "def f(x):\n    y = x + 1\n    return y\n"
    f = SourceFile("f.py", "python", text)
    hole = Hole("line", f, 10, 23)
    assert hole.middle == "    y = x + 1"
    originals = {f.path: True}

    def original(sf):
        return originals[sf.path]

    right, wrong, broken = (score(hole, c, original) for c in ("    y = x + 1", "    y = x - 1", "    y = (x"))
    assert (right["exact_match"], right["parses"]) == (True, True)
    # Whitespace does not change exact match, but a lost indentation breaks the file.
    assert score(hole, "y = x + 1", original)["exact_match"] and not score(hole, "y = x + 1", original)["parses"]
    assert (wrong["exact_match"], wrong["parses"]) == (False, True)
    assert broken["parses"] is False
    s = summarise([right, wrong, broken])
    assert s["exact_match"]["value"] == pytest.approx(1 / 3, abs=1e-4) and s["exact_match"]["n"] == 3
    assert s["parse_rate"]["value"] == pytest.approx(2 / 3, abs=1e-4)
    assert 0.0 <= s["edit_similarity"]["lo"] <= s["edit_similarity"]["value"] <= s["edit_similarity"]["hi"] <= 1.0
    # A file that did not parse to begin with is not counted for the parse rate.
    assert score(hole, "y = x + 1", lambda sf: False)["parses"] is None


def test_held_out_files_skip_empty_files_and_find_languages():
    import datasets

    split = datasets.Dataset.from_dict(
        {"content": ["x = 1\n", "", "s = '<fim_prefix>'\n", "int x;\n"], "file_path": ["a.py", "b.py", "c.py", "d.c"]}
    )
    files = held_out_files(split, "content")
    assert [(f.path, f.language) for f in files] == [("a.py", "python"), ("c.py", "python"), ("d.c", "c")]


def test_held_out_files_read_the_columns_of_hub_datasets():
    """A Hub dataset names its languages its own way ("Python", in `language` or `lang`) and its paths
    in `path`: read raw, no file had a grammar, so the report lost its block holes and parse rates."""
    import datasets

    from fimtune.evaluate.holes import draw_holes

    text = "def f(x):\n    y = x + 1\n    return y\n"
    for columns in (
        {"language": ["Python"], "file_path": ["a"]},
        {"lang": ["Python"], "path": ["a"]},
        {"path": ["a.py"]},
    ):
        files = held_out_files(datasets.Dataset.from_dict({"content": [text], **columns}), "content")
        assert [(f.path, f.language) for f in files] == [(columns.get("file_path", columns.get("path"))[0], "python")]
        assert {h.kind for h in draw_holes(files, 3, 0)} == {"line", "block", "span"}, columns


def test_files_that_share_a_path_are_checked_and_drawn_apart():
    """Two repositories' setup.py: one parses, one (Python 2) does not; each is checked on its own,
    and a hole at the same offsets of each is two holes."""
    from fimtune.evaluate.holes import draw_holes
    from fimtune.evaluate.infill import parse_checker

    py3 = SourceFile("setup.py", "python", "print('a')\n")
    py2 = SourceFile("setup.py", "python", "print 'bb'\n")  # as long: holes at the same offsets
    for order in ([py3, py2], [py2, py3]):
        check = parse_checker()
        assert [check(f) for f in order] == [f is py3 for f in order]
    holes = draw_holes([py3, py2], 2, seed=0, kinds=("line",))
    assert {h.file for h in holes} == {py3, py2}


def test_exact_match_keeps_nesting_and_what_a_span_makes_of_the_code_beside_it():
    """A block whose `return` moved into its loop is another program; a span that lost its leading
    space glues two words; a line that lost its indentation, or tabs for spaces, is the same code."""
    text = "def total(xs):\n    s = 0\n    for x in xs:\n        s += x\n    return s\n"
    start = text.index("for")
    block = Hole("block", SourceFile("t.py", "python", text), start, len(text))
    moved = "for x in xs:\n        s += x\n        return s\n"
    assert score(block, moved, lambda f: True)["exact_match"] is False
    assert score(block, "for x in xs:\n\t\ts += x\n\treturn s\n", lambda f: True)["exact_match"] is True
    span = Hole("span", SourceFile("t.py", "python", text), text.index(" s\n"), text.index(" s\n") + 2)
    assert span.middle == " s"
    assert score(span, "s", lambda f: True)["exact_match"] is False  # "returns"
    assert score(span, " s", lambda f: True)["exact_match"] is True
    line = Hole("line", SourceFile("t.py", "python", text), text.index("    s = 0"), text.index("    s = 0") + 9)
    assert score(line, "s = 0", lambda f: True)["exact_match"] is True


def test_a_block_filled_at_another_depth_is_not_an_exact_match():
    """A block hole starts a line, so only the code beside it shows its depth: the nearest non-blank
    line above and below count, also across a blank line."""
    text = "def total(xs):\n    s = 0\n    for x in xs:\n        a = f(x)\n        if a:\n            s += a\n\n    return s\n"
    start = text.index("        if a:")
    block = Hole("block", SourceFile("t.py", "python", text), start, text.index("\n\n") + 1)
    assert block.middle == "        if a:\n            s += a\n"
    assert score(block, "    if a:\n        s += a\n", lambda f: True)["exact_match"] is False  # out of the loop
    assert score(block, block.middle, lambda f: True)["exact_match"] is True
    assert score(block, "        if a:\n          s += a\n", lambda f: True)["exact_match"] is True  # 2-space body
    text = "def f(xs):\n    for x in xs:\n        y = x * 2\n        s += g(y,\n               x)\n    return s\n"
    start = text.index("        s += g")
    block = Hole("block", SourceFile("t.py", "python", text), start, text.index("    return"))
    deeper = "            s += g(y,\n                   x)\n"  # one level too deep, after a simple statement
    assert score(block, deeper, lambda f: True)["exact_match"] is False
    assert score(block, block.middle, lambda f: True)["exact_match"] is True


def test_paired_exact_match_delta_has_an_interval_when_no_hole_differs():
    """tuned - base exact match over the same holes: Newcombe's square-and-add interval for paired rates,
    not mean ± 1.96 SE of the differences, a point ([+0.000, +0.000]) when base and tuned agree on
    every hole. Checked on the Cavo et al. (2012) table of Fagerland, Lydersen & Laake (ch. 8):
    59 both, 6 only the first, 16 only the second, 80 neither -> -0.0621 (-0.1186 to -0.0046)."""
    from fimtune.evaluate.infill import paired_deltas

    def rows(pairs):
        return [{"exact_match": b, "edit_similarity": 0.5, "parses": None} for b in pairs]

    same = paired_deltas(rows([False] * 9), rows([False] * 9))["exact_match"]
    assert same["value"] == 0.0 and same["lo"] < -0.25 and same["hi"] > 0.25 and same["n"] == 9
    counts = ((True, True, 59), (False, True, 6), (True, False, 16), (False, False, 80))  # (base, tuned, holes)
    base = [b for b, _, n in counts for _ in range(n)]
    tuned = [t for _, t, n in counts for _ in range(n)]
    cavo = paired_deltas(rows(base), rows(tuned))["exact_match"]
    assert (cavo["value"], cavo["lo"], cavo["hi"], cavo["n"]) == pytest.approx((-0.0621, -0.1186, -0.0046, 161))


def test_paired_parse_rate_and_humaneval_deltas_have_intervals():
    """The parse rate's and HumanEval's tuned - base are paired as exact match's is (they printed a bare
    difference): parse rate over the holes that can be checked, pass@1 over the problems, and with
    several samples each problem's pass@k difference."""
    from fimtune.evaluate.humaneval import paired_deltas as humaneval_deltas
    from fimtune.evaluate.infill import paired_deltas
    from fimtune.evaluate.stats import paired_difference

    base = [{"exact_match": False, "edit_similarity": 0.5, "parses": p} for p in (True, False, None, False)]
    tuned = [{"exact_match": False, "edit_similarity": 0.5, "parses": p} for p in (True, True, None, True)]
    parse = paired_deltas(base, tuned)["parse_rate"]
    expected = paired_difference([True, False, False], [True, True, True]).as_dict()
    assert parse == expected and parse["n"] == 3 and parse["value"] == pytest.approx(2 / 3, abs=1e-4)
    one = humaneval_deltas([[False], [True], [False]], [[False], [True], [True]], 1)["pass@1"]
    assert one == paired_difference([False, True, False], [False, True, True]).as_dict() and one["lo"] < 0 < one["hi"]
    several = humaneval_deltas([[False, False], [True, False]], [[True, True], [True, False]], 2)
    assert list(several) == ["pass@1"] and several["pass@1"]["value"] == pytest.approx(0.5)  # (1 - 0) and (0.5 - 0.5)
    assert several["pass@1"]["n"] == 2 and -1.0 <= several["pass@1"]["lo"] <= several["pass@1"]["hi"] <= 1.0


def test_paired_pass_at_k_of_several_samples_has_an_interval_when_no_problem_differs():
    """With several samples, tuned - base pass@k was mean ± 1.96 SE of the problems' differences: a point
    ([+0.000, +0.000]) when base and tuned agree on every problem (all failed: a small model's HumanEval),
    where one sample each gives Newcombe's interval. For 0/1 values it is Newcombe's (negative phi)."""
    from fimtune.evaluate.humaneval import paired_deltas as humaneval_deltas
    from fimtune.evaluate.stats import paired_difference, paired_mean_difference

    one = humaneval_deltas([[False]] * 3, [[False]] * 3, 1)["pass@1"]
    several = humaneval_deltas([[False, False]] * 3, [[False, False]] * 3, 2)["pass@1"]
    assert several["value"] == 0.0 and several["hi"] - several["lo"] > 1.0
    assert (several["lo"], several["hi"]) == pytest.approx((one["lo"], one["hi"]), abs=1e-4)
    base, tuned = [True, False, True, False, False, False], [False, True, True, True, False, True]
    binary = paired_mean_difference([float(b) for b in base], [float(t) for t in tuned])
    assert binary == paired_difference(base, tuned)
