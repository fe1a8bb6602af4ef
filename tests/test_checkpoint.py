"""Checkpoints in process on tiny models: a checkpoint restores the engine, step, loop state and RNG; incomplete ones
are skipped for the one before; old ones rotate away; another config is refused; non-finite losses skip steps."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch

from rlhf import checkpoint, dist
from rlhf.compose import compose
from rlhf.guard import NonFiniteError, StepGuard
from rlhf.optim import KahanAdamW, MasterWeightAdamW
from rlhf.stages.sft import SFTTrainer
from rlhf.tracking import Tracker

SFT = ["experiment=tiny", "stage=sft", "logger=none", "stage.max_steps=4", "stage.checkpoint_interval=2"]
SFT += ["eval.gold_prompts=0", "stage.eval_max_batches=1"]  # checkpoints are the subject, not evaluations


def sft_trainer(run_dir: Path, overrides: list[str]) -> SFTTrainer:
    cfg = compose(overrides)
    trainer = SFTTrainer(cfg, run_dir, Tracker(cfg, "sft", run_dir))
    trainer.setup()
    trainer.checkpoints = checkpoint.Checkpointer(
        trainer, cfg, checkpoint.stage_folder(run_dir, "sft"), wandb_id="run-id", stop=None
    )
    return trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dist_process_group) -> tuple[SFTTrainer, Path]:
    """Four SFT steps with a checkpoint every two."""
    run_dir = tmp_path_factory.mktemp("sft")
    trainer = sft_trainer(run_dir, SFT)
    trainer.train()
    return trainer, run_dir


def test_checkpoints_rotate_and_carry_a_manifest(trained) -> None:
    _, run_dir = trained
    folder = checkpoint.stage_folder(run_dir, "sft")
    assert [p.name for p in checkpoint.checkpoint_folders(folder)] == ["step-0000004", "step-0000002"]
    manifest = checkpoint.read_manifest(folder / "step-0000004")
    assert manifest["step"] == 4 and manifest["wandb_id"] == "run-id" and manifest["config"]["stage"]["max_steps"] == 4
    assert "model/state/mp_rank_00_model_states.pt" in manifest["files"] and "rng/rank0.pt" in manifest["files"]
    assert not list(folder.glob(".tmp-*"))
    earlier = checkpoint.read_manifest(folder / "step-0000002")
    assert 0 < earlier["elapsed_s"] < manifest["elapsed_s"]  # the stage's time, for a resumed run's wall_s


def test_keep_last_deletes_older_checkpoints(tmp_path: Path, dist_process_group) -> None:
    trainer = sft_trainer(
        tmp_path, [*SFT, "stage.max_steps=3", "stage.checkpoint_interval=1", "checkpoint.keep_last=1"]
    )
    trainer.train()
    assert [p.name for p in checkpoint.checkpoint_folders(checkpoint.stage_folder(tmp_path, "sft"))] == ["step-0000003"]


def test_a_checkpoint_restores_weights_optimizer_loop_state_and_rng(trained, tmp_path: Path) -> None:
    first, run_dir = trained
    path = checkpoint.latest(checkpoint.stage_folder(run_dir, "sft"))
    second = sft_trainer(tmp_path, SFT)
    second.checkpoints.load(path)
    assert second.step == 4 and second.progress == first.progress
    elapsed = checkpoint.read_manifest(path)["elapsed_s"]
    assert second.checkpoints.elapsed_before == elapsed and second.checkpoints.elapsed() > elapsed
    restored = dict(second.engine.module.named_parameters())
    for name, param in first.engine.module.named_parameters():
        torch.testing.assert_close(restored[name], param, rtol=0, atol=0, msg=name)
    opt_a, opt_b = first.engine.optimizer.state_dict(), second.engine.optimizer.state_dict()
    for key, state in opt_a["state"].items():
        torch.testing.assert_close(state["exp_avg_sq"], opt_b["state"][key]["exp_avg_sq"], rtol=0, atol=0)
    assert second.engine.get_lr() == first.engine.get_lr()
    assert torch.equal(second.micro_batches(4)[0]["input_ids"], first.micro_batches(4)[0]["input_ids"])
    rng = torch.load(path / "rng" / "rank0.pt", weights_only=False)
    assert torch.equal(torch.get_rng_state(), rng["torch"])


def test_bf16_training_checkpoints_and_saves_its_fp32_masters(tmp_path: Path, dist_process_group) -> None:
    overrides = [
        *SFT,
        "stage.max_steps=2",
        "hardware.precision=bf16",
        "stage.global_batch=4",  # one micro-batch a step: bf16 is emulated on CPUs without bf16 instructions
        "data.max_prompt_len=48",
        "data.max_answer_len=32",
    ]
    first = sft_trainer(tmp_path / "a", overrides)
    first.train()
    second = sft_trainer(tmp_path / "b", overrides)
    second.checkpoints.load(checkpoint.latest(checkpoint.stage_folder(tmp_path / "a", "sft")))
    masters_a, masters_b = first.engine.optimizer, second.engine.optimizer
    assert isinstance(masters_b, MasterWeightAdamW) and next(second.engine.module.parameters()).dtype == torch.bfloat16
    for a, b in zip(masters_a.masters, masters_b.masters, strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    assert any(not torch.equal(m.bfloat16().float(), m) for m in masters_b.masters)  # bits that bf16 drops
    for a, b in zip(first.engine.module.parameters(), second.engine.module.parameters(), strict=True):
        assert torch.equal(a, b)
    saved = dist.full_state_dict(first.engine, 0)
    names = {id(p): n for n, p in first.engine.module.named_parameters()}
    for param, master in zip(masters_a.model_params, masters_a.masters, strict=True):
        assert torch.equal(saved[names[id(param)]], master)  # the final model is saved from the masters


def test_bf16_training_without_masters_checkpoints_its_kahan_compensation(tmp_path: Path, dist_process_group):
    overrides = [*SFT, "stage.max_steps=2", "hardware.precision=bf16", "optimizer.master_weights=false"]
    overrides += ["stage.global_batch=4", "data.max_prompt_len=48", "data.max_answer_len=32"]  # bf16 is emulated here
    trainer = sft_trainer(tmp_path, overrides)
    trainer.train()
    kahan, params = trainer.engine.optimizer, list(trainer.engine.module.parameters())
    assert isinstance(kahan, KahanAdamW) and params[0].dtype == torch.bfloat16
    assert len(trainer.progress.history) == 2 and all(math.isfinite(loss) for loss in trainer.progress.history)
    assert any(kahan.state[p]["compensation"].abs().max() > 0 for p in params)  # bits that bf16 drops
    saved = dist.full_state_dict(trainer.engine, 0)
    for name, param in trainer.engine.module.named_parameters():
        assert torch.equal(saved[name], kahan.master_of(param))  # saved from weight + compensation
    kept = {p: {k: v.clone() for k, v in kahan.state[p].items()} for p in params}
    names = {p: n for n, p in trainer.engine.module.named_parameters()}
    with torch.no_grad():  # then lose it all, and restore it from the step-2 checkpoint
        for p in params:
            p.add_(1.0)
            for value in kahan.state[p].values():
                value.zero_()
    trainer.checkpoints.load(checkpoint.latest(checkpoint.stage_folder(tmp_path, "sft")))
    for p in params:
        assert torch.equal(kahan.master_of(p), saved[names[p]])
        for key, value in kept[p].items():
            assert value.dtype == kahan.state[p][key].dtype and torch.equal(value, kahan.state[p][key]), key


def test_a_truncated_checkpoint_is_skipped_for_the_one_before(trained, tmp_path: Path, caplog) -> None:
    _, run_dir = trained
    folder = tmp_path / "checkpoints"
    shutil.copytree(checkpoint.stage_folder(run_dir, "sft"), folder)
    newest = folder / "step-0000004" / "model" / "state" / "mp_rank_00_model_states.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING):
        assert checkpoint.latest(folder).name == "step-0000002"
    assert "step-0000004: model/state/mp_rank_00_model_states.pt has 1000 bytes" in caplog.text

    (folder / "step-0000002" / "rng" / "rank0.pt").unlink()  # a missing file in the other one too: nothing usable
    with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint.*rng/rank0.pt is missing"):
        checkpoint.latest(folder)
    (folder / "step-0000006").mkdir()  # an interrupted save that got renamed without a manifest is never picked
    assert checkpoint.verify(folder / "step-0000006") == "checkpoint.json is missing (an interrupted save)"


def test_a_checkpoint_from_another_config_is_refused_naming_the_difference(trained, tmp_path: Path) -> None:
    _, run_dir = trained
    other = sft_trainer(tmp_path, [*SFT, "optimizer.lr=3e-4"])
    with pytest.raises(checkpoint.CheckpointError, match=r"optimizer.lr: 0.001 -> 0.0003"):
        other.checkpoints.load(checkpoint.latest(checkpoint.stage_folder(run_dir, "sft")))


def nan_loss_at(trainer: SFTTrainer, steps: set[int]) -> None:
    """Make the model's loss NaN during the given (0-based) optimizer steps."""

    def hook(module, args, kwargs, output):
        if trainer.step in steps:
            output.loss = output.loss * float("nan")
        return output

    trainer.engine.module.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize(("zero", "precision"), [(0, "fp32"), (2, "fp32"), (0, "bf16")])
