"""Bad input, one case per row: configs, models, data and checkpoints. Each gives one clear error naming what is wrong
and where, a non-zero exit, and overwrites nothing (no final model, no change to an existing run directory).

Set BAD_INPUT_TABLE=<file> to have the cases write their messages there as a markdown table."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException
from transformers import AutoModelForCausalLM

from rlhf import models, pipeline
from rlhf.compose import compose
from rlhf.config import ConfigError, DType
from rlhf.stages.reward import RewardTrainer
from rlhf.tracking import Tracker

TINY = ["experiment=tiny", "logger=none"]
SFT = [*TINY, "stage=sft", "stage.max_steps=4", "stage.checkpoint_interval=2", "stage.eval_max_batches=1"]


@dataclass
class Case:
    name: str
    overrides: list[str]
    message: str  # a fragment of the one error message
    prepare: Callable[[Path, Path], list[str]] | None = None  # (case folder, prior run) -> more overrides
    kind: str = "config"  # config: refused when composed; run: refused by `rlhf` with exit code 2
    tags: list[str] = field(default_factory=list)


def model_folder(case_dir: Path, prior: Path) -> Path:
    """A copy of the prior run's SFT output to damage."""
    target = case_dir / "model"
    shutil.copytree(prior / "sft" / "final", target)
    return target


def truncated_weights(case_dir: Path, prior: Path) -> list[str]:
    weights = model_folder(case_dir, prior) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    return [f"stage.init_from={weights.parent}"]


