"""Means over seeds with 95% confidence intervals (Student-t), in plain Python (no scipy).

For N values with mean m and sample standard deviation s, the interval is m +- t_{0.975, N-1} s / sqrt(N).
The quantile comes from the closed-form distribution function of Student's t at an integer number of
degrees of freedom (Abramowitz & Stegun 26.7.3-4, a finite sum in cos(theta), theta = atan(t / sqrt(df))),
inverted by bisection: exact to float precision for every df, which a table would not be.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def t_two_sided(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with ``df`` (a positive integer) degrees of freedom, ``t >= 0``."""
    theta = math.atan(t / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2 == 0:  # sin(theta) (1 + 1/2 cos^2 + 1.3/(2.4) cos^4 + ... up to cos^(df-2))
        term = total = 1.0
        for j in range(1, df // 2):
            term *= cos2 * (2 * j - 1) / (2 * j)
            total += term
        return math.sin(theta) * total
    if df == 1:
        return 2 * theta / math.pi
    # odd df: 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2.4/(3.5) cos^4 + ... up to cos^(df-3)))
    term = total = 1.0
    for j in range(1, (df - 1) // 2):
        term *= cos2 * (2 * j) / (2 * j + 1)
        total += term
    return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom, for 0.5 <= p < 1
    (``t_quantile(0.975, 4)`` = 2.776)."""
    if not (isinstance(df, int) and df >= 1):
        raise ValueError(f"t_quantile: df must be an integer >= 1, got {df!r}")
    if not 0.5 <= p < 1:
        raise ValueError(f"t_quantile: p must be in [0.5, 1), got {p!r}")
    target = 2 * p - 1  # P(|T| <= t)
    low, high = 0.0, 1.0
    while t_two_sided(high, df) < target:
        low, high = high, 2 * high
    for _ in range(200):  # bisection to the last bit
        middle = (low + high) / 2
        if middle in (low, high):
            break
        if t_two_sided(middle, df) < target:
            low = middle
        else:
            high = middle
    return (low + high) / 2


@dataclass(frozen=True)
class Interval:
    """``mean`` +- ``half`` (the 95% interval's half-width; NaN for fewer than 2 values) over ``n`` values
    with sample standard deviation ``sd`` (N - 1 in the denominator)."""

    mean: float
    half: float
    sd: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """The mean of ``values`` and its two-sided ``level`` Student-t interval."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval: no values")
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return Interval(mean, t_quantile((1 + level) / 2, n - 1) * sd / math.sqrt(n), sd, n)