def test_a_non_finite_loss_skips_the_step_and_is_counted(
    zero: int, precision: str, tmp_path: Path, dist_process_group
) -> None:
    overrides = [f"hardware.zero_stage={zero}", f"hardware.precision={precision}", "stage.checkpoint_interval=0"]
    overrides += ["stage.global_batch=4", "data.max_prompt_len=48", "data.max_answer_len=32"]  # bf16 is emulated here
    trainer = sft_trainer(tmp_path, [*SFT, *overrides])
    nan_loss_at(trainer, {1})
    weights = []
    original_step = trainer.guard.end_step

    def record(step: int) -> bool:
        weights.append({n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()})
        return original_step(step)

    trainer.guard.end_step = record
    figures = trainer.train()
    assert figures["skipped_steps"] == 1 and figures["steps"] == 4
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])  # step 2 left the weights alone
    assert not all(torch.equal(weights[1][n], weights[2][n]) for n in weights[0])  # step 3 trained
    assert all(torch.isfinite(p).all() for p in trainer.engine.module.parameters())


def test_too_many_non_finite_steps_stop_the_run_with_the_last_checkpoint_intact(
    tmp_path: Path, dist_process_group
) -> None:
    trainer = sft_trainer(tmp_path, [*SFT, "stage.max_steps=8", "checkpoint.max_skipped_in_a_row=3"])
    nan_loss_at(trainer, {4, 5, 6, 7})
    with pytest.raises(NonFiniteError, match=r"3 steps in a row \(to step 7\)"):
        trainer.train()
    folder = checkpoint.stage_folder(tmp_path, "sft")
    assert checkpoint.latest(folder).name == "step-0000004"  # steps 5 and 6 were skipped, not checkpointed
    assert json.loads((folder / "step-0000004" / "checkpoint.json").read_text())["step"] == 4