def pickle_only_weights(case_dir: Path, prior: Path) -> list[str]:
    folder = model_folder(case_dir, prior)
    torch.save(AutoModelForCausalLM.from_pretrained(folder).state_dict(), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return [f"stage.init_from={folder}"]


def missing_weights(case_dir: Path, prior: Path) -> list[str]:
    folder = model_folder(case_dir, prior)
    (folder / "model.safetensors").unlink()
    return [f"stage.init_from={folder}"]


def saved_reward_model(case_dir: Path, extra_token: bool = False) -> Path:
    """An untrained tiny reward model saved as the reward stage saves one (with an extra token if asked)."""
    cfg = compose([*TINY, "stage=reward", "stage.max_steps=1"])
    trainer = RewardTrainer(cfg, case_dir, Tracker(cfg, "reward", case_dir))
    trainer.setup()
    if extra_token:
        trainer.tokenizer.add_tokens(["<an-extra-token>"])
    module = trainer.engine.module
    target = case_dir / "reward"
    models.save_reward_model(module, module.state_dict(), trainer.tokenizer, target, DType.fp32, {"mean": 0, "std": 1})
    return target


def reward_with_another_tokenizer(case_dir: Path, prior: Path) -> list[str]:
    return [f"stage.reward_from={saved_reward_model(case_dir, extra_token=True)}"]


def data_file(name: str, lines: list[str]) -> Callable[[Path, Path], list[str]]:
    def write(case_dir: Path, prior: Path) -> list[str]:
        path = case_dir / name
        path.write_text("".join(f"{line}\n" for line in lines))
        return [f"data.sources=[{{path: {path}, format: pairs}}]"]

    return write


def reward_file(code: str) -> Callable[[Path, Path], list[str]]:
    """A reward function `f` in a file of the case's own, as PPO's only reward."""

    def write(case_dir: Path, prior: Path) -> list[str]:
        (case_dir / "rewards.py").write_text(code)
        return [f"stage.reward_funcs=[{case_dir}/rewards.py:f]"]

    return write


PPO_FUNCTION = [*TINY, "stage=ppo", "stage.max_steps=1", "eval.gold_prompts=0"]
PAIR = json.dumps({"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."})


def resume_prior(case_dir: Path, prior: Path) -> list[str]:
    """A copy of the prior run, to be resumed."""
    run = case_dir / "run"
    shutil.copytree(prior, run)
    shutil.rmtree(run / "sft" / "final")
    (run / "sft" / "summary.json").unlink()
    return [f"resume={run}"]


def truncated_checkpoint(case_dir: Path, prior: Path) -> list[str]:
    overrides = resume_prior(case_dir, prior)
    newest = (
        case_dir / "run" / "sft" / "checkpoints" / "step-0000004" / "model" / "state" / "mp_rank_00_model_states.pt"
    )
    newest.write_bytes(newest.read_bytes()[:100])
    return overrides


def checkpoint_missing_a_file(case_dir: Path, prior: Path) -> list[str]:
    overrides = resume_prior(case_dir, prior)
    (case_dir / "run" / "sft" / "checkpoints" / "step-0000004" / "trainer_state.pt").unlink()
    return overrides


def existing_run(case_dir: Path, prior: Path) -> list[str]:
    run = case_dir / "run"
    shutil.copytree(prior, run)
    return [f"hydra.run.dir={run}"]


def resume_with_another_lr(case_dir: Path, prior: Path) -> list[str]:
    return [*resume_prior(case_dir, prior), "optimizer.lr=2e-3"]


CASES = [
    # configs: refused when composed, before anything loads
    Case("negative learning rate", ["optimizer.lr=-1e-5"], "optimizer.lr=-1e-05 must be > 0"),
    Case("zero learning rate", ["optimizer.lr=0"], "optimizer.lr=0.0 must be > 0"),
    Case("zero PPO actor rate", ["stage=ppo", "optimizer.actor_lr=0"], "optimizer.actor_lr=0.0 must be > 0"),
    Case("negative warmup", ["optimizer.warmup_steps=-1"], "optimizer.warmup_steps=-1 must be >= 0"),
    Case(
        "batch not divisible by micro-batches",
        ["stage=sft", "stage.global_batch=10"],
        "stage.global_batch=10 must be a positive multiple of world size x hardware.micro_batch = 1 x 4 = 4",
    ),
    Case(
        "batch not divisible by world size",
        ["stage=sft", "hardware=cpu-2proc", "stage.global_batch=12"],
        "= 2 x 4 = 8",
    ),
    Case(
        "PPO mini-batches that do not divide",
        ["stage=ppo", "stage.global_batch=8", "stage.mini_batches=3"],
        "= 8 rollouts must split into stage.mini_batches=3",
    ),
    Case("unknown advantage estimator", ["stage=ppo", "stage.advantage=ppo"], "must be one of gae, rloo, grpo"),
    Case(
        "group estimator with one sample per prompt",
        ["stage=ppo", "stage.advantage=rloo"],
        "it needs stage.samples_per_prompt >= 2 (it is 1)",
    ),
    Case("bad option inside the pipeline", ["stage.reward.global_batch=6"], "stage.reward.global_batch=6 must be"),
    Case("misspelt option", ["stage=sft", "stage.max_step=5"], "max_step"),
    Case(
        "misspelt option added with +",
        ["stage=sft", "+stage.max_step=5"],
        "stage.max_step is not an option of SFTStageConfig (did you mean stage.max_steps?)",
    ),
    Case(
        "a stage's option at the pipeline's level",
        ["+stage.kl_coef=0.1"],
        "stage.kl_coef is not an option of PipelineStageConfig (did you mean stage.ppo.kl_coef?)",
    ),
    Case("unknown config choice", ["model=opt-9b"], "Could not find 'model/opt-9b'"),
    Case("wrong type", ["stage=sft", "stage.max_steps=ten"], "could not be converted to Integer"),
    Case("ZeRO stage 4", ["hardware.zero_stage=4"], "hardware.zero_stage=4 must be 0, 1, 2 or 3"),
    Case("zero micro-batch", ["hardware.micro_batch=0"], "hardware.micro_batch=0 must be >= 1"),
    Case("fp16 on CPU", ["hardware.precision=fp16"], "hardware.precision=fp16 is not supported"),
    Case("offload without ZeRO", ["optimizer=adamw-offload"], "optimizer.offload=true needs hardware.zero_stage"),
    Case("local model without a path", ["model=local"], "model.source=local needs model.path"),
    Case("LoRA without target modules", ["model.lora.dim=8"], "needs a non-empty model.lora.target_modules"),
    Case("sequences longer than the model", ["data.max_prompt_len=4000"], "exceeds model.max_length"),
    Case("zero sampling temperature", ["stage=ppo", "stage.temperature=0"], "stage.temperature=0.0 must be > 0"),
    Case("PPO without any reward model", ["stage.stages=[ppo]"], "runs ppo without reward"),
    Case("stages out of order", ["stage.stages=[ppo,sft]"], "must keep the order"),
    Case(
        "reward function that cannot be imported",
        ["stage=ppo", "stage.reward_funcs=[model,my_rewardz:brevity]"],
        "reward function 'my_rewardz:brevity': cannot import 'my_rewardz'",
    ),
    Case(
        "reward weights that do not match the functions",
        ["stage=ppo", "stage.reward_weights=[1,1]"],
        "stage.reward_weights has 2 weights for 1 reward functions",
    ),
    Case("data split of two shares", ["data.split=[1,1]"], "must be three non-negative shares"),
    Case(
        "unknown data format",
        ["data.sources=[{path: x.jsonl, format: csvish}]"],
        "data.sources[0].format='csvish' must be one of",
    ),
    Case("keep no checkpoint", ["checkpoint.keep_last=0"], "checkpoint.keep_last=0 must be >= 1"),
    Case("negative checkpoint interval", ["stage=sft", "stage.checkpoint_interval=-1"], "must be >= 0"),
    Case("resume a missing run", ["resume=/nonexistent/run"], "resume=/nonexistent/run must be auto or an existing"),
    # models: refused when the stage loads them
    Case(
        "local model folder without a model",
        [*SFT, "model=local"],
        "no Hugging Face model there (config.json not found)",
        prepare=lambda case_dir, prior: [f"model.path={case_dir}"],
        kind="run",
    ),
    Case("truncated weights", SFT, "cannot load model tiny from", prepare=truncated_weights, kind="run"),
    Case("weights missing", SFT, "cannot load model tiny from", prepare=missing_weights, kind="run"),
    Case("pickled weights only", SFT, "set allow_pickle=true", prepare=pickle_only_weights, kind="run"),
    Case(
        "reward model missing",
        [*TINY, "stage=ppo", "stage.reward_from=/nowhere/reward"],
        "/nowhere/reward: no saved reward model there",
        kind="run",
    ),
    Case(
        "reward model with another tokenizer",
        [*TINY, "stage=ppo", "stage.max_steps=1"],
        "uses another tokenizer than the actor",
        prepare=reward_with_another_tokenizer,
        kind="run",
    ),
    Case(
        "language model given as the reward model",
        [*TINY, "stage=ppo", "stage.max_steps=1"],
        "is a causal language model (LlamaForCausalLM), not a reward model",
        prepare=lambda case_dir, prior: [f"stage.reward_from={prior}/sft/final"],
        kind="run",
    ),
    Case(
        "reward model given as the actor",
        SFT,
        "is a reward model (LlamaForSequenceClassification), not a language model",
        prepare=lambda case_dir, prior: [f"stage.init_from={saved_reward_model(case_dir)}"],
        kind="run",
    ),
    Case(
        "reward function that raises",
        PPO_FUNCTION,
        "raised KeyError: 'answer' on row 0 of the batch (prompt 'Ivan has 40 cookies",
        prepare=reward_file("def f(prompts, completions, **columns):\n    return columns['answer']\n"),
        kind="run",
    ),
    Case(
        "reward function with one value too few",
        PPO_FUNCTION,
        "returned 7 values for 8 completions: return one float (or None) per completion",
        prepare=reward_file("def f(prompts, completions, **columns):\n    return [1.0] * (len(completions) - 1)\n"),
        kind="run",
    ),
    # data: refused when the stage reads it (strict: a bad row is an error naming the row)
    Case(
        "data file missing",
        SFT,
        "data file not found",
        prepare=lambda d, p: [f"data.sources=[{{path: {d}/no.jsonl, format: pairs}}]"],
        kind="run",
    ),  # fmt: skip
    Case(
        "malformed JSON row",
        [*SFT, "data.strict=true"],
        "row 2",
        prepare=data_file("bad.jsonl", [PAIR, '{"prompt": "Say hi", "chosen": ', PAIR]),
        kind="run",
    ),
    Case(
        "row missing a field",
        [*SFT, "data.strict=true"],
        "row 3: missing field: 'rejected'",
        prepare=data_file("missing.jsonl", [PAIR, PAIR, json.dumps({"prompt": "a", "chosen": "b"})]),
        kind="run",
    ),
    Case(
        "empty data file",
        SFT,
        "empty.jsonl: no usable rows (it is empty)",
        prepare=data_file("empty.jsonl", []),
        kind="run",
    ),
    Case(
        "no valid row",
        SFT,
        "bad.jsonl: no usable rows (all 1 skipped, first: ",
        prepare=data_file("bad.jsonl", [json.dumps({"prompt": "a"})]),
        kind="run",
    ),
    Case(
        "too little data for a later stage, found before the first",
        [*TINY, "stage.sft.global_batch=4", "stage.reward.onpolicy.samples_per_prompt=0"],
        "reward pairs, fewer than one global batch (stage.reward.global_batch=16): lower it or add data",
        prepare=data_file("small.jsonl", [PAIR] * 40),
        kind="run",
    ),
    # checkpoints and run directories
    Case("run directory already used", SFT, "already holds a run", prepare=existing_run, kind="run"),
    Case("resume with another config", SFT, "optimizer.lr: 0.001 -> 0.002", prepare=resume_with_another_lr, kind="run"),
    Case(
        "truncated checkpoint",
        SFT,
        "step-0000004: model/state/mp_rank_00_model_states.pt has 100 bytes",
        prepare=truncated_checkpoint,
        kind="run",
    ),
    Case(
        "checkpoint missing a file",
        SFT,
        "step-0000004: trainer_state.pt is missing",
        prepare=checkpoint_missing_a_file,
        kind="run",
    ),
]


@pytest.fixture(scope="module")
def prior_run(tmp_path_factory, dist_process_group) -> Path:
    """A finished tiny SFT run (its checkpoint: the end of the stage, step 4), for the cases that need one."""
    run_dir = tmp_path_factory.mktemp("prior") / "run"
    assert pipeline.run(compose(SFT), run_dir) == 0
    return run_dir


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def record(case: Case, code: int, message: str) -> None:
    table = os.environ.get("BAD_INPUT_TABLE")
    if table:
        first = " ".join(message.split())[:300].replace("|", "\\|")
        with open(table, "a") as out:
            out.write(f"| {case.name} | {case.kind} | {code} | {first} |\n")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_clear_error_and_overwrites_nothing(
    case: Case, tmp_path: Path, prior_run: Path, caplog
) -> None:
    extra = case.prepare(tmp_path, prior_run) if case.prepare else []
    overrides = [*case.overrides, *extra]
    if case.kind == "config":
        with pytest.raises((ConfigError, HydraException, OmegaConfBaseException)) as err:
            compose(overrides)
        cause = err.value.__cause__
        message = f"{err.value} {cause}" if cause else str(err.value)  # Hydra prints the cause under its message
        assert case.message in message, message
        record(case, 1 if isinstance(err.value, HydraException) else 2, message)
        return
    hydra_dir = next((o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")), None)
    resume = next((o.split("=", 1)[1] for o in overrides if o.startswith("resume=")), None)
    run_dir = Path(hydra_dir or resume or tmp_path / "out")
    cfg = compose([o for o in overrides if not o.startswith("hydra.")])
    before = snapshot(run_dir) if run_dir.exists() else {}
    with caplog.at_level(logging.ERROR):
        code = pipeline.run(cfg, run_dir)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert code == 2 and len(errors) == 1 and case.message in errors[0], (code, errors)
    record(case, code, errors[0])
    if before:
        assert snapshot(run_dir) == before  # nothing in the existing run changed
    assert not list(run_dir.glob("*/final")) or before


@pytest.mark.parametrize("resume", ["", "auto"])
def test_a_run_that_failed_before_training_does_not_lock_its_folder(
    tmp_path: Path, dist_process_group, resume: str
) -> None:
    run_dir = tmp_path / "run"
    assert pipeline.run(compose([*SFT, "model=local", "model.path=/missing/model"]), run_dir) == 2
    assert (run_dir / "config.resolved.yaml").is_file()  # the failed start left its record
    fixed = [*SFT, "stage.max_steps=2", "stage.checkpoint_interval=0"] + ([f"resume={resume}"] if resume else [])
    assert pipeline.run(compose(fixed), run_dir) == 0  # the same folder takes the fixed config
    assert (run_dir / "sft" / "final").is_dir()
    assert "max_steps: 2" in (run_dir / "config.resolved.yaml").read_text()
