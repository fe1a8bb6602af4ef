"""The built-in verifiable dataset and its gold scorer."""

from __future__ import annotations

from collections import Counter

import pytest

from rlhf.compose import compose
from rlhf.config import ConfigError
from rlhf.data import builtin, gold_rows, stage_rows


def test_generation_is_deterministic_distinct_and_covers_every_family() -> None:
    pairs = builtin.generate(6000, seed=7)
    assert pairs == builtin.generate(6000, seed=7)
    assert pairs != builtin.generate(6000, seed=8)
    assert len({p.prompt for p in pairs}) == 6000
    counts = Counter(p.family for p in pairs)
    assert set(counts) == {f.name for f in builtin.FAMILIES}
    assert min(counts.values()) >= 900


def test_chosen_is_right_and_rejected_is_wrong_for_every_pair() -> None:
    pairs = builtin.generate(3000, seed=1)
    assert all(builtin.grade(p.prompt, p.chosen) == 1.0 for p in pairs)
    assert all(builtin.grade(p.prompt, p.rejected) == 0.0 for p in pairs)
    assert all(p.chosen != p.rejected for p in pairs)


def test_gold_scorer_on_hand_written_answers() -> None:
    grade = builtin.grade
    assert grade("What is 12 + 7?", "12 + 7 = 19. The answer is 19.") == 1.0
    assert grade("What is 12 + 7?", "19") == 1.0
    assert grade("What is 12 + 7?", "The answer is 20.") == 0.0
    assert grade("What is 12 * 3?", "I don't know.") == 0.0
    assert grade("Convert 3 kilometers to meters.", "That is 3000 meters. The answer is 3000.") == 1.0
    assert grade("How many times does the letter 'a' appear in 'banana'?", "The answer is 3.") == 1.0
    assert grade("Sort these numbers from smallest to largest: 5, 2, 9.", "2, 5, 9") == 1.0
    assert grade("Sort these numbers from smallest to largest: 5, 2, 9.", "5, 2, 9") == 0.0
    assert grade("Write the word 'planet' backwards.", "The answer is tenalp.") == 1.0
    assert grade("Write the word 'planet' backwards.", "The answer is planet.") == 0.0
    assert grade("Tell me a joke.", "Why did the chicken cross the road?") == 0.0
    assert grade("What is 1 + 1?", "") == 0.0
    assert grade("What is 1 + 1?", "The answer is 2") == 1.0
    assert grade("What is 1 + 1?", "The answer is 2, or maybe 3.") == 0.0  # the last number after 'answer is'


def test_builtin_families_draws_only_the_named_families_and_keeps_the_splits_apart() -> None:
    data = compose(["experiment=tiny", "stage=ppo", "data.builtin_families=[word_problem, sorting]"]).data
    prompts = {}
    for stage in ("sft", "reward", "ppo"):
        rows = stage_rows(data, stage).train
        assert {r["family"] for r in rows} == {"word_problem", "sorting"}
        prompts[stage] = {r["prompt"] for r in rows}
    held_out = gold_rows(data, "validation", 1000) + gold_rows(data, "test", 1000)
    assert len(held_out) == round(data.builtin_size * data.eval_fraction)  # all held-out rows are of those families
    assert {r["family"] for r in held_out} == {"word_problem", "sorting"}
    seen = {r["prompt"] for r in held_out}
    for stage, stage_prompts in prompts.items():
        assert not stage_prompts & seen, stage
        seen |= stage_prompts
    with pytest.raises(ConfigError, match="data.builtin_families: no family word_problems; the families: arithmetic"):
        compose(["experiment=tiny", "data.builtin_families=[word_problems]"])
