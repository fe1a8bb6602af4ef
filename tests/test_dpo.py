"""DPO: the losses against hand-computed values, the answers' log-probs, and the stage on tiny models (in-process
for the learning and resume checks, one `rlhf` run for the pipeline's sft -> dpo hand-over and its W&B figures)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rlhf import checkpoint, gold, pipeline, preference
from rlhf.compose import compose
from rlhf.config import ConfigError, stage_config
from rlhf.data.tokenize import answer_pair_batch
from rlhf.stages.dpo import DPOTrainer
from rlhf.tracking import Tracker
from tests.conftest import read_summary, run_cli, single_run_dir
from tests.test_reward import separable_pairs
from tests.test_sft import inspect_wandb, wandb_runs


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_each_dpo_loss_against_hand_computed_values() -> None:
    policy = (torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0]))
    reference = (torch.tensor([-11.0, -4.0]), torch.tensor([-11.0, -4.0]))
    lengths = (torch.tensor([2.0, 4.0]), torch.tensor([4.0, 2.0]))
    # sigmoid: z = beta ((pc - rc) - (pr - rr)) = 0.5 ((1) - (-1)) = 1 and 0.5 (0 - 1) = -0.5
    losses, chosen, rejected = preference.dpo_loss(policy, reference, lengths, "sigmoid", 0.5)
    assert losses.tolist() == pytest.approx([-math.log(sig(1.0)), -math.log(sig(-0.5))], abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.5, 0.0]) and rejected.tolist() == pytest.approx([-0.5, 0.5])
    smoothed, _, _ = preference.dpo_loss(policy, reference, lengths, "sigmoid", 0.5, label_smoothing=0.1)
    expected = [-0.9 * math.log(sig(z)) - 0.1 * math.log(sig(-z)) for z in (1.0, -0.5)]
    assert smoothed.tolist() == pytest.approx(expected, abs=1e-6)
    # rpo: plus alpha times the chosen answer's per-token NLL, -pc / lc = 5 and 1
    rpo, _, _ = preference.dpo_loss(policy, reference, lengths, "sigmoid", 0.5, rpo_alpha=0.5)
    expected = [-math.log(sig(1.0)) + 0.5 * 5.0, -math.log(sig(-0.5)) + 0.5 * 1.0]
    assert rpo.tolist() == pytest.approx(expected, abs=1e-6)
    # ipo over per-token means: z = (pc/lc - rc/lc) - (pr/lr - rr/lr); loss (z - 1/(2 beta))^2
    ipo, _, _ = preference.dpo_loss(policy, reference, lengths, "ipo", 0.5)
    z = [(-10 / 2 + 11 / 2) - (-12 / 4 + 11 / 4), (-4 / 4 + 4 / 4) - (-3 / 2 + 4 / 2)]
    assert ipo.tolist() == pytest.approx([(v - 1.0) ** 2 for v in z], abs=1e-6)
    # simpo: reference-free, z = beta (pc/lc - pr/lr) - gamma
    simpo, chosen, _ = preference.dpo_loss(policy, None, lengths, "simpo", 2.0, simpo_gamma=1.0)
    z = [2.0 * (-10 / 2 + 12 / 4) - 1.0, 2.0 * (-4 / 4 + 3 / 2) - 1.0]
    assert simpo.tolist() == pytest.approx([-math.log(sig(v)) for v in z], abs=1e-6)
    assert chosen.tolist() == pytest.approx([2.0 * -5.0, 2.0 * -1.0])
    with pytest.raises(ValueError, match="unknown DPO loss"):
        preference.dpo_loss(policy, reference, lengths, "kto", 0.1)


def test_answer_log_probs_count_only_the_answer_tokens() -> None:
    pairs = [{"chosen": [5, 6, 7, 8], "rejected": [5, 6, 9], "prompt_len": 2}]
    batch = answer_pair_batch(pairs, pad_id=0)
    assert batch["answer_mask"].tolist() == [[0, 0, 1, 1], [0, 0, 1, 0]]
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 12)  # the predictions of tokens 1..3
    got = preference.answer_logps(logits, batch["input_ids"], batch["answer_mask"])
    logp = torch.log_softmax(logits, dim=-1)
    expected = [logp[0, 1, 7] + logp[0, 2, 8], logp[1, 1, 9]]  # token t from the logits at t - 1
    assert got.tolist() == pytest.approx([e.item() for e in expected], abs=1e-5)


def dpo_trainer(tmp_path: Path, *overrides: str) -> DPOTrainer:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = separable_pairs(tmp_path / "sep.jsonl", count=300)
    cfg = compose(
        [
            "experiment=tiny", "stage=dpo", "logger=none", "eval.gold_prompts=0", "stage.eval_pairs=16",
            f"data.sources=[{{path: {data}, format: pairs}}]", "data.split=[0,1,0]", "optimizer.lr=1e-3",
            *overrides,
        ]
    )  # fmt: skip
    trainer = DPOTrainer(cfg, tmp_path, Tracker(cfg, "dpo", tmp_path))
    trainer.setup()
    return trainer


@pytest.mark.parametrize("loss", ["sigmoid", "simpo"])  # ipo's path differs only in its math (tested above)
def test_a_tiny_models_dpo_loss_falls_and_its_implicit_reward_accuracy_rises(
    loss: str, tmp_path: Path, dist_process_group
) -> None:
    trainer = dpo_trainer(tmp_path, f"stage.loss={loss}", "stage.max_steps=4", "stage.global_batch=8")
    if loss == "simpo":
        assert trainer.reference is None and trainer.reference_s == 0  # reference-free
    else:
        assert trainer.reference is None and trainer.reference_s > 0  # precomputed, then dropped
        assert all("ref_logps" in p for p in trainer.eval_share())
    before = trainer.evaluate_pairs()
    figures = trainer.train()
    after = trainer.evaluate_pairs()
    assert figures["last_loss_mean"] < figures["first_loss_mean"]
    assert after["dpo/eval/rewards/accuracies"] >= 0.9 > before["dpo/eval/rewards/accuracies"], (before, after)
    assert after["dpo/eval/rewards/margins"] > before["dpo/eval/rewards/margins"]


def test_a_reference_engine_gives_the_precomputed_log_probs(tmp_path: Path, dist_process_group) -> None:
    small = ["stage.max_steps=2", "stage.global_batch=4", "stage.eval_pairs=8"]
    cached = dpo_trainer(tmp_path / "cached", *small)
    live = dpo_trainer(tmp_path / "live", *small, "stage.precompute_reference=false")
    assert live.reference is not None and cached.reference is None
    pairs = cached.eval_share()[:4]
    loss_cached, figures_cached = cached.pair_losses(pairs)
    loss_live, figures_live = live.pair_losses([{k: v for k, v in p.items() if k != "ref_logps"} for p in pairs])
    assert loss_live.item() == pytest.approx(loss_cached.item(), rel=1e-5)
    torch.testing.assert_close(figures_live["chosen"], figures_cached["chosen"], rtol=1e-5, atol=1e-6)


def test_rpo_alpha_adds_the_chosen_answers_per_token_nll(tmp_path: Path, dist_process_group) -> None:
    trainer = dpo_trainer(tmp_path, "stage.max_steps=1", "stage.global_batch=4", "stage.eval_pairs=8")
    pairs = trainer.eval_share()[:4]
    batch = answer_pair_batch(pairs, trainer.tokenizer.pad_token_id)
    with torch.no_grad():  # the LM head only from the first answer column on gives the full logits' log-probs
        full = trainer.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = preference.answer_logps(full[:, :-1], batch["input_ids"], batch["answer_mask"])
        assert batch["answer_mask"].argmax(dim=1).min() > 1  # the prompts are left out
        torch.testing.assert_close(torch.cat(trainer.logps(trainer.engine, batch)), expected, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        plain, figures = trainer.pair_losses(pairs)
        trainer.cfg.stage.rpo_alpha = 2.0
        with_nll, _ = trainer.pair_losses(pairs)
    lengths = answer_pair_batch(pairs, trainer.tokenizer.pad_token_id)["answer_mask"].sum(dim=1)[: len(pairs)]
    nll = (-figures["logps_c"] / lengths).mean().item()
    assert nll > 0 and figures["nll"].mean().item() == pytest.approx(nll, rel=1e-6)  # logged as dpo/nll_loss
    assert with_nll.item() == pytest.approx(plain.item() + 2.0 * nll, rel=1e-5)


@pytest.mark.parametrize("setting", ["zero3-lora", "zero2-bf16"])
def test_dpo_resumes_exactly_under_zero_lora_and_bf16(setting: str, tmp_path: Path, dist_process_group) -> None:
    overrides = {
        "zero3-lora": ["hardware.zero_stage=3", "model.lora.dim=4", "model.lora.target_modules=[q_proj,v_proj]"],
        "zero2-bf16": ["hardware.zero_stage=2", "hardware.precision=bf16", "data.max_answer_len=16"],
    }[setting] + ["stage.max_steps=2", "stage.global_batch=4", "stage.eval_pairs=8", "stage.checkpoint_interval=1"]
    runs = []
    for resumed in (False, True):
        trainer = dpo_trainer(tmp_path, *overrides)
        trainer.checkpoints = checkpoint.Checkpointer(trainer, trainer.cfg, tmp_path / "ckpt", None, stop=None)
        if resumed:
            trainer.checkpoints.load(checkpoint.latest(tmp_path / "ckpt"))
        else:
            trainer.run_step()
            trainer.checkpoints.step_done(trainer.total_steps)
        assert trainer.step == 1
        runs.append(trainer.run_step().kept)
    for key in ("dpo/loss", "dpo/rewards/margins", "dpo/logps/chosen"):
        assert runs[1][key] == pytest.approx(runs[0][key], rel=1e-4, abs=1e-6), key


def test_dpo_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="stage.loss=kto must be one of sigmoid, ipo, simpo"):
        compose(["experiment=tiny", "stage=dpo", "stage.loss=kto"])
    with pytest.raises(ConfigError, match="stage.dpo.beta=0.0 must be > 0"):
        compose(["experiment=tiny", "stage.stages=[sft,dpo]", "stage.dpo.beta=0"])
    with pytest.raises(ConfigError, match="stage.rpo_alpha=-1.0 must be >= 0"):
        compose(["experiment=tiny", "stage=dpo", "stage.rpo_alpha=-1"])


def test_dpo_runs_on_two_processes_with_its_w_and_b_figures(tmp_path: Path) -> None:
    steps = ["stage.max_steps=2", "stage.global_batch=8", "stage.eval_pairs=16"]
    result = run_cli(["experiment=tiny", "hardware=cpu-2proc", "stage=dpo", "eval.gold_prompts=4", *steps], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = single_run_dir(tmp_path)
    summary = read_summary(run_dir, "dpo")
    assert summary["steps"] == 2 and summary["eval_pairs"] == 16 and "gold_score" in summary
    assert summary["world_size"] == 2
    assert 0 < summary["kl"] < 1  # the final answers' KL to the start, the start loaded again on both ranks
    logged = inspect_wandb(wandb_runs(run_dir)[-1])["summary"]
    for key in (
        "dpo/loss",
        "dpo/rewards/accuracies",
        "dpo/rewards/margins",
        "dpo/eval/loss",
        "dpo/nll_loss",
        "eval/kl",
    ):
        assert key in logged, key


def test_a_pipeline_hands_the_sft_output_to_dpo_as_its_policy() -> None:
    cfg = compose(["experiment=tiny", "stage.stages=[sft,dpo]"])
    sub = stage_config(cfg, "dpo")
    pipeline.hand_over(sub, {"sft": "/run/sft/final"})
    assert sub.stage.init_from == "/run/sft/final"
    named = stage_config(compose(["experiment=tiny", "stage.stages=[sft,dpo]", "stage.dpo.init_from=/mine"]), "dpo")
    pipeline.hand_over(named, {"sft": "/run/sft/final"})
    assert named.stage.init_from == "/mine"  # a policy the config names is kept


def test_dpo_after_sft_in_one_run_takes_the_sft_stages_final_gold_evaluation(
    tmp_path: Path, dist_process_group, monkeypatch
) -> None:
    trainer = dpo_trainer(tmp_path, "stage.max_steps=1", "stage.global_batch=4")
    trainer.gold_rows = [{"prompt": f"q{i}", "family": "arithmetic"} for i in range(4)]
    sft_final = tmp_path / "sft" / "final"
    sft_final.mkdir(parents=True)
    record = gold.GoldRecord([f"q{i}" for i in range(4)], ["arithmetic"] * 4, [1.0, 0.0, 0.0, 1.0], ["a"] * 4)
    gold.save(tmp_path / "sft", {"end": record})
    answered = []
    monkeypatch.setattr(gold, "evaluate_policy", lambda *args: (answered.append(args), (None, None))[1])

    assert gold.handed_over(tmp_path, str(tmp_path / "elsewhere"), trainer.gold_rows, 1) is None
    assert gold.handed_over(tmp_path, str(sft_final), trainer.gold_rows[:3], 1) is None  # other prompts
    assert gold.handed_over(tmp_path, str(sft_final), trainer.gold_rows, 3) is None  # shared otherwise by 3 ranks
    trainer.cfg.stage.init_from = str(sft_final)
    figures = trainer.evaluate_gold("start")
    assert figures["eval/gold_score"] == 0.5 and not answered  # the SFT stage's record, no answers generated
    assert gold.load(trainer.out_dir)["start"] == record
    trainer.cfg.eval.kl_prompts = 0  # no start model in the folder to measure the final answers' KL to
    trainer.evaluate_gold("end")
    assert len(answered) == 1  # the end is this stage's own model: answered


def test_onpolicy_dpo_trains_on_pairs_of_the_policys_own_graded_answers(tmp_path: Path, dist_process_group) -> None:
    onpolicy = ["samples_per_prompt=2", "train_prompts=12", "eval_prompts=6", "max_new_tokens=8", "static_fraction=0.5"]
    overrides = ["experiment=tiny", "stage=dpo", "logger=none", "eval.gold_prompts=0", "stage.max_steps=2"]
    cfg = compose([*overrides, *(f"stage.onpolicy.{setting}" for setting in onpolicy)])
    trainer = DPOTrainer(cfg, tmp_path, Tracker(cfg, "dpo", tmp_path))
    trainer.setup()
    saved = json.loads((tmp_path / "dpo" / "onpolicy_pairs.json").read_text())
    # a random tiny policy answers nothing right: each pair is the data's right answer against one of its own
    assert {p["kind"] for p in saved["train"] + saved["eval"]} == {"reference"} and saved["eval"]
    kinds = [p["kind"] for p in trainer.train_pairs]
    assert kinds.count("reference") == len(saved["train"]) == kinds.count("data")  # static_fraction 0.5: as many
    assert [p["kind"] for p in trainer.eval_pairs] == ["reference"] * len(saved["eval"])
    assert all(p["prompt_len"] > 0 for p in trainer.train_pairs) and all("ref_logps" in p for p in trainer.eval_share())
    figures = trainer.train()
    assert trainer.step == 2 and math.isfinite(figures["last_loss_mean"])
