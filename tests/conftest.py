"""Shared fixtures: composing configs like the CLI does, and running the `rlhf` command in a scratch directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:  # pytest -n: the cores shared among the workers, not each worker's threads on every core
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORKERS))


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a child `rlhf`: W&B offline, no rank variables (the in-process group of
    `dist_process_group` holds its port; a child needs its own), no WANDB_SERVICE (an in-process test's
    wandb-core would be shared, and a killed child's run would stay open in it), plus `extra`."""
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="0")
    for key in ("WANDB_API_KEY", "WANDB_SERVICE", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env | extra


def run_cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """`rlhf <args>` in `cwd` with W&B offline; output captured as text."""
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "rlhf", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    """`rlhf <args>` started in the background in `cwd`, its output going to `cwd/cli.out`."""
    cwd.mkdir(parents=True, exist_ok=True)
    out = open(cwd / "cli.out", "w")  # noqa: SIM115 — the child writes it until it exits
    return subprocess.Popen(
        [sys.executable, "-m", "rlhf", *args], cwd=cwd, env=cli_env(**env), stdout=out, stderr=subprocess.STDOUT
    )


def wait_for(cwd: Path, pattern: str, process: subprocess.Popen, timeout: float = 300) -> Path:
    """The first path under `cwd` matching `pattern`, once it appears (the process must still be running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(cwd.glob(pattern))
        if found:
            return found[0]
        if process.poll() is not None:
            raise AssertionError(f"rlhf exited ({process.returncode}) first:\n{(cwd / 'cli.out').read_text()[-3000:]}")
        time.sleep(0.05)
    raise TimeoutError(f"{pattern} did not appear under {cwd} in {timeout} s")


def wandb_records(run: Path) -> list[dict]:
    """The records (run, history, summary, ...) of one offline W&B run folder, as `wandb leet inspect` reads them."""
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def wandb_history(run: Path) -> dict[int, dict]:
    """The logged metrics of one offline W&B run folder, by step."""
    rows = [r["history"]["item"] for r in wandb_records(run) if r.get("type") == "history"]
    return {int(row["_step"]): row for row in rows}


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
