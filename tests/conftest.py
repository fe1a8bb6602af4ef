"""Shared fixtures: composing configs like the CLI does, and running the `rlhf` command in a scratch directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """`rlhf <args>` in `cwd` with W&B offline; output captured as text."""
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="0")
    for key in ("WANDB_API_KEY", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # the in-process group of `dist_process_group` holds its port; a child needs its own
    return subprocess.run(
        [sys.executable, "-m", "rlhf", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def single_run_dir(cwd: Path) -> Path:
    """The one run directory a single `rlhf` run wrote under `cwd/outputs`."""
    dirs = [p.parent for p in (cwd / "outputs").glob("*/*/config.resolved.yaml")]
    assert len(dirs) == 1, dirs
    return dirs[0]


def read_summary(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "summary.json").read_text())


@pytest.fixture(scope="session")
def dist_process_group():
    """A single-process gloo group on the CPU accelerator, for trainers run inside the test process (one per
    session: DeepSpeed caches its groups, so the group must outlive every engine)."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    from rlhf import dist

    dist.init("gloo")
    yield
    dist.destroy()
