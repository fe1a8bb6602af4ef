"""Running a stage: in this process for world size 1, else through DeepSpeed's launcher with one worker per rank.

Workers do not compose the config again: they read the resolved config the parent wrote into the run directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig

from rlhf import dist
from rlhf.config import RESOLVED_CONFIG_NAME, Accelerator, load_resolved, save_resolved, world_size

log = logging.getLogger("rlhf")


def configure_process(cfg: DictConfig, local_procs: int) -> None:
    """Accelerator and thread settings; must run before DeepSpeed is imported."""
    if cfg.hardware.accelerator == Accelerator.cpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
        threads = cfg.hardware.threads_per_proc or max(1, (os.cpu_count() or 1) // local_procs)
        torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("compilers").setLevel(logging.WARNING)  # DeepSpeed's op probes log every gcc call


def backend(cfg: DictConfig) -> str:
    return "gloo" if cfg.hardware.accelerator == Accelerator.cpu else "nccl"


def run(cfg: DictConfig, run_dir: Path) -> int:
    """Run the configured stage, or each stage of a pipeline; return the exit code (0 on success, 2 for unusable
    input, else the workers')."""
    if cfg.hardware.accelerator == Accelerator.cuda and not torch.cuda.is_available():
        log.error(
            "hardware=%s needs CUDA GPUs and none is visible here; use hardware=cpu or hardware=cpu-2proc",
            cfg.hardware.name,
        )
        return 2
    save_resolved(cfg, run_dir)
    if cfg.stage.name == "pipeline":
        from rlhf.pipeline import run_pipeline

        return run_pipeline(cfg, run_dir)
    return run_stage(cfg, run_dir, run_dir / RESOLVED_CONFIG_NAME)


def run_stage(cfg: DictConfig, run_dir: Path, config_path: Path) -> int:
    """One stage, in this process for world size 1, else in launched workers that read `config_path`."""
    if world_size(cfg) == 1:
        configure_process(cfg, 1)
        dist.init(backend(cfg))  # kept for later stages and multirun jobs: DeepSpeed caches its groups
        return run_reporting_input_errors(cfg, run_dir)
    return launch_workers(cfg, run_dir, config_path)


def run_reporting_input_errors(cfg: DictConfig, run_dir: Path) -> int:
    """Run the stage in this process; a missing model or unusable data is one clear message and exit code 2."""
    from rlhf import stages
    from rlhf.data import DataError
    from rlhf.models import ModelError

    try:
        stages.run(cfg, run_dir)
    except (ModelError, DataError) as err:
        log.error("stage %s stopped: %s", cfg.stage.name, err)
        return 2
    return 0


def launch_workers(cfg: DictConfig, run_dir: Path, config_path: Path) -> int:
    hw = cfg.hardware
    env = dict(os.environ)
    if hw.accelerator == Accelerator.cpu:
        configure_process(cfg, hw.procs_per_node)
        env["DS_ACCELERATOR"] = "cpu"
        env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--master_port", str(dist.free_port())]
    if hw.nodes > 1:
        command += ["--hostfile", hw.hostfile, "--num_nodes", str(hw.nodes)]
    command += ["--num_gpus", str(hw.procs_per_node), "--module", "rlhf.launch"]
    command += [str(run_dir), "--config", str(config_path)]
    log.info("launching %d workers: %s", world_size(cfg), " ".join(command))
    code = subprocess.call(command, env=env)
    if code != 0:
        log.error(
            "stage %s failed: a worker exited with code %d (see the log above and %s)",
            cfg.stage.name,
            code,
            run_dir,
        )
    return code


def worker_main(run_dir: Path, config_path: Path) -> None:
    """One rank of a multi-process stage, started by DeepSpeed's launcher."""
    cfg = load_resolved(config_path)
    configure_process(cfg, cfg.hardware.procs_per_node)
    rank = int(os.environ.get("RANK", "0"))
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if rank == 0:
        handlers.append(logging.FileHandler(run_dir / "rank0.log"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s][rank{rank}][%(name)s][%(levelname)s] - %(message)s",
        handlers=handlers,
    )
    dist.init(backend(cfg))
    try:
        code = run_reporting_input_errors(cfg, run_dir)
    finally:
        dist.destroy()
    sys.exit(code)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one rank of a multi-process rlhf stage (started by the launcher)")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--config", type=Path, required=True, help="the stage's resolved config")
    parser.add_argument("--local_rank", type=int, default=None, help="set by DeepSpeed's launcher; unused")
    args = parser.parse_args()
    worker_main(args.run_dir, args.config)
