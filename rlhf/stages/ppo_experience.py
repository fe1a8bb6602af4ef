"""PPO's experience: a batch of prompts sampled by the actor and scored by the four models, with the KL-shaped
rewards and advantages (GAE with the critic, or a group baseline) that the update learns from."""

from __future__ import annotations

import time
from typing import NamedTuple

import torch
from omegaconf import DictConfig

from rlhf import dist, rollout, stats
from rlhf.data import builtin
from rlhf.data.tokenize import pad_left
from rlhf.ppo import functional as ppo_math
from rlhf.rewards import columns_of
from rlhf.stages.ppo_models import RLHFEngine, actor_logprobs


class Experience(NamedTuple):
    """One batch of rollouts. B rows, prompt width P, response width R; response tensors are [B, R]."""

    sequences: torch.Tensor  # [B, P + R] left-padded prompt then response (pad after EOS)
    attention_mask: torch.Tensor  # [B, P + R]
    response_mask: torch.Tensor  # [B, R] 1 up to and including the first EOS
    logprobs: torch.Tensor  # actor log-probs of the sampled tokens when sampled
    ref_logprobs: torch.Tensor
    values: torch.Tensor  # critic values of the state before each token
    rewards: torch.Tensor  # per token: the score at the last token, less kl_coef * KL unless the KL is in the loss
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor  # [B] the score learnt from: the reward, plus the EOS penalty, clipped
    reward: torch.Tensor  # [B] the reward functions' weighted sum (the reward model's score normalised)
    reward_parts: dict[str, torch.Tensor]  # [B] each reward function's own value (nan where it returned None)
    kl: torch.Tensor  # [B] summed KL to the reference
    gold: torch.Tensor  # [B] the gold score of each response (nan where the prompt has no built-in answer)
    texts: list[tuple]  # (prompt as written, response text, reward) per row, for the sample tables
    generation_s: float  # seconds spent sampling, without the scoring passes


@torch.no_grad()
def build_experience(eng: RLHFEngine, batch: list[dict], stage: DictConfig, tok, kl_coef: float) -> Experience:
    """Rollouts for prompts ({prompt, input_ids}, each prompt's samples in consecutive rows), scored: actor and
    reference log-probs, critic values, the reward, per-token rewards and the advantages of `stage.advantage`."""
    eng.eval_mode()
    prompts = pad_left([row["input_ids"] for row in batch], tok.pad_token_id, stage.prompt_width)
    width = prompts["input_ids"].shape[1]
    started = time.perf_counter()
    rolled = eng.generate(prompts)
    sequences = rolled.sequences.cpu()
    generation_s = time.perf_counter() - started  # generation alone, without the experience forward passes
    resp_mask = rollout.response_mask(sequences[:, width:], tok.eos_token_id)
    mask = torch.cat([prompts["attention_mask"], resp_mask], dim=1)
    texts = [
        tok.decode(seq[width:][m.bool()], skip_special_tokens=True) for seq, m in zip(sequences, resp_mask, strict=True)
    ]
    prompt_texts = [row["prompt"] for row in batch]  # as written (a string or chat messages), not templated

    if rolled.logprobs is not None and stage.reuse_rollout_logprobs:
        logprobs = rolled.logprobs.cpu()  # the actor's at sampling time: a fresh forward equals them up to rounding
    else:
        logprobs = actor_logprobs(eng.actor, sequences, mask, width, stage.temperature).cpu()
    if eng.reference is not None:
        ref_logprobs = actor_logprobs(eng.reference, sequences, mask, width, stage.temperature).cpu()
    else:  # kl_coef 0: no reference model, and a KL of 0
        ref_logprobs = logprobs.clone()
    values = torch.zeros_like(logprobs)
    if eng.critic is not None:
        device = eng.critic.device
        values = eng.critic(sequences.to(device), mask.to(device), per_token=True)[:, width - 1 : -1].float().cpu()
    reward, reward_parts = eng.score(prompt_texts, texts, columns_of(batch), sequences, mask)
    reached_eos = (sequences[:, width:] == tok.eos_token_id).any(dim=1)
    scores = reward + stage.no_eos_penalty * (~reached_eos).float()
    scores = scores.clamp(-stage.score_clip, stage.score_clip)

    m = resp_mask.float()
    kl = ppo_math.kl_penalty(logprobs, ref_logprobs, stage.kl_estimator) * m
    advantages, returns, rewards = estimate_advantages(scores, kl, values * m, m, stage, kl_coef)
    gold_scores = [
        builtin.score(p, t) if isinstance(p, str) and builtin.reference_answer(p) is not None else float("nan")
        for p, t in zip(prompt_texts, texts, strict=True)
    ]
    return Experience(
        sequences,
        mask,
        resp_mask,
        logprobs,
        ref_logprobs,
        values * m,
        rewards,
        advantages,
        returns,
        scores,
        reward,
        reward_parts,
        kl.sum(dim=1),
        torch.tensor(gold_scores, dtype=torch.float),
        list(zip(prompt_texts, texts, reward.tolist(), strict=True)),
        generation_s,
    )


