"""PPO's math as small pure functions over [batch, response_len] tensors with a 0/1 mask of valid response tokens.

Index t of every tensor is the t-th response token: its log-prob, the critic's value of the state before it, its
KL to the reference and its shaped reward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

AllReduce = Callable[[list[float]], list[float]]  # sums over ranks (dist.all_reduce_sum); the identity alone


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of the valid entries."""
    mean = masked_mean(x, mask)
    count = mask.sum()
    return ((x - mean) ** 2 * mask).sum() / (count - 1).clamp(min=1)


def global_moments(x: torch.Tensor, mask: torch.Tensor, all_reduce: AllReduce | None = None) -> tuple[float, float]:
    """Mean and unbiased variance of the valid entries over every rank's batch (`all_reduce` sums over ranks), so
    whitening and explained variance see the global batch, not one rank's share."""
    count, total, squares = [(mask.sum()).item(), (x * mask).sum().item(), (x.double() ** 2 * mask).sum().item()]
    if all_reduce is not None:
        count, total, squares = all_reduce([count, total, squares])
    mean = total / max(count, 1.0)
    var = (squares - count * mean**2) / max(count - 1.0, 1.0)
    return mean, max(var, 0.0)


def whiten(x: torch.Tensor, mask: torch.Tensor, all_reduce: AllReduce | None = None) -> torch.Tensor:
    """(x - mean) / std over the valid entries (of all ranks' batches with `all_reduce`); invalid entries come
    out 0."""
    mean, var = global_moments(x, mask, all_reduce)
    return (x - mean) / (var + 1e-8) ** 0.5 * mask


def logprobs_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) under each row of logits: [B, T, V], [B, T] -> [B, T]."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), 2, labels.unsqueeze(-1)).squeeze(-1)


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's distribution: [B, T, V] -> [B, T]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`logprobs_of` and `entropy_of` from one log-softmax; the entropy is a figure to log, computed without
    building an autograd graph."""
    logp = F.log_softmax(logits.float(), dim=-1)
    logprobs = torch.gather(logp, 2, labels.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    return logprobs, entropy


def full_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of each position's whole next-token distribution, p from `logits` and q from `ref_logits`:
    [B, T, V] -> [B, T]. A real KL, not a one-sample estimate."""
    logp, logq = F.log_softmax(logits.float(), dim=-1), F.log_softmax(ref_logits.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(actor || reference) estimate from sampled tokens: k1 = log p - log q (unbiased, can be
    negative), k3 = (q/p - 1) - log(q/p) (unbiased, never negative, lower variance)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 or k3)")


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the last valid response token (0 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (mask.long() * positions).argmax(dim=1)


def shaped_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: -kl_coef * KL at every valid token, plus the sequence score at the last valid one."""
    rewards = -kl_coef * kl * mask
    rows = torch.arange(score.shape[0], device=score.device)
    rewards[rows, last_valid_index(mask)] += score
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns (advantages + values); the episode ends at the last valid
    token, so nothing after it bootstraps."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


GROUP_ESTIMATORS = ("rloo", "grpo", "dr_grpo", "reinforce_plus_plus_baseline")  # need samples_per_prompt >= 2
ESTIMATORS = ("gae", "rloo", "grpo", "dr_grpo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")


def group_advantages(returns: torch.Tensor, group: int, estimator: str) -> torch.Tensor:
    """One advantage per response from its return and those of the other responses to the same prompt (`group`
    consecutive rows each): rloo subtracts the mean of the others (leave-one-out); grpo standardises within the
    group ((r - mean) / (std + 1e-4), 0 where all agree); dr_grpo only subtracts the group's mean (Dr. GRPO: no
    division by the std, which weighs groups that nearly agree up). [B] -> [B]."""
    r = returns.view(-1, group)
    if estimator == "rloo":
        return (r - (r.sum(dim=1, keepdim=True) - r) / (group - 1)).flatten()
    if estimator == "grpo":
        return ((r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + 1e-4)).flatten()
    if estimator == "dr_grpo":
        return (r - r.mean(dim=1, keepdim=True)).flatten()
    raise ValueError(f"unknown group estimator {estimator!r} (rloo, grpo or dr_grpo)")


def reinforce_returns(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """REINFORCE++'s per-token returns: the sum of the (KL-shaped) rewards from each token to the end of its
    response, undiscounted; 0 after it."""
    masked = rewards * mask
    return (masked.flip(1).cumsum(1).flip(1)) * mask


def subtract_group_mean(scores: torch.Tensor, group: int) -> torch.Tensor:
    """Each score less the mean of its prompt's group (`group` consecutive rows): REINFORCE++-baseline's
    baseline, applied to the score before the KL shaping. [B] -> [B]."""
    s = scores.view(-1, group)
    return (s - s.mean(dim=1, keepdim=True)).flatten()


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """A per-token loss as one number: token-mean averages every valid token of the batch (TRL, OpenRLHF, verl),
    seq-mean each response's valid tokens, then the responses."""
    if aggregation == "token-mean":
        return masked_mean(per_token, mask)
    if aggregation == "seq-mean":
        return masked_mean(per_token, mask, dim=1).mean()
    raise ValueError(f"unknown loss aggregation {aggregation!r} (token-mean or seq-mean)")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    clip_high: float = 0.0,
    aggregation: str = "token-mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate loss, the fractions of tokens where the ratio was clipped below (1 - clip) and
    above (1 + clip_high, DAPO's clip-higher; clip_high 0: the same as clip), and the approximate KL between the
    old and the new policy (k3 of the ratio), the loss aggregated as `aggregate` does."""
    high = clip_high or clip
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + high)
    loss = aggregate(torch.maximum(unclipped, clipped), mask, aggregation)
    bit = clipped > unclipped
    clipped_low = masked_mean((bit & (ratio < 1.0)).float(), mask)
    clipped_high = masked_mean((bit & (ratio > 1.0)).float(), mask)
    approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, clipped_low, clipped_high, approx_kl


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * max((v - R)^2, (clip(v) - R)^2) and the fraction of tokens where the clip bit."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, all_reduce: AllReduce | None = None
) -> float:
    """1 - Var(returns - values) / Var(returns) (over all ranks with `all_reduce`): 1 is a perfect critic, 0 no
    better than the mean."""
    _, var_returns = global_moments(returns, mask, all_reduce)
    _, var_error = global_moments(returns - values, mask, all_reduce)
    return 1.0 - var_error / max(var_returns, 1e-8)


def ptx_block_indices(pass_index: int, rank: int, world: int, per_rank: int, row: int, count: int, n_blocks: int):
    """The pre-training blocks for the micro-batch of `count` training rows starting at `row` of this rank's
    `per_rank` rows, in pass `pass_index` over the experience (iteration x ppo_epochs + epoch): one block per
    training row, each rank and pass reading blocks of its own in sequence, so none repeats before the corpus is
    used up."""
    start = (pass_index * world + rank) * per_rank + row
    return [(start + i) % n_blocks for i in range(count)]


class KLController:
    """The KL coefficient: fixed, or adaptive (Ziegler et al. 2019) towards `target` KL per sequence."""

    def __init__(self, init: float, target: float = 0.0, horizon: int = 10000) -> None:
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, current_kl: float, n_samples: int) -> None:
        if self.target <= 0:
            return
        error = max(-0.2, min(0.2, current_kl / self.target - 1.0))
        self.value *= 1.0 + error * n_samples / self.horizon
