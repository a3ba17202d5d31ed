"""Intervals and pass@k against known values; the docstring examples of the evaluation modules."""

from __future__ import annotations

import math

import pytest

from fimtune.evaluate.stats import mean_estimate, pass_at_k, proportion, ratio_estimate, wilson_interval


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        (5, 10, 0.236593, 0.763407),  # symmetric around 0.5
        (0, 10, 0.0, 0.277533),  # never below 0
        (10, 10, 0.722467, 1.0),  # never above 1
        (81, 263, 0.2553, 0.3662),  # Newcombe (1998), Table I, method 3 (score interval)
    ],
)
def test_wilson_interval_known_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)
    assert proportion(k, n).value == pytest.approx(k / n)


def test_wilson_narrows_with_more_samples():
    width = [(lambda lo_hi: lo_hi[1] - lo_hi[0])(wilson_interval(n // 2, n)) for n in (10, 100, 1000)]
    assert width[0] > width[1] > width[2]
    assert width[2] == pytest.approx(2 * 1.959964 * math.sqrt(0.25 / 1000), rel=1e-2)


def test_pass_at_k_matches_the_combinatorial_formula():
    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 1, 10), (5, 0, 1), (5, 5, 3), (100, 37, 10)]:
        expected = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 5)


def test_mean_and_ratio_estimates():
    e = mean_estimate([1.0, 2.0, 3.0, 4.0])
    se = math.sqrt(sum((x - 2.5) ** 2 for x in [1, 2, 3, 4]) / 3 / 4)
    assert (e.value, e.n) == (2.5, 4) and e.hi - e.value == pytest.approx(1.959964 * se, rel=1e-6)
    assert mean_estimate([0.7]).lo is None  # one value: no interval, never a fake one
    # Rows of equal length: the ratio estimate is the mean of the row means, same interval.
    r, m = ratio_estimate([2.0, 4.0, 9.0], [4, 4, 4]), mean_estimate([0.5, 1.0, 2.25])
    assert r.value == pytest.approx(m.value) and (r.lo, r.hi) == pytest.approx((m.lo, m.hi))
    ppl = r.exp()
    assert ppl.value == pytest.approx(math.exp(r.value)) and ppl.lo == pytest.approx(math.exp(r.lo))


def test_pass_at_k_of_several_samples_keeps_an_interval_when_every_problem_agrees():
    """pass@1 of 3 problems that all failed (or all passed) is not known exactly: with 2 samples per
    problem its interval is the one of 1 sample per problem (Wilson over the problems), not a point."""
    from fimtune.evaluate.humaneval import summarise

    for outcome in (False, True):
        one = summarise([[outcome]] * 3, 1)["pass@1"]
        two = summarise([[outcome, outcome]] * 3, 2)["pass@1"]
        assert (two["value"], two["lo"], two["hi"], two["n"]) == (one["value"], one["lo"], one["hi"], 3)
        assert two["hi"] - two["lo"] > 0.4
    mixed = summarise([[True, False], [False, False], [True, True], [True, False]], 2)["pass@1"]
    assert mixed["lo"] < mixed["value"] == 0.5 < mixed["hi"]