def estimate_advantages(
    scores: torch.Tensor, kl: torch.Tensor, values: torch.Tensor, m: torch.Tensor, stage: DictConfig, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The advantages and returns of `stage.advantage`, and the per-token rewards they come from (the score at the
    last token, less kl_coef x KL at every token unless the KL is in the loss). Each prompt's samples are
    consecutive rows of this rank's batch (prompt_batches); whitening is over every rank's batch."""
    group = stage.samples_per_prompt
    if stage.advantage == "reinforce_plus_plus_baseline":
        scores = ppo_math.subtract_group_mean(scores, group)
    rewards = ppo_math.shaped_rewards(scores, kl, m, 0.0 if stage.kl_in_loss else kl_coef)
    if stage.advantage == "gae":
        advantages, returns = ppo_math.gae(rewards, values, m, stage.gamma, stage.lam)
        if stage.whiten_advantages:
            advantages = ppo_math.whiten(advantages, m, all_reduce=dist.all_reduce_sum)
        return advantages, returns, rewards
    if stage.advantage.startswith("reinforce_plus_plus"):
        returns = ppo_math.reinforce_returns(rewards, m)
        return ppo_math.whiten(returns, m, all_reduce=dist.all_reduce_sum), torch.zeros_like(rewards), rewards
    per_response = ppo_math.group_advantages(rewards.sum(dim=1), group, stage.advantage)
    return per_response[:, None] * m, torch.zeros_like(rewards), rewards


def rollout_gold(exp: Experience) -> dict[str, float]:
    """On rank 0, over every rank's rollouts: their gold score, and how well the reward ranks them as gold does: the
    AUC of the reward against gold right/wrong over all rollouts, and the accuracy on pairs of answers to the
    same prompt, one right and one wrong (what a group baseline learns from). Reward hacking shows as a rising reward
    with falling agreement."""
    graded = (~exp.gold.isnan()).tolist()  # a built-in prompt
    rows = [
        (reward, gold, str(text[0]))
        for reward, gold, text, keep in zip(exp.reward.tolist(), exp.gold.tolist(), exp.texts, graded, strict=True)
        if keep
    ]
    shares = dist.gather_objects(rows)
    if shares is None:  # not rank 0
        return {}
    rows = [row for share in shares for row in share]
    if not rows:
        return {}
    rewards, golds, prompts = (list(column) for column in zip(*rows, strict=True))
    return {
        "ppo/gold_mean": sum(golds) / len(golds),
        "ppo/reward_gold_auc": stats.auc(rewards, golds),
        "ppo/reward_gold_pair_acc": stats.within_group_accuracy(rewards, golds, prompts),
    }
