"""FIM permutations: layouts token by token, the recipe's draw order, inversion, rates, spans, char unit."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fimtune.fim import (
    FimTokens,
    cut_text,
    draw_cut,
    draw_cuts,
    permute,
    permute_array,
    permute_text,
    text_line_starts,
    token_line_starts,
    unpermute,
)
from fimtune.tokenization import encode_batch

T = FimTokens(prefix=1, middle=2, suffix=3, pad=4)
P, M, S = T.prefix, T.middle, T.suffix
N_RATE_DOCS = 10_000


class ScriptedRng:
    """Stands in for a numpy Generator: replays scripted draws and records the calls made."""

    def __init__(self, *draws):
        self.draws, self.calls = list(draws), []

    def random(self):
        self.calls.append("random")
        return self.draws.pop(0)

    def integers(self, low, high, size):
        self.calls.append(("integers", low, high, size))
        return np.array(self.draws.pop(0))


def random_docs(rng: np.random.Generator, n: int, max_len: int = 40) -> list[list[int]]:
    """Documents of ids >= 10 (never a FIM id), lengths 0..max_len: empty and 1-token ones included."""
    lengths = np.concatenate([[0, 1, 1, 2], rng.integers(0, max_len + 1, size=n - 4)])
    return [rng.integers(10, 1000, size=k).tolist() for k in lengths]


def test_psm_layout_token_by_token():
    rng = ScriptedRng(0.0, [5, 2], 0.9)  # FIM; cuts drawn 5 then 2 (sorted to 2, 5); 0.9 >= spm_rate: PSM
    out = permute([10, 11, 12, 13, 14, 15, 16], rng, T, fim_rate=0.5, spm_rate=0.5)
    assert out == [P, 10, 11, S, 15, 16, M, 12, 13, 14]
    assert rng.calls == ["random", ("integers", 0, 8, 2), "random"]  # the recipe's order of draws


def test_spm_layout_token_by_token():
    rng = ScriptedRng(0.0, [2, 5], 0.1)
    out = permute([10, 11, 12, 13, 14, 15, 16], rng, T, fim_rate=0.5, spm_rate=0.5)
    assert out == [P, S, 15, 16, M, 10, 11, 12, 13, 14]


def test_not_fim_draws_once_and_returns_the_input():
    rng = ScriptedRng(0.7)
    assert permute([10, 11, 12], rng, T, fim_rate=0.5) == [10, 11, 12]
    assert rng.calls == ["random"]


def test_empty_parts_are_allowed():
    assert permute([10, 11], ScriptedRng(0.0, [0, 0], 0.9), T) == [P, S, 10, 11, M]
    assert permute([10, 11], ScriptedRng(0.0, [2, 2], 0.9), T) == [P, 10, 11, S, M]
    assert permute([], ScriptedRng(0.0, [0, 0], 0.1), T) == [P, S, M]


def test_real_generator_follows_the_recipe_draws():
    doc = list(range(10, 30))
    for seed in range(50):
        ref = np.random.default_rng(seed)
        expected = doc
        if ref.random() < 0.5:
            a, b = sorted(ref.integers(low=0, high=len(doc) + 1, size=2))
            pre, mid, suf = doc[:a], doc[a:b], doc[b:]
            expected = [P, S, *suf, M, *pre, *mid] if ref.random() < 0.5 else [P, *pre, S, *suf, M, *mid]
        assert permute(doc, np.random.default_rng(seed), T) == expected


def test_unpermute_recovers_every_document():
    rng = np.random.default_rng(0)
    docs = random_docs(rng, 3000)
    for doc, fim_rate, spm_rate in zip(docs, rng.random(len(docs)), rng.random(len(docs)), strict=True):
        out = permute(doc, rng, T, fim_rate, spm_rate)
        assert len(out) in (len(doc), len(doc) + 3)
        assert unpermute(out, T) == doc


def test_rates_within_three_sigma():
    rng = np.random.default_rng(1234)
    docs = random_docs(rng, N_RATE_DOCS)
    for fim_rate, spm_rate in ((0.5, 0.5), (0.9, 0.2)):
        cuts = [draw_cut(rng, len(d) + 1, fim_rate, spm_rate) for d in docs]
        n_fim = sum(c is not None for c in cuts)
        n_spm = sum(c is not None and c.spm for c in cuts)
        assert abs(n_fim - N_RATE_DOCS * fim_rate) <= 3 * math.sqrt(N_RATE_DOCS * fim_rate * (1 - fim_rate))
        assert abs(n_spm - n_fim * spm_rate) <= 3 * math.sqrt(n_fim * spm_rate * (1 - spm_rate))


def test_observed_fim_rate_of_permute_outputs():
    rng = np.random.default_rng(99)
    docs = random_docs(rng, N_RATE_DOCS, max_len=8)
    n_fim = sum(len(permute(d, rng, T)) == len(d) + 3 for d in docs)
    assert abs(n_fim - N_RATE_DOCS / 2) <= 3 * math.sqrt(N_RATE_DOCS / 4)


def test_draw_cuts_equals_one_draw_cut_per_document():
    n_points = np.random.default_rng(0).integers(1, 50, size=500)
    cuts = draw_cuts(np.random.default_rng(7), n_points, 0.5, 0.5)
    rng = np.random.default_rng(7)
    for d, n in enumerate(n_points):
        one = draw_cut(rng, int(n), 0.5, 0.5)
        assert cuts.fim[d] == (one is not None)
        if one is not None:
            assert (cuts.lo[d], cuts.hi[d], cuts.spm[d]) == (one.lo, one.hi, one.spm)


def test_same_seed_same_output_different_seed_different():
    docs = random_docs(np.random.default_rng(0), 200)

    def run(seed):
        rng = np.random.default_rng(seed)
        return [permute(d, rng, T) for d in docs]

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_numpy_fast_path():
    ids = np.arange(10, 30, dtype=np.int32)
    out = permute_array(ids, np.random.default_rng(3), T, fim_rate=1.0)
    assert isinstance(out, np.ndarray) and out.dtype == np.int32
    assert out.tolist() == permute(ids, np.random.default_rng(3), T, fim_rate=1.0)
    assert all(type(x) is int for x in permute(ids, np.random.default_rng(3), T, fim_rate=1.0))


def test_token_line_starts_snap_cuts_to_lines(tiny_tokenizer):
    from fimtune.tokens import newline_mask

    mask = newline_mask(tiny_tokenizer)
    text = "def f(a, b):\n    c = a + b\n    return c\n\nx = f(1, 2)\nprint(x)\n"
    ids = np.asarray(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])
    points = token_line_starts(ids, mask)
    rng = np.random.default_rng(0)
    for _ in range(200):
        out = permute(ids, rng, T, fim_rate=1.0, spm_rate=0.0, cut_points=points)
        s, m = out.index(S), out.index(M)
        prefix, middle = out[1:s], out[m + 1 :]
        assert not prefix or mask[prefix[-1]]  # the prefix ends with a newline token
        assert not middle or not out[s + 1 : m] or mask[middle[-1]]  # a middle before a suffix ends one too
        assert unpermute(out, T) == ids.tolist()


def test_text_line_spans_give_whole_line_middles():
    text = "import os\n\ndef main():\n    print(os.getcwd())\n"
    assert text_line_starts(text).tolist() == [0, 10, 11, 23, len(text)]
    rng = np.random.default_rng(0)
    for _ in range(200):
        cut = cut_text(text, rng, fim_rate=1.0, spans="line")
        assert cut.prefix + cut.middle + cut.suffix == text
        assert cut.prefix == "" or cut.prefix.endswith("\n")
        assert cut.middle == "" or cut.middle.endswith("\n")


def test_line_end_rate_leaves_the_middles_last_newline_to_the_suffix():
    text = "import os\n\ndef main():\n    print(os.getcwd())\n    return 0"
    moved = kept = 0
    for seed in range(300):
        plain = cut_text(text, np.random.default_rng(seed), fim_rate=1.0, spans="line")
        at_end = cut_text(text, np.random.default_rng(seed), fim_rate=1.0, spans="line", line_end_rate=1.0)
        assert at_end.prefix + at_end.middle + at_end.suffix == text
        assert (at_end.prefix, at_end.spm) == (plain.prefix, plain.spm)  # the same draws, one more after
        if plain.middle.endswith("\n"):
            assert (at_end.middle, at_end.suffix) == (plain.middle[:-1], "\n" + plain.suffix)
        else:  # empty, or the text's last line (no newline)
            assert at_end == plain
        half = cut_text(text, np.random.default_rng(seed), fim_rate=1.0, spans="line", line_end_rate=0.5)
        assert half in (plain, at_end)
        if plain.middle.endswith("\n") and half != plain:
            moved += 1
        elif plain.middle.endswith("\n"):
            kept += 1
    assert moved > 50 and kept > 50
    crlf = text.replace("\n", "\r\n")
    for seed in range(50):
        plain = cut_text(crlf, np.random.default_rng(seed), fim_rate=1.0, spans="line")
        cut = cut_text(crlf, np.random.default_rng(seed), fim_rate=1.0, spans="line", line_end_rate=1.0)
        assert cut.prefix + cut.middle + cut.suffix == crlf
        assert cut.middle == (plain.middle[:-2] if plain.middle.endswith("\r\n") else plain.middle)
    with_rate = cut_text(text, np.random.default_rng(0), fim_rate=1.0, line_end_rate=1.0)  # uniform spans: no draw
    assert with_rate == cut_text(text, np.random.default_rng(0), fim_rate=1.0)


def test_char_unit_never_splits_a_token_and_round_trips(tiny_tokenizer):
    def encode(s):
        return encode_batch(tiny_tokenizer, [s])[0].tolist()

    text = "def tokenize(self, text):\n    return [t for t in text.split() if t]  # naïve\n"
    for seed in range(100):
        out = permute_text(text, np.random.default_rng(seed), T, encode, fim_rate=1.0)
        cut = cut_text(text, np.random.default_rng(seed), fim_rate=1.0)
        s, m = out.index(S), out.index(M)
        if cut.spm:
            parts = {"suffix": out[2:m], "prefix+middle": out[m + 1 :]}
            texts = {"suffix": cut.suffix, "prefix+middle": cut.prefix + cut.middle}
        else:
            parts = {"prefix": out[1:s], "suffix": out[s + 1 : m], "middle": out[m + 1 :]}
            texts = {"prefix": cut.prefix, "suffix": cut.suffix, "middle": cut.middle}
        for name, ids in parts.items():  # every token lies wholly inside its part
            assert tiny_tokenizer.decode(ids) == texts[name], (seed, name)
        assert tiny_tokenizer.decode(unpermute(out, T)) == text


def test_char_unit_left_as_is_is_the_plain_encoding():
    def encode(s):
        return [ord(c) for c in s]

    assert permute_text("abc", np.random.default_rng(0), T, encode, fim_rate=0.0) == [97, 98, 99]


def test_unknown_spans_is_an_error():
    with pytest.raises(ValueError, match="spans"):
        cut_text("x", np.random.default_rng(0), spans="word")
