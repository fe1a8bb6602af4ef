"""Pairwise preferences: the Bradley-Terry loss, the DPO family's losses, and the held-out figures of scored
chosen/rejected pairs.

The reward stage evaluates its model with `pair_sums` (one rank's share of the pairs, summed over the ranks) and
`pair_figures` (accuracy with its interval, per kind of pair, the loss, the mean scores, and the statistics of the
policy's own answers' scores that PPO normalises with). The DPO stage scores a pair by its implicit rewards
(`dpo_loss`) and reports them the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from rlhf.stats import Interval, wilson_interval


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected - margin): the Bradley-Terry preference loss."""
    return -F.logsigmoid(chosen - rejected - margin).mean()


DPO_LOSSES = ("sigmoid", "ipo", "simpo")


def dpo_loss(
    policy: tuple[torch.Tensor, torch.Tensor],
    reference: tuple[torch.Tensor, torch.Tensor] | None,
    lengths: tuple[torch.Tensor, torch.Tensor],
    kind: str,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.0,
    rpo_alpha: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the chosen and rejected answers' implicit rewards, from the summed log-probs of the
    answers under the policy and (not for simpo) the frozen reference, and the answers' token counts.

    - sigmoid (DPO): -(1 - e) log sigmoid(z) - e log sigmoid(-z), z = beta ((pc - rc) - (pr - rr)), e the label
      smoothing (conservative DPO); rewards beta (p - r).
    - ipo: (z - 1 / (2 beta))^2 with z = (pc - rc) - (pr - rr) over per-token mean log-probs (as IPO and TRL);
      rewards beta (p - r) of those means.
    - simpo: reference-free, -(1 - e) log sigmoid(z) - e log sigmoid(-z), z = beta (pc / |c| - pr / |r|) - gamma;
      rewards beta p / |answer|.

    `rpo_alpha` adds rpo_alpha times the chosen answer's per-token negative log-likelihood to each pair's loss (RPO,
    Pang et al. 2024; TRL's `rpo_alpha`): the preference term alone can lower the chosen answer's likelihood along
    with the rejected one's and move probability to answers neither holds (longer ones, in practice).
    """
    if kind not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss {kind!r}: one of {', '.join(DPO_LOSSES)}")
    chosen, rejected = policy
    chosen_nll = -chosen / lengths[0]
    if kind in ("ipo", "simpo"):  # per-token means
        chosen, rejected = chosen / lengths[0], rejected / lengths[1]
    if kind == "simpo":
        chosen_reward, rejected_reward = beta * chosen, beta * rejected
        z = chosen_reward - rejected_reward - simpo_gamma
    else:
        ref_chosen, ref_rejected = reference
        if kind == "ipo":
            ref_chosen, ref_rejected = ref_chosen / lengths[0], ref_rejected / lengths[1]
        chosen_reward, rejected_reward = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
        z = (chosen_reward - rejected_reward) / (1.0 if kind == "sigmoid" else beta)
    if kind == "ipo":
        losses = (z - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    if rpo_alpha:
        losses = losses + rpo_alpha * chosen_nll
    return losses, chosen_reward.detach(), rejected_reward.detach()


def answer_logps(logits: torch.Tensor, input_ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the summed log-probs of the answer tokens (`answer_mask` 1 on them) given what precedes them;
    `logits` [B, T - 1, V] are the predictions of tokens 1.. of `input_ids` [B, T] (the last position's left out)."""
    logps = torch.log_softmax(logits.float(), dim=-1)
    token = logps.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token * answer_mask[:, 1:]).sum(dim=1)


def policy_scores(pair: dict, chosen: float, rejected: float) -> list[float]:
    """The scores of those answers of a pair that the policy wrote."""
    return [
        score for score, own in ((chosen, pair.get("policy_chosen")), (rejected, pair.get("policy_rejected"))) if own
    ]


def pair_sums(
    pairs: list[dict],
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    kinds: Sequence[str],
    margin: float,
    all_are_own: bool,
) -> list[float]:
    """One rank's sums behind `pair_figures`, to be added over the ranks: pairs, right ones (a tie is wrong), loss,
    chosen and rejected scores, the own scores' count, sum and sum of squares (the policy's answers, or every answer
    with `all_are_own`), then pairs and right ones of each of `kinds` (a pair's `kind`)."""
    right = (chosen > rejected).tolist()
    own = chosen.tolist() + rejected.tolist()
    if not all_are_own:
        scores = zip(pairs, chosen.tolist(), rejected.tolist(), strict=True)
        own = [s for p, c, r in scores for s in policy_scores(p, c, r)]
    per_kind = []
    for kind in kinds:
        hits = [r for r, p in zip(right, pairs, strict=True) if p["kind"] == kind]
        per_kind += [len(hits), sum(hits)]
    loss = pairwise_loss(chosen, rejected, margin).item() * len(chosen) if len(chosen) else 0.0
    return [
        len(chosen),
        sum(right),
        loss,
        chosen.sum().item(),
        rejected.sum().item(),
        len(own),
        sum(own),
        sum(x * x for x in own),
        *per_kind,
    ]


def pair_figures(sums: Sequence[float], kinds: Sequence[str]) -> tuple[dict[str, float], dict[str, float]]:
    """From `pair_sums` added over the ranks: the W&B metrics (accuracy with its 95% Wilson interval, per kind,
    loss, mean chosen/rejected scores, gap) and the score statistics (mean and std of the own scores, counts)."""
    n, correct, loss_sum, chosen_sum, rejected_sum, own_n, own_sum, own_sq, *per_kind = sums
    mean = own_sum / max(own_n, 1)
    score_stats = {
        "mean": mean,
        "std": max(own_sq / max(own_n, 1) - mean**2, 0.0) ** 0.5,
        "pairs": int(n),
        "answers": int(own_n),
    }
    accuracy = wilson_interval(int(correct), int(n))
    metrics = {
        "reward/acc": accuracy.value,
        "reward/acc_ci_low": accuracy.low,
        "reward/acc_ci_high": accuracy.high,
        "reward/eval_pairs": n,
        "reward/eval_loss": loss_sum / n,
        "reward/chosen_mean": chosen_sum / n,
        "reward/rejected_mean": rejected_sum / n,
        "reward/gap": (chosen_sum - rejected_sum) / n,
    }
    for kind, count, hits in zip(kinds, per_kind[::2], per_kind[1::2], strict=True):
        if count:
            metrics[f"reward/acc_{kind}"] = hits / count
    return metrics, score_stats


def describe(metrics: dict[str, float], kinds: Sequence[str]) -> str:
    """The evaluation in one line: accuracy with its interval, per kind, loss and mean scores."""
    accuracy = Interval(metrics["reward/acc"], metrics["reward/acc_ci_low"], metrics["reward/acc_ci_high"])
    by_kind = ", ".join(f"{k} {metrics[f'reward/acc_{k}']:.3f}" for k in kinds if f"reward/acc_{k}" in metrics)
    return (
        f"acc {accuracy.text()} on {int(metrics['reward/eval_pairs'])} pairs ({by_kind}), loss "
        f"{metrics['reward/eval_loss']:.4f}, chosen {metrics['reward/chosen_mean']:.3f}, rejected "
        f"{metrics['reward/rejected_mean']:.3f}"
    )
