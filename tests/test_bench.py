"""rlhf-bench: the FLOP count against torch's own counter, the phase figures, and a run on tiny models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, LlamaConfig

from rlhf import bench
from rlhf.data import builtin
from tests.conftest import cli_env, wandb_records

CONFIG = LlamaConfig(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_forward_flops_match_torchs_count_for_a_full_pass_and_a_cached_step() -> None:
    model = AutoModelForCausalLM.from_config(CONFIG, attn_implementation="eager").eval()  # counted attention matmuls
    shape = bench.Shape.of(CONFIG)
    ids = torch.randint(0, 1000, (2, 48))
    with torch.no_grad():
        full = counted(lambda: model(input_ids=ids))  # logits at every position
        assert bench.forward_flops(shape, 2, 48, 48, 48) == pytest.approx(full, rel=0.01)
        cache = model(input_ids=ids, use_cache=True).past_key_values
        step = counted(lambda: model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True))
        assert bench.forward_flops(shape, 2, 1, 49, 1) == pytest.approx(step, rel=0.01)
    backward = counted(lambda: model(input_ids=ids, labels=ids).loss.backward())  # forward + backward
    assert 3 * full == pytest.approx(backward, rel=0.05)


def test_phase_figures_and_mfu() -> None:
    shape = bench.Shape.of(CONFIG)
    flops = bench.phase_flops(shape, shape, batch=8, prompt=64, response=32, reward=shape)
    assert flops["training"] == pytest.approx(1.5 * flops["experience"])
    reused = bench.phase_flops(shape, shape, batch=8, prompt=64, response=32, actor_passes=1, reward=shape)
    actor_pass = bench.forward_flops(shape, 8, 96, 96, 32)
    assert reused["experience"] == pytest.approx(flops["experience"] - actor_pass)  # one actor pass fewer
    grpo = bench.phase_flops(shape, None, batch=8, prompt=64, response=32, actor_passes=1)  # no critic or reward model
    assert grpo["experience"] == pytest.approx(actor_pass) and grpo["training"] == pytest.approx(3 * actor_pass)
    assert grpo["generation"] == flops["generation"]
    folded = bench.phase_flops(shape, shape, batch=8, prompt=64, response=32, reward=shape, critic_folded=True)
    critic_pass = bench.forward_flops(shape, 8, 96, 96, 0)
    assert folded["training"] == pytest.approx(flops["training"] - critic_pass)  # the critic's backward alone
    rounds = [bench.Iteration(2.0, 1.0, 3.0, 256, 768)] * 2
    figures = bench.summarise(rounds, flops, peak_flops=1e9, batch=8, loop_s=12.5)
    assert figures["samples_per_s"] == pytest.approx(16 / 12.5)
    assert figures["gen_tokens_per_s"] == 128 and figures["train_tokens_per_s"] == 256
    assert figures["gen_frac"] == pytest.approx(1 / 3) and figures["train_frac"] == pytest.approx(0.5)
    assert figures["mfu_training"] == pytest.approx(flops["training"] * 2 / 6.0 / 1e9)
    assert bench.matmul_peak(torch.float32, seconds=0.05) > 1e9  # any CPU multiplies faster than 1 GFLOP/s


TRL_JSON = {
    "system": "trl", "trl": "1.12.0", "dtype": "fp32", "iters": 4, "train_loop_s": 91.5, "gen_s": 20.5,
    "exp_other_fwd_s": 17.4, "train_s(fwd+bwd+step)": 50.0, "samples_per_s(train_loop)": 0.35,
    "gen_tokens_per_s(generation_only)": 50.0, "peak_rss_mb": 8300.0, "prompt_len": 64,
}  # fmt: skip


def run_bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    overrides = ["model=tiny", "model@reward_model=tiny", "optimizer.lr=1e-3", f"cache_dir={tmp_path / 'cache'}"]
    return subprocess.run(
        [sys.executable, "-m", "rlhf.bench", *args, *overrides],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_rlhf_bench_on_tiny_models_writes_json_table_and_wandb(tmp_path: Path) -> None:
    trl = tmp_path / "trl.json"
    trl.write_text(json.dumps(TRL_JSON))
    out = tmp_path / "bench"
    result = run_bench(tmp_path, "--iterations", "2", "--warmup", "1", "--out", str(out), "--compare", str(trl))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    ours = report["rlhf"]
    assert ours["rollout"] == "engine" and ours["reused_rollout_logprobs"]
    assert (
        ours["iterations"] == 2
        and ours["prompt_width"] == ours["prompt_len"] == 64
        and ours["resp_len"] == 32
        and ours["batch"] == 8
    )
    assert ours["gen_tokens_per_s"] == pytest.approx(2 * 8 * 32 / ours["gen_s"])  # every response 32 tokens
    trained = ours["train_tokens_per_s"] * ours["train_s"] / 2  # real tokens per iteration: padding left out
    assert 8 * (32 + 5) < trained < 8 * 96
    assert ours["gen_frac"] + ours["exp_fwd_frac"] + ours["train_frac"] == pytest.approx(1.0)
    for phase in ("generation", "experience", "training", "total"):
        assert 0 < ours[f"mfu_{phase}"] < 1, phase
    assert ours["peak_rss_mb"] > 100 and ours["peak_gflops"] > 1
    assert report["compare"][0]["samples_per_s"] == 0.35
    text = (out / "bench.md").read_text()
    assert text.count("\n") == 4 and "| trl 1.12.0 | fp32 | generate | 64 | 0.35 |" in text
    runs = list((out / "wandb").glob("offline-run-*"))
    summaries = [r for r in wandb_records(runs[0]) if r.get("type") == "summary"]
    assert "bench/samples_per_s" in json.dumps(summaries) and "bench/mfu_training" in json.dumps(summaries)


def test_the_grpo_workload_samples_groups_of_word_problems_without_critic_or_reward_model_and_profiles(
    tmp_path: Path,
) -> None:
    out = tmp_path / "bench"
    result = run_bench(
        tmp_path, "--workload", "grpo", "--iterations", "1", "--warmup", "0", "--profile", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ours = json.loads((out / "bench.json").read_text())["rlhf"]
    assert ours["workload"] == "grpo" and ours["batch"] == 8 and ours["group"] == 4 and ours["resp_len"] == 32
    assert 10 < ours["prompt_len"] < 64  # word problems, padded to the longest of the iteration's two
    assert "reward model" not in result.stderr and "no critic (dr_grpo)" in result.stderr
    assert ours["gen_tokens_per_s"] == pytest.approx(8 * 32 / ours["gen_s"])
    profile = (out / "profile.md").read_text()  # one more iteration, by phase and operator
    assert "### rollout" in profile and "### training" in profile and "aten::" in profile
    prompts = bench.word_problem_prompts(lambda text: {"input_ids": list(text.encode())}, 3)
    assert all(builtin.reference_answer(row["prompt"].strip()) for row in prompts)  # the verifier grades them
