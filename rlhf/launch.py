"""Running a stage: in this process for world size 1, else through DeepSpeed's launcher with one worker per rank.

Workers do not compose the config again: they read the resolved config the parent wrote into the run directory.
Over several nodes (`hardware.launcher`) either one `rlhf` starts every node's ranks (pdsh over the hostfile), or
one `rlhf` runs on each node and starts that node's ranks (`no_ssh`), or each rank is a SLURM task running `rlhf`
(`slurm`). The run folder is shared by the nodes; the lead process (node 0, SLURM task 0) keeps its records.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import torch
from omegaconf import DictConfig

from rlhf import checkpoint, dist
from rlhf.checkpoint import CheckpointError, Preempted, config_diff
from rlhf.compose import recorded_overrides
from rlhf.config import RESOLVED_CONFIG_NAME, Accelerator, Launcher, load_resolved, save_resolved, world_size
from rlhf.guard import NonFiniteError
from rlhf.stage_schemas import PIPELINE_ORDER
from rlhf.stages import finished_summary

log = logging.getLogger("rlhf")


def check_run_dir(cfg: DictConfig, run_dir: Path) -> str | None:
    """Why this run may not start in `run_dir`, or None: a run directory that already holds a run is continued only
    with `resume` set and the same config (nothing is overwritten); `resume=<dir>` needs a run there."""
    saved = run_dir / RESOLVED_CONFIG_NAME
    if not saved.is_file():
        if cfg.resume not in ("", "auto"):
            return f"resume={cfg.resume}: no run to continue there ({RESOLVED_CONFIG_NAME} not found)"
        return None
    if not trained_anything(run_dir):  # an earlier start failed before any checkpoint: the folder is free
        log.info("%s holds no checkpoint or finished stage (an earlier start stopped first): starting afresh", run_dir)
        saved.unlink()
        return None
    if not cfg.resume:
        return (
            f"{run_dir} already holds a run; continue it with resume=auto (same overrides and hydra.run.dir) or "
            "choose another hydra.run.dir"
        )
    changed = config_diff(load_resolved(saved), cfg)
    if changed:
        return (
            f"cannot resume {run_dir}: its run used another config; it differs in:\n  "
            + "\n  ".join(changed)
            + "\nresume with the overrides the run started with"
        )
    return None


def trained_anything(run_dir: Path) -> bool:
    """Whether a run directory holds a stage's checkpoint or final output (else nothing there can be resumed)."""
    return any(
        any(checkpoint.stage_folder(run_dir, name).glob(f"{checkpoint.PREFIX}*")) or (run_dir / name / "final").is_dir()
        for name in PIPELINE_ORDER
    )


def leads_run(cfg: DictConfig) -> bool:
    """Whether this process keeps the run folder's records (its config, the check that the run may start there, the
    pipeline's report): the only `rlhf` of a run, node 0's under `launcher=no_ssh`, SLURM task 0's under `slurm`."""
    hw = cfg.hardware
    if hw.launcher == Launcher.no_ssh:
        return hw.node_rank == 0
    if hw.launcher == Launcher.slurm and world_size(cfg) > 1:
        return os.environ.get("SLURM_PROCID", "0") == "0"
    return True


def run_stage(cfg: DictConfig, run_dir: Path, config_path: Path | None) -> int:
    """One stage, in this process for world size 1 (or as one SLURM task's rank), else in launched workers that
    read `config_path` (None: a node other than the lead's writes its own copy); with `resume` set, a stage that
    already finished in `run_dir` is not run again."""
    if cfg.resume and finished_summary(run_dir, cfg.stage.name) is not None:
        log.info("stage %s finished earlier in %s: not run again", cfg.stage.name, run_dir)
        return 0
    if world_size(cfg) > 1 and cfg.hardware.launcher == Launcher.slurm:
        problem = join_slurm_job(cfg)
        if problem:
            log.error("%s", problem)
            return 2
        dist.configure_process(cfg, cfg.hardware.procs_per_node)
    elif world_size(cfg) == 1:
        dist.configure_process(cfg, 1)
    else:
        return launch_workers(cfg, run_dir, config_path)
    dist.init(dist.backend(cfg))  # kept for later stages and multirun jobs: DeepSpeed caches its groups
    if dist.rank() != 0:
        logging.getLogger("rlhf").setLevel(logging.WARNING)
    return run_reporting_input_errors(cfg, run_dir)


