"""Checkpoints that survive a kill at any point: every trained engine's DeepSpeed state plus the trainer's own state,
written under a temporary name and renamed when complete, verified against a manifest on load, rotated; and the
stop request that SIGTERM or SIGINT turns into a checkpoint and a non-zero exit.

Layout: `<run>/<stage>/checkpoints/step-0000010/` holding one folder per engine (`model`, or `actor` and `critic`),
`trainer_state.pt` (step, epoch, loop figures, KL controller, EMA, ...), `rng/rank<r>.pt` and `checkpoint.json`
(the manifest: step, the size of every file, the stage config, the W&B run id). A folder without a manifest, or
whose files differ from it, is skipped for the one before.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from rlhf import dist

Stage = Any  # a stage recipe (rlhf.stages.loop.Stage, a layer above): its name, step, engines and loop state

log = logging.getLogger(__name__)

MANIFEST = "checkpoint.json"
TRAINER_STATE = "trainer_state.pt"
PREFIX = "step-"
IGNORED_ON_RESUME = (
    "resume",
    "dry_run",
    "logger",
    "run_name",
    "cache_dir",
    "checkpoint.keep_last",
    *(f"hardware.{key}" for key in ("hostfile", "node_rank", "master_addr", "master_port")),  # where, not what
)


class CheckpointError(RuntimeError):
    """No usable checkpoint where one is needed, or one from another config; the message says which and why."""


class Preempted(Exception):
    """A stop was requested (SIGTERM or SIGINT); the checkpoint is saved and the run exits with 128 + signal."""

    def __init__(self, signum: int, step: int, path: Path | None) -> None:
        self.signum, self.step, self.path = signum, step, path
        saved = f"checkpoint at step {step}: {path}" if path else "nothing to save yet (no step done)"
        super().__init__(f"stopped by {signal.Signals(signum).name}; {saved}")


def stage_folder(run_dir: Path, stage: str) -> Path:
    return run_dir / stage / "checkpoints"


def step_folder(folder: Path, step: int) -> Path:
    return folder / f"{PREFIX}{step:07d}"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def flat(cfg: DictConfig | dict) -> dict[str, Any]:
    """A config as `dotted.key -> value`, resolved, enums as their names."""
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True) if isinstance(cfg, DictConfig) else cfg
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    walk(container, "")
    return out


def config_diff(saved: DictConfig | dict, current: DictConfig | dict) -> list[str]:
    """`key: saved -> current` for every setting that differs, except those a resume may change (logging, names)."""
    old, new = flat(saved), flat(current)
    changed = []
    for key in sorted(set(old) | set(new)):
        if any(key == ignored or key.startswith(f"{ignored}.") for ignored in IGNORED_ON_RESUME):
            continue
        if old.get(key, "<unset>") != new.get(key, "<unset>"):
            changed.append(f"{key}: {old.get(key, '<unset>')} -> {new.get(key, '<unset>')}")
    return changed


def verify(path: Path) -> str | None:
    """Why the checkpoint at `path` is unusable (missing manifest, missing or truncated file), or None if complete."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"{MANIFEST} is missing (an interrupted save)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as err:
        return f"{MANIFEST} is unreadable: {err}"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {size} (truncated?)"
    return None


def checkpoint_folders(folder: Path) -> list[Path]:
    """The checkpoint folders under `folder`, newest first, complete or not (see `verify`)."""
    if not folder.is_dir():
        return []
    found = [
        p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]), reverse=True)


def latest(folder: Path) -> Path | None:
    """The newest complete checkpoint under `folder`; incomplete ones are skipped with a warning. None when there is
    none at all; CheckpointError when there are some and none is complete (nothing is deleted: the user decides)."""
    candidates = checkpoint_folders(folder)
    problems = []
    for path in candidates:
        problem = verify(path)
        if problem is None:
            if problems:
                log.warning("skipped incomplete checkpoints: %s; resuming from %s", "; ".join(problems), path.name)
            return path
        problems.append(f"{path.name}: {problem}")
    if problems:
        raise CheckpointError(
            f"no complete checkpoint in {folder} ({'; '.join(problems)}); move the folder away to start the stage again"
        )
    return None


