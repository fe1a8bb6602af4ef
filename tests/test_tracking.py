"""W&B modes: logger=none means no W&B run, whatever WANDB_MODE says."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import pytest

from rlhf.checkpoint import Preempted
from rlhf.compose import compose
from rlhf.config import LoggerMode
from rlhf.data import DataError
from rlhf.tracking import Tracker, resolve_mode, run_group, run_name
from tests.conftest import wandb_records


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


def test_wandb_groups_carry_the_date_and_run_names_do_not_repeat_the_stage() -> None:
    assert run_group(Path("outputs/2026-12-02/01-02-03-pipeline-tiny")) == "2026-12-02_01-02-03-pipeline-tiny"
    assert run_name("sft", Path("outputs/2026-12-02/01-02-03-pipeline-tiny")) == "sft-01-02-03-pipeline-tiny"
    assert run_name("sft", Path("outputs/multirun/2026-12-02/0-sft-tiny-cpu")) == "0-sft-tiny-cpu"


@pytest.mark.parametrize(
    ("error", "code"),
    [(DataError("bad row"), 2), (Preempted(signal.SIGINT, 3, None), 130), (RuntimeError("bug"), 1), (None, 0)],
)
def test_wandb_records_the_exit_code_rlhf_gives(tmp_path: Path, monkeypatch, error, code) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose(["experiment=tiny", "stage=sft", "logger=wandb"])
    with contextlib.suppress(type(error) if error else ()), Tracker(cfg, "sft", tmp_path) as tracker:
        tracker.log({"loss": 1.0}, step=1)
        if error is not None:
            raise error
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    exits = [r["exit"]["exit_code"] for r in wandb_records(run) if r.get("type") == "exit"]
    assert exits == [code]


def test_a_stage_that_fails_before_recording_anything_leaves_no_wandb_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose(["experiment=tiny", "stage=sft", "logger=wandb"])
    with contextlib.suppress(DataError), Tracker(cfg, "sft", tmp_path):
        raise DataError("data source mine.jsonl: no usable rows")  # e.g. while the trainer sets up
    assert not (tmp_path / "wandb").exists()
