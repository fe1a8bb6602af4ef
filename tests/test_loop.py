"""The one stage loop (rlhf.stages.loop): a recipe of a few lines gets evaluations on cadence, the guard, the
history, metrics and the step log, without a copy of the loop."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from rlhf.guard import NonFiniteError, StepGuard
from rlhf.stages import loop
from rlhf.stages.loop import LoopProgress, StepOutcome


class RecordingTracker:
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict]] = []

    def log(self, metrics: dict, step: int) -> None:
        self.logged.append((step, metrics))


class FakeEngine:
    """Just enough of a DeepSpeed engine for StepGuard: every backward is an optimizer step."""

    def backward(self, loss: torch.Tensor) -> None:
        pass

    def is_gradient_accumulation_boundary(self) -> bool:
        return True

    def step(self) -> None:
        pass

    def zero_optimization_stage(self) -> int:
        return 1


class CountdownStage:
    """A fourth stage in a dozen lines: its loss is 1 / step, non-finite at the steps in `bad_steps`."""

    name = "countdown"

    def __init__(self, total_steps: int, eval_interval: int, bad_steps: tuple[int, ...] = ()) -> None:
        self.cfg = OmegaConf.create({"stage": {"log_interval": 1, "eval_interval": eval_interval}})
        self.step, self.total_steps, self.steps_per_epoch = 0, total_steps, total_steps
        self.progress, self.guard = LoopProgress(), StepGuard(self.name, max_in_a_row=2)
        self.tracker, self.checkpoints, self.bad_steps, self.evaluated = RecordingTracker(), None, bad_steps, []

    def run_step(self) -> StepOutcome:
        self.step += 1
        loss = float("nan") if self.step in self.bad_steps else 1.0 / self.step
        self.guard.backward_step(FakeEngine(), torch.tensor(loss))
        return StepOutcome({"countdown/lr": 0.1}, {"countdown/loss": loss}, ("countdown/loss",), 10, 2, loss)

    def evaluate(self, when: str) -> dict[str, float]:
        self.evaluated.append(when)
        self.progress.evals[f"eval_{when}"] = self.step
        return {"countdown/eval": float(self.step)}

    def figures(self) -> dict:
        return {"steps": self.step, "history": list(self.progress.history), **self.progress.evals}


def test_a_new_stage_gets_evaluations_metrics_and_history_from_the_loop(caplog) -> None:
    stage = CountdownStage(total_steps=5, eval_interval=2, bad_steps=(3,))
    with caplog.at_level(logging.INFO, logger="rlhf.stages.loop"):
        figures = loop.train(stage)
    assert stage.evaluated == ["start", "step-2", "step-4", "end"]
    assert figures["steps"] == 5 and figures["history"] == [1.0, 0.5, 0.25, 0.2]  # step 3 skipped: not kept
    assert stage.guard.skipped == 1 and stage.progress.samples == 10 and stage.progress.train_tokens == 50
    steps = [step for step, _ in stage.tracker.logged]
    assert steps == [0, 1, 2, 3, 4, 5]
    by_step = dict(stage.tracker.logged)
    assert "countdown/loss" not in by_step[3] and by_step[3]["guard/skipped_steps"] == 1  # the skipped step's loss
    assert by_step[4]["countdown/loss"] == 0.25 and by_step[4]["countdown/eval"] == 4.0
    assert by_step[1]["perf/samples_per_s"] > 0 and by_step[1]["perf/tokens_per_s"] == pytest.approx(
        5 * by_step[1]["perf/samples_per_s"]
    )
    lines = [r.getMessage() for r in caplog.records if "countdown step" in r.getMessage()]
    assert len(lines) == 5 and "loss nan" in lines[2] and "loss 0.25" in lines[3]


def test_a_resumed_stage_continues_from_its_step_without_the_start_evaluation() -> None:
    stage = CountdownStage(total_steps=4, eval_interval=10)
    stage.step = 2
    stage.progress = LoopProgress.from_state(LoopProgress(history=[1.0, 0.5], samples=4).state_dict())
    figures = loop.train(stage)
    assert stage.evaluated == ["end"] and figures["history"] == [1.0, 0.5, 1 / 3, 0.25]
    assert [step for step, _ in stage.tracker.logged] == [3, 4]


def test_steps_non_finite_in_a_row_stop_the_stage() -> None:
    with pytest.raises(NonFiniteError, match="2 steps in a row"):
        loop.train(CountdownStage(total_steps=5, eval_interval=10, bad_steps=(2, 3)))


def test_a_ppo_checkpoint_from_before_the_loop_resumes_with_its_times(dist_process_group, tmp_path: Path) -> None:
    from tests.test_ppo import function_reward_trainer

    trainer = function_reward_trainer()
    state = trainer.state_dict()
    state["step"] = 1
    state["progress"] = {"history": [{"ppo/kl": 0.5}], "evals": {}, "gen_s": 3.0, "rollout_s": 2.0, "train_s": 1.0}
    trainer.load_state_dict(state)
    progress = trainer.progress
    assert progress.train_seconds == 4.0 and progress.samples == 8 and progress.history == [{"ppo/kl": 0.5}]
    figures = trainer.figures()
    assert figures["gen_time_frac"] == 0.5 and figures["experience_time_frac"] == 0.75 and figures["kl_first"] == 0.5
    assert not math.isnan(figures["s_per_step"])


class CountdownRecipe(loop.Recipe):
    """The same stage on `loop.Recipe`: what it keeps, its loss figures and its checkpoint state come from there."""

    name = "countdown"

    def setup(self) -> None:
        self.total_steps = self.steps_per_epoch = 4

    def run_step(self) -> StepOutcome:
        self.step += 1
        loss = 1.0 / self.step
        self.guard.backward_step(FakeEngine(), torch.tensor(loss))
        return StepOutcome({}, {"countdown/loss": loss}, (), 10, 2, loss)

    def evaluate(self, when: str) -> dict[str, float]:
        return {}

    def figures(self) -> dict:
        return self.history_figures()

    def save(self) -> Path:
        return self.out_dir


def test_a_recipe_resumes_from_its_state_and_reports_its_loss_figures(tmp_path: Path) -> None:
    cfg = OmegaConf.create(
        {"stage": {"log_interval": 1, "eval_interval": 10}, "checkpoint": {"max_skipped_in_a_row": 2}}
    )
    first = CountdownRecipe(cfg, tmp_path, RecordingTracker())
    first.setup()
    first.total_steps = 2  # stopped half way
    first.train()
    resumed = CountdownRecipe(cfg, tmp_path, RecordingTracker())
    resumed.setup()
    resumed.load_state_dict(first.state_dict())
    figures = resumed.train()
    assert resumed.save() == tmp_path / "countdown" and [s for s, _ in resumed.tracker.logged] == [3, 4]
    assert figures["steps"] == 4 and figures["first_loss"] == 1.0 and figures["last_loss"] == 0.25
    assert figures["samples"] == 8 and figures["skipped_steps"] == 0