def test_peak_memory_is_measured_from_its_reset() -> None:
    dist.reset_peak_memory()
    block = bytearray(400_000_000)  # 0.4 GB touched
    with_block = dist.peak_memory()["peak_rss_gb"]
    del block
    dist.reset_peak_memory()
    assert dist.peak_memory()["peak_rss_gb"] < with_block - 0.3


class TwoMicroBatchEngine:
    """What the guard uses of a DeepSpeed engine at ZeRO 0 in fp32: an optimizer step every second backward."""

    def __init__(self) -> None:
        self.module = torch.nn.Linear(2, 1)
        self.micro_steps = 0
        self.applied: list[bool] = []  # per optimizer step: whether it changed the weights
        self._config = type("Config", (), {"gradient_clipping": 0.0})()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.micro_steps += 1

    def is_gradient_accumulation_boundary(self) -> bool:
        return self.micro_steps % 2 == 0

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            grads = [p.grad for p in self.module.parameters()]
            self.applied.append(all(g is not None for g in grads))
            assert all(g is None or torch.isfinite(g).all() for g in grads), "a non-finite update was applied"
            self.module.zero_grad(set_to_none=True)

    def zero_optimization_stage(self) -> int:
        return 0

    def bfloat16_enabled(self) -> bool:
        return False

    def fp16_enabled(self) -> bool:
        return False


def test_a_non_finite_loss_skips_only_its_own_engine_s_step(dist_process_group) -> None:
    guard = StepGuard("ppo", max_in_a_row=3)
    critic, actor = TwoMicroBatchEngine(), TwoMicroBatchEngine()
    x = torch.ones(1, 2)
    for micro_batch in range(2):  # PPO's order: the critic's update, then the actor's, per micro-batch
        guard.backward_step(critic, critic.module(x).sum())
        actor_loss = actor.module(x).sum() * (float("nan") if micro_batch == 0 else 1.0)
        guard.backward_step(actor, actor_loss)
    assert critic.applied == [True] and actor.applied == [False]
    assert guard.end_step(1) is True and guard.skipped == 1
