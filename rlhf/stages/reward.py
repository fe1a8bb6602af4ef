"""Stage 2: the reward model — a backbone with a scalar head trained on chosen/rejected pairs."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from rlhf import dist, engine, models
from rlhf.checkpoint import Checkpointer
from rlhf.config import cache_dir, grad_accum_steps
from rlhf.data import DataError, batch_indices, plan_steps, stage_rows
from rlhf.data.cache import cache_key, shared
from rlhf.data.tokenize import PromptFormat, encode_pair, pad_right
from rlhf.guard import StepGuard
from rlhf.progress import StepLog, describe_plan, loss_figures
from rlhf.tracking import Tracker

log = logging.getLogger(__name__)


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected - margin): the Bradley-Terry preference loss."""
    return -F.logsigmoid(chosen - rejected - margin).mean()


def pair_batch(pairs: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows in one right-padded batch, so one forward pass scores both."""
    rows = [{"input_ids": p[k], "labels": p[k]} for k in ("chosen", "rejected") for p in pairs]
    batch = pad_right(rows, pad_id)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


class RewardTrainer:
    """Setup, train (with held-out pairwise accuracy), save (with score mean/std), and checkpoint state."""

    name = "reward"

    def __init__(self, cfg: DictConfig, run_dir: Path, tracker: Tracker) -> None:
        self.cfg, self.run_dir, self.tracker = cfg, run_dir, tracker
        self.out_dir = run_dir / self.name
        self.step = 0
        self.rank, self.world = dist.rank(), dist.world_size()
        self.score_stats = {"mean": 0.0, "std": 1.0}
        self.progress: dict = {"history": [], "evals": {}, "train_seconds": 0.0, "train_tokens": 0, "samples": 0}
        self.guard = StepGuard(self.name, cfg.checkpoint.max_skipped_in_a_row)
        self.checkpoints: Checkpointer | None = None  # set by the stage runner; None: no checkpoints

    # 1. setup: tokenizer, pairs, backbone + head (+ LoRA, checkpointing), DeepSpeed engine
    def setup(self) -> None:
        cfg, model_cfg = self.cfg, self.cfg.reward_model
        torch.manual_seed(cfg.seed)
        self.tokenizer = models.load_tokenizer(model_cfg, cache_dir(cfg))
        processed = self._processed_data()
        self.train_pairs, self.eval_pairs = processed["train"], processed["eval"]
        self.tracker.summary({f"data/{self.name}/{source}": n for source, n in processed["counts"].items()})

        lm = models.load_causal_lm(model_cfg, self.tokenizer, cfg.seed, cfg.stage.init_from, cache_dir(cfg))
        model = models.reward_model_from_lm(lm)
        del lm
        self.lora_modules = models.prepare_for_training(model, model_cfg)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

        self.global_batch, self.micro_batch = cfg.stage.global_batch, cfg.hardware.micro_batch
        self.accum = grad_accum_steps(cfg)
        self.steps_per_epoch, self.total_steps = plan_steps(len(self.train_pairs), cfg.stage, "reward training pairs")
        if len(self.eval_pairs) < self.world:
            raise DataError(f"{len(self.eval_pairs)} held-out pairs: the reward model needs some to evaluate")
        self.engine = engine.initialize(model, cfg, self.total_steps)
        log.info(
            describe_plan("reward", "pairs", len(self.train_pairs), len(self.eval_pairs), model, self.lora_modules, cfg)
        )
        log.info("reward: %d optimizer steps", self.total_steps)

    def _processed_data(self) -> dict:
        """Tokenised train/eval pairs and source counts, built once (rank 0) through the data cache."""
        cfg = self.cfg
        fmt = PromptFormat.for_tokenizer(self.tokenizer, cfg.data)

        def encode(rows: list[dict]) -> list[dict]:
            return [encode_pair(self.tokenizer, fmt, r["prompt"], r["chosen"], r["rejected"], cfg.data) for r in rows]

        def build() -> dict:
            data = stage_rows(cfg.data, self.name)
            return {"train": encode(data.train), "eval": encode(data.eval), "counts": data.counts}

        return shared(cache_dir(cfg), cache_key(cfg.data, self.name, self.tokenizer), build, cfg.data.rebuild)

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

    # 2. train: numbered optimizer steps over `accum` micro-batches of pairs; eval at 0, every interval and the end;
    # a checkpoint when due (see rlhf.checkpoint); a step with a non-finite loss is skipped and counted
    def train(self) -> dict:
        cfg, eng, progress = self.cfg, self.engine, self.progress
        steplog = StepLog("reward", self.total_steps, cfg.stage.log_interval, log, enabled=self.rank == 0)
        evals = progress["evals"]
        if self.step == 0:
            start = self.evaluate()
            evals |= {"eval_acc_start": start["reward/acc"], "eval_loss_start": start["reward/eval_loss"]}
            self.tracker.log(start, step=0)
        eng.train()
        while self.step < self.total_steps:
            started = time.perf_counter()
            loss_sum, correct, pairs, tokens = 0.0, 0, 0, 0
            for batch in self.micro_batches(self.step):
                chosen, rejected = self._scores(batch)
                loss = pairwise_loss(chosen, rejected, cfg.stage.margin)
                if self.guard.backward_step(eng, loss):
                    loss_sum += loss.item() * len(chosen)
                    correct += int((chosen > rejected).sum())
                    pairs += len(chosen)
                tokens += int(batch["attention_mask"].sum())
            loss_sum, correct, pairs, tokens = dist.all_reduce_sum([loss_sum, correct, pairs, tokens])
            step_s = time.perf_counter() - started
            self.step += 1
            skipped = self.guard.end_step(self.step)
            progress["train_seconds"] += step_s
            progress["train_tokens"] += int(tokens)
            progress["samples"] += self.global_batch
            metrics = {
                "reward/lr": eng.get_lr()[0],
                "guard/skipped_steps": self.guard.skipped,
                "perf/tokens_per_s": tokens / step_s,
                "perf/step_s": step_s,
                "perf/samples_per_s": self.global_batch / step_s,
            }
            if not skipped:
                progress["history"].append(loss_sum / pairs)
                metrics |= {"reward/loss": loss_sum / pairs, "reward/train_acc": correct / pairs}
            if self._eval_due():
                metrics |= self.evaluate()
                evals |= {"eval_acc": metrics["reward/acc"], "eval_loss": metrics["reward/eval_loss"]}
                evals |= {k.split("/")[1]: metrics[k] for k in ("reward/chosen_mean", "reward/rejected_mean")}
            self.tracker.log(metrics, step=self.step)
            shown = {k: metrics.get(k, float("nan")) for k in ("reward/loss", "reward/train_acc", "reward/lr")}
            steplog.step(self.step, shown, tokens / step_s, step_s)
            if self.checkpoints is not None:
                self.checkpoints.step_done(self.total_steps)
        history = progress["history"]
        return {
            "steps": self.step,
            **loss_figures(history, progress["samples"], progress["train_seconds"], progress["train_tokens"]),
            **evals,
            "gap": evals.get("chosen_mean", 0.0) - evals.get("rejected_mean", 0.0),
            "score_mean": self.score_stats["mean"],
            "score_std": self.score_stats["std"],
            "skipped_steps": self.guard.skipped,
            "params": self.n_params,
            "trainable_params": self.n_trainable,
        }

    def _eval_due(self) -> bool:
        """Evaluate every `eval_interval` steps and at the last, but not when stopping early for a signal."""
        due = self.step % self.cfg.stage.eval_interval == 0
        stopping = self.checkpoints is not None and self.checkpoints.stop_requested()
        return self.step == self.total_steps or (due and not stopping)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out pairwise accuracy, loss, mean chosen/rejected scores and their gap; the mean and std of all
        held-out scores become the normalisation saved with the model."""
        eng = self.engine
        eng.eval()
        share = len(self.eval_pairs) // self.world
        mine = self.eval_pairs[self.rank :: self.world][:share][: self.cfg.stage.eval_max_batches * self.micro_batch]
        chosen_all, rejected_all = [], []
        for start in range(0, len(mine), self.micro_batch):
            chosen, rejected = self._scores(
                pair_batch(mine[start : start + self.micro_batch], self.tokenizer.pad_token_id)
            )
            chosen_all.append(chosen.float().cpu())
            rejected_all.append(rejected.float().cpu())
        eng.train()
        chosen, rejected = torch.cat(chosen_all), torch.cat(rejected_all)
        both = torch.cat([chosen, rejected]).double()
        n, correct, loss_sum, c_sum, r_sum, s_sum, s_sq = dist.all_reduce_sum(
            [
                len(chosen),
                int((chosen > rejected).sum()),
                pairwise_loss(chosen, rejected, self.cfg.stage.margin).item() * len(chosen),
                chosen.sum().item(),
                rejected.sum().item(),
                both.sum().item(),
                (both**2).sum().item(),
            ]
        )
        mean = s_sum / (2 * n)
        std = max(s_sq / (2 * n) - mean**2, 0.0) ** 0.5
        self.score_stats = {"mean": mean, "std": std, "pairs": int(n)}
        metrics = {
            "reward/acc": correct / n,
            "reward/eval_loss": loss_sum / n,
            "reward/chosen_mean": c_sum / n,
            "reward/rejected_mean": r_sum / n,
            "reward/gap": (c_sum - r_sum) / n,
        }
        if self.rank == 0:
            log.info(
                "reward eval at step %d: acc %.4f, loss %.4f, chosen %.3f, rejected %.3f (%d pairs)",
                self.step,
                metrics["reward/acc"],
                metrics["reward/eval_loss"],
                metrics["reward/chosen_mean"],
                metrics["reward/rejected_mean"],
                int(n),
            )
        return metrics

    # 3. save: backbone + head as a sequence-classification folder with the score statistics, LoRA merged
    def save(self) -> Path:
        state = dist.full_state_dict(self.engine, self.cfg.hardware.zero_stage)
        target = self.out_dir / "final"
        if self.rank == 0:
            state = models.merge_lora_state_dict(state, models.lora_scalings(self.engine.module))
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
            "progress": self.progress,
            "score_stats": self.score_stats,
            "guard": self.guard.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.progress, self.score_stats = state["step"], state["progress"], state["score_stats"]
        self.guard.load_state_dict(state["guard"])
