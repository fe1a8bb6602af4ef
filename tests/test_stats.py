"""The statistics behind every learning claim, against values computed by hand or by brute force."""

from __future__ import annotations

import math
import random

import pytest

from rlhf import stats


def test_wilson_interval_matches_the_textbook_values() -> None:
    interval = stats.wilson_interval(10, 100)  # Wilson 95% for 10/100: [0.0552, 0.1744]
    assert interval.value == 0.1
    assert interval.low == pytest.approx(0.0552, abs=1e-4) and interval.high == pytest.approx(0.1744, abs=1e-4)
    zero = stats.wilson_interval(0, 50)
    assert 0.05 < zero.high < 0.08  # not empty at a rate of 0
    for n in (50, 200, 300):  # exact bounds, so a table reads 0 rather than 8.67e-19
        assert stats.wilson_interval(0, n).low == 0.0 and stats.wilson_interval(n, n).high == 1.0
    assert math.isnan(stats.wilson_interval(0, 0).value)


def test_mcnemar_exact_p_values() -> None:
    assert stats.mcnemar_p(0, 0) == 1.0
    assert stats.mcnemar_p(5, 5) == 1.0
    assert stats.mcnemar_p(10, 0) == pytest.approx(2 / 2**10)
    assert stats.mcnemar_p(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 2**10)  # two-sided binomial tail


def test_paired_difference_counts_changes_and_its_interval_covers_the_truth() -> None:
    before = [0, 0, 1, 1, 0, 1]
    after = [1, 0, 1, 0, 1, 1]
    change = stats.paired_difference(before, after)
    assert (change.n, change.gained, change.lost) == (6, 2, 1)
    assert change.diff.value == pytest.approx(1 / 6)
    assert change.diff.low <= change.diff.value <= change.diff.high
    assert change.before == pytest.approx(0.5) and change.after == pytest.approx(4 / 6)
    assert stats.paired_difference(before, after) == change  # a fixed seed: the same interval every time
    with pytest.raises(ValueError, match="differ in length"):
        stats.paired_difference([0, 1], [1])

    rng = random.Random(0)  # 300 prompts, a true gain of 10 points: the interval excludes 0 and covers 0.1
    before = [float(rng.random() < 0.4) for _ in range(300)]
    after = [1.0 if b or rng.random() < 1 / 6 else 0.0 for b in before]
    change = stats.paired_difference(before, after)
    assert 0 < change.diff.low < 0.1 < change.diff.high
    assert change.p_value < 0.001


def test_auc_is_the_probability_a_positive_outranks_a_negative() -> None:
    assert stats.auc([3, 2, 1, 0], [1, 1, 0, 0]) == 1.0
    assert stats.auc([0, 1, 2, 3], [1, 1, 0, 0]) == 0.0
    assert stats.auc([1, 1, 1, 1], [1, 0, 1, 0]) == 0.5  # ties count half
    assert stats.auc([0.9, 0.2, 0.5, 0.4], [1, 1, 0, 0]) == pytest.approx(0.5)  # 2 of 4 pairs ordered right
    assert math.isnan(stats.auc([1, 2], [1, 1]))


def test_within_group_accuracy_compares_only_answers_to_the_same_prompt() -> None:
    # prompt a: right 5 > wrong 1 (right); prompt b: right 0 < wrong 2 (wrong) and right 0 = wrong 0 (a tie, wrong)
    scores, labels = [5, 1, 0, 2, 0], [1, 0, 1, 0, 0]
    assert stats.within_group_accuracy(scores, labels, ["a", "a", "b", "b", "b"]) == pytest.approx(1 / 3)
    # pooled over prompts (the AUC) prompt a's high scores hide prompt b's inversion: 3.5 of 6 pairs
    assert stats.auc(scores, labels) == pytest.approx(3.5 / 6)
    assert math.isnan(stats.within_group_accuracy([1, 2], [1, 1], ["a", "a"]))  # no pair with different labels
    assert math.isnan(stats.within_group_accuracy([1, 0], [1, 0], ["a", "b"]))  # one answer per prompt
