"""The one stage loop: what every stage repeats, written once.

A stage (SFT, reward model, PPO) is a recipe behind the `Stage` protocol: its setup, one optimizer step (one PPO
iteration), its evaluation and its summary figures, its save, and its engines and state for checkpoints. `train`
runs it: the evaluation at the start, the timed steps with the non-finite guard, the history, the evaluation
cadence, the W&B metrics and the step log, and the checkpoint hooks (a stop request is honoured at step
boundaries; a resumed stage continues from its step).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig

from rlhf import dist
from rlhf.checkpoint import Checkpointer
from rlhf.guard import StepGuard
from rlhf.progress import StepLog, eval_due
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
