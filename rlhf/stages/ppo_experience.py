"""PPO's experience: a batch of prompts sampled by the actor and scored by the four models, with the KL-shaped
rewards and advantages (GAE with the critic, or a group baseline) that the update learns from."""

from __future__ import annotations

import contextlib
import time
from typing import Any, NamedTuple

import torch
from omegaconf import DictConfig

from rlhf import dist, rollout, stats
from rlhf.data import builtin
from rlhf.data.tokenize import pad_left
from rlhf.ppo import functional as ppo_math
from rlhf.rewards import columns_of, finite_sums, reward_function_metrics
from rlhf.stages.ppo_models import PPOModels, actor_logprobs


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
    critic_values: torch.Tensor | None = None  # [B, R] values with their autograd graph, when training reuses them


@torch.no_grad()
def build_experience(
    models: PPOModels, batch: list[dict], stage: DictConfig, tok, kl_coef: float, keep_critic_graph: bool = False
) -> Experience:
    """Rollouts for prompts ({prompt, input_ids}, each prompt's samples in consecutive rows), scored: actor and
    reference log-probs, critic values, the reward, per-token rewards and the advantages of `stage.advantage`.
    `keep_critic_graph`: the critic's pass runs in training mode with autograd, and the experience keeps its values
    for the critic's update to run only the backward (PPOTrainer.critic_forward_folds)."""
    models.eval_mode()
    prompts = pad_left([row["input_ids"] for row in batch], tok.pad_token_id, stage.prompt_width)
    width = prompts["input_ids"].shape[1]
    started = time.perf_counter()
    rolled = models.generate(prompts)
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
        logprobs = actor_logprobs(models.actor, sequences, mask, width, stage.temperature).cpu()
    if models.reference is not None:
        ref_logprobs = actor_logprobs(models.reference, sequences, mask, width, stage.temperature).cpu()
    else:  # kl_coef 0: no reference model, and a KL of 0
        ref_logprobs = logprobs.clone()
    values, critic_values = torch.zeros_like(logprobs), None
    if models.critic is not None:
        device = models.critic.device
        with torch.enable_grad() if keep_critic_graph else contextlib.nullcontext():
            models.critic.module.train(keep_critic_graph)
            critic_values = models.critic(sequences.to(device), mask.to(device), per_token=True)[:, width - 1 : -1]
            models.critic.module.eval()
        values = critic_values.detach().float().cpu()
        critic_values = critic_values.float() if keep_critic_graph else None
    reward, reward_parts = models.reward(prompt_texts, texts, columns_of(batch), sequences, mask)
    reached_eos = (sequences[:, width:] == tok.eos_token_id).any(dim=1)
    scores = reward + stage.no_eos_penalty * (~reached_eos).float()
    scores = scores.clamp(-stage.score_clip, stage.score_clip)

    m = resp_mask.float()
    kl = ppo_math.kl_penalty(logprobs, ref_logprobs, stage.kl_estimator) * m
    advantages, returns, rewards = estimate_advantages(scores, kl, values * m, m, stage, kl_coef)
    gold_scores = [
        builtin.grade(p, t) if isinstance(p, str) and builtin.reference_answer(p) is not None else float("nan")
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
        critic_values,
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


class IterationInputs(NamedTuple):
    """What the iteration's figures need from the trainer besides the experience."""

    eos_id: int
    kl_coef: float
    actor_lr: float
    critic: Any  # the critic engine, or None


def iteration_metrics(
    exp: Experience,
    stage: DictConfig,
    inputs: IterationInputs,
    stats: dict[str, float],
    experience_s: float,
    update_s: float,
) -> tuple[dict[str, float], int, int]:
    """The iteration's figures over all ranks (reward, each reward function, KL, losses, lengths, truncation, flat
    groups, throughput), the tokens it trained on and the rollouts it counted."""
    m = exp.response_mask.float()
    lengths = exp.response_mask.sum(dim=1).float()
    reached_eos = (exp.sequences[:, -exp.response_mask.shape[1] :] == inputs.eos_id).any(dim=1)
    truncated = ~reached_eos & (lengths >= stage.max_new_tokens)  # cut off by max_new_tokens
    groups = exp.scores.view(-1, stage.samples_per_prompt)
    flat_groups = (groups.max(dim=1).values == groups.min(dim=1).values).sum().item()  # no signal for a baseline
    totals = dist.all_reduce_sum(
        [
            len(exp.scores),
            exp.scores.sum().item(),
            (exp.scores**2).sum().item(),
            exp.kl.sum().item(),
            lengths.sum().item(),
            reached_eos.sum().item(),
            truncated.sum().item(),
            flat_groups,
            len(groups),
            exp.attention_mask.sum().item() * stage.ppo_epochs,
            *(x for values in exp.reward_parts.values() for x in finite_sums(values)),
        ]
    )
    n_rows, score_sum, score_sq, kl_sum, len_sum, eos_sum = totals[:6]
    truncated_sum, flat_sum, n_groups, train_tokens = totals[6:10]
    reward_mean = score_sum / n_rows
    metrics = {
        "ppo/reward_mean": reward_mean,
        "ppo/reward_std": max(score_sq / n_rows - reward_mean**2, 0.0) ** 0.5,
        **reward_function_metrics(list(exp.reward_parts), totals[10:]),
        "ppo/kl": kl_sum / n_rows,
        "ppo/kl_coef": inputs.kl_coef,
        **{f"ppo/{k}": v for k, v in stats.items()},
        "ppo/response_len": len_sum / n_rows,
        "ppo/eos_rate": eos_sum / n_rows,
        "ppo/truncated_frac": truncated_sum / n_rows,
        "ppo/actor_lr": inputs.actor_lr,
        "perf/gen_tokens_per_s": len_sum / exp.generation_s,
        "perf/train_tokens_per_s": train_tokens / update_s,
        "perf/gen_time_frac": exp.generation_s / (experience_s + update_s),
        "perf/experience_time_frac": experience_s / (experience_s + update_s),
    }
    if stage.samples_per_prompt > 1:
        metrics["ppo/flat_group_frac"] = flat_sum / n_groups  # groups whose samples all scored the same
    if inputs.critic is not None:
        explained = ppo_math.explained_variance(exp.values, exp.returns, m, dist.all_reduce_sum)
        metrics["ppo/value_explained_var"] = explained
    return metrics, int(train_tokens), int(n_rows)
