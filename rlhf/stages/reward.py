"""Stage 2: the reward model — a backbone with a scalar head trained on chosen/rejected pairs."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from rlhf import dist, engine, lora, models, stats
from rlhf.checkpoint import Checkpointer
from rlhf.config import cache_dir
from rlhf.data import DataError, batch_indices, datasets, onpolicy, plan_steps
from rlhf.data.tokenize import pad_right
from rlhf.guard import StepGuard
from rlhf.progress import describe_plan, loss_figures
from rlhf.stages import loop, reward_onpolicy
from rlhf.stages.loop import LoopProgress, StepOutcome
from rlhf.tracking import Tracker

log = logging.getLogger(__name__)


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected - margin): the Bradley-Terry preference loss."""
    return -F.logsigmoid(chosen - rejected - margin).mean()


PAIR_KINDS = (*onpolicy.KINDS, "data")  # the policy's answers (see rlhf.data.onpolicy), or the data's own pair


def pair_batch(pairs: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows in one right-padded batch, so one forward pass scores both."""
    rows = [{"input_ids": p[k], "labels": p[k]} for k in ("chosen", "rejected") for p in pairs]
    batch = pad_right(rows, pad_id)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def policy_scores(pair: dict, chosen: float, rejected: float) -> list[float]:
    """The scores of those answers of a pair that the policy wrote."""
    return [
        score for score, own in ((chosen, pair.get("policy_chosen")), (rejected, pair.get("policy_rejected"))) if own
    ]


class RewardTrainer:
    """The reward-model recipe (rlhf.stages.loop.Stage): setup (with on-policy pairs), a step, held-out pairwise
    accuracy, save (with the score mean/std), and its engine and loop state for checkpoints."""

    name = "reward"

    def __init__(self, cfg: DictConfig, run_dir: Path, tracker: Tracker) -> None:
        self.cfg, self.run_dir, self.tracker = cfg, run_dir, tracker
        self.out_dir = run_dir / self.name
        self.step = 0
        self.rank, self.world = dist.rank(), dist.world_size()
        self.score_stats = {"mean": 0.0, "std": 1.0}
        self.progress = LoopProgress()
        self.guard = StepGuard(self.name, cfg.checkpoint.max_skipped_in_a_row)
        self.checkpoints: Checkpointer | None = None  # set by the stage runner; None: no checkpoints

    # 1. setup: tokenizer, pairs, backbone + head (+ LoRA, checkpointing), DeepSpeed engine
    def setup(self) -> None:
        cfg = self.cfg
        model_cfg = cfg.model if cfg.stage.from_policy else cfg.reward_model  # the backbone's model option
        torch.manual_seed(cfg.seed)
        self.tokenizer = models.load_tokenizer(model_cfg, cache_dir(cfg))
        processed = datasets.processed(cfg, self.name, self.tokenizer)
        self.train_pairs, self.eval_pairs = processed["train"], processed["eval"]
        self.tracker.summary({f"data/{self.name}/{source}": n for source, n in processed["counts"].items()})
        if cfg.stage.onpolicy.samples_per_prompt > 0:
            self.train_pairs, self.eval_pairs, counts = reward_onpolicy.with_onpolicy_pairs(
                cfg, self.tokenizer, self.out_dir, self.train_pairs, self.eval_pairs
            )
            self.tracker.summary({f"data/{self.name}/{k}": n for k, n in counts.items()})

        start = cfg.stage.init_from or (cfg.stage.policy_from if cfg.stage.from_policy else "")
        lm = models.load_causal_lm(model_cfg, self.tokenizer, cfg.seed, start, cache_dir(cfg))
        model = models.reward_model_from_lm(lm)
        del lm
        if cfg.stage.disable_dropout:
            models.disable_dropout(model)
        self.lora_modules = models.prepare_for_training(model, model_cfg)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

        self.global_batch, self.micro_batch = cfg.stage.global_batch, cfg.hardware.micro_batch
        self.steps_per_epoch, self.total_steps = plan_steps(len(self.train_pairs), cfg.stage, "reward training pairs")
        if len(self.eval_pairs) < self.world:
            raise DataError(f"{len(self.eval_pairs)} held-out pairs: the reward model needs some to evaluate")
        self.engine = engine.initialize(model, cfg, self.total_steps)
        log.info(
            describe_plan("reward", "pairs", len(self.train_pairs), len(self.eval_pairs), model, self.lora_modules, cfg)
        )
        log.info("reward: %d optimizer steps", self.total_steps)

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of pairs for optimizer step `step` (a pure function of seed and step)."""
        mine = batch_indices(len(self.train_pairs), self.global_batch, self.cfg.seed, step, self.rank, self.world)
        pad = self.tokenizer.pad_token_id
        return [
            pair_batch([self.train_pairs[i] for i in mine[m : m + self.micro_batch]], pad)
            for m in range(0, len(mine), self.micro_batch)
        ]

    def _scores(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        eng = self.engine
        scores = eng(**{k: v.to(eng.device) for k, v in batch.items()})
        half = scores.shape[0] // 2
        return scores[:half], scores[half:]

    def train(self) -> dict:
        """Every remaining step through the stage loop; the summary figures."""
        return loop.train(self)

    # 2. one optimizer step over this rank's micro-batches of pairs; the loop (rlhf.stages.loop) runs the steps,
    # evaluations and checkpoints
    def run_step(self) -> StepOutcome:
        eng = self.engine
        eng.train()
        loss_sum, correct, pairs, tokens = 0.0, 0, 0, 0
        for batch in self.micro_batches(self.step):
            chosen, rejected = self._scores(batch)
            loss = pairwise_loss(chosen, rejected, self.cfg.stage.margin)
            if self.guard.backward_step(eng, loss):
                loss_sum += loss.item() * len(chosen)
                correct += int((chosen > rejected).sum())
                pairs += len(chosen)
            tokens += int(batch["attention_mask"].sum())
        loss_sum, correct, pairs, tokens = dist.all_reduce_sum([loss_sum, correct, pairs, tokens])
        loss = loss_sum / max(pairs, 1)
        self.step += 1
        kept = {"reward/loss": loss, "reward/train_acc": correct / max(pairs, 1)}
        shown = ("reward/loss", "reward/train_acc", "reward/lr")
        return StepOutcome({"reward/lr": eng.get_lr()[0]}, kept, shown, int(tokens), self.global_batch, loss)

    def evaluate(self, when: str) -> dict[str, float]:
        """Held-out accuracy and loss, at the start (with `stage.eval_start`), every `eval_interval` steps and at
        the end."""
        evals = self.progress.evals
        if when == "start":
            if not self.cfg.stage.eval_start:
                return {}
            metrics = self.evaluate_pairs()
            evals |= {"eval_acc_start": metrics["reward/acc"], "eval_loss_start": metrics["reward/eval_loss"]}
            return metrics
        metrics = self.evaluate_pairs()
        evals |= {"eval_loss": metrics["reward/eval_loss"], "eval_pairs": metrics["reward/eval_pairs"]}
        evals |= {f"eval_{k[len('reward/') :]}": v for k, v in metrics.items() if k.startswith("reward/acc")}
        evals |= {k.split("/")[1]: metrics[k] for k in ("reward/chosen_mean", "reward/rejected_mean")}
        return metrics

    def figures(self) -> dict:
        progress, evals = self.progress, self.progress.evals
        return {
            "steps": self.step,
            **loss_figures(progress.history, progress.samples, progress.train_seconds, progress.train_tokens),
            **evals,
            "gap": evals.get("chosen_mean", 0.0) - evals.get("rejected_mean", 0.0),
            "score_mean": self.score_stats["mean"],
            "score_std": self.score_stats["std"],
            "skipped_steps": self.guard.skipped,
            "params": self.n_params,
            "trainable_params": self.n_trainable,
        }

    @torch.no_grad()
    def evaluate_pairs(self) -> dict[str, float]:
        """Held-out pairwise accuracy (a tie counts as wrong) with its 95% interval, per pair kind, the loss and the
        mean chosen/rejected scores. The mean and std of the scores of the policy's own answers among them (all
        answers when none is the policy's) become the normalisation saved with the model, so PPO's normalised
        rewards are centred on what the policy writes."""
        eng = self.engine
        eng.eval()
        usable = self.eval_pairs[: self.cfg.stage.eval_pairs or None]
        mine = usable[: len(usable) - len(usable) % self.world][self.rank :: self.world]
        chosen_all, rejected_all = [], []
        for start in range(0, len(mine), self.micro_batch):
            chosen, rejected = self._scores(
                pair_batch(mine[start : start + self.micro_batch], self.tokenizer.pad_token_id)
            )
            chosen_all.append(chosen.float().cpu())
            rejected_all.append(rejected.float().cpu())
        eng.train()
        chosen, rejected = torch.cat(chosen_all), torch.cat(rejected_all)
        right = (chosen > rejected).tolist()
        kinds = [p["kind"] for p in mine]
        own = [
            s for p, c, r in zip(mine, chosen.tolist(), rejected.tolist(), strict=True) for s in policy_scores(p, c, r)
        ]
        if not any(p.get("policy_chosen") or p.get("policy_rejected") for p in self.eval_pairs):
            own = chosen.tolist() + rejected.tolist()  # no answer of the policy's among them: all answers
        per_kind = []  # pairs and right ones of each kind
        for kind in PAIR_KINDS:
            per_kind += [kinds.count(kind), sum(r for r, k in zip(right, kinds, strict=True) if k == kind)]
        n, correct, loss_sum, c_sum, r_sum, s_n, s_sum, s_sq, *per_kind = dist.all_reduce_sum(
            [
                len(chosen),
                sum(right),
                pairwise_loss(chosen, rejected, self.cfg.stage.margin).item() * len(chosen),
                chosen.sum().item(),
                rejected.sum().item(),
                len(own),
                sum(own),
                sum(x * x for x in own),
                *per_kind,
            ]
        )
        mean = s_sum / max(s_n, 1)
        std = max(s_sq / max(s_n, 1) - mean**2, 0.0) ** 0.5
        self.score_stats = {"mean": mean, "std": std, "pairs": int(n), "answers": int(s_n)}
        accuracy = stats.wilson_interval(correct, int(n))
        metrics = {
            "reward/acc": accuracy.value,
            "reward/acc_ci_low": accuracy.low,
            "reward/acc_ci_high": accuracy.high,
            "reward/eval_pairs": n,
            "reward/eval_loss": loss_sum / n,
            "reward/chosen_mean": c_sum / n,
            "reward/rejected_mean": r_sum / n,
            "reward/gap": (c_sum - r_sum) / n,
        }
        for kind, count, hits in zip(PAIR_KINDS, per_kind[::2], per_kind[1::2], strict=True):
            if count:
                metrics[f"reward/acc_{kind}"] = hits / count
        if self.rank == 0:
            by_kind = ", ".join(
                f"{k} {metrics[f'reward/acc_{k}']:.3f}" for k in PAIR_KINDS if f"reward/acc_{k}" in metrics
            )
            log.info(
                "reward eval at step %d: acc %s on %d pairs (%s), loss %.4f, chosen %.3f, rejected %.3f",
                self.step,
                accuracy.text(),
                int(n),
                by_kind,
                metrics["reward/eval_loss"],
                metrics["reward/chosen_mean"],
                metrics["reward/rejected_mean"],
            )
        return metrics

    # 3. save: backbone + head as a sequence-classification folder with the score statistics, LoRA merged
    def save(self) -> Path:
        state = dist.full_state_dict(self.engine, self.cfg.hardware.zero_stage)
        target = self.out_dir / "final"
        if self.rank == 0:
            state = lora.merge_lora_state_dict(state, lora.lora_scalings(self.engine.module))
            models.save_reward_model(
                self.engine.module, state, self.tokenizer, target, self.cfg.reward_model.dtype, self.score_stats
            )
            stats = self.score_stats
            log.info("reward: final model saved to %s (score mean %.4f, std %.4f)", target, stats["mean"], stats["std"])
        dist.barrier()
        return target

    # 4. checkpoints (rlhf.checkpoint): the engine, and the loop state that a resumed run continues from
    def engines(self) -> dict:
        return {"model": self.engine}

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "progress": self.progress.state_dict(),
            "score_stats": self.score_stats,
            "guard": self.guard.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.score_stats = state["step"], state["score_stats"]
        self.progress = LoopProgress.from_state(state["progress"])
        self.guard.load_state_dict(state["guard"])
