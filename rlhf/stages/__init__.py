"""The stage recipes (each a `loop.Stage`), and running one stage with its W&B run, summary and table."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from omegaconf import DictConfig

from rlhf import checkpoint, dist
from rlhf.config import cache_dir, world_size
from rlhf.plan import model_params
from rlhf.progress import markdown_table
from rlhf.stages.dpo import DPOTrainer
from rlhf.stages.loop import Stage
from rlhf.stages.ppo import PPOTrainer
from rlhf.stages.reward import RewardTrainer
from rlhf.stages.sft import SFTTrainer
from rlhf.tracking import Tracker

log = logging.getLogger(__name__)


TRAINERS: dict[str, type[Stage]] = {"sft": SFTTrainer, "reward": RewardTrainer, "dpo": DPOTrainer, "ppo": PPOTrainer}
MODEL_OPTION = {"sft": "model", "reward": "reward_model", "dpo": "model", "ppo": "model"}  # the option it trains


def finished_summary(run_dir: Path, name: str) -> dict | None:
    """The summary of stage `name` if it finished in `run_dir` (its summary and final model are there)."""
    path = run_dir / name / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if Path(summary["output"]).is_dir() else None


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Set up, train and save one stage in this process (one rank); rank 0 writes `<stage>/summary.json`. With
    `resume` set, the stage continues from its newest complete checkpoint (same step, data order, RNG and W&B run);
    SIGTERM and SIGINT stop it with a checkpoint (raising checkpoint.Preempted)."""
    name = cfg.stage.name
    started = time.perf_counter()
    dist.reset_peak_memory()  # a stage's own peak, not an earlier stage's of the same process
    folder = checkpoint.stage_folder(run_dir, name)
    latest = checkpoint.latest(folder) if cfg.resume else None
    manifest = checkpoint.read_manifest(latest) if latest else {}
    resume_id = manifest.get("wandb_id")
    with checkpoint.StopRequest() as stop, Tracker(cfg, name, run_dir, dist.rank(), resume_id) as tracker:
        trainer = TRAINERS[name](cfg, run_dir, tracker)
        trainer.setup()
        trainer.checkpoints = checkpoint.Checkpointer(
            trainer, cfg, folder, tracker.run_id or resume_id, stop, started=started
        )
        if latest is not None:
            trainer.checkpoints.load(latest)
        figures = trainer.train()
        output = trainer.save()
        checkpoint.prune_finished(folder)
        wall_s = trainer.checkpoints.elapsed()  # over all invocations when resumed
        devices = world_size(cfg)
        params = model_params(cfg[MODEL_OPTION[name]], cache_dir(cfg))
        summary = {
            "stage": name,
            "model": cfg[MODEL_OPTION[name]].name,
            "model_params_m": round(params / 1e6, 2) if params else None,
            "hardware": cfg.hardware.name,
            "world_size": devices,
            "host_cpus": os.cpu_count(),  # processes of a CPU run share these cores
            "wall_s": wall_s,
            **figures,
            "resumed_from_step": manifest.get("step"),
            "est_cost_usd": wall_s / 3600 * devices * cfg.hardware.cost_per_device_hour,
            **dist.peak_memory(),  # rank 0's; a resumed stage's since its resume
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
            "peak_rss_gb",
            "peak_device_gb",
        ]
        log.info("\n%s\nfinal model: %s", markdown_table([{k: summary[k] for k in shown if k in summary}]), output)
    dist.barrier()  # the summary is written before any rank exits: another node's `rlhf` reads it next
    return summary
