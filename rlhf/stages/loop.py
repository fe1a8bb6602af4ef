"""The one stage loop: what every stage repeats, written once.

A stage (SFT, reward model, PPO) is a recipe behind the `Stage` protocol: its setup, one optimizer step (one PPO
iteration), its evaluation and its summary figures, its save, and its engines and state for checkpoints. `Recipe`
holds what every recipe keeps (its place, loop state, guard) and checkpoints it. `train` runs a stage: the
evaluation at the start, the timed steps with the non-finite guard, the history, the evaluation cadence, the W&B
metrics and the step log, and the checkpoint hooks (a stop request is honoured at step boundaries; a resumed stage
continues from its step).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig

from rlhf import dist, gold, lora, models
from rlhf.checkpoint import Checkpointer
from rlhf.config import Source, cache_dir
from rlhf.data import batch_indices, datasets
from rlhf.guard import StepGuard
from rlhf.progress import StepLog, eval_due, loss_figures
from rlhf.stage_schemas import data_share
from rlhf.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class LoopProgress:
    """The loop state a checkpoint carries besides the step: what the summary is computed from."""

    history: list = field(default_factory=list)  # per step not skipped: its loss (SFT, reward) or figures (PPO)
    evals: dict = field(default_factory=dict)  # the evaluations' summary figures, newest of each kind
    train_seconds: float = 0.0  # time in steps (evaluations and checkpoints not counted)
    train_tokens: int = 0
    samples: int = 0  # examples, pairs or rollouts
    timers: dict[str, float] = field(default_factory=dict)  # a stage's own split of the step time (PPO's phases)

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> LoopProgress:
        return cls(**state)


@dataclass
class StepOutcome:
    """What one step of a recipe did, for the loop to log and keep."""

    metrics: dict[str, float]  # the step's W&B figures (the loop adds time, rates and the guard's count)
    kept: dict[str, float]  # more figures, logged only when the guard did not skip the step (its loss)
    shown: tuple[str, ...]  # the figures the step log prints (nan when absent); none: no step log line
    tokens: int  # tokens the step trained on
    samples: int  # examples, pairs or rollouts it trained on
    record: Any = None  # its history entry when the guard did not skip it (None: nothing to keep)
    log_rate: float | None = None  # the step log's tokens/s when not tokens over the step's time (PPO: sampling)


class Stage(Protocol):
    """A stage recipe. The runner calls setup, then `train(stage)`, then save; checkpoints use `engines`,
    `state_dict` and `load_state_dict` (which carry `step` and `progress`)."""

    name: str
    cfg: DictConfig
    step: int  # optimizer steps (PPO: iterations) done
    total_steps: int
    steps_per_epoch: int
    progress: LoopProgress
    guard: StepGuard
    tracker: Tracker
    checkpoints: Checkpointer | None  # set by the runner; None: no checkpoints or stop requests

    def setup(self) -> None: ...

    def run_step(self) -> StepOutcome:
        """Optimizer step (PPO: iteration) `step + 1`, advancing `step`; a non-finite loss goes through `guard`."""
        ...

    def evaluate(self, when: str) -> dict[str, float]:
        """The evaluation `when` ("start", "step-N" or "end"): W&B figures, and the summary's in `progress.evals`."""
        ...

    def figures(self) -> dict: ...

    def save(self) -> Path: ...

    def engines(self) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def train(stage: Stage) -> dict:
    """Run `stage` from its current step to its last and return its summary figures."""
    progress, checkpoints = stage.progress, stage.checkpoints
    steplog = StepLog(stage.name, stage.total_steps, stage.cfg.stage.log_interval, log, enabled=dist.rank() == 0)
    if stage.step == 0:
        if checkpoints is not None:
            checkpoints.check_stop()  # a signal while loading: stop before a long evaluation
        start = stage.evaluate("start")
        if start:
            stage.tracker.log(start, step=0)
    while stage.step < stage.total_steps:
        started = time.perf_counter()
        outcome = stage.run_step()
        step_s = time.perf_counter() - started
        skipped = stage.guard.end_step(stage.step)
        progress.train_seconds += step_s
        progress.train_tokens += outcome.tokens
        progress.samples += outcome.samples
        metrics = {
            "guard/skipped_steps": stage.guard.skipped,
            "perf/step_s": step_s,
            "perf/tokens_per_s": outcome.tokens / step_s,
            "perf/samples_per_s": outcome.samples / step_s,
            **outcome.metrics,
        }
        if not skipped:
            metrics |= outcome.kept
            if outcome.record is not None:
                progress.history.append(outcome.record)
        if eval_due(stage.step, stage.total_steps, stage.cfg.stage.eval_interval, checkpoints):
            metrics |= stage.evaluate("end" if stage.step == stage.total_steps else f"step-{stage.step}")
        stage.tracker.log(metrics, step=stage.step)
        if outcome.shown:
            rate = outcome.tokens / step_s if outcome.log_rate is None else outcome.log_rate
            steplog.step(stage.step, {k: metrics.get(k, float("nan")) for k in outcome.shown}, rate, step_s)
        if checkpoints is not None:
            checkpoints.step_done(stage.total_steps)
    return stage.figures()