def read_manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def save(
    trainer: Stage, folder: Path, cfg: DictConfig, rng: dict, wandb_id: str | None, elapsed_s: float = 0.0
) -> Path:
    """Write the trainer's checkpoint at its current step into `folder` (every rank calls it) and keep the newest
    `checkpoint.keep_last`; `elapsed_s` is the stage's time so far, over all its invocations. It is written as
    `.tmp-step-N` and renamed once every rank's files and the manifest are in, so an interrupted save is never
    mistaken for a checkpoint."""
    target = step_folder(folder, trainer.step)
    if target.exists() and verify(target) is None:
        return target  # this step is already saved (e.g. stopped again right after a resume)
    tmp = folder / f".tmp-{target.name}"
    started = time.perf_counter()
    if dist.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    dist.barrier()
    for key, engine in trainer.engines().items():
        engine.save_checkpoint(str(tmp / key), tag="state", save_latest=False)
    torch.save(rng, tmp / "rng" / f"rank{dist.rank()}.pt")
    dist.barrier()
    if dist.rank() == 0:
        torch.save(trainer.state_dict(), tmp / TRAINER_STATE)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {
            "stage": trainer.name,
            "step": trainer.step,
            "epoch": trainer.step // max(trainer.steps_per_epoch, 1),
            "world_size": dist.world_size(),
            "wandb_id": wandb_id,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "elapsed_s": elapsed_s,
            "files": files,
            "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, target)
        for old in checkpoint_folders(folder)[cfg.checkpoint.keep_last :]:
            shutil.rmtree(old, ignore_errors=True)
        size = sum(files.values()) / 2**20
        log.info("%s: checkpoint at step %d in %.1f s (%.0f MiB): %s", trainer.name, trainer.step,
                 time.perf_counter() - started, size, target)  # fmt: skip
    dist.barrier()
    return target


def prune_finished(folder: Path) -> None:
    """Once a stage's final model is saved, only its newest checkpoint (the end of the stage) is kept."""
    if dist.rank() == 0:
        for old in checkpoint_folders(folder)[1:]:
            shutil.rmtree(old, ignore_errors=True)


def load(trainer: Stage, path: Path, cfg: DictConfig) -> dict:
    """Restore every engine, the trainer's state and this rank's RNG from the checkpoint at `path`; a checkpoint
    written under another config is refused with the settings that differ. Returns the manifest."""
    manifest = read_manifest(path)
    changed = config_diff(manifest["config"], cfg)
    if changed:
        raise CheckpointError(
            f"checkpoint {path} was written with another config; it differs in:\n  "
            + "\n  ".join(changed)
            + "\nrun with the same settings to resume it, or start a new run"
        )
    for key, engine in trainer.engines().items():
        loaded, _ = engine.load_checkpoint(str(path / key), tag="state", load_module_strict=True)
        if loaded is None:
            raise CheckpointError(f"checkpoint {path}: DeepSpeed could not load {key}")
    rng_file = path / "rng" / f"rank{dist.rank()}.pt"
    if not rng_file.is_file():
        raise CheckpointError(f"checkpoint {path} has no RNG state for rank {dist.rank()} ({rng_file})")
    trainer.load_state_dict(torch.load(path / TRAINER_STATE, weights_only=False))
    set_rng_state(torch.load(rng_file, weights_only=False))
    log.info("%s: resumed from %s (step %d)", trainer.name, path, trainer.step)
    return manifest


class StopRequest:
    """While active, SIGTERM and SIGINT only set a flag that the training loop reads at its next safe point (all
    ranks agree through an all-reduce), so the run stops with a checkpoint instead of dying mid-step. A second
    Ctrl-C stops at once, without a checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum = 0
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.signum:
            log.warning(
                "received %s: stopping with a checkpoint at the next step boundary", signal.Signals(signum).name
            )
            self.signum = signum

    def requested(self) -> int:
        """The signal number if any rank received one (0 otherwise); every rank must call it at the same point."""
        return int(max(dist.all_reduce_max([float(self.signum)])[0], 0))

    def __enter__(self) -> StopRequest:
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Checkpointer:
    """A stage's checkpoint policy: save every `stage.checkpoint_interval` steps and at the last step (unless the
    step was skipped for a non-finite value), and when a stop is requested. The RNG state saved is the one at the
    last step boundary, so a checkpoint taken mid-step resumes as if the step never began. It also keeps the
    stage's time across invocations: `started` is when this one began (perf_counter), the checkpoint adds the
    time before it."""

    def __init__(
        self,
        trainer: Stage,
        cfg: DictConfig,
        folder: Path,
        wandb_id: str | None,
        stop: StopRequest | None,
        started: float | None = None,
    ) -> None:
        self.trainer, self.cfg, self.folder, self.wandb_id, self.stop = trainer, cfg, folder, wandb_id, stop
        self.started = time.perf_counter() if started is None else started
        self.elapsed_before = 0.0  # the stage's seconds up to the checkpoint this invocation resumed from
        self.rng = rng_state()
        self.last: Path | None = None
        self.signum = 0

    def elapsed(self) -> float:
        """The stage's seconds so far: up to the checkpoint resumed from, plus this invocation (work lost after
        that checkpoint and the time between invocations are not counted)."""
        return self.elapsed_before + time.perf_counter() - self.started

    def load(self, path: Path) -> dict:
        manifest = load(self.trainer, path, self.cfg)
        self.elapsed_before = manifest.get("elapsed_s", 0.0)
        self.rng = rng_state()
        self.last = path
        return manifest

    def save(self) -> Path:
        self.last = save(self.trainer, self.folder, self.cfg, self.rng, self.wandb_id, self.elapsed())
        return self.last

    def stop_requested(self) -> int:
        """The signal that asked this run to stop, on any rank (0: none); every rank must call it at the same point."""
        if not self.signum and self.stop is not None:
            self.signum = self.stop.requested()
        return self.signum

    def step_done(self, total_steps: int) -> None:
        """After a complete step (update, evaluation, logging): save when due, then stop if asked to."""
        self.rng = rng_state()
        step, interval = self.trainer.step, self.cfg.stage.checkpoint_interval
        signum = self.stop_requested()
        due = step == total_steps or (interval > 0 and step % interval == 0)
        if signum or (due and self.trainer.guard.in_a_row == 0):  # a skipped step is not "the last good" state
            self.save()
        if signum:
            raise Preempted(signum, step, self.last)

    def check_stop(self) -> None:
        """A safe point inside a step, before any weight changes: on a stop request save the state of the last
        step boundary and stop."""
        signum = self.stop_requested()
        if signum:
            path = self.save() if self.trainer.step > 0 else self.last
            raise Preempted(signum, self.trainer.step, path)
