"""Stage 1: supervised fine-tuning on prompt + chosen answer, loss on the answer tokens only."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from rlhf import dist, engine, gold, lora, models, rollout, stats
from rlhf.checkpoint import Checkpointer
from rlhf.config import cache_dir
from rlhf.data import batch_indices, datasets, plan_steps
from rlhf.data.tokenize import IGNORE_INDEX, pad_right
from rlhf.guard import StepGuard
from rlhf.progress import describe_plan, loss_figures
from rlhf.stages import loop
from rlhf.stages.loop import LoopProgress, StepOutcome
from rlhf.tracking import Tracker

log = logging.getLogger(__name__)


def eval_share(count: int, limit: int, rank: int, world: int) -> range:
    """This rank's indices of the first `limit` of `count` eval examples: the same examples are evaluated at any
    world size (so runs compare), in equal shares (under ZeRO-3 every rank must run the same forward passes)."""
    total = min(count, limit)
    total -= total % world
    return range(rank, total, world)


class SFTTrainer:
    """The SFT recipe (rlhf.stages.loop.Stage): setup, a step, evaluation, save (a Hugging Face folder), and its
    engine and loop state for checkpoints."""

    name = "sft"

    def __init__(self, cfg: DictConfig, run_dir: Path, tracker: Tracker) -> None:
        self.cfg, self.run_dir, self.tracker = cfg, run_dir, tracker
        self.out_dir = run_dir / self.name
        self.step = 0
        self.rank, self.world = dist.rank(), dist.world_size()
        self.progress = LoopProgress()
        self.guard = StepGuard(self.name, cfg.checkpoint.max_skipped_in_a_row)
        self.checkpoints: Checkpointer | None = None  # set by the stage runner; None: no checkpoints

    # 1. setup: tokenizer, data, model (+ LoRA, checkpointing), DeepSpeed engine
    def setup(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.tokenizer = models.load_tokenizer(cfg.model, cache_dir(cfg))
        processed = datasets.processed(cfg, self.name, self.tokenizer)
        self.train_examples, self.eval_examples = processed["train"], processed["eval"]
        self.tracker.summary({f"data/{self.name}/{source}": n for source, n in processed["counts"].items()})

        model = models.load_causal_lm(cfg.model, self.tokenizer, cfg.seed, cfg.stage.init_from, cache_dir(cfg))
        self.lora_modules = models.prepare_for_training(model, cfg.model)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.n_lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)

        self.global_batch = cfg.stage.global_batch
        self.micro_batch = cfg.hardware.micro_batch
        self.steps_per_epoch, self.total_steps = plan_steps(
            len(self.train_examples), cfg.stage, "SFT training examples"
        )
        self.engine = engine.initialize(model, cfg, self.total_steps)
        self.generation_model = rollout.GenerationModel(self.engine.module, cfg.hardware.zero_stage)
        self.gold_rows = gold.held_out_rows(cfg, self.tokenizer)
        self.gold_records = gold.load(self.out_dir)
        log.info(
            describe_plan(
                "sft", "examples", len(self.train_examples), len(self.eval_examples), model, self.lora_modules, cfg
            )
        )
        log.info("sft: %d optimizer steps", self.total_steps)

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches for optimizer step `step`: a pure function of (seed, step), so a resumed
        run sees exactly the data an uninterrupted one would."""
        mine = batch_indices(len(self.train_examples), self.global_batch, self.cfg.seed, step, self.rank, self.world)
        return [
            pad_right([self.train_examples[i] for i in mine[m : m + self.micro_batch]], self.pad_id)
            for m in range(0, len(mine), self.micro_batch)
        ]

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def train(self) -> dict:
        """Every remaining step through the stage loop; the summary figures."""
        return loop.train(self)

    # 2. one optimizer step over this rank's micro-batches; the loop (rlhf.stages.loop) runs the steps, evaluations
    # and checkpoints
    def run_step(self) -> StepOutcome:
        eng = self.engine
        eng.train()
        loss_sum, answer_tokens, tokens = 0.0, 0, 0
        for batch in self.micro_batches(self.step):
            out = eng(**{k: v.to(eng.device) for k, v in batch.items()})
            finite = self.guard.backward_step(eng, out.loss)
            n_answer = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            loss_sum += out.loss.item() * n_answer if finite else 0.0
            answer_tokens += n_answer if finite else 0
            tokens += int(batch["attention_mask"].sum())
        loss_sum, answer_tokens, tokens = dist.all_reduce_sum([loss_sum, answer_tokens, tokens])
        loss = loss_sum / max(answer_tokens, 1)
        self.step += 1
        shown = ("sft/loss", "sft/lr")
        return StepOutcome({"sft/lr": eng.get_lr()[0]}, {"sft/loss": loss}, shown, int(tokens), self.global_batch, loss)

    def evaluate(self, when: str) -> dict[str, float]:
        """The eval loss (at the start, every `eval_interval` steps and at the end) and, at the start and the end,
        the gold score of greedy answers."""
        evals = self.progress.evals
        loss = self.eval_loss()
        if when == "start":
            evals["eval_loss_start"] = loss
            metrics = {"sft/eval_loss": loss} | self.evaluate_gold("start")
            evals |= gold.summary_figures(metrics, "_start")
            return metrics
        evals["eval_loss"] = loss
        metrics = {"sft/eval_loss": loss, "sft/ppl": math.exp(min(loss, 50.0))}
        if when == "end":
            metrics |= self.evaluate_gold("end")
            evals |= gold.summary_figures(metrics)
        return metrics

    def figures(self) -> dict:
        progress, evals = self.progress, self.progress.evals
        return {
            "steps": self.step,
            **loss_figures(progress.history, progress.samples, progress.train_seconds, progress.train_tokens),
            **evals,
            "eval_ppl": math.exp(min(evals.get("eval_loss", float("nan")), 50.0)),
            **gold.delta_figures(self.gold_records),
            "skipped_steps": self.guard.skipped,
            "params": self.n_params,
            "trainable_params": self.n_trainable,
            "lora_params": self.n_lora,
        }

    @torch.no_grad()
    def eval_loss(self) -> float:
        """Mean answer-token loss on the first `eval_max_batches` x micro-batch examples of the eval split, shared
        out over the ranks (the same examples at any world size, so runs compare); nan when the split is empty."""
        eng = self.engine
        eng.eval()
        limit = self.cfg.stage.eval_max_batches * self.micro_batch
        mine = [self.eval_examples[i] for i in eval_share(len(self.eval_examples), limit, self.rank, self.world)]
        loss_sum, count = 0.0, 0
        for start in range(0, len(mine), self.micro_batch):
            batch = pad_right(mine[start : start + self.micro_batch], self.pad_id)
            out = eng(**{k: v.to(eng.device) for k, v in batch.items()})
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            loss_sum += out.loss.item() * n
            count += n
        eng.train()
        loss_sum, count = dist.all_reduce_sum([loss_sum, count])
        if count == 0:  # nothing to evaluate: no figure rather than a loss of 0
            if self.rank == 0:
                log.warning("sft eval at step %d: the eval split has no answer tokens: no eval loss", self.step)
            return float("nan")
        loss = loss_sum / count
        self.progress.evals["eval_tokens"] = int(count)
        if self.rank == 0:
            log.info(
                "sft eval at step %d: loss %.4f, ppl %.4g (%d answer tokens)",
                self.step,
                loss,
                math.exp(min(loss, 50.0)),
                int(count),
            )
        return loss

    def evaluate_gold(self, when: str) -> dict[str, float]:
        """The gold score of greedy answers to the held-out gold prompts (see rlhf.gold), kept under `when` in
        `<run>/sft/gold.json`: at the start the base model's, at the end the SFT model's."""
        if not self.gold_rows:
            return {}
        started = time.perf_counter()
        record = gold.evaluate_policy(self.generation_model, self.tokenizer, self.gold_rows, self.cfg)
        if record is None:  # not rank 0
            return {}
        self.gold_records[when] = record
        gold.save(self.out_dir, self.gold_records)
        score = stats.wilson_interval(sum(record.correct), len(record.correct))
        log.info(
            "sft gold (%s, step %d): %s on %d held-out prompts, greedy (%.0f s)",
            when,
            self.step,
            score.text(),
            len(record.correct),
            time.perf_counter() - started,
        )
        return gold.metrics(record)

    # 3. save: the final model in Hugging Face format, LoRA merged, written atomically by rank 0
    def save(self) -> Path:
        state = dist.full_state_dict(self.engine, self.cfg.hardware.zero_stage)
        target = self.out_dir / "final"
        if self.rank == 0:
            state = lora.merge_lora_state_dict(state, lora.lora_scalings(self.engine.module))
            models.save_hf(self.engine.module.config, state, self.tokenizer, target, self.cfg.model.dtype)
            log.info("sft: final model saved to %s", target)
        dist.barrier()
        return target

    # 4. checkpoints (rlhf.checkpoint): the engine, and the loop state that a resumed run continues from
    def engines(self) -> dict:
        return {"model": self.engine}

    def state_dict(self) -> dict:
        return {"step": self.step, "progress": self.progress.state_dict(), "guard": self.guard.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.progress = state["step"], LoopProgress.from_state(state["progress"])
        self.guard.load_state_dict(state["guard"])
