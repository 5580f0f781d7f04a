"""Seed statistics shared by the benchmarks: mean +- std, and paired differences with a t-interval."""

from __future__ import annotations

import math
import statistics


def mean_std(values: list[float], digits: int = 3) -> str:
    """``mean ± std`` (sample std, n - 1) of the finite values, or the value alone for one seed."""
    values = [v for v in values if v == v]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def paired_t(a: list[float], b: list[float], level: float = 0.95) -> dict[str, float]:
    """Paired comparison of ``a`` and ``b`` (same seeds, same order): ``d_i = a_i - b_i``.

    ``mean = mean(d)``, ``half = t_{(1 + level) / 2, n - 1} * std(d) / sqrt(n)``: the t-interval
    ``[mean - half, mean + half]`` for the mean paired difference; ``below`` counts seeds with
    ``a_i < b_i``.
    """
    from scipy import stats

    d = [x - y for x, y in zip(a, b, strict=True)]
    n = len(d)
    mean = statistics.mean(d)
    half = stats.t.ppf((1 + level) / 2, n - 1) * statistics.stdev(d) / math.sqrt(n) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "lo": mean - half, "hi": mean + half, "below": sum(x < 0 for x in d)}


def paired_text(p: dict[str, float], digits: int = 3) -> tuple[str, str]:
    """(``-1.234 [-2.000, -0.468]``, ``k/n``): the mean difference with its interval, seeds below zero."""
    return (f"{p['mean']:+.{digits}f} [{p['lo']:+.{digits}f}, {p['hi']:+.{digits}f}]", f"{p['below']}/{p['n']}")
