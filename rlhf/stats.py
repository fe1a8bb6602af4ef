"""Small statistics for honest before/after claims: intervals on a rate, paired differences, and ranking agreement.

Pure functions over plain lists, so every figure the framework reports about learning can be checked by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


@dataclass(frozen=True)
class Interval:
    """An estimate with its 95% interval."""

    value: float
    low: float
    high: float

    def text(self, scale: float = 1.0, signed: bool = False) -> str:
        sign = "+" if signed else ""
        return f"{self.value * scale:{sign}.3g} [{self.low * scale:{sign}.3g}, {self.high * scale:{sign}.3g}]"


def wilson_interval(successes: float, n: int) -> Interval:
    """The rate successes / n with Wilson's 95% score interval (well-behaved at 0, 1 and small n)."""
    if n <= 0:
        return Interval(math.nan, math.nan, math.nan)
    rate = successes / n
    denominator = 1 + Z95**2 / n
    centre = (rate + Z95**2 / (2 * n)) / denominator
    half = Z95 * math.sqrt(rate * (1 - rate) / n + Z95**2 / (4 * n * n)) / denominator
    return Interval(rate, max(0.0, round(centre - half, 12)), min(1.0, round(centre + half, 12)))  # 0, not 1e-19


@dataclass(frozen=True)
class PairedDifference:
    """after - before on the same items: the mean difference with a paired-bootstrap 95% interval, and for 0/1
    outcomes McNemar's exact two-sided p-value (items that changed: `gained` 0 -> 1, `lost` 1 -> 0)."""

    n: int
    before: float
    after: float
    diff: Interval
    gained: int
    lost: int
    p_value: float

    def text(self) -> str:
        changed = f"+{self.gained}/-{self.lost}"
        return f"{self.diff.text(100, signed=True)} points (n={self.n}, {changed}, p={self.p_value:.2g})"


def mcnemar_p(gained: int, lost: int) -> float:
    """McNemar's exact test: the two-sided binomial p-value of `gained` against `lost` changed items."""
    changed = gained + lost
    if changed == 0:
        return 1.0
    tail = sum(math.comb(changed, k) for k in range(min(gained, lost) + 1)) / 2**changed
    return min(1.0, 2 * tail)


def paired_difference(
    before: list[float], after: list[float], resamples: int = 4000, seed: int = 0
) -> PairedDifference:
    """Mean of after - before over paired items, with a percentile-bootstrap 95% interval over items (fixed seed:
    the same data give the same interval)."""
    if len(before) != len(after):
        raise ValueError(f"paired lists differ in length: {len(before)} and {len(after)}")
    n = len(before)
    if n == 0:
        nan = math.nan
        return PairedDifference(0, nan, nan, Interval(nan, nan, nan), 0, 0, nan)
    diffs = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    means = diffs[np.random.default_rng(seed).integers(0, n, size=(resamples, n))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    gained = sum(1 for b, a in zip(before, after, strict=True) if a > b)
    lost = sum(1 for b, a in zip(before, after, strict=True) if a < b)
    return PairedDifference(
        n,
        sum(before) / n,
        sum(after) / n,
        Interval(float(diffs.mean()), float(low), float(high)),
        gained,
        lost,
        mcnemar_p(gained, lost),
    )


def auc(scores: list[float], labels: list[float]) -> float:
    """The probability that a random positive (label 1) scores above a random negative, ties counted half
    (the Mann-Whitney AUC); nan when either class is absent."""
    positives = [s for s, y in zip(scores, labels, strict=True) if y > 0.5]
    negatives = [s for s, y in zip(scores, labels, strict=True) if y <= 0.5]
    if not positives or not negatives:
        return math.nan
    wins = sum((p > q) + 0.5 * (p == q) for p in positives for q in negatives)
    return wins / (len(positives) * len(negatives))


def within_group_accuracy(scores: list[float], labels: list[float], groups: list) -> float:
    """Over every two items of one group (e.g. two answers to one prompt) with different labels, the share that
    `scores` orders as the labels do, a tie counted wrong; nan when no group has two labels. This is what a
    pairwise-trained reward model is asked, and all that a group baseline (RLOO, GRPO) uses of its scores."""
    by_group: dict = {}
    for score, label, group in zip(scores, labels, groups, strict=True):
        by_group.setdefault(group, []).append((score, label))
    right = total = 0
    for items in by_group.values():
        for i, (s_i, y_i) in enumerate(items):
            for s_j, y_j in items[i + 1 :]:
                if y_i != y_j:
                    total += 1
                    right += (s_i - s_j) * (y_i - y_j) > 0
    return right / total if total else math.nan