def join_slurm_job(cfg: DictConfig) -> str | None:
    """Set this SLURM task's rendezvous (MASTER_ADDR: the job's first node, MASTER_PORT: hardware.master_port, RANK,
    WORLD_SIZE, LOCAL_RANK) from SLURM's variables; why this process cannot be a rank, or None."""
    if "SLURM_PROCID" not in os.environ:
        return (
            "hardware.launcher=slurm runs each rank as a SLURM task (hydra/launcher=slurm starts one per device); "
            "this process is not in a SLURM job: use hardware.launcher=deepspeed or no_ssh"
        )
    from submitit.helpers import TorchDistributedEnvironment

    os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")
    os.environ.setdefault("MASTER_PORT", str(cfg.hardware.master_port))
    job = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    if job.world_size != world_size(cfg):
        return (
            f"the SLURM job has {job.world_size} tasks but hardware.nodes x hardware.procs_per_node is "
            f"{world_size(cfg)}: start it with hydra/launcher=slurm, which asks for one task per device"
        )
    return None


def run_reporting_input_errors(cfg: DictConfig, run_dir: Path) -> int:
    """Run the stage in this process. A missing model, unusable data or checkpoint, or a reward function's bad value
    is one clear message and exit code 2; a stop by SIGTERM/SIGINT exits 128 + the signal after its checkpoint; too
    many non-finite steps exit 3."""
    from rlhf import stages
    from rlhf.data import DataError
    from rlhf.models import ModelError
    from rlhf.rewards import RewardFunctionError
    from rlhf.tracking import exit_code_of

    try:
        stages.run(cfg, run_dir)
    except (ModelError, DataError, CheckpointError, Preempted, NonFiniteError, RewardFunctionError) as err:
        if isinstance(err, Preempted):
            log.warning("stage %s %s; continue with: %s", cfg.stage.name, err, resume_command(run_dir))
        elif isinstance(err, NonFiniteError):
            log.error("%s", err)
        else:
            log.error("stage %s stopped: %s", cfg.stage.name, err)
        return exit_code_of(err)
    return 0


def resume_command(run_dir: Path) -> str:
    """The command that continues the run in `run_dir`: its overrides as Hydra recorded them, with resume set."""
    overrides = recorded_overrides(run_dir)
    if not overrides and not (run_dir / ".hydra" / "overrides.yaml").is_file():  # started from Python, not `rlhf`
        return f"rlhf resume={run_dir} <the overrides it started with>"
    return " ".join(["rlhf", f"resume={run_dir}", *(shlex.quote(o) for o in overrides)])


def launcher_command(cfg: DictConfig, hostfile: str) -> list[str]:
    """DeepSpeed's launcher for this node's ranks (every node's with pdsh), up to the module it runs."""
    hw = cfg.hardware
    command = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if hw.nodes == 1:
        command += ["--master_port", str(dist.free_port())]
    else:
        command += ["--hostfile", hostfile, "--num_nodes", str(hw.nodes), "--master_port", str(hw.master_port)]
        command += ["--master_addr", hw.master_addr] if hw.master_addr else []
        if hw.launcher == Launcher.no_ssh:
            command += ["--no_ssh", "--node_rank", str(hw.node_rank)]
    return command + ["--num_gpus", str(hw.procs_per_node), "--module", "rlhf.launch"]


def launch_workers(cfg: DictConfig, run_dir: Path, config_path: Path | None) -> int:
    with tempfile.TemporaryDirectory(prefix="rlhf-node-") as node_dir:
        hostfile = cfg.hardware.hostfile
        if not hostfile and cfg.hardware.nodes > 1:  # --no_ssh reads only the slot counts: the names are placeholders
            hostfile = str(Path(node_dir) / "hostfile")
            slots = f" slots={cfg.hardware.procs_per_node}\n"
            Path(hostfile).write_text("".join(f"node{i}{slots}" for i in range(cfg.hardware.nodes)))
        config_path = config_path or save_resolved(cfg, Path(node_dir))
        return run_launcher(cfg, run_dir, config_path, hostfile)


