"""The reward model: score index under any padding, the pairwise loss, learning a separable preference, save/load,
ZeRO and LoRA variants, two processes, and the scoring command."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForSequenceClassification

from rlhf import stages
from rlhf.compose import compose
from rlhf.config import ArchConfig, ModelConfig
from rlhf.data import builtin
from rlhf.data.tokenize import pad_left, pad_right, pair_batch
from rlhf.models import dropout_sites, load_reward_model, load_tokenizer, reward_model_from_lm, tiny_config
from rlhf.ppo.functional import last_valid_index
from rlhf.preference import pair_figures, pair_sums, pairwise_loss
from rlhf.stages.reward import RewardTrainer
from rlhf.tracking import Tracker
from tests.conftest import read_summary, run_cli, single_run_dir
from tests.test_sft import inspect_wandb, wandb_runs

TINY_ARCH = ArchConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256)


def test_the_score_is_read_at_the_last_real_token_whatever_the_padding() -> None:
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    assert last_valid_index(right).tolist() == [2, 4]
    assert last_valid_index(left).tolist() == [4, 4]


def test_pairwise_loss() -> None:
    zero = torch.zeros(3)
    assert pairwise_loss(zero, zero).item() == pytest.approx(math.log(2))
    assert pairwise_loss(torch.tensor([5.0]), torch.tensor([-5.0])).item() < 1e-4
    assert pairwise_loss(torch.tensor([1.0]), torch.tensor([0.0]), margin=1.0).item() == pytest.approx(math.log(2))


@pytest.fixture(scope="module")
def tiny_reward_model():
    from transformers import AutoModelForCausalLM

    model_cfg = OmegaConf.structured(ModelConfig(name="tiny", source="tiny", arch=TINY_ARCH))
    tokenizer = load_tokenizer(model_cfg)
    torch.manual_seed(0)
    model = reward_model_from_lm(AutoModelForCausalLM.from_config(tiny_config(model_cfg, tokenizer))).eval()
    return model, tokenizer


def test_score_is_the_same_under_left_and_right_padding_and_pad_equal_to_eos(tiny_reward_model) -> None:
    model, tokenizer = tiny_reward_model
    eos = tokenizer.eos_token_id
    rows = [[11, 12, 13, eos], [21, 22, 23, 24, 25, 26, 27, eos], [31, 32, eos]]
    with torch.no_grad():
        alone = torch.cat([model(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)) for r in rows])
        right = pad_right([{"input_ids": r, "labels": r} for r in rows], tokenizer.pad_token_id)
        left = pad_left(rows, tokenizer.pad_token_id)
        eos_padded = pad_right([{"input_ids": r, "labels": r} for r in rows], eos)  # pad == EOS
        for batch in (right, left, eos_padded):
            got = model(batch["input_ids"], batch["attention_mask"])
            torch.testing.assert_close(got, alone, rtol=1e-4, atol=1e-5)


def separable_pairs(path: Path, count: int = 600) -> Path:
    """A preference any reward model should learn: a helpful answer against a refusal."""
    rows = [
        {"prompt": f"What is {i} + {i % 7}?", "chosen": f"{i} + {i % 7} = {i + i % 7}.", "rejected": "I won't say."}
        for i in range(count)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_tiny_reward_model_learns_a_separable_preference(tmp_path: Path) -> None:
    data = separable_pairs(tmp_path / "sep.jsonl")
    result = run_cli(
        [
            "experiment=tiny",
            "stage=reward",
            "stage.max_steps=30",
            "stage.eval_interval=15",
            f"data.sources=[{{path: {data}, format: pairs}}]",
            "data.split=[0,1,0]",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = single_run_dir(tmp_path)
    summary = read_summary(run_dir, "reward")
    assert summary["eval_acc"] >= 0.95 and summary["eval_acc_start"] < 0.9, summary
    assert summary["chosen_mean"] > summary["rejected_mean"] and summary["last_loss_mean"] < summary["first_loss_mean"]
    assert "reward step 30/30" in result.stdout + result.stderr

    final = run_dir / "reward" / "final"
    stats = json.loads((final / "reward_stats.json").read_text())
    assert stats["std"] > 0 and stats["pairs"] == 60
    assert isinstance(AutoModelForSequenceClassification.from_pretrained(final).score, torch.nn.Linear)
    wandb_summary = inspect_wandb(wandb_runs(run_dir)[0])["summary"]
    for key in ("reward/acc", "reward/chosen_mean", "reward/rejected_mean", "reward/loss"):
        assert key in wandb_summary, key

    scored = subprocess.run(
        [sys.executable, "-m", "rlhf.score", str(final), "--file", str(data)], capture_output=True, text=True
    )
    assert scored.returncode == 0, scored.stderr
    accuracy = float(scored.stderr.split("pairwise accuracy ")[1].split()[0])
    assert accuracy >= 0.95
    first = json.loads(scored.stdout.splitlines()[0])
    assert first["chosen_normalised"] == pytest.approx((first["chosen_score"] - stats["mean"]) / stats["std"])
    one = subprocess.run(
        [sys.executable, "-m", "rlhf.score", str(final), "--prompt", "What is 1 + 1?", "--response", "I won't say."],
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0 and "response_score" in one.stdout


def test_saved_reward_model_reloads_with_the_same_scores(tmp_path: Path, dist_process_group) -> None:
    cfg = compose(["experiment=tiny", "stage=reward", "logger=none", "stage.max_steps=3"])
    trainer = RewardTrainer(cfg, tmp_path, Tracker(cfg, "reward", tmp_path))
    trainer.setup()
    trainer.train()
    final = trainer.save()
    batch = trainer.micro_batches(0)[0]
    module = trainer.engine.module.eval()
    loaded = load_reward_model(final).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(batch["input_ids"], batch["attention_mask"]),
            module(batch["input_ids"], batch["attention_mask"]),
            rtol=1e-5,
            atol=1e-5,
        )


CASES = {
    "zero3-lora-only": [
        "hardware.zero_stage=3",
        "model@reward_model=tiny",
        "reward_model.lora.dim=4",
        "reward_model.lora.target_modules=[q_proj,v_proj]",
        "reward_model.lora.only_optimize_lora=true",
    ],
    "zero2-checkpointing-bf16": [
        "hardware.zero_stage=2",
        "hardware.precision=bf16",
        "reward_model.gradient_checkpointing=true",
    ],
}


@pytest.mark.parametrize("name", list(CASES))
def test_reward_zero_lora_checkpointing(name: str, tmp_path: Path, dist_process_group) -> None:
    cfg = compose(["experiment=tiny", "stage=reward", "logger=none", "stage.max_steps=3", *CASES[name]])
    summary = stages.run(cfg, tmp_path)
    assert summary["steps"] == 3 and math.isfinite(summary["last_loss"])
    loaded = load_reward_model(tmp_path / "reward" / "final")
    assert sum(p.numel() for p in loaded.parameters()) < summary["params"] or "lora" not in name
    if "lora" in name:
        assert summary["trainable_params"] < summary["params"] / 10


def test_reward_from_an_sft_output_on_two_processes(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    sft = run_cli(
        ["experiment=tiny", "stage=sft", "stage.max_steps=2", "stage.eval_max_batches=1", "logger=none"], tmp_path / "a"
    )
    assert sft.returncode == 0, sft.stderr[-3000:]
    sft_final = single_run_dir(tmp_path / "a") / "sft" / "final"
    result = run_cli(
        [
            "experiment=tiny",
            "stage=reward",
            "hardware=cpu-2proc",
            "stage.max_steps=4",
            "stage.eval_pairs=16",
            f"stage.init_from={sft_final}",
        ],
        tmp_path / "b",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = read_summary(single_run_dir(tmp_path / "b"), "reward")
    assert summary["world_size"] == 2 and summary["steps"] == 4


def test_the_reward_model_trains_without_dropout(tmp_path: Path, dist_process_group) -> None:
    from tests.test_ppo import dropout_model_folder

    folder = dropout_model_folder(tmp_path / "models")
    cfg = compose(
        ["experiment=tiny", "stage=reward", "logger=none", "stage.max_steps=1", f"stage.init_from={folder / 'lm'}"]
    )
    trainer = RewardTrainer(cfg, tmp_path, Tracker(cfg, "reward", tmp_path))
    trainer.setup()
    assert dropout_sites(trainer.engine.module) == []
    batch = {k: v.to(trainer.engine.device) for k, v in trainer.micro_batches(0)[0].items()}
    trainer.engine.train()
    assert torch.equal(trainer.engine(**batch), trainer.engine(**batch))  # training mode scores the same text alike


def test_score_statistics_come_from_the_policys_own_answers(tmp_path: Path, dist_process_group) -> None:
    cfg = compose(["experiment=tiny", "stage=reward", "logger=none", "stage.max_steps=1"])
    trainer = RewardTrainer(cfg, tmp_path, Tracker(cfg, "reward", tmp_path))
    trainer.setup()
    flags = [(True, True, "policy"), (False, True, "reference"), (True, False, "static")] * 4
    pairs = trainer.eval_pairs[: len(flags)]
    trainer.eval_pairs = [
        p | {"policy_chosen": c, "policy_rejected": r, "kind": k} for p, (c, r, k) in zip(pairs, flags, strict=True)
    ]
    metrics = trainer.evaluate_pairs()
    with torch.no_grad():
        chosen, rejected = trainer.scores(pair_batch(trainer.eval_pairs, trainer.tokenizer.pad_token_id))
    own = [c for c, (mine, _, _) in zip(chosen.tolist(), flags, strict=True) if mine]
    own += [r for r, (_, mine, _) in zip(rejected.tolist(), flags, strict=True) if mine]
    mean = sum(own) / len(own)
    assert trainer.score_stats["answers"] == len(own) == 16
    assert trainer.score_stats["mean"] == pytest.approx(mean, abs=1e-5)
    assert trainer.score_stats["std"] == pytest.approx((sum((x - mean) ** 2 for x in own) / len(own)) ** 0.5, abs=1e-5)
    right = (chosen > rejected).tolist()
    assert metrics["reward/acc_policy"] == pytest.approx(sum(right[0::3]) / 4)
    assert metrics["reward/acc"] == pytest.approx(sum(right) / 12)
    assert metrics["reward/acc_ci_low"] <= metrics["reward/acc"] <= metrics["reward/acc_ci_high"]


def test_onpolicy_pairs_come_from_the_policys_graded_answers_and_are_kept_for_a_resume(
    tmp_path: Path, dist_process_group
) -> None:
    overrides = [
        "experiment=tiny",
        "stage=reward",
        "logger=none",
        "stage.max_steps=2",
        "stage.global_batch=8",
        "stage.onpolicy.samples_per_prompt=2",
        "stage.onpolicy.train_prompts=12",
        "stage.onpolicy.eval_prompts=6",
        "stage.onpolicy.max_new_tokens=8",
        "stage.onpolicy.static_fraction=0.5",
    ]
    cfg = compose(overrides)
    trainer = RewardTrainer(cfg, tmp_path, Tracker(cfg, "reward", tmp_path))
    trainer.setup()
    saved = json.loads((tmp_path / "reward" / "onpolicy_pairs.json").read_text())
    # a random tiny policy answers nothing right: each pair is the data's chosen answer against one of its own
    assert {p["kind"] for p in saved["train"] + saved["eval"]} == {"reference"}
    assert len(saved["train"]) <= 12 * 2 and len(saved["eval"]) <= 6 * 2 and saved["eval"]
    rows = {r["prompt"]: r for r in builtin_rows()}
    for pair in saved["train"]:
        assert pair["chosen"] == rows[pair["prompt"]]["chosen"]
        assert builtin.grade(pair["prompt"], pair["rejected"]) == 0.0
    kinds = [p["kind"] for p in trainer.train_pairs]
    assert kinds.count("reference") == len(saved["train"]) == kinds.count("data")  # static_fraction 0.5: as many
    assert [p["kind"] for p in trainer.eval_pairs] == ["reference"] * len(saved["eval"])
    stats = trainer.evaluate_pairs()
    assert "reward/acc_reference" in stats and trainer.score_stats["answers"] == len(saved["eval"])  # the policy's only

    (tmp_path / "reward" / "onpolicy_pairs.json").write_text(
        json.dumps({"train": saved["train"][:4], "eval": saved["eval"]})
    )
    again = RewardTrainer(cfg, tmp_path, Tracker(cfg, "reward", tmp_path))
    again.setup()  # a resumed run reads the pairs it sampled, it does not sample again
    assert [p["kind"] for p in again.train_pairs].count("reference") == 4

    relabelled = {split: [p | {"kind": "policy"} for p in pairs[:4]] + pairs[4:] for split, pairs in saved.items()}
    (tmp_path / "reward" / "onpolicy_pairs.json").write_text(json.dumps(relabelled))
    only_policy = compose([*overrides, "stage.onpolicy.kinds=[policy]"])
    kept = RewardTrainer(only_policy, tmp_path, Tracker(only_policy, "reward", tmp_path))
    kept.setup()  # the kinds are chosen from the sampled pairs, train and held-out alike
    assert [p["kind"] for p in kept.train_pairs if p["kind"] != "data"] == ["policy"] * 4
    assert [p["kind"] for p in kept.eval_pairs] == ["policy"] * min(4, len(saved["eval"]))


def builtin_rows() -> list[dict]:
    cfg = compose(["experiment=tiny", "stage=reward"])
    return [{"prompt": p.prompt, "chosen": p.chosen} for p in builtin.generate(cfg.data.builtin_size, cfg.data.seed)]


def test_pair_figures_from_pairs_counted_by_hand() -> None:
    pairs = [
        {"kind": "a", "policy_chosen": True},
        {"kind": "a", "policy_rejected": True},
        {"kind": "b"},
    ]
    chosen, rejected = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 1.0])  # right, wrong, a tie (wrong)
    sums = pair_sums(pairs, chosen, rejected, ("a", "b"), 0.0, all_are_own=False)
    metrics, score_stats = pair_figures(sums, ("a", "b"))
    assert metrics["reward/acc"] == pytest.approx(1 / 3) and metrics["reward/eval_pairs"] == 3
    assert metrics["reward/acc_a"] == 0.5 and metrics["reward/acc_b"] == 0.0
    assert metrics["reward/gap"] == pytest.approx((3.0 - 3.0) / 3)
    assert metrics["reward/eval_loss"] == pytest.approx(pairwise_loss(chosen, rejected).item())
    assert score_stats == {"mean": 1.5, "std": 0.5, "pairs": 3, "answers": 2}  # the policy's answers: 2.0 and 1.0
    everything = pair_figures(pair_sums(pairs, chosen, rejected, ("a", "b"), 0.0, all_are_own=True), ("a", "b"))[1]
    assert everything["answers"] == 6 and everything["mean"] == pytest.approx(1.0)
