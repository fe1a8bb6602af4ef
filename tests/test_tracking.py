"""W&B modes: logger=none means no W&B run, whatever WANDB_MODE says."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.config import LoggerMode, compose
from rlhf.tracking import Tracker, resolve_mode


def test_logger_none_writes_no_wandb_run_even_with_wandb_mode_offline(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose(["experiment=tiny", "stage=sft", "logger=none"])
    with Tracker(cfg, "sft", tmp_path) as tracker:
        tracker.log({"loss": 1.0}, step=1)
    assert tracker.run is None and not (tmp_path / "wandb").exists()


@pytest.mark.parametrize(
    ("env", "mode", "expected"),
    [
        ("offline", LoggerMode.disabled, "disabled"),
        ("offline", LoggerMode.online, "offline"),
        ("", LoggerMode.offline, "offline"),
    ],
)
def test_wandb_mode_from_the_environment_wins_except_over_logger_none(monkeypatch, env, mode, expected) -> None:
    monkeypatch.setenv("WANDB_MODE", env)
    assert resolve_mode(mode) == expected
