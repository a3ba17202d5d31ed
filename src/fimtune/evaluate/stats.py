"""Estimates with 95% intervals: proportions and [0, 1] means (Wilson), paired differences of proportions
and of [0, 1] means (Newcombe), means (± 1.96 SE), ratios of sums, pass@k.

Every figure in a report is an :class:`Estimate`: a value, its interval and its sample count.

    >>> proportion(5, 10).as_dict()
    {'value': 0.5, 'lo': 0.2366, 'hi': 0.7634, 'n': 10, 'interval': 'wilson'}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Z95 = 1.959963984540054  # two-sided 95% normal quantile
DIGITS = 4  # rounding of values written to reports


@dataclass(frozen=True)
class Estimate:
    """A figure with its 95% interval (None where it cannot be estimated) and its sample count."""

    value: float
    lo: float | None
    hi: float | None
    n: int
    interval: str  # "wilson" | "newcombe" | "mean±1.96se" | "ratio±1.96se" | "exp(ratio±1.96se)"

    def as_dict(self) -> dict[str, object]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, DIGITS)

        return {"value": r(self.value), "lo": r(self.lo), "hi": r(self.hi), "n": self.n, "interval": self.interval}

    def exp(self) -> Estimate:
        """The estimate mapped through ``exp`` (loss -> perplexity); the interval follows."""
        return Estimate(
            math.exp(min(self.value, 50.0)),
            None if self.lo is None else math.exp(min(self.lo, 50.0)),
            None if self.hi is None else math.exp(min(self.hi, 50.0)),
            self.n,
            f"exp({self.interval})",
        )


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``successes / n``.

    It stays inside [0, 1] and is sensible at 0 and n successes, unlike p ± z·SE.

    >>> [round(x, 4) for x in wilson_interval(5, 10)]
    [0.2366, 0.7634]
    >>> [round(x, 4) for x in wilson_interval(0, 20)]
    [0.0, 0.1611]
    >>> wilson_interval(0, 0)
    (0.0, 1.0)
    """
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def proportion(successes: int, n: int) -> Estimate:
    """A rate with its Wilson interval; the value of an empty sample is 0 with interval [0, 1]."""
    lo, hi = wilson_interval(successes, n)
    return Estimate(successes / n if n else 0.0, lo, hi, n, "wilson")


def bounded_mean(values: Sequence[float]) -> Estimate:
    """The mean of values in [0, 1] (pass@k per problem) with the Wilson interval of that share of
    ``len(values)``: a [0, 1] value's variance is at most p(1 - p), so the interval holds whatever the
    values, and it is not a point when they all agree (as mean ± 1.96 SE is: 0 of 3 problems).

    >>> bounded_mean([0.0, 0.0, 0.0]) == proportion(0, 3)
    True
    """
    n = len(values)
    mean = sum(values) / n if n else 0.0
    lo, hi = wilson_interval(mean * n, n)
    return Estimate(mean, lo, hi, n, "wilson")


def mean_estimate(values: Sequence[float], bounds: tuple[float, float] | None = None) -> Estimate:
    """The mean with mean ± 1.96·SE (SE from the sample standard deviation; none below 2 values).

    ``bounds`` clips the interval to the values' range (e.g. (0, 1) for a similarity).

    >>> e = mean_estimate([0.2, 0.4, 0.6, 0.8])
    >>> round(e.value, 4), round(e.lo, 4), round(e.hi, 4), e.n
    (0.5, 0.247, 0.753, 4)
    >>> mean_estimate([0.0, 1.0], bounds=(0.0, 1.0)).lo
    0.0
    """
    n = len(values)
    if n == 0:
        return Estimate(0.0, None, None, 0, "mean±1.96se")
    mean = sum(values) / n
    if n < 2:
        return Estimate(mean, None, None, n, "mean±1.96se")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = Z95 * math.sqrt(var / n)
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(bounds[0], lo), min(bounds[1], hi)
    return Estimate(mean, lo, hi, n, "mean±1.96se")


def paired_difference(base: Sequence[bool], tuned: Sequence[bool]) -> Estimate:
    """``tuned`` rate - ``base`` rate over the same items, with Newcombe's square-and-add interval for
    paired proportions (Newcombe 1998, method 10): the two rates' Wilson intervals joined through the
    pairs' correlation. Unlike mean ± 1.96 SE of the differences, it is not a point when no pair differs.

    >>> e = paired_difference([False] * 9, [False] * 9)
    >>> e.value, round(e.lo, 4), round(e.hi, 4), e.n
    (0.0, -0.2991, 0.2991, 9)
    """
    n = len(base)
    if n == 0:
        return Estimate(0.0, None, None, 0, "newcombe")
    both = sum(b and t for b, t in zip(base, tuned, strict=True))
    base_only, tuned_only = sum(base) - both, sum(tuned) - both
    neither = n - both - base_only - tuned_only
    p_t, p_b = (both + tuned_only) / n, (both + base_only) / n
    lo_t, hi_t = wilson_interval(both + tuned_only, n)
    lo_b, hi_b = wilson_interval(both + base_only, n)
    margins = (both + tuned_only) * (base_only + neither) * (both + base_only) * (tuned_only + neither)
    a = both * neither - tuned_only * base_only
    # the correlation of the pairs, shrunk towards 0 by n/2 when positive (Newcombe's phi)
    phi = 0.0 if margins == 0 or 0 <= a <= n / 2 else (a - n / 2 if a > 0 else a) / math.sqrt(margins)
    lo, hi = square_and_add((p_t, lo_t, hi_t), (p_b, lo_b, hi_b), phi)
    return Estimate(p_t - p_b, lo, hi, n, "newcombe")


