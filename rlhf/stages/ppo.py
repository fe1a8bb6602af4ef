"""Stage 3: PPO of the actor against its reward (the reward model and/or reward functions, rlhf.rewards), with a
frozen reference, a critic (GAE) or a group baseline, EMA and PTX.

Each iteration (1) samples responses to a batch of prompts with the actor, (2) scores them — actor and reference
log-probs, critic values, the reward — and shapes per-token rewards with the KL penalty, (3) computes the advantages
of `stage.advantage` (rlhf.stages.ppo_experience), then (4) runs `ppo_epochs` passes of clipped policy (and value)
updates over micro-batches.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig

from rlhf import dist, gold, stats
from rlhf.config import cache_dir, ppo_rollouts
from rlhf.data import DataError, batch_indices, plan_steps
from rlhf.data.tokenize import used_columns
from rlhf.guard import all_finite
from rlhf.models import dropout_sites, load_tokenizer, save_hf
from rlhf.ppo import functional as ppo_math
from rlhf.rewards import columns_of
from rlhf.stages.loop import Recipe, StepOutcome, merged_weights, save_causal_lm
from rlhf.stages.ppo_experience import (
    Experience,
    IterationInputs,
    build_experience,
    iteration_metrics,
    rollout_gold,
)
from rlhf.stages.ppo_models import PPOModels, RewardFn, actor_logprobs
from rlhf.tracking import Tracker

log = logging.getLogger(__name__)

SHOWN_METRICS = ("ppo/reward_mean", "ppo/kl", "ppo/policy_loss", "ppo/value_loss", "ppo/clipfrac", "ppo/entropy")


class PPOTrainer(Recipe):
    """PPO iterations over the prompt share of the data mix (a recipe of rlhf.stages.loop), plus the pieces of the
    loop (`prompt_batch`, `generate_experience`, `train_step`) for people who write their own. `models` (PPOModels,
    built from the config when not given) are the four models; given, the trainer is set up at once."""

    name = "ppo"

    def __init__(
        self,
        cfg: DictConfig,
        run_dir: Path | None = None,
        tracker: Tracker | None = None,
        models: PPOModels | None = None,
        reward_fn: RewardFn | None = None,
    ) -> None:
        super().__init__(cfg, run_dir, tracker or Tracker.off(cfg, self.name))
        self.models, self.reward_fn = models, reward_fn
        self.ema: dict[str, torch.Tensor] | None = None
        self.ema_updates = 0
        if models is not None:
            self.setup()

    # 1. setup: prompts (too-long ones dropped and counted), PTX blocks, the four engines, KL controller, EMA
    def setup(self) -> None:
        cfg, stage = self.cfg, self.cfg.stage
        torch.manual_seed(cfg.seed)
        self.tokenizer = self.models.tokenizer if self.models else load_tokenizer(cfg.model, cache_dir(cfg))
        data = self.load_data(self.tokenizer)
        self.prompts, self.dropped = data["train"], data["dropped"]
        self.gold_rows = gold.held_out_rows(cfg, self.tokenizer)
        self.gold_records = gold.load(self.out_dir) if self.out_dir else {}
        self.sft_record = gold.handed_over(self.run_dir, self.cfg.stage.init_from, self.gold_rows, self.world)
        self.tracker.summary({"data/ppo/dropped_too_long": self.dropped})
        self.ptx_blocks = data["ptx"] if stage.ptx_coef > 0 else []
        if stage.ptx_coef > 0 and not self.ptx_blocks:
            raise DataError("stage.ptx_coef > 0 but the PTX source gives no block of max_prompt_len + max_answer_len")
        self.steps_per_epoch, self.total_steps = plan_steps(len(self.prompts), stage, "PPO prompts")
        if self.models is None:
            self.models = PPOModels(cfg, self.total_steps, self.reward_fn)
        torch.manual_seed(dist.rank_seed(cfg.seed))  # the models are built: from here on ranks sample apart
        self.fold_critic = self.critic_forward_folds()
        self.kl_ctl = ppo_math.KLController(stage.kl_coef, stage.kl_target, stage.kl_horizon)
        if stage.ema_beta > 0:
            state = self._actor_state()  # every rank joins the gather; rank 0 keeps the copy
            self.ema = {n: t.float().clone() for n, t in state.items()}
        log.info(
            "ppo: %d prompts (%d dropped as longer than data.max_prompt_len=%d), %d held-out gold prompts (%s), %d "
            "iterations of %d prompts x %d samples, world size %d",
            len(self.prompts),
            self.dropped,
            cfg.data.max_prompt_len,
            len(self.gold_rows),
            cfg.eval.gold_split,
            self.total_steps,
            stage.global_batch,
            stage.samples_per_prompt,
            self.world,
        )

    def critic_forward_folds(self) -> bool:
        """Whether the critic's experience forward is also its training forward: with one epoch of one mini-batch
        and one micro-batch per rank, the critic trains from the weights that scored and on the same rows, so the
        experience pass keeps its autograd graph and the update runs only the backward. Not with dropout left in the
        critic (LoRA's, or stage.disable_dropout=false): its values would be noisy where the experience needs them
        exact."""
        stage, critic = self.cfg.stage, self.models.critic
        return (
            critic is not None
            and stage.ppo_epochs == 1
            and stage.mini_batches == 1
            and ppo_rollouts(stage) // self.world <= self.cfg.hardware.micro_batch
            and not dropout_sites(critic.module)
        )

    def prompt_batch(self, step: int) -> list[dict]:
        """This rank's prompts ({prompt, input_ids}) for iteration `step`, each `samples_per_prompt` times in a
        row: a pure function of (seed, step)."""
        stage = self.cfg.stage
        mine = batch_indices(len(self.prompts), stage.global_batch, self.cfg.seed, step, self.rank, self.world)
        return [self.prompts[i] for i in mine for _ in range(stage.samples_per_prompt)]

    def prompt_batches(self) -> Iterator[list[dict]]:
        """`prompt_batch` of every remaining iteration, for a loop of your own (`train_step` advances `step`)."""
        while self.step < self.total_steps:
            yield self.prompt_batch(self.step)

    # 2. experience: sample, then score with the four models (rlhf.stages.ppo_experience)
    def generate_experience(self, batch: list[dict]) -> Experience:
        """Rollouts for prompts as `prompt_batches` gives them ({prompt, input_ids}), scored."""
        return build_experience(
            self.models, batch, self.cfg.stage, self.tokenizer, self.kl_ctl.value, keep_critic_graph=self.fold_critic
        )

    # 3. learning: ppo_epochs passes over the experience, each `mini_batches` optimizer steps of clipped policy and
    # value losses; a step accumulates the gradients of its micro-batches (DeepSpeed steps at the boundary)
    def train_step(self, exp: Experience) -> dict[str, float]:
        models, stage = self.models, self.cfg.stage
        width = exp.sequences.shape[1] - exp.response_mask.shape[1]
        micro = self.cfg.hardware.micro_batch
        actor_dev = models.actor.device
        sums: dict[str, float] = {}
        count = 0
        models.train_mode()
        for epoch in range(stage.ppo_epochs):
            order = torch.randperm(
                len(exp.sequences), generator=torch.Generator().manual_seed(self.cfg.seed + self.step * 131 + epoch)
            )
            for start in range(0, len(order), micro):
                idx = order[start : start + micro]
                # no padding beyond this micro-batch's longest prompt and response
                first, length = used_columns(exp.attention_mask[idx], exp.response_mask[idx], width, stage.prompt_width)
                seq, mask = exp.sequences[idx, first : width + length], exp.attention_mask[idx, first : width + length]
                prompt = width - first
                m = exp.response_mask[idx, :length].float().to(actor_dev)
                stats = {}
                if models.critic is not None:  # first: a graph kept from the experience (fold) is freed sooner
                    stats |= self._critic_step(exp, idx, length, seq, mask, prompt, m)
                logprobs, entropy = actor_logprobs(models.actor, seq, mask, prompt, stage.temperature, entropy=True)
                old = exp.logprobs[idx, :length].to(actor_dev)
                advantages = exp.advantages[idx, :length].to(actor_dev)
                pg_loss, clip_low, clip_high, approx_kl = ppo_math.policy_loss(
                    logprobs, old, advantages, m, stage.clip_range, stage.clip_range_high, stage.loss_aggregation
                )
                loss = pg_loss
                stats |= {
                    "policy_loss": pg_loss.item(),
                    "clipfrac": clip_low.item() + clip_high.item(),
                    "clipfrac_low": clip_low.item(),
                    "clipfrac_high": clip_high.item(),
                    "approx_kl": approx_kl.item(),
                    "entropy": ppo_math.masked_mean(entropy, m).item(),
                }
                if stage.kl_in_loss:  # GRPO's way: the KL to the reference as a loss term, not a reward
                    ref = exp.ref_logprobs[idx, :length].to(actor_dev)
                    kl = ppo_math.kl_penalty(logprobs, ref, stage.kl_estimator)
                    kl_loss = ppo_math.aggregate(kl, m, stage.loss_aggregation)
                    loss = loss + self.kl_ctl.value * kl_loss
                    stats["kl_loss"] = kl_loss.item()
                if self.ptx_blocks:
                    ptx_loss = self._ptx_loss(self.step * stage.ppo_epochs + epoch, start, len(idx), len(order))
                    loss = loss + stage.ptx_coef * ptx_loss
                    stats["ptx_loss"] = ptx_loss.item()
                actor_steps = models.actor.global_steps
                self.guard.backward_step(models.actor, loss)
                if self.ema is not None and models.actor.global_steps != actor_steps:
                    self._update_ema()  # after every actor optimizer step, as DeepSpeed-Chat does

                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        self.step += 1
        return {k: v / count for k, v in sums.items()}

    def _critic_step(self, exp: Experience, idx, length: int, seq, mask, prompt: int, m) -> dict[str, float]:
        """One clipped value-loss update of the critic on a micro-batch (GAE's returns as targets)."""
        critic = self.models.critic
        m = m.to(critic.device)
        if exp.critic_values is not None:  # the experience's forward, with its graph (critic_forward_folds)
            values = exp.critic_values[idx.to(critic.device), :length]
        else:
            values = critic(seq.to(critic.device), mask.to(critic.device), per_token=True)[:, prompt - 1 : -1]
        old_values = exp.values[idx, :length].to(critic.device)
        returns = exp.returns[idx, :length].to(critic.device)
        v_loss, v_clipfrac = ppo_math.value_loss(values.float(), old_values, returns, m, self.cfg.stage.value_clip)
        self.guard.backward_step(critic, v_loss)
        return {"value_loss": v_loss.item(), "value_clipfrac": v_clipfrac.item()}

    def _ptx_loss(self, pass_index: int, row: int, count: int, per_rank: int) -> torch.Tensor:
        """The language-model loss on pre-training blocks of this rank's own (see ppo_math.ptx_block_indices)."""
        index = ppo_math.ptx_block_indices(
            pass_index, self.rank, self.world, per_rank, row, count, len(self.ptx_blocks)
        )
        ids = torch.tensor([self.ptx_blocks[i] for i in index], device=self.models.actor.device)
        return self.models.actor(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss

    def _actor_state(self) -> dict[str, torch.Tensor]:
        """The actor's full weights with LoRA merged (gathered under ZeRO-3); on rank 0 only."""
        return merged_weights(self.models.actor, self.models.actor_zero)

    def _update_ema(self) -> None:
        """ema = beta * ema + (1 - beta) * actor; under ZeRO-3 every rank joins the gather of the whole actor."""
        beta = self.cfg.stage.ema_beta
        self.ema_updates += 1
        for name, value in self._actor_state().items():
            self.ema[name].mul_(beta).add_(value.float(), alpha=1.0 - beta)

    # 4. one iteration: experience, then learning; the loop (rlhf.stages.loop) runs the iterations, evaluations and
    # checkpoints (also between experience and learning, at a stop request). An iteration with a non-finite reward
    # is skipped, as is an update with a non-finite loss
    def run_step(self) -> StepOutcome:
        stage, timers = self.cfg.stage, self.progress.timers
        started = time.perf_counter()
        exp = self.generate_experience(self.prompt_batch(self.step))
        if self.checkpoints is not None:
            self.checkpoints.check_stop()
        experience_s = time.perf_counter() - started
        if not all_finite(exp.reward, exp.values):
            self.guard.skip_step()
            self.step += 1
            log.warning("ppo iteration %d: non-finite reward or value; skipped", self.step)
            return StepOutcome({}, {}, (), 0, 0)
        stats = self.train_step(exp)
        update_s = time.perf_counter() - started - experience_s
        for timer, seconds in (("experience_s", experience_s), ("rollout_s", exp.generation_s), ("update_s", update_s)):
            timers[timer] = timers.get(timer, 0.0) + seconds
        metrics, tokens = self._iteration_metrics(exp, stats, experience_s, update_s)
        if self.step % stage.sample_table_interval == 0 or self.step == 1:
            rows = [{"step": self.step, "prompt": str(p), "response": r, "score": s} for p, r, s in exp.texts[:4]]
            self.tracker.table("ppo/samples", rows, step=self.step)  # before the loop commits the step
        log_rate = metrics["perf/gen_tokens_per_s"]
        shown = tuple(k for k in SHOWN_METRICS if k in metrics)  # no value loss without a critic (rloo, grpo)
        return StepOutcome(metrics, {}, shown, tokens, ppo_rollouts(stage), metrics, log_rate)

    def evaluate(self, when: str) -> dict[str, float]:
        """The held-out gold evaluation (see `evaluate_gold`) with its summary figures."""
        metrics = self.evaluate_gold(when)
        self.progress.evals |= gold.summary_figures(metrics, "_start" if when == "start" else "")
        return metrics

    def figures(self) -> dict:
        stage, progress = self.cfg.stage, self.progress
        evals, history, timers = progress.evals, progress.history, progress.timers
        window = max(1, min(5, len(history) // 4))

        def mean_of(key: str, rows: list[dict]) -> float:
            values = [r[key] for r in rows if not math.isnan(r.get(key, math.nan))]  # rank 0's alone; nan: no pair
            return sum(values) / len(values) if values else math.nan

        total = progress.train_seconds
        return {
            "steps": self.step,
            "samples": self.step * ppo_rollouts(stage),
            "train_s": total,
            "samples_per_s": len(history) * ppo_rollouts(stage) / total if total else 0.0,
            "s_per_step": total / len(history) if history else float("nan"),
            "gen_time_frac": timers.get("rollout_s", 0.0) / total if total else float("nan"),
            "experience_time_frac": timers.get("experience_s", 0.0) / total if total else float("nan"),
            "tokens_per_s": mean_of("perf/train_tokens_per_s", history),
            "gen_tokens_per_s": mean_of("perf/gen_tokens_per_s", history),
            "reward_first": mean_of("ppo/reward_mean", history[:window]),
            "reward_last": mean_of("ppo/reward_mean", history[-window:]),
            "kl_first": mean_of("ppo/kl", history[:window]),
            "kl_last": mean_of("ppo/kl", history[-window:]),
            "kl_max": max((r["ppo/kl"] for r in history), default=float("nan")),
            "rollout_gold_first": mean_of("ppo/gold_mean", history[:window]),
            "rollout_gold_last": mean_of("ppo/gold_mean", history[-window:]),
            "reward_gold_auc_first": mean_of("ppo/reward_gold_auc", history[:window]),
            "reward_gold_auc_last": mean_of("ppo/reward_gold_auc", history[-window:]),
            "reward_gold_pair_acc": mean_of("ppo/reward_gold_pair_acc", history),
            **evals,
            **gold.delta_figures(self.gold_records),
            "dropped_prompts": self.dropped,
            "skipped_steps": self.guard.skipped,
        }

    def _iteration_metrics(
        self, exp: Experience, stats: dict[str, float], experience_s: float, update_s: float
    ) -> tuple[dict[str, float], int]:
        """The iteration's figures over all ranks (iteration_metrics) and the tokens it trained on; updates the KL
        controller with the iteration's KL."""
        actor, critic = self.models.actor, self.models.critic
        figures = IterationInputs(self.tokenizer.eos_token_id, self.kl_ctl.value, actor.get_lr()[0], critic)
        metrics, train_tokens, n_rows = iteration_metrics(exp, self.cfg.stage, figures, stats, experience_s, update_s)
        self.kl_ctl.update(metrics["ppo/kl"], n_rows)
        return metrics | rollout_gold(exp), train_tokens

    @torch.no_grad()
    def evaluate_gold(self, when: str) -> dict[str, float]:
        """On the held-out gold prompts answered greedily: the gold score (with its 95% interval, per family), the
        reward (as PPO learns from it), and the KL to the reference along the answers of the first `eval.kl_prompts`
        (the KL of the whole next-token distributions, summed over each answer's tokens, in nats; 0 before the first
        update, when the actor is the reference). The per-prompt outcomes are kept under `when` in
        `<run>/ppo/gold.json`. Empty when the mix has no built-in prompts."""
        cfg, models = self.cfg, self.models
        rows = gold.my_share(self.gold_rows)
        if not rows:
            return {}
        models.eval_mode()
        if when == "start" and self.sft_record is not None:
            return self._evaluate_handed_over(rows)
        with models.generation_mode() as model:
            answers = list(gold.answers(model, self.tokenizer, rows, cfg.eval.batch, cfg.eval.max_new_tokens))
        kl_sum, kl_rows, reward_sum, correct, texts = 0.0, 0, 0.0, [], []
        kl_share = 0 if self.step == 0 else cfg.eval.kl_prompts // self.world  # the actor is the reference at 0
        if models.reference is None:  # kl_coef 0: no reference model to measure the KL to
            kl_share = 0
        for batch in answers:
            limit = max(0, min(len(batch.rows), kl_share - kl_rows))
            if limit:
                kl_sum += gold.answers_kl(models.actor, models.reference, batch, limit, cfg.hardware.micro_batch)
                kl_rows += limit
            prompts, columns = [r["prompt"] for r in batch.rows], columns_of(batch.rows)
            reward, _ = models.reward(prompts, batch.texts, columns, batch.sequences, batch.attention_mask)
            reward_sum += reward.sum().item()
            correct += gold.grade(batch.rows, batch.texts)
            texts += batch.texts
        kl_sum, kl_rows, reward_sum, n = dist.all_reduce_sum([kl_sum, kl_rows, reward_sum, len(rows)])
        metrics = {"eval/reward": reward_sum / n}
        if models.reference is not None:
            metrics["eval/kl"] = kl_sum / kl_rows if kl_rows else 0.0
        record = gold.gather(rows, correct, texts)
        if record is not None:  # rank 0
            metrics |= gold.keep(self.gold_records, when, record, self.out_dir)
            log.info(
                "ppo eval (%s, step %d): gold %s, reward %.4f, KL to reference %.3f nats (%d prompts, greedy)",
                when,
                self.step,
                stats.wilson_interval(sum(record.correct), len(record.correct)).text(),
                metrics["eval/reward"],
                metrics.get("eval/kl", math.nan),
                len(record.correct),
            )
        return metrics

    def _evaluate_handed_over(self, rows: list[dict]) -> dict[str, float]:
        """The start evaluation from the SFT stage's final one (the same model, prompts and greedy answers): only
        the reward model scores its answers; the KL is 0, the actor being the reference."""
        mine = gold.my_share(list(zip(self.sft_record.prompts, self.sft_record.responses, strict=True)))
        reward_sum = 0.0
        for start in range(0, len(mine), self.cfg.eval.batch):
            part = slice(start, start + self.cfg.eval.batch)
            prompts, texts = zip(*mine[part], strict=True)
            reward, _ = self.models.reward(list(prompts), list(texts), columns_of(rows[part]))
            reward_sum += reward.sum().item()
        reward_sum, n = dist.all_reduce_sum([reward_sum, len(rows)])
        metrics = {"eval/reward": reward_sum / n} | ({"eval/kl": 0.0} if self.models.reference is not None else {})
        if self.rank == 0:
            metrics |= gold.keep(self.gold_records, "start", self.sft_record, self.out_dir)
            log.info(
                "ppo eval (start): the SFT stage's final gold evaluation (the same model), reward %.4f",
                metrics["eval/reward"],
            )
        return metrics

    # 5. save: the actor (LoRA merged) and, with EMA, the EMA actor beside it
    def save(self) -> Path:
        target = self.out_dir / "final"
        save_causal_lm(self.models.actor, self.models.actor_zero, self.cfg, self.tokenizer, target)
        if self.rank == 0:
            if self.ema is not None:
                config, dtype = self.models.actor.module.config, self.cfg.model.dtype
                save_hf(config, self.ema, self.tokenizer, target.with_name("final-ema"), dtype)
            log.info("ppo: final actor saved to %s%s", target, " (EMA beside it)" if self.ema is not None else "")
        dist.barrier()
        return target

    # 6. checkpoints (rlhf.checkpoint): both trained engines, and the loop state, KL coefficient and EMA
    def engines(self) -> dict:
        if self.models.critic is None:
            return {"actor": self.models.actor}
        return {"actor": self.models.actor, "critic": self.models.critic}

    def state_dict(self) -> dict:
        return super().state_dict() | {"kl_coef": self.kl_ctl.value, "ema": self.ema}

    def load_state_dict(self, state: dict) -> None:
        progress = state["progress"]
        if "gen_s" in progress:  # a checkpoint from before the stage loop: the phase times under their old names
            timers = {"experience_s": progress["gen_s"], "update_s": progress["train_s"]}
            timers["rollout_s"] = progress["rollout_s"]
            progress = {
                "history": progress["history"],
                "evals": progress["evals"],
                "train_seconds": progress["gen_s"] + progress["train_s"],
                "samples": state["step"] * ppo_rollouts(self.cfg.stage),
                "timers": timers,
            }
        super().load_state_dict(state | {"progress": progress})
        self.kl_ctl.value = state["kl_coef"]
        if self.ema is not None and self.rank == 0:
            self.ema = state["ema"]
