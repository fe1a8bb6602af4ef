"""Nothing lost, through the `rlhf` command: a run killed with SIGKILL resumes from its newest checkpoint and goes on
exactly as an uninterrupted run of the same seed; the pipeline resumes in the stage it stopped in; SIGTERM saves a
checkpoint and exits non-zero within 60 s with one and two processes, and two processes resume from it."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from rlhf import checkpoint
from tests.conftest import read_summary, run_cli, single_run_dir, start_cli, wait_for, wandb_history

SFT = [
    "experiment=tiny",
    "stage=sft",
    "stage.max_steps=6",
    "stage.global_batch=8",
    "stage.checkpoint_interval=2",
    "stage.eval_interval=3",
    "stage.eval_max_batches=2",
]
SECRETS = {"WANDB_API_KEY": "local-0123456789abcdef0123456789abcdef01234567", "HF_TOKEN": "hf_notarealtokenXYZ123"}


def output(result) -> str:
    return result.stdout + result.stderr


def kill_after(cwd: Path, args: list[str], pattern: str, grace: float = 0.0) -> Path:
    """Start `rlhf <args>`, SIGKILL it `grace` seconds after `pattern` (a checkpoint) exists; its run directory."""
    process = start_cli(args, cwd)
    wait_for(cwd, pattern, process)
    time.sleep(grace)
    process.kill()
    process.wait()
    return single_run_dir(cwd)


def resumed_step(text: str, stage: str) -> int:
    return int(re.search(rf"{stage}: resumed from \S+ \(step (\d+)\)", text).group(1))


def stage_runs(run_dir: Path, stage: str) -> list[Path]:
    """The offline W&B run folders of a stage, oldest first, found by the run id its checkpoints record."""
    manifest = checkpoint.read_manifest(checkpoint.latest(checkpoint.stage_folder(run_dir, stage)))
    return sorted((run_dir / "wandb").glob(f"offline-run-*-{manifest['wandb_id']}"))


def test_sft_killed_with_sigkill_resumes_exactly_where_its_checkpoint_left(tmp_path: Path) -> None:
    reference = run_cli(SFT, tmp_path / "reference")
    assert reference.returncode == 0, output(reference)[-3000:]
    reference_dir = single_run_dir(tmp_path / "reference")

    # the grace lets W&B flush (every second) what the run logged up to its checkpoint
    run_dir = kill_after(tmp_path / "killed", SFT, "outputs/*/*/sft/checkpoints/step-0000002", grace=1.5)
    assert not (run_dir / "sft" / "final").exists()
    resumed = run_cli([*SFT, f"resume={run_dir}"], tmp_path / "killed")
    assert resumed.returncode == 0, output(resumed)[-3000:]
    step = resumed_step(output(resumed), "sft")
    assert step in (2, 4)

    summary, expected = read_summary(run_dir, "sft"), read_summary(reference_dir, "sft")
    assert summary["steps"] == 6 and summary["resumed_from_step"] == step
    assert summary["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-5)
    runs = stage_runs(run_dir, "sft")
    assert len(runs) == 2  # one W&B run (one id), continued
    after, before = wandb_history(runs[1]), wandb_history(stage_runs(reference_dir, "sft")[0])
    assert min(after) == step + 1 and max(after) == 6
    # W&B keeps what was logged more than its 1 s flush interval before the kill: steps 0-2 always, and with the
    # resume from step 2 every step is there; a resume from step 4 may miss step 4 if it was logged just before
    first = set(wandb_history(runs[0]))
    assert set(range(3)) <= first
    if step == 2:
        assert first | set(after) == set(range(7))
    for s in range(step + 1, 7):
        assert after[s]["sft/loss"] == pytest.approx(before[s]["sft/loss"], rel=1e-5, abs=1e-6), s


PIPELINE = [
    "experiment=quickstart",
    "stage.sft.max_steps=4",
    "stage.sft.eval_max_batches=1",
    "stage.reward.max_steps=4",
    "stage.reward.eval_pairs=4",
    "stage.ppo.max_steps=5",
    "stage.ppo.checkpoint_interval=2",
    "stage.ppo.eval_interval=5",
    "stage.ppo.advantage=gae",  # with a critic, the stage with the most state to resume (the default is rloo)
    "stage.ppo.samples_per_prompt=1",
    "eval.gold_prompts=8",
]


def test_pipeline_killed_in_ppo_resumes_in_ppo_and_matches_an_uninterrupted_ppo(tmp_path: Path) -> None:
    run_dir = kill_after(tmp_path / "killed", PIPELINE, "outputs/*/*/ppo/checkpoints/step-0000002")
    resumed = run_cli([*PIPELINE, "resume=auto", f"hydra.run.dir={run_dir}"], tmp_path / "killed")
    assert resumed.returncode == 0, output(resumed)[-3000:]
    text = output(resumed)
    assert "stage sft finished earlier" in text and "stage reward finished earlier" in text
    step = resumed_step(text, "ppo")
    assert step in (2, 4)
    assert read_summary(run_dir, "ppo")["steps"] == 5 and (run_dir / "pipeline.md").is_file()

    sft, reward = run_dir / "sft" / "final", run_dir / "reward" / "final"
    only_ppo = [*PIPELINE, "stage.stages=[ppo]", f"stage.ppo.init_from={sft}", f"stage.ppo.reward_from={reward}"]
    reference = run_cli(only_ppo, tmp_path / "reference")
    assert reference.returncode == 0, output(reference)[-3000:]
    reference_dir = single_run_dir(tmp_path / "reference")

    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 4  # sft, reward, and ppo twice under one id
    ppo_runs = stage_runs(run_dir, "ppo")
    assert len(ppo_runs) == 2
    after, before = wandb_history(ppo_runs[1]), wandb_history(stage_runs(reference_dir, "ppo")[0])
    assert min(k for k in after if k > 0) == step + 1
    for key in ("ppo/reward_mean", "ppo/policy_loss", "ppo/value_loss", "ppo/kl"):
        assert after[step + 1][key] == pytest.approx(before[step + 1][key], rel=1e-4, abs=1e-5), key
    assert read_summary(run_dir, "ppo")["gold_score"] == pytest.approx(read_summary(reference_dir, "ppo")["gold_score"])


def test_sigterm_saves_a_checkpoint_and_exits_within_a_minute(tmp_path: Path) -> None:
    """One process (two ranks stopped by a signal to one of them: tests/test_multinode.py)."""
    args = [
        "experiment=tiny",
        "stage=sft",
        "stage.max_steps=8",
        "stage.checkpoint_interval=2",
        "hardware=cpu",
    ]
    process = start_cli(args, tmp_path, **SECRETS)
    wait_for(tmp_path, "outputs/*/*/sft/checkpoints/step-0000002", process)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=90)
    elapsed = time.monotonic() - started
    text = (tmp_path / "cli.out").read_text()
    assert code == 128 + signal.SIGTERM and elapsed < 60, (code, elapsed, text[-3000:])
    assert "stopped by SIGTERM; checkpoint at step" in text
    assert "failed" not in text and "return code" not in text  # a clean stop does not read like a crash

    run_dir = single_run_dir(tmp_path)
    latest = checkpoint.latest(checkpoint.stage_folder(run_dir, "sft"))
    manifest = checkpoint.read_manifest(latest)
    assert manifest["step"] >= 2 and not (run_dir / "sft" / "final").exists()
    assert "rng/rank0.pt" in manifest["files"]
    assert not list(checkpoint.stage_folder(run_dir, "sft").glob(".tmp-*"))

    for path in [p for p in tmp_path.rglob("*") if p.is_file()]:  # secrets never reach configs, logs or W&B files
        data = path.read_bytes()
        assert not any(secret.encode() in data for secret in SECRETS.values()), path
    command = re.search(r"continue with: rlhf (.*)", text).group(1).split()
    assert command == [f"resume={run_dir}", *args]  # the exact command, not a placeholder
    resumed = run_cli([f"resume={run_dir}"], tmp_path)  # alone: the run's recorded overrides
    assert resumed.returncode == 0, output(resumed)[-3000:]
    summary = read_summary(run_dir, "sft")
    assert summary["steps"] == 8 and summary["resumed_from_step"] == manifest["step"]
