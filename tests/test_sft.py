"""SFT end to end on the tiny model: the loss falls, the model saves and loads, W&B holds the run."""

from __future__ import annotations

import json
import logging
import math
import subprocess
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf import models
from rlhf.chat import Chat, resolve_model_dir
from rlhf.compose import compose
from rlhf.config import DType
from rlhf.data import eval_share
from rlhf.stages.sft import SFTTrainer
from rlhf.tracking import Tracker
from tests.conftest import read_summary, run_cli, single_run_dir


def wandb_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def inspect_wandb(run: Path) -> dict:
    result = subprocess.run(
        ["wandb", "leet", "inspect", "--summary", "--json", str(run)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


def generate_from(model_dir: Path) -> str:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    return tokenizer.decode(out[0, ids.shape[1] :])


def test_sft_tiny_loss_falls_saves_and_logs_to_wandb(tmp_path: Path) -> None:
    result = run_cli(
        ["experiment=tiny", "stage=sft", "stage.max_steps=30", "stage.global_batch=8", "stage.eval_interval=15"],
        tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = single_run_dir(tmp_path)
    summary = read_summary(run_dir, "sft")
    assert summary["steps"] == 30
    assert 0.1 < summary["peak_rss_gb"] < 20  # this stage's peak resident memory
    assert summary["eval_loss"] < summary["eval_loss_start"] - 0.5, summary
    assert summary["last_loss_mean"] < summary["first_loss_mean"] - 0.5, summary
    assert "sft step 30/30" in result.stderr + result.stdout  # the step log with rates and ETA
    assert "data cache" in result.stderr + result.stdout  # hit or miss, logged

    final = run_dir / "sft" / "final"
    assert (final / "model.safetensors").is_file() and not list(run_dir.glob("sft/final.tmp-*"))
    generate_from(final)

    runs = wandb_runs(run_dir)
    assert len(runs) == 1
    record = inspect_wandb(runs[0])
    text = json.dumps(record)
    assert "sft/loss" in text and "sft/eval_loss" in text
    assert '"tiny"' in text and "global_batch" in text  # the resolved config is the run config


@pytest.fixture
def lora_trainer(tmp_path: Path, dist_process_group) -> SFTTrainer:
    """LoRA SFT of the tiny model, started from a saved copy of it (an adapter needs a base folder to name)."""
    overrides = ["experiment=tiny", "stage=sft", "logger=none", "stage.max_steps=4"]
    base_cfg = compose(overrides)
    tokenizer = models.load_tokenizer(base_cfg.model)
    base = models.load_causal_lm(base_cfg.model, tokenizer, base_cfg.seed)
    models.save_hf(base.config, base.state_dict(), tokenizer, tmp_path / "base", DType.fp32)
    cfg = compose(
        [
            *overrides,
            f"stage.init_from={tmp_path / 'base'}",
            "model.lora.dim=8",
            "model.lora.target_modules=[q_proj,v_proj,mlp.]",
            "model.lora.only_optimize_lora=true",
        ]
    )
    trainer = SFTTrainer(cfg, tmp_path, Tracker(cfg, "sft", tmp_path))
    trainer.setup()
    return trainer


def test_lora_sft_trains_only_lora_and_saves_the_merged_model_and_a_peft_adapter(
    lora_trainer: SFTTrainer, tmp_path: Path
) -> None:
    module = lora_trainer.engine.module
    assert module.peft_config["default"].target_modules == {"q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    lora_trainer.train()
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed)
    assert {n for n in before if ".lora_B" in n} <= changed

    final = lora_trainer.save()
    batch = lora_trainer.micro_batches(0)[0]
    module.eval()

    def logits(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    expected = logits(module)
    merged = AutoModelForCausalLM.from_pretrained(final)
    torch.testing.assert_close(logits(merged), expected, rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())

    adapter = final / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        (tmp_path / "base").resolve()
    )
    with_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), adapter)
    torch.testing.assert_close(logits(with_peft), expected, rtol=1e-4, atol=1e-4)
    cfg = lora_trainer.cfg
    from_adapter = models.load_causal_lm(cfg.model, lora_trainer.tokenizer, cfg.seed, init_from=str(adapter))
    torch.testing.assert_close(logits(from_adapter), expected, rtol=1e-4, atol=1e-4)
    assert resolve_model_dir(adapter) == adapter
    torch.testing.assert_close(logits(Chat(adapter).model), expected, rtol=1e-4, atol=1e-4)


def test_an_adapter_whose_base_model_is_gone_is_refused_with_both_places(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    gone = tmp_path / "moved-away"
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(gone)})
    )
    cfg = compose(["experiment=tiny", "stage=sft"])
    with pytest.raises(models.ModelError, match=f"init_from={adapter} is a LoRA adapter for {gone}, which holds no"):
        models.load_causal_lm(cfg.model, None, 0, init_from=str(adapter))


@pytest.mark.slow
def test_sft_on_the_embedded_model(tmp_path: Path) -> None:
    result = run_cli(["stage=sft", "stage.max_steps=4", "stage.eval_max_batches=2", "logger=none"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = read_summary(single_run_dir(tmp_path), "sft")
    assert summary["params"] > 100_000_000 and summary["steps"] == 4
    assert summary["eval_loss"] < summary["eval_loss_start"]


def test_sft_trains_on_a_blend_of_builtin_and_a_local_jsonl(tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "user", "content": f"Echo {i}"}, {"role": "assistant", "content": f"{i}"}]}
        for i in range(40)
    ]
    (tmp_path / "mine.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    source = f"{{path: {tmp_path}/mine.jsonl, format: sft, split: [1, 0, 0]}}"
    result = run_cli(
        [
            "experiment=tiny",
            "stage=sft",
            "stage.max_steps=2",
            "data.builtin_size=400",
            f"data.sources=[{{name: builtin}},{source}]",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = wandb_runs(single_run_dir(tmp_path))[0]
    summary = inspect_wandb(run)["summary"]
    assert summary["data/sft/builtin"] == summary["data/sft/mine.jsonl"] == 54  # (72 + 36) rows, half each


def test_an_empty_eval_split_gives_no_eval_loss_not_zero(lora_trainer: SFTTrainer, caplog) -> None:
    kept = lora_trainer.eval_examples
    lora_trainer.eval_examples = []
    try:
        with caplog.at_level(logging.WARNING):
            loss = lora_trainer.eval_loss()
    finally:
        lora_trainer.eval_examples = kept
    assert math.isnan(loss)
    assert "the eval split has no answer tokens: no eval loss" in caplog.text


def test_the_eval_examples_are_the_same_at_any_world_size() -> None:
    one = set(eval_share(120, 32, 0, 1))
    assert one == set(range(32))
    for world in (2, 4):
        shares = [list(eval_share(120, 32, rank, world)) for rank in range(world)]
        assert set().union(*shares) == one and len({len(s) for s in shares}) == 1  # equal shares
    assert [len(eval_share(7, 32, rank, 2)) for rank in (0, 1)] == [3, 3]  # a short split: still equal


def test_a_stage_evaluates_on_its_cadence_and_at_the_end_but_not_when_stopping_early() -> None:
    from rlhf.progress import eval_due

    class Stopping:
        def stop_requested(self) -> bool:
            return True

    assert [s for s in range(1, 11) if eval_due(s, 10, 4, None)] == [4, 8, 10]
    assert [s for s in range(1, 11) if eval_due(s, 10, 4, Stopping())] == [10]
