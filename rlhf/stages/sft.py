"""Stage 1: supervised fine-tuning on prompt + chosen answer, loss on the answer tokens only."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from rlhf import dist, engine, gold, models, rollout
from rlhf.config import cache_dir
from rlhf.data import eval_share, plan_steps
from rlhf.data.tokenize import IGNORE_INDEX, pad_right
from rlhf.progress import describe_plan
from rlhf.stages.loop import Recipe, StepOutcome, param_counts

log = logging.getLogger(__name__)


class SFTTrainer(Recipe):
    """The SFT recipe (rlhf.stages.loop): the language-model loss on the chosen answers; evaluated by the eval
    loss and, at the start and the end, the gold score of greedy answers; saved as a Hugging Face folder."""

    name = "sft"

    def setup(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.tokenizer = models.load_tokenizer(cfg.model, cache_dir(cfg))
        processed = self.load_data(self.tokenizer)
        self.train_examples, self.eval_examples = processed["train"], processed["eval"]
        model = models.load_causal_lm(cfg.model, self.tokenizer, cfg.seed, cfg.stage.init_from, cache_dir(cfg))
        lora_modules = models.prepare_for_training(model, cfg.model)
        self.params = param_counts(model)
        train, held_out = len(self.train_examples), len(self.eval_examples)
        self.steps_per_epoch, self.total_steps = plan_steps(train, cfg.stage, "SFT training examples")
        self.engine = engine.initialize(model, cfg, self.total_steps)
        self.generation_model = rollout.GenerationModel(self.engine.module, cfg.hardware.zero_stage)
        self.gold_rows = gold.held_out_rows(cfg, self.tokenizer)
        self.gold_records = gold.load(self.out_dir)
        log.info(describe_plan("sft", "examples", train, held_out, model, lora_modules, cfg))
        log.info("sft: %d optimizer steps", self.total_steps)

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's padded micro-batches for optimizer step `step`."""
        pad = self.tokenizer.pad_token_id
        return [pad_right(rows, pad) for rows in self.micro_batches_of(self.train_examples, step)]

    def run_step(self) -> StepOutcome:
        eng = self.engine
        eng.train()
        loss_sum, answer_tokens, tokens = 0.0, 0, 0
        for batch in self.micro_batches(self.step):
            out = eng(**{k: v.to(eng.device) for k, v in batch.items()})
            if self.guard.backward_step(eng, out.loss):
                n_answer = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                loss_sum, answer_tokens = loss_sum + out.loss.item() * n_answer, answer_tokens + n_answer
            tokens += int(batch["attention_mask"].sum())
        loss_sum, answer_tokens, tokens = dist.all_reduce_sum([loss_sum, answer_tokens, tokens])
        loss = loss_sum / max(answer_tokens, 1)
        self.step += 1
        shown, samples = ("sft/loss", "sft/lr"), self.cfg.stage.global_batch
        return StepOutcome({"sft/lr": eng.get_lr()[0]}, {"sft/loss": loss}, shown, int(tokens), samples, loss)

    def evaluate(self, when: str) -> dict[str, float]:
        """The eval loss (at the start, every `eval_interval` steps and at the end) and, at the start and the end,
        the gold score of greedy answers, kept under `when` in `<run>/sft/gold.json`."""
        loss = self.eval_loss()
        self.progress.evals["eval_loss_start" if when == "start" else "eval_loss"] = loss
        metrics = {"sft/eval_loss": loss}
        if when != "start":
            metrics["sft/ppl"] = math.exp(min(loss, 50.0))
        return metrics | self.evaluate_gold(when)

    def figures(self) -> dict:
        eval_loss = self.progress.evals.get("eval_loss", math.nan)
        figures = self.history_figures() | {"eval_ppl": math.exp(min(eval_loss, 50.0))}
        return figures | gold.delta_figures(self.gold_records) | self.params

    @torch.no_grad()
    def eval_loss(self) -> float:
        """Mean answer-token loss on the first `eval_max_batches` x micro-batch examples of the eval split, shared
        out over the ranks (the same examples at any world size, so runs compare); nan when the split is empty."""
        eng, micro = self.engine, self.cfg.hardware.micro_batch
        eng.eval()
        limit = self.cfg.stage.eval_max_batches * micro
        mine = [self.eval_examples[i] for i in eval_share(len(self.eval_examples), limit, self.rank, self.world)]
        loss_sum, count = 0.0, 0
        for start in range(0, len(mine), micro):
            batch = pad_right(mine[start : start + micro], self.tokenizer.pad_token_id)
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            loss_sum += eng(**{k: v.to(eng.device) for k, v in batch.items()}).loss.item() * n
            count += n
        eng.train()
        loss_sum, count = dist.all_reduce_sum([loss_sum, count])
        if count == 0:  # nothing to evaluate: no figure rather than a loss of 0
            if self.rank == 0:
                log.warning("sft eval at step %d: the eval split has no answer tokens: no eval loss", self.step)
            return math.nan
        loss = loss_sum / count
        self.progress.evals["eval_tokens"] = int(count)
        if self.rank == 0:
            ppl = math.exp(min(loss, 50.0))
            log.info("sft eval at step %d: loss %.4f, ppl %.4g (%d answer tokens)", self.step, loss, ppl, int(count))
        return loss

    def save(self) -> Path:
        """The final model as a Hugging Face folder, LoRA merged, written atomically by rank 0."""
        return self.save_policy(self.cfg.hardware.zero_stage)
