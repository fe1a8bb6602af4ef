"""Direct preference optimisation: the policy trained on chosen/rejected pairs against a frozen copy of itself (the
reference), with no reward model, critic or sampling; the losses (DPO, IPO, SimPO) in rlhf.preference.

The reference's log-probs of a pair do not change while the policy trains: with `stage.precompute_reference` they are
computed once, before training, for every pair the run will use, and the reference is then dropped (its memory
freed); otherwise a frozen reference engine (ZeRO-3 partitioned like the policy under ZeRO-3) scores each batch.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from rlhf import dist, engine, gold, models, preference, rollout
from rlhf.config import cache_dir
from rlhf.data import DataError, eval_share, plan_steps
from rlhf.data.tokenize import answer_pair_batch
from rlhf.progress import describe_plan
from rlhf.stages import reward_onpolicy
from rlhf.stages.loop import Recipe, StepOutcome, param_counts
from rlhf.stats import wilson_interval
from rlhf.tracking import Tracker

log = logging.getLogger(__name__)

SHOWN = ("dpo/loss", "dpo/rewards/accuracies", "dpo/rewards/margins", "dpo/lr")


class DPOTrainer(Recipe):
    """The DPO recipe (rlhf.stages.loop): a preference loss on the answers' log-probs under the policy and the
    reference; evaluated by the held-out pairs' implicit-reward accuracy (with its interval) and, at the start and
    the end, the gold score of greedy answers; saved as a Hugging Face folder."""

    name = "dpo"

    def __init__(self, cfg: DictConfig, run_dir: Path, tracker: Tracker) -> None:
        super().__init__(cfg, run_dir, tracker)
        self.reference = None
        self.reference_s = 0.0  # seconds spent on the reference's log-probs

    def setup(self) -> None:
        cfg, stage = self.cfg, self.cfg.stage
        torch.manual_seed(cfg.seed)
        self.tokenizer = models.load_tokenizer(cfg.model, cache_dir(cfg))
        processed = self.load_data(self.tokenizer)
        self.train_pairs, self.eval_pairs = processed["train"], processed["eval"]
        if stage.onpolicy.samples_per_prompt > 0:
            stage.policy_from = stage.policy_from or stage.init_from
            self.train_pairs, self.eval_pairs, counts = reward_onpolicy.with_onpolicy_pairs(
                cfg, self.tokenizer, self.out_dir, self.train_pairs, self.eval_pairs
            )
            self.tracker.summary({f"data/{self.name}/{k}": n for k, n in counts.items()})
        model = models.load_causal_lm(cfg.model, self.tokenizer, cfg.seed, stage.init_from, cache_dir(cfg))
        if stage.disable_dropout:
            models.disable_dropout(model)
        reference = copy.deepcopy(model) if stage.loss != "simpo" else None  # SimPO needs none
        lora_modules = models.prepare_for_training(model, cfg.model)
        self.params = param_counts(model)
        self.steps_per_epoch, self.total_steps = plan_steps(len(self.train_pairs), stage, "DPO training pairs")
        if len(self.eval_pairs) < self.world:
            raise DataError(f"{len(self.eval_pairs)} held-out pairs: DPO needs some to evaluate")
        self.zero_stage = cfg.hardware.zero_stage
        self.engine = engine.initialize(model, cfg, self.total_steps)
        if reference is not None:
            self.reference = engine.initialize_frozen(reference, cfg, self.zero_stage)
            if stage.precompute_reference:
                self.precompute_reference()
        self.generation_model = rollout.GenerationModel(self.engine.module, self.zero_stage)
        self.gold_rows = gold.held_out_rows(cfg, self.tokenizer)
        self.gold_records = gold.load(self.out_dir)
        train, held_out = len(self.train_pairs), len(self.eval_pairs)
        log.info(describe_plan("dpo", "pairs", train, held_out, model, lora_modules, cfg))
        log.info("dpo: %s loss, beta %g, %d optimizer steps", stage.loss, stage.beta, self.total_steps)

    @torch.no_grad()
    def precompute_reference(self) -> None:
        """The reference's log-probs of every pair this rank will train or evaluate on, kept in the pairs; then the
        reference engine is dropped."""
        started = time.perf_counter()
        needed = {id(p): p for step in range(self.total_steps) for mb in self.micro_batches_of(self.train_pairs, step)
                  for p in mb}  # fmt: skip
        needed |= {id(p): p for p in self.eval_share()}
        pairs, micro = list(needed.values()), self.cfg.hardware.micro_batch
        for start in range(0, len(pairs), micro):
            chunk = pairs[start : start + micro]
            chosen, rejected = self.logps(self.reference, answer_pair_batch(chunk, self.tokenizer.pad_token_id))
            for pair, c, r in zip(chunk, chosen.tolist(), rejected.tolist(), strict=True):
                pair["ref_logps"] = (c, r)
        self.reference = None
        self.reference_s = time.perf_counter() - started
        log.info(
            "dpo: the reference's log-probs of %d pairs in %.1f s; reference dropped", len(pairs), self.reference_s
        )

    def eval_share(self) -> list[dict]:
        usable = self.eval_pairs[: self.cfg.stage.eval_pairs or None]
        return [usable[i] for i in eval_share(len(usable), len(usable), self.rank, self.world)]

    def logps(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen and the rejected answers' summed log-probs under `model` for an `answer_pair_batch`. The LM
        head and the softmax run only from the batch's first answer column on, not over the prompts."""
        device = model.device
        ids, answer_mask = batch["input_ids"].to(device), batch["answer_mask"].to(device)
        first = max(int(answer_mask.argmax(dim=1).min()) - 1, 0)  # the position that predicts the first answer token
        keep = torch.arange(first, ids.shape[1] - 1, device=device)  # the last position predicts nothing
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device), logits_to_keep=keep).logits
        summed = preference.answer_logps(logits, ids[:, first:], answer_mask[:, first:])
        half = summed.shape[0] // 2
        return summed[:half], summed[half:]

    def pair_losses(self, pairs: list[dict]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of a micro-batch of pairs and its per-pair figures (rewards, log-probs)."""
        stage = self.cfg.stage
        batch = answer_pair_batch(pairs, self.tokenizer.pad_token_id)
        chosen, rejected = self.logps(self.engine, batch)
        lengths = batch["answer_mask"].sum(dim=1).clamp(min=1).to(chosen.device, chosen.dtype)
        half = len(pairs)
        reference = None
        if stage.loss != "simpo":
            if "ref_logps" in pairs[0]:
                reference = tuple(
                    torch.tensor([p["ref_logps"][i] for p in pairs], device=chosen.device) for i in (0, 1)
                )
            else:
                with torch.no_grad():
                    reference = self.logps(self.reference, batch)
        losses, chosen_reward, rejected_reward = preference.dpo_loss(
            (chosen, rejected), reference, (lengths[:half], lengths[half:]), stage.loss, stage.beta,
            stage.label_smoothing, stage.simpo_gamma, stage.rpo_alpha,
        )  # fmt: skip
        figures = {"chosen": chosen_reward, "rejected": rejected_reward, "logps_c": chosen, "logps_r": rejected}
        figures["nll"] = -chosen / lengths[:half]  # the chosen answers' per-token NLL, RPO's term
        return losses.mean(), {k: v.detach().float() for k, v in figures.items()}

    def run_step(self) -> StepOutcome:
        self.engine.train()
        sums = [0.0] * 8  # pairs, loss, right, chosen, rejected, log-probs chosen, rejected, chosen NLL
        tokens = 0
        for pairs in self.micro_batches_of(self.train_pairs, self.step):
            loss, f = self.pair_losses(pairs)
            if self.guard.backward_step(self.engine, loss):
                sums = [a + b for a, b in zip(sums, figure_sums(len(pairs), loss.item(), f), strict=True)]
            tokens += sum(len(p["chosen"]) + len(p["rejected"]) for p in pairs)
        sums, tokens = dist.all_reduce_sum(sums), int(dist.all_reduce_sum([tokens])[0])
        self.step += 1
        kept = figure_metrics(sums, "dpo/")
        lr = {"dpo/lr": self.engine.get_lr()[0]}
        return StepOutcome(lr, kept, SHOWN, tokens, self.cfg.stage.global_batch, kept.get("dpo/loss", math.nan))

    @torch.no_grad()
    def evaluate_pairs(self) -> dict[str, float]:
        """The held-out pairs' loss, implicit rewards and accuracy (a tie is wrong) with its 95% interval."""
        self.engine.eval()
        mine, micro = self.eval_share(), self.cfg.hardware.micro_batch
        sums = [0.0] * 8
        for start in range(0, len(mine), micro):
            chunk = mine[start : start + micro]
            loss, f = self.pair_losses(chunk)
            sums = [a + b for a, b in zip(sums, figure_sums(len(chunk), loss.item(), f), strict=True)]
        self.engine.train()
        sums = dist.all_reduce_sum(sums)
        metrics = figure_metrics(sums, "dpo/eval/")
        accuracy = wilson_interval(int(sums[2]), int(sums[0]))
        metrics |= {"dpo/eval/acc_ci_low": accuracy.low, "dpo/eval/acc_ci_high": accuracy.high}
        if self.rank == 0:
            log.info(
                "dpo eval at step %d: accuracy %s on %d pairs, loss %.4f, margin %.3f",
                self.step, accuracy.text(), int(sums[0]), metrics["dpo/eval/loss"], metrics["dpo/eval/rewards/margins"],
            )  # fmt: skip
        return metrics

    def evaluate(self, when: str) -> dict[str, float]:
        """The held-out pairs (every `eval_interval` steps and at the end) and, at the start and the end, the gold
        score of greedy answers, kept under `when` in `<run>/dpo/gold.json`."""
        metrics = self.evaluate_pairs() if when != "start" else {}
        if metrics:
            accuracy = metrics["dpo/eval/rewards/accuracies"]
            self.progress.evals |= {
                "eval_acc": accuracy,
                "eval_acc_ci_low": metrics["dpo/eval/acc_ci_low"],
                "eval_acc_ci_high": metrics["dpo/eval/acc_ci_high"],
                "eval_pairs": metrics["dpo/eval/pairs"],
                "eval_loss": metrics["dpo/eval/loss"],
                "eval_margin": metrics["dpo/eval/rewards/margins"],
            }
        return metrics | self.evaluate_gold(when)

    def kl_reference(self):
        """The policy the stage started from, to measure the final answers' KL to (as PPO's eval/kl): the frozen
        reference engine, or the start loaded again where its log-probs were precomputed and it was dropped."""
        if self.cfg.eval.kl_prompts <= 0:
            return None
        if self.reference is not None:
            return self.reference
        cfg = self.cfg
        with torch.random.fork_rng(devices=[]):  # a tiny model is built from the seed: leave the stream alone
            start = models.load_causal_lm(cfg.model, self.tokenizer, cfg.seed, cfg.stage.init_from, cache_dir(cfg))
        return engine.initialize_frozen(start, cfg, self.zero_stage)

    def figures(self) -> dict:
        extra = {"reference_s": self.reference_s}
        return self.history_figures() | gold.delta_figures(self.gold_records) | self.params | extra

    def save(self) -> Path:
        """The final policy as a Hugging Face folder, LoRA merged, written atomically by rank 0."""
        return self.save_policy(self.zero_stage)


def figure_sums(pairs: int, loss: float, f: dict[str, torch.Tensor]) -> list[float]:
    """A micro-batch's sums behind `figure_metrics`, to be added over micro-batches and ranks."""
    right = int((f["chosen"] > f["rejected"]).sum())
    return [
        pairs,
        loss * pairs,
        right,
        f["chosen"].sum().item(),
        f["rejected"].sum().item(),
        f["logps_c"].sum().item(),
        f["logps_r"].sum().item(),
        f["nll"].sum().item(),
    ]


def figure_metrics(sums: list[float], prefix: str) -> dict[str, float]:
    """TRL's DPO figures (rewards/chosen, rejected, margins, accuracies, logps/chosen, rejected, nll_loss: the
    chosen answers' per-token NLL, in the loss with rpo_alpha) and the loss."""
    n, loss, right, chosen, rejected, logps_c, logps_r, nll = sums
    if n == 0:
        return {}
    return {
        f"{prefix}loss": loss / n,
        f"{prefix}pairs": n,
        f"{prefix}rewards/chosen": chosen / n,
        f"{prefix}rewards/rejected": rejected / n,
        f"{prefix}rewards/margins": (chosen - rejected) / n,
        f"{prefix}rewards/accuracies": right / n,
        f"{prefix}logps/chosen": logps_c / n,
        f"{prefix}nll_loss": nll / n,
        f"{prefix}logps/rejected": logps_r / n,
    }
