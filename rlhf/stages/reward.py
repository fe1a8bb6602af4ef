"""Stage 2: the reward model — a backbone with a scalar head trained on chosen/rejected pairs."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from rlhf import dist, engine, models, preference
from rlhf.config import cache_dir
from rlhf.data import DataError, eval_share, onpolicy, plan_steps
from rlhf.data.tokenize import pair_batch
from rlhf.progress import describe_plan
from rlhf.stages import reward_onpolicy
from rlhf.stages.loop import Recipe, StepOutcome, merged_weights, param_counts
from rlhf.tracking import Tracker

log = logging.getLogger(__name__)

PAIR_KINDS = (*onpolicy.KINDS, "data")  # the policy's answers (see rlhf.data.onpolicy), or the data's own pair


class RewardTrainer(Recipe):
    """The reward-model recipe (rlhf.stages.loop): the pairwise loss on chosen/rejected pairs (the data's and the
    policy's own graded answers); evaluated by held-out pairwise accuracy; saved with its score mean and std."""

    name = "reward"

    def __init__(self, cfg: DictConfig, run_dir: Path, tracker: Tracker) -> None:
        super().__init__(cfg, run_dir, tracker)
        self.score_stats = {"mean": 0.0, "std": 1.0}

    def setup(self) -> None:
        cfg = self.cfg
        model_cfg = cfg.model if cfg.stage.from_policy else cfg.reward_model  # the backbone's model option
        torch.manual_seed(cfg.seed)
        self.tokenizer = models.load_tokenizer(model_cfg, cache_dir(cfg))
        processed = self.load_data(self.tokenizer)
        self.train_pairs, self.eval_pairs = processed["train"], processed["eval"]
        if cfg.stage.onpolicy.samples_per_prompt > 0:
            self.train_pairs, self.eval_pairs, counts = reward_onpolicy.with_onpolicy_pairs(
                cfg, self.tokenizer, self.out_dir, self.train_pairs, self.eval_pairs
            )
            self.tracker.summary({f"data/{self.name}/{k}": n for k, n in counts.items()})
        start = cfg.stage.init_from or (cfg.stage.policy_from if cfg.stage.from_policy else "")
        model = models.reward_model_from_lm(
            models.load_causal_lm(model_cfg, self.tokenizer, cfg.seed, start, cache_dir(cfg))
        )
        if cfg.stage.disable_dropout:
            models.disable_dropout(model)
        lora_modules = models.prepare_for_training(model, model_cfg)
        self.params = param_counts(model)
        self.steps_per_epoch, self.total_steps = plan_steps(len(self.train_pairs), cfg.stage, "reward training pairs")
        if len(self.eval_pairs) < self.world:
            raise DataError(f"{len(self.eval_pairs)} held-out pairs: the reward model needs some to evaluate")
        self.zero_stage = engine.zero_stage_of(cfg, cfg.stage.zero_stage)
        self.engine = engine.initialize(model, cfg, self.total_steps, zero_stage=self.zero_stage)
        train, held_out = len(self.train_pairs), len(self.eval_pairs)
        log.info(describe_plan("reward", "pairs", train, held_out, model, lora_modules, cfg))
        log.info("reward: %d optimizer steps", self.total_steps)

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of pairs for optimizer step `step`."""
        pad = self.tokenizer.pad_token_id
        return [pair_batch(pairs, pad) for pairs in self.micro_batches_of(self.train_pairs, step)]

    def scores(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen and the rejected answers' scores of a `pair_batch`."""
        scores = self.engine(**{k: v.to(self.engine.device) for k, v in batch.items()})
        half = scores.shape[0] // 2
        return scores[:half], scores[half:]

    def run_step(self) -> StepOutcome:
        self.engine.train()
        loss_sum, correct, pairs, tokens = 0.0, 0, 0, 0
        for batch in self.micro_batches(self.step):
            chosen, rejected = self.scores(batch)
            loss = preference.pairwise_loss(chosen, rejected, self.cfg.stage.margin)
            if self.guard.backward_step(self.engine, loss):
                loss_sum += loss.item() * len(chosen)
                correct += int((chosen > rejected).sum())
                pairs += len(chosen)
            tokens += int(batch["attention_mask"].sum())
        loss_sum, correct, pairs, tokens = dist.all_reduce_sum([loss_sum, correct, pairs, tokens])
        loss = loss_sum / max(pairs, 1)
        self.step += 1
        kept = {"reward/loss": loss, "reward/train_acc": correct / max(pairs, 1)}
        shown, samples = ("reward/loss", "reward/train_acc", "reward/lr"), self.cfg.stage.global_batch
        return StepOutcome({"reward/lr": self.engine.get_lr()[0]}, kept, shown, int(tokens), samples, loss)

    def evaluate(self, when: str) -> dict[str, float]:
        """Held-out accuracy and loss, at the start (with `stage.eval_start`), every `eval_interval` steps and at
        the end."""
        if when == "start" and not self.cfg.stage.eval_start:
            return {}
        metrics, evals = self.evaluate_pairs(), self.progress.evals
        if when == "start":
            evals |= {"eval_acc_start": metrics["reward/acc"], "eval_loss_start": metrics["reward/eval_loss"]}
            return metrics
        evals |= {"eval_loss": metrics["reward/eval_loss"], "eval_pairs": metrics["reward/eval_pairs"]}
        evals |= {f"eval_{k[len('reward/') :]}": v for k, v in metrics.items() if k.startswith("reward/acc")}
        evals |= {k.split("/")[1]: metrics[k] for k in ("reward/chosen_mean", "reward/rejected_mean")}
        return metrics

    def figures(self) -> dict:
        evals = self.progress.evals
        gap = evals.get("chosen_mean", 0.0) - evals.get("rejected_mean", 0.0)
        stats = {"gap": gap, "score_mean": self.score_stats["mean"], "score_std": self.score_stats["std"]}
        return self.history_figures() | stats | self.params

    @torch.no_grad()
    def evaluate_pairs(self) -> dict[str, float]:
        """Held-out pairwise accuracy with its 95% interval, per pair kind, the loss and the mean chosen/rejected
        scores (rlhf.preference). The mean and std of the scores of the policy's own answers among them (all
        answers when none is the policy's) become the normalisation saved with the model, so PPO's normalised
        rewards are centred on what the policy writes."""
        self.engine.eval()
        micro, pad = self.cfg.hardware.micro_batch, self.tokenizer.pad_token_id
        usable = self.eval_pairs[: self.cfg.stage.eval_pairs or None]
        mine = [usable[i] for i in eval_share(len(usable), len(usable), self.rank, self.world)]
        scored = [self.scores(pair_batch(mine[s : s + micro], pad)) for s in range(0, len(mine), micro)]
        self.engine.train()
        chosen, rejected = (torch.cat([s[side].float().cpu() for s in scored]) for side in (0, 1))
        all_are_own = not any(p.get("policy_chosen") or p.get("policy_rejected") for p in self.eval_pairs)
        sums = preference.pair_sums(mine, chosen, rejected, PAIR_KINDS, self.cfg.stage.margin, all_are_own)
        metrics, self.score_stats = preference.pair_figures(dist.all_reduce_sum(sums), PAIR_KINDS)
        if self.rank == 0:
            log.info("reward eval at step %d: %s", self.step, preference.describe(metrics, PAIR_KINDS))
        return metrics

    def save(self) -> Path:
        """Backbone and head as a sequence-classification folder with the score statistics, LoRA merged."""
        state = merged_weights(self.engine, self.zero_stage)
        target = self.out_dir / "final"
        if self.rank == 0:
            models.save_reward_model(
                self.engine.module, state, self.tokenizer, target, self.cfg.reward_model.dtype, self.score_stats
            )
            mean, std = self.score_stats["mean"], self.score_stats["std"]
            log.info("reward: final model saved to %s (score mean %.4f, std %.4f)", target, mean, std)
        dist.barrier()
        return target

    def state_dict(self) -> dict:
        return super().state_dict() | {"score_stats": self.score_stats}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.score_stats = state["score_stats"]
