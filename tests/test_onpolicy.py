"""On-policy reward pairs: the policy's graded answers become pairs of the kind PPO will rank."""

from __future__ import annotations

import random

from rlhf.data import onpolicy

ROW = {"prompt": "What is 2 + 3?", "chosen": "2 + 3 = 5. The answer is 5.", "rejected": "The answer is 6."}


def test_a_right_and_a_wrong_answer_of_the_policy_make_policy_pairs() -> None:
    answers = ["The answer is 5.", "The answer is 4.", "The answer is 5.", "The answer is 7."]
    pairs = onpolicy.build_pairs(ROW, answers, [1, 0, 1, 0], max_pairs=10, rng=random.Random(0))
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {
        ("The answer is 5.", "The answer is 4."),
        ("The answer is 5.", "The answer is 7."),
    }  # the duplicate right answer counts once
    assert all(p["kind"] == "policy" and p["policy_chosen"] and p["policy_rejected"] for p in pairs)
    assert len(onpolicy.build_pairs(ROW, answers, [1, 0, 1, 0], max_pairs=1, rng=random.Random(0))) == 1


def test_without_a_right_answer_the_reference_is_chosen_and_without_a_wrong_one_the_static_rejected() -> None:
    wrong_only = onpolicy.build_pairs(ROW, ["4", "6"], [0, 0], max_pairs=4, rng=random.Random(0))
    assert [p["chosen"] for p in wrong_only] == [ROW["chosen"]] * 2
    assert all(p["kind"] == "reference" and not p["policy_chosen"] and p["policy_rejected"] for p in wrong_only)
    right_only = onpolicy.build_pairs(ROW, ["5"], [1], max_pairs=4, rng=random.Random(0))
    assert [(p["chosen"], p["rejected"], p["kind"]) for p in right_only] == [("5", ROW["rejected"], "static")]
    assert right_only[0]["policy_chosen"] and not right_only[0]["policy_rejected"]
    assert onpolicy.kind_counts(wrong_only + right_only) == {"policy": 0, "reference": 2, "static": 1}