def run_launcher(cfg: DictConfig, run_dir: Path, config_path: Path, hostfile: str) -> int:
    """Run DeepSpeed's launcher to the end, its output passed through; signals go to this node's workers."""
    hw = cfg.hardware
    env = dict(os.environ)
    if hw.accelerator == Accelerator.cpu:
        dist.configure_process(cfg, hw.procs_per_node)
        env["DS_ACCELERATOR"] = "cpu"
        env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    command = launcher_command(cfg, hostfile)
    command += [str(run_dir), "--config", str(config_path)] + (["--resume", cfg.resume] if cfg.resume else [])
    here = hw.procs_per_node if hw.launcher == Launcher.no_ssh else world_size(cfg)
    log.info("launching %d of %d workers: %s", here, world_size(cfg), " ".join(command))
    # the launcher's stdout (its log and the workers') passes through here, so that after a stop by a signal its
    # "exits with return code = 130" line, which reads like a crash, is left out
    launcher = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE, text=True)
    with forward_signals(launcher):
        for line in launcher.stdout:
            if not LAUNCHER_STOP_LINE.search(line):
                sys.stdout.write(line)
                sys.stdout.flush()
        code = launcher.wait()
    if code - 128 in (signal.SIGTERM, signal.SIGINT):  # the workers saved a checkpoint (the signal may have come to
        # another node: every rank stops at the same step)
        log.warning(
            "stage %s stopped by %s on every worker; continue with: %s",
            cfg.stage.name,
            signal.Signals(code - 128).name,
            resume_command(run_dir),
        )
    elif code != 0:
        log.error(
            "stage %s failed: a worker exited with code %d (see the log above and %s)",
            cfg.stage.name,
            code,
            run_dir,
        )
    return code


def is_worker(cmdline: list[str]) -> bool:
    """Whether a command line is one rank's (`python -u -m rlhf.launch ...`), not the launcher naming the module."""
    return any(a == "-m" and b == "rlhf.launch" for a, b in zip(cmdline, cmdline[1:], strict=False))


LAUNCHER_STOP_LINE = re.compile(r"exits with return code = (130|143)\b")  # DeepSpeed's launcher after a stop


@contextmanager
def forward_signals(launcher: subprocess.Popen) -> Iterator[None]:
    """Pass SIGTERM and SIGINT on to this machine's workers (each saves a checkpoint and exits), not to DeepSpeed's
    launcher, which would kill them after 30 s; before the workers exist, the launcher gets the signal."""
    import psutil

    def forward(signum: int, frame) -> None:
        try:
            children = psutil.Process(launcher.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        workers = [p for p in children if is_worker(p.cmdline())]
        log.warning("received %s: passing it to %d workers", signal.Signals(signum).name, len(workers))
        for process in workers or [psutil.Process(launcher.pid)]:
            with suppress(psutil.NoSuchProcess):
                process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def worker_main(run_dir: Path, config_path: Path, resume: str) -> None:
    """One rank of a multi-process stage, started by DeepSpeed's launcher."""
    cfg = load_resolved(config_path)
    cfg.resume = resume
    dist.configure_process(cfg, cfg.hardware.procs_per_node)
    rank = int(os.environ.get("RANK", "0"))
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if rank == 0:
        handlers.append(logging.FileHandler(run_dir / "rank0.log"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s][rank{rank}][%(name)s][%(levelname)s] - %(message)s",
        handlers=handlers,
    )
    dist.init(dist.backend(cfg))
    try:
        code = run_reporting_input_errors(cfg, run_dir)
    finally:
        dist.destroy()
    sys.exit(code)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one rank of a multi-process rlhf stage (started by the launcher)")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--config", type=Path, required=True, help="the stage's resolved config")
    parser.add_argument("--resume", default="", help="the invocation's resume setting")
    parser.add_argument("--local_rank", type=int, default=None, help="set by DeepSpeed's launcher; unused")
    args = parser.parse_args()
    worker_main(args.run_dir, args.config, args.resume)
