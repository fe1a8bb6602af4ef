"""What only a CUDA GPU can check (marked `gpu`, skipped without CUDA; `tests/gpu/check.sh` runs them on a machine
that has only Python, torch with CUDA and transformers): the sampler's greedy tokens against `transformers.generate`,
a tiny pipeline in bf16 under ZeRO-2 and ZeRO-3, and the PPO benchmark on SmolLM2-135M's shapes (random weights,
responses of a fixed length). Each test writes what it measured to $RLHF_GPU_REPORT (a JSON-lines file) when set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf import rollout
from tests import test_rollout
from tests.conftest import cli_env, read_summary, run_cli, single_run_dir

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")]

SMOLLM2_SHAPES = [  # SmolLM2-135M's architecture, randomly initialised (no weights to fetch)
    "model=tiny",
    "model.name=smollm2-135m-random",
    "model.max_length=512",
    "model.arch={hidden_size:576,num_layers:30,num_heads:9,num_kv_heads:3,intermediate_size:1536,vocab_size:49152}",
    "model@reward_model=tiny",
    "reward_model.name=smollm2-135m-random",
    "reward_model.arch=${model.arch}",
]


def report(name: str, figures: dict) -> None:
    """Append a test's figures to $RLHF_GPU_REPORT, for the check script's summary."""
    path = os.environ.get("RLHF_GPU_REPORT")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"test": name, "device": torch.cuda.get_device_name()} | figures) + "\n")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_samplers_greedy_tokens_equal_generate_on_cuda(dtype: torch.dtype) -> None:
    model = test_rollout.tiny_model().to("cuda", dtype)
    batch = {k: v.cuda() for k, v in test_rollout.prompts([5, 9, 3, 12, 7, 1, 10, 12]).items()}
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ours = rollout.generate(model, ids, mask, 24, test_rollout.EOS, test_rollout.PAD, temperature=0).sequences
    theirs = test_rollout.hf_greedy(model, batch, 24, test_rollout.EOS)
    same = (ours == theirs[:, : ours.shape[1]]).float().mean().item()
    report(f"greedy_equal_generate[{dtype}]", {"equal_token_share": same, "tokens": ours.numel()})
    if dtype == torch.float32:
        assert torch.equal(ours, theirs[:, : ours.shape[1]])
    else:  # bf16 rounding may flip a near-tie between two tokens, and every later token with it
        assert (ours[:, 12:13] == theirs[:, 12:13]).all() and same > 0.8


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_a_tiny_pipeline_trains_on_cuda_in_bf16(zero_stage: int, tmp_path: Path) -> None:
    args = [
        "experiment=quickstart",
        "hardware=1xA100-80G",
        "hardware.precision=bf16",
        f"hardware.zero_stage={zero_stage}",
        "stage.sft.max_steps=20",
        "stage.reward.max_steps=20",
        "stage.ppo.max_steps=4",
    ]
    result = run_cli(args, tmp_path, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = single_run_dir(tmp_path)
    sft, reward, ppo = (read_summary(run_dir, name) for name in ("sft", "reward", "ppo"))
    report(
        f"tiny_pipeline[zero{zero_stage}]",
        {k: s.get(k) for s in (sft, reward, ppo) for k in ("wall_s", "last_loss", "eval_acc", "peak_device_gb")}
        | {"sft_loss": [sft["first_loss"], sft["last_loss"]], "ppo_steps": ppo["steps"]},
    )
    assert sft["last_loss"] < sft["first_loss"] and ppo["steps"] == 4
    assert sft["peak_device_gb"] > 0  # it ran on the GPU
    assert (run_dir / "ppo" / "final" / "config.json").is_file()


def test_the_ppo_benchmark_on_smollm2_shapes_on_cuda(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "rlhf.bench", "--iterations", "3", "--warmup", "1", "--out", str(tmp_path)]
    result = subprocess.run(
        [*command, "hardware=1xA100-80G", *SMOLLM2_SHAPES], env=cli_env(), capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads((tmp_path / "bench.json").read_text())["rlhf"]
    report("ppo_bench[smollm2-135m shapes, bf16]", figures)
    assert figures["samples_per_s"] > 0 and figures["resp_len"] == 32 and figures["dtype"] == "bf16"