class Recipe:
    """What every recipe keeps: its config, run folder and W&B run, `step`, `progress` and `guard`, and their
    checkpointing (with one DeepSpeed engine, `engine`, under "model"; a recipe with more overrides `engines`). A
    recipe adds its setup, step, evaluation, figures and save."""

    name: str

    def __init__(self, cfg: DictConfig, run_dir: Path | None, tracker: Tracker) -> None:
        self.cfg, self.run_dir, self.tracker = cfg, run_dir, tracker
        self.out_dir = run_dir / self.name if run_dir is not None else None
        self.step = 0
        self.rank, self.world = dist.rank(), dist.world_size()
        self.progress = LoopProgress()
        self.guard = StepGuard(self.name, cfg.checkpoint.max_skipped_in_a_row)
        self.checkpoints: Checkpointer | None = None  # set by the stage runner; None: no checkpoints

    def train(self) -> dict:
        """Every remaining step through the stage loop; the summary figures."""
        return train(self)

    def load_data(self, tokenizer) -> dict:
        """This stage's tokenised data (rlhf.data.datasets), its per-source counts recorded in the W&B summary."""
        processed = datasets.processed(self.cfg, data_share(self.name), tokenizer)
        self.tracker.summary({f"data/{self.name}/{source}": n for source, n in processed["counts"].items()})
        return processed

    def micro_batches_of(self, rows: list, step: int) -> list[list]:
        """This rank's share of `rows` for optimizer step `step`, in micro-batches: a pure function of (seed,
        step), so a resumed run sees exactly the data an uninterrupted one would."""
        mine = batch_indices(len(rows), self.cfg.stage.global_batch, self.cfg.seed, step, self.rank, self.world)
        micro = self.cfg.hardware.micro_batch
        return [[rows[i] for i in mine[m : m + micro]] for m in range(0, len(mine), micro)]

    def history_figures(self) -> dict:
        """The summary figures of a stage whose history is its losses: steps, throughput, first and last loss,
        the evaluations' figures and the skipped steps."""
        progress = self.progress
        return {
            "steps": self.step,
            **loss_figures(progress.history, progress.samples, progress.train_seconds, progress.train_tokens),
            **progress.evals,
            "skipped_steps": self.guard.skipped,
        }

    def engines(self) -> dict:
        return {"model": self.engine}

    def state_dict(self) -> dict:
        return {"step": self.step, "progress": self.progress.state_dict(), "guard": self.guard.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.progress = state["step"], LoopProgress.from_state(state["progress"])
        self.guard.load_state_dict(state["guard"])

    def evaluate_gold(self, when: str) -> dict[str, float]:
        """At the start and the end (a recipe with `generation_model`, `gold_rows` and `gold_records`): the gold
        score of the policy's greedy answers to the held-out prompts, kept under `when` in `<stage>/gold.json`; on
        rank 0 (the others and other times: empty). A start from the SFT stage's output of the same run takes that
        stage's final evaluation instead of answering again."""
        if when not in ("start", "end") or not self.gold_rows:
            return {}
        started = time.perf_counter()
        handed, kl = None, None
        if when == "start":
            handed = gold.handed_over(self.run_dir, self.cfg.stage.init_from, self.gold_rows, self.world)
        if handed is not None:
            log.info("%s gold (start): the SFT stage's final evaluation of this model", self.name)
            record = handed if self.rank == 0 else None
        else:
            reference = self.kl_reference() if when == "end" else None
            record, kl = gold.evaluate_policy(
                self.generation_model, self.tokenizer, self.gold_rows, self.cfg, reference
            )
        if record is None:
            return {}
        metrics = gold.keep(self.gold_records, when, record, self.out_dir) | ({"eval/kl": kl} if kl is not None else {})
        self.progress.evals |= gold.summary_figures(metrics, "_start" if when == "start" else "")
        took = time.perf_counter() - started
        shown = f", KL to the start {kl:.3f} nats" if kl is not None else ""
        log.info("%s gold (%s, step %d): %s%s (%.0f s)", self.name, when, self.step, gold.describe(record), shown, took)
        return metrics

    def kl_reference(self):
        """The model the final answers' KL is measured to (see gold.answers_kl), or None for no KL."""
        return None

    def save_policy(self, zero_stage: int) -> Path:
        """The trained causal LM (`engine`) as `<stage>/final` (see save_causal_lm)."""
        target = self.out_dir / "final"
        save_causal_lm(self.engine, zero_stage, self.cfg, self.tokenizer, target)
        if self.rank == 0:
            log.info("%s: final model saved to %s", self.name, target)
        dist.barrier()
        return target


def save_causal_lm(engine, zero_stage: int, cfg: DictConfig, tokenizer, target: Path) -> None:
    """A trained causal LM as a Hugging Face folder `target`, LoRA merged, and when only LoRA trained, the adapter in
    peft's format in `target/adapter`, on the model the stage started from. Gathered under ZeRO-3 (every rank must
    call); written by rank 0."""
    state = dist.full_state_dict(engine, zero_stage)
    if dist.rank() != 0:
        return
    module = engine.module
    scalings = lora.lora_scalings(module)
    base = lora_base(cfg) if scalings else ""
    with_adapter = bool(base) and cfg.model.lora.only_optimize_lora
    if scalings and not with_adapter:
        why = "weights besides LoRA trained too" if base else "the stage did not start from a saved model"
        log.info("no LoRA adapter saved beside %s: %s", target, why)

    def add_adapter(folder: Path) -> None:
        lora.save_adapter(state, module, base, folder / lora.ADAPTER_DIR)

    merged = lora.merge_lora_state_dict(state, scalings)
    add_files = add_adapter if with_adapter else None
    models.save_hf(module.config, merged, tokenizer, target, cfg.model.dtype, add_files=add_files)


def lora_base(cfg: DictConfig) -> str:
    """The model folder or hub id a stage's LoRA adapter applies to: where the stage started ("" when that is no
    saved model: a tiny random model, or another adapter merged in)."""
    init_from = cfg.stage.get("init_from", "")
    if init_from:
        return "" if lora.is_adapter(init_from) else str(Path(init_from).expanduser().resolve())
    if cfg.model.source == Source.tiny:
        return ""
    location = models.model_location(cfg.model, cache_dir(cfg))
    return str(Path(location).resolve()) if Path(location).exists() else location


def param_counts(model) -> dict[str, int]:
    """The summary's parameter counts: all, trainable and LoRA."""
    named = list(model.named_parameters())
    return {
        "params": sum(p.numel() for _, p in named),
        "trainable_params": sum(p.numel() for _, p in named if p.requires_grad),
        "lora_params": sum(p.numel() for n, p in named if ".lora_" in n),
    }


def merged_weights(engine, zero_stage: int) -> dict:
    """An engine's full weights with LoRA merged, for saving (gathered under ZeRO-3: every rank must call); empty
    on ranks other than 0."""
    state = dist.full_state_dict(engine, zero_stage)
    if dist.rank() != 0:
        return {}
    return lora.merge_lora_state_dict(state, lora.lora_scalings(engine.module))
