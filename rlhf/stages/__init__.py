"""Stage trainers behind one small protocol, and running one stage with its W&B run, summary and table."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Protocol

from omegaconf import DictConfig

from rlhf import dist
from rlhf.config import cache_dir, world_size
from rlhf.plan import model_params
from rlhf.progress import markdown_table
from rlhf.stages.ppo import PPOTrainer
from rlhf.stages.reward import RewardTrainer
from rlhf.stages.sft import SFTTrainer
from rlhf.tracking import Tracker

log = logging.getLogger(__name__)


class StageTrainer(Protocol):
    """What every stage trainer offers: the runner calls setup, train, save; checkpoints use save/load_state."""

    name: str

    def setup(self) -> None: ...

    def train(self) -> dict: ...

    def save(self) -> Path: ...

    def save_state(self, path: Path) -> None: ...

    def load_state(self, path: Path) -> None: ...


TRAINERS: dict[str, type[StageTrainer]] = {"sft": SFTTrainer, "reward": RewardTrainer, "ppo": PPOTrainer}
MODEL_OPTION = {"sft": "model", "reward": "reward_model", "ppo": "model"}  # the model option a stage trains


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Set up, train and save one stage in this process (one rank); rank 0 writes `<stage>/summary.json`."""
    name = cfg.stage.name
    started = time.perf_counter()
    with Tracker(cfg, name, run_dir, dist.rank()) as tracker:
        trainer = TRAINERS[name](cfg, run_dir, tracker)
        trainer.setup()
        figures = trainer.train()
        output = trainer.save()
        wall_s = time.perf_counter() - started
        devices = world_size(cfg)
        params = model_params(cfg[MODEL_OPTION[name]], cache_dir(cfg))
        summary = {
            "stage": name,
            "model": cfg[MODEL_OPTION[name]].name,
            "model_params_m": round(params / 1e6, 2) if params else None,
            "hardware": cfg.hardware.name,
            "world_size": devices,
            "wall_s": wall_s,
            **figures,
            "est_cost_usd": wall_s / 3600 * devices * cfg.hardware.cost_per_device_hour,
            "output": str(output),
        }
        tracker.summary({f"{name}/{k}": v for k, v in summary.items()} | {"time/stage_s": wall_s})
    if dist.rank() == 0:
        (run_dir / name).mkdir(parents=True, exist_ok=True)
        (run_dir / name / "summary.json").write_text(json.dumps(summary, indent=2))
        shown = [
            "stage",
            "model",
            "world_size",
            "steps",
            "wall_s",
            "samples_per_s",
            "tokens_per_s",
            "first_loss",
            "last_loss",
            "eval_loss_start",
            "eval_loss",
            "eval_acc_start",
            "eval_acc",
            "reward_first",
            "reward_last",
            "kl_first",
            "kl_last",
            "gold_score_start",
            "gold_score",
            "reward_start",
            "reward",
            "s_per_step",
            "gen_time_frac",
            "experience_time_frac",
            "est_cost_usd",
        ]
        log.info("\n%s\nfinal model: %s", markdown_table([{k: summary[k] for k in shown if k in summary}]), output)
    return summary
