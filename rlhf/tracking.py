"""Weights & Biases on rank 0: one run per stage, online with a key, offline without, and always finished."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rlhf.config import LoggerMode

log = logging.getLogger(__name__)

STEP_METRIC = "train/step"  # the x-axis every logged metric is defined against


def api_key_configured() -> bool:
    """Whether W&B has a key without asking for one: WANDB_API_KEY or a ~/.netrc entry for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc().hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host or "coreweave" in host for host in hosts)


def resolve_mode(mode: LoggerMode) -> str:
    """The W&B mode to run in; WANDB_MODE in the environment wins, as W&B users expect, except over `logger=none`
    (disabled), which means no W&B run at all."""
    if mode == LoggerMode.disabled:
        return "disabled"
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    if mode == LoggerMode.auto:
        return "online" if api_key_configured() else "offline"
    return mode.value


def run_group(run_dir: Path) -> str:
    """The W&B group of a run: its folder with the date folder above it (`2026-12-02_01-02-03-pipeline-tiny`), so runs
    started at the same time on different days do not share a group."""
    return f"{run_dir.parent.name}_{run_dir.name}" if run_dir.parent.name else run_dir.name


def run_name(stage: str, run_dir: Path) -> str:
    """A W&B run name: the stage, then the run folder's name unless that already names the stage."""
    return run_dir.name if f"-{stage}-" in f"-{run_dir.name}-" else f"{stage}-{run_dir.name}"


class Tracker:
    """A W&B run for one stage, or a no-op on other ranks and with `logger=none`. Use as a context manager. The run
    starts at the first thing it records (or when its id is asked for), so a stage that fails while setting up (a
    missing model, bad data) leaves no W&B run behind: its error is the command's message, not a failed run."""

    def __init__(self, cfg: DictConfig, stage: str, run_dir: Path, rank: int = 0, resume_id: str | None = None) -> None:
        """`resume_id` continues that W&B run (a resumed stage) instead of starting a new one."""
        self.run = None
        self.cfg, self.stage, self.run_dir, self.resume_id = cfg, stage, run_dir, resume_id
        self.mode = resolve_mode(cfg.logger.mode)
        self.enabled = rank == 0 and self.mode != "disabled"

    @classmethod
    def off(cls, cfg: DictConfig, stage: str) -> Tracker:
        """A tracker that records nothing (a trainer driven from Python without a W&B run)."""
        tracker = cls(cfg, stage, Path("."))
        tracker.enabled = False
        return tracker

    def _started(self):
        """The W&B run, started on first use; None when disabled."""
        if self.run is None and self.enabled:
            self.run = self._start()
        return self.run

    def _start(self):
        import wandb

        from rlhf.config import cache_dir, world_size
        from rlhf.plan import model_params

        cfg, stage, run_dir, resume_id, mode = self.cfg, self.stage, self.run_dir, self.resume_id, self.mode
        group, name = cfg.logger.group or run_group(run_dir), cfg.run_name or run_name(stage, run_dir)
        config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        trained = cfg.reward_model if stage == "reward" else cfg.model
        params = model_params(trained, cache_dir(cfg))  # sweep axes the W&B UI can chart
        config["model"]["params_m"] = round(params / 1e6, 2) if params else None
        config["hardware"]["world_size"] = world_size(cfg)
        try:
            run = wandb.init(
                project=cfg.logger.project,
                entity=cfg.logger.entity or None,
                group=group,
                job_type=stage,
                name=name,
                tags=list(cfg.logger.tags) + [stage, cfg.model.name, cfg.hardware.name],
                config=config,
                dir=str(run_dir),
                mode=mode,
                id=resume_id,
                resume="allow" if resume_id else None,
                # flush the run file every second, not every 15 s: a killed run keeps what it logged before
                settings=wandb.Settings(console="off", silent=True, x_transaction_log_flush_interval=1.0),
            )
        except Exception as error:
            if resume_id and "is in use" in str(error) and os.environ.get("WANDB_SERVICE"):
                from rlhf.checkpoint import CheckpointError

                raise CheckpointError(
                    f"W&B run {resume_id} is still open in the wandb-core service named by WANDB_SERVICE (the "
                    "interrupted run's); unset WANDB_SERVICE or restart that service, then resume again"
                ) from error
            raise
        # every metric against the stage's own step (optimizer steps; PPO: iterations), so W&B's automatic panels
        # and the generated dashboard share one x-axis across the stages' runs
        run.define_metric(STEP_METRIC)
        run.define_metric("*", step_metric=STEP_METRIC)
        log.info("W&B run %s (%s%s) in %s", run.id, mode, ", resumed" if resume_id else "", run.dir)
        return run

    @property
    def run_id(self) -> str | None:
        run = self._started()
        return run.id if run is not None else None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Log and commit `step` now (W&B otherwise holds a step's row until the next step, and a killed run
        would lose the step it checkpointed last); anything else for this step must be logged before."""
        if self._started() is not None:
            self.run.log(metrics | {STEP_METRIC: step}, step=step, commit=True)

    def table(self, key: str, rows: list[dict[str, Any]], step: int) -> None:
        """A W&B table (e.g. sample prompts and responses) under `key` at `step`, before `log` commits the step."""
        if rows and self._started() is not None:
            import wandb

            columns = list(rows[0])
            table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
            self.run.log({key: table}, step=step, commit=False)

    def summary(self, figures: dict[str, Any]) -> None:
        if self._started() is not None:
            self.run.summary.update(figures)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=exit_code_of(exc))


def exit_code_of(error: BaseException | None) -> int:
    """The exit code `rlhf` gives for a stage that ended with `error`, so W&B records the same: 0, 128 + the signal
    for a stop with a checkpoint, 2 for unusable input (a reward function's bad value included), 3 for too many
    non-finite steps, else 1."""
    from rlhf.checkpoint import CheckpointError, Preempted
    from rlhf.data import DataError
    from rlhf.guard import NonFiniteError
    from rlhf.models import ModelError
    from rlhf.rewards import RewardFunctionError

    if error is None:
        return 0
    if isinstance(error, Preempted):
        return 128 + error.signum
    if isinstance(error, ModelError | DataError | CheckpointError | RewardFunctionError):
        return 2
    return 3 if isinstance(error, NonFiniteError) else 1
