"""Preference pairs from the policy's own answers, labelled by the gold scorer (InstructGPT's recipe, free here
because the built-in task is verifiable): the reward model then learns to tell apart the answers the policy actually
writes, right from wrong, rather than the data's templates.

For one prompt the policy answered k times, each answer graded right (1) or wrong (0):
- a right and a wrong answer of the policy make a `policy` pair (both sides on-policy: what PPO will rank);
- with no right answer, the data's chosen answer against a wrong one of the policy makes a `reference` pair;
- with no wrong answer, a right one of the policy against the data's rejected answer makes a `static` pair.
"""

from __future__ import annotations

import random
from itertools import product

KINDS = ("policy", "reference", "static")


def build_pairs(row: dict, answers: list[str], grades: list[float], max_pairs: int, rng: random.Random) -> list[dict]:
    """Up to `max_pairs` pairs for one prompt's `row` ({prompt, chosen, rejected}) from the policy's graded
    `answers` (duplicates count once), each {prompt, chosen, rejected, kind, policy_chosen, policy_rejected}."""
    right = list(dict.fromkeys(a for a, g in zip(answers, grades, strict=True) if g > 0.5))
    wrong = list(dict.fromkeys(a for a, g in zip(answers, grades, strict=True) if g <= 0.5))
    if right and wrong:
        combos, kind = list(product(right, wrong)), "policy"
    elif wrong:
        combos, kind = [(row["chosen"], w) for w in wrong], "reference"
    elif right and row.get("rejected"):
        combos, kind = [(r, row["rejected"]) for r in right], "static"
    else:
        return []
    chosen = rng.sample(combos, min(max_pairs, len(combos)))
    return [
        {
            "prompt": row["prompt"],
            "chosen": good,
            "rejected": bad,
            "kind": kind,
            "policy_chosen": kind != "reference",
            "policy_rejected": kind != "static",
        }
        for good, bad in chosen
    ]


def kind_counts(pairs: list[dict]) -> dict[str, int]:
    """How many pairs of each kind."""
    return {kind: sum(1 for p in pairs if p["kind"] == kind) for kind in KINDS}