def paired_mean_difference(base: Sequence[float], tuned: Sequence[float]) -> Estimate:
    """``tuned`` mean - ``base`` mean of [0, 1] values over the same items (pass@k per problem): the
    square-and-add of the two means' :func:`bounded_mean` intervals, joined through the items'
    correlation (Pearson's r; 0 when a side is constant). For 0/1 values it is
    :func:`paired_difference` without the shrinking of a positive correlation. Like it, and unlike
    mean ± 1.96 SE of the differences, it is not a point when no item differs.

    >>> e = paired_mean_difference([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    >>> e.value, round(e.lo, 4), round(e.hi, 4), e.n
    (0.0, -0.5615, 0.5615, 3)
    """
    n = len(base)
    if n == 0:
        return Estimate(0.0, None, None, 0, "newcombe")
    b, t = bounded_mean(base), bounded_mean(tuned)
    cross = sum((x - b.value) * (y - t.value) for x, y in zip(base, tuned, strict=True))
    spread = sum((x - b.value) ** 2 for x in base) * sum((y - t.value) ** 2 for y in tuned)
    r = cross / math.sqrt(spread) if spread > 0 else 0.0
    lo, hi = square_and_add((t.value, t.lo, t.hi), (b.value, b.lo, b.hi), r)
    return Estimate(t.value - b.value, max(-1.0, lo), min(1.0, hi), n, "newcombe")


def square_and_add(
    tuned: tuple[float, float, float], base: tuple[float, float, float], corr: float
) -> tuple[float, float]:
    """The interval of ``tuned - base`` from each one's (value, lo, hi) and their correlation (Newcombe)."""
    (p_t, lo_t, hi_t), (p_b, lo_b, hi_b) = tuned, base
    d = p_t - p_b
    below = (p_t - lo_t) ** 2 + (hi_b - p_b) ** 2 - 2 * corr * (p_t - lo_t) * (hi_b - p_b)
    above = (p_b - lo_b) ** 2 + (hi_t - p_t) ** 2 - 2 * corr * (p_b - lo_b) * (hi_t - p_t)
    return d - math.sqrt(max(0.0, below)), d + math.sqrt(max(0.0, above))


def ratio_estimate(sums: Sequence[float], counts: Sequence[int]) -> Estimate:
    """``sum(sums) / sum(counts)`` (e.g. loss per token over rows) with a row-level 95% interval.

    Tokens of one row are not independent, so the interval comes from the rows: the
    linearised variance of a ratio estimator, ``Σ((s_i - r·c_i) / c̄)² / (R(R-1))``. With
    rows of equal length it is the standard error of the per-row means. ``n`` counts rows.

    >>> e = ratio_estimate([2.0, 4.0], [2, 2])
    >>> e.value, round(e.lo, 4), round(e.hi, 4), e.n
    (1.5, 0.52, 2.48, 2)
    """
    rows, total = len(sums), sum(counts)
    if total == 0:
        return Estimate(0.0, None, None, rows, "ratio±1.96se")
    r = sum(sums) / total
    if rows < 2:
        return Estimate(r, None, None, rows, "ratio±1.96se")
    mean_count = total / rows
    var = sum(((s - r * c) / mean_count) ** 2 for s, c in zip(sums, counts, strict=True)) / (rows * (rows - 1))
    half = Z95 * math.sqrt(var)
    return Estimate(r, r - half, r + half, rows, "ratio±1.96se")


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one problem with ``c`` of ``n`` samples correct: ``1 - C(n-c, k) / C(n, k)``.

    Computed as a product, stable for large n (Chen et al., 2021).

    >>> pass_at_k(10, 3, 1)
    0.3
    >>> round(pass_at_k(5, 1, 2), 4), pass_at_k(5, 4, 2), pass_at_k(5, 0, 3)
    (0.4, 1.0, 0.0)
    """
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return round(1.0 - prod, 12)


def ks_for(samples: int) -> list[int]:
    """The k of pass@k to report for ``samples`` per problem: 1, 10, 100 up to ``samples``.

    >>> ks_for(1), ks_for(20), ks_for(100)
    ([1], [1, 10], [1, 10, 100])
    """
    return [k for k in (1, 10, 100) if k <= samples]
