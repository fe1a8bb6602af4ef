"""Learning on the embedded model (slow): PPO with the gold scorer itself as its reward raises the held-out gold
score of a short SFT's policy, with the paired 95% interval above zero. This is the ceiling of what the PPO loop can
learn from a reward in a few minutes; a reward model can only approach it."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf import stages
from rlhf.compose import compose
from rlhf.data import builtin
from rlhf.stages.ppo import PPOTrainer
from rlhf.stages.ppo_models import RLHFEngine

EVAL = ["logger=none", "eval.gold_split=validation", "eval.gold_prompts=200"]


def gold_reward(prompts: list, responses: list[str]) -> list[float]:
    return [builtin.score(p, r) for p, r in zip(prompts, responses, strict=True)]


@pytest.mark.slow
@pytest.mark.xfail(
    reason="issue 15: measured 2026-12-01 from a 60-step SFT (bf16), 12 iterations of 16 prompts at actor_lr 2e-5 "
    "took validation gold 0.327 -> 0.19 with a KL of 3.5 nats: PPO does not yet learn from the gold reward",
    strict=False,
)
def test_ppo_with_the_gold_scorer_as_reward_raises_held_out_gold(tmp_path: Path, dist_process_group) -> None:
    sft = compose(["stage=sft", "stage.max_steps=40", "stage.eval_interval=40", "optimizer.lr=3e-5", *EVAL])
    sft_summary = stages.run(sft, tmp_path)
    assert sft_summary["gold_score"] > sft_summary["gold_score_start"]  # some sampled answers are right: a signal
    cfg = compose(
        [
            "stage=ppo",
            f"stage.init_from={tmp_path}/sft/final",
            "stage.max_steps=24",
            "stage.global_batch=16",
            "stage.eval_interval=24",
            "stage.temperature=0.7",
            "optimizer.actor_lr=2e-5",
            *EVAL,
        ]
    )
    trainer = PPOTrainer(cfg, tmp_path, engine=RLHFEngine(cfg, reward_fn=gold_reward))
    summary = trainer.train()
    assert summary["gold_n"] == 200
    assert summary["gold_delta_low"] > 0, summary  # held-out prompts, paired: the policy answers more of them right
    assert summary["rollout_gold_last"] > summary["rollout_gold_first"], summary
