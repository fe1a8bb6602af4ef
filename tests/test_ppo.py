"""PPO end to end on tiny models: the README's API example learns its reward, the CLI stage logs and saves
everything, LoRA trains only LoRA weights, and a ZeRO-3 actor runs on two processes."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf import checkpoint, dist, models, pipeline
from rlhf.compose import compose
from rlhf.config import ConfigError, DType
from rlhf.data.tokenize import used_columns
from rlhf.lora import merged_lora
from rlhf.ppo import functional as ppo_math
from rlhf.rollout import response_mask
from rlhf.stages.ppo import PPOTrainer
from rlhf.stages.ppo_models import PPOModels, actor_logprobs
from rlhf.stages.reward import RewardTrainer
from rlhf.tracking import Tracker
from tests import test_rollout
from tests.conftest import read_summary, run_cli, single_run_dir
from tests.test_sft import inspect_wandb, wandb_runs

README = Path(__file__).parent.parent / "README.md"


def test_response_mask_stops_after_the_first_eos() -> None:
    responses = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [2, 9, 2, 0]])
    assert response_mask(responses, eos_id=2).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_the_readme_api_example_learns_its_reward(dist_process_group) -> None:
    code = re.search(r"```python\n(import rlhf\n.*?)```", README.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 — the README's own example
    rewards = namespace["rewards"]
    assert namespace["trainer"].step == 6 and len(rewards) == 6
    assert sum(rewards[-2:]) / 2 > rewards[0] + 0.15, rewards


@pytest.fixture(scope="module")
def tiny_reward(tmp_path_factory, dist_process_group) -> Path:
    out = tmp_path_factory.mktemp("reward")
    cfg = compose(["experiment=tiny", "stage=reward", "logger=none", "stage.max_steps=4"])
    trainer = RewardTrainer(cfg, out, Tracker(cfg, "reward", out))
    trainer.setup()
    trainer.train()
    return trainer.save()


PPO_SMALL = ["experiment=tiny", "stage=ppo", "stage.global_batch=8", "stage.max_new_tokens=8"]


def test_ppo_stage_logs_every_metric_and_saves_actor_and_ema(tmp_path: Path, tiny_reward: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n\n".join(f"Document {i}. " + "Plain text for the language-model loss. " * 30 for i in range(20))
    )
    result = run_cli(
        [
            *PPO_SMALL,
            "stage.max_steps=3",
            "stage.eval_interval=2",
            "eval.gold_prompts=8",
            "stage.ema_beta=0.9",
            "stage.ptx_coef=0.5",
            f"data.ptx.path={corpus}",
            "stage.kl_estimator=k3",
            "stage.kl_target=1.0",
            f"stage.reward_from={tiny_reward}",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = single_run_dir(tmp_path)
    summary = read_summary(run_dir, "ppo")
    assert summary["steps"] == 3 and 0 < summary["gen_time_frac"] < 1
    assert "gold_score_start" in summary and "gold_score" in summary and "kl" in summary
    assert (run_dir / "ppo" / "final" / "model.safetensors").is_file()
    assert (run_dir / "ppo" / "final-ema" / "model.safetensors").is_file()
    record = inspect_wandb(wandb_runs(run_dir)[0])
    keys = set(record["summary"])
    expected = {
        "ppo/reward_mean", "ppo/reward_std", "ppo/kl", "ppo/kl_coef", "ppo/policy_loss", "ppo/value_loss",
        "ppo/clipfrac", "ppo/approx_kl", "ppo/entropy", "ppo/response_len", "ppo/eos_rate",
        "ppo/value_explained_var", "ppo/ptx_loss", "perf/gen_tokens_per_s", "perf/train_tokens_per_s",
        "perf/gen_time_frac", "eval/gold_score", "eval/kl", "ppo/samples", "reward/model_mean", "reward/model_std",
    }  # fmt: skip
    assert expected <= keys, expected - keys


def test_missing_reward_model_is_a_clear_error(tmp_path: Path, dist_process_group, caplog) -> None:
    with caplog.at_level(logging.ERROR):
        code = pipeline.run(compose([*PPO_SMALL, "logger=none", "stage.max_steps=1"]), tmp_path / "run")
    assert code == 2
    assert "stage=ppo needs a reward model: stage.reward_from=" in caplog.text


def test_lora_actor_trains_only_lora_and_merged_generation_matches(tmp_path: Path, tiny_reward: Path) -> None:
    cfg = compose(
        [
            *PPO_SMALL,
            "logger=none",
            "stage.max_steps=2",
            f"stage.reward_from={tiny_reward}",
            "model.lora.dim=4",
            "model.lora.target_modules=[q_proj,v_proj]",
            "model.lora.only_optimize_lora=true",
            "reward_model.lora.dim=4",
            "reward_model.lora.target_modules=[q_proj,v_proj]",
            "reward_model.lora.only_optimize_lora=true",
        ]
    )
    ppo_models = PPOModels(cfg, total_steps=2)
    trainer = PPOTrainer(cfg, tmp_path, models=ppo_models)
    actor, critic = ppo_models.actor.module, ppo_models.critic.module
    before = {n: p.detach().clone() for n, p in actor.named_parameters()}
    critic_before = {n: p.detach().clone() for n, p in critic.named_parameters()}
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        plain = actor(input_ids=ids).logits
        with merged_lora(actor):
            merged = actor(input_ids=ids).logits
    torch.testing.assert_close(merged, plain, rtol=1e-4, atol=1e-5)
    summary = trainer.train()
    changed = {n for n, p in actor.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed)
    critic_changed = {n for n, p in critic.named_parameters() if not torch.equal(p, critic_before[n])}
    assert any(".lora_" in n for n in critic_changed)  # the critic's LoRA trains, and its value head with it
    assert all(".lora_" in n or n.startswith("score.") for n in critic_changed), critic_changed
    assert summary["steps"] == 2


def test_zero3_generation_gathers_the_actor_once_per_call(dist_process_group, monkeypatch) -> None:
    import deepspeed
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as Coordinator

    cfg = compose(
        [*PPO_SMALL, "logger=none", "stage.max_steps=1", "stage.actor_zero_stage=3", "stage.max_new_tokens=12"]
    )
    ppo_models = PPOModels(cfg, reward_fn=lambda prompts, responses: [0.0] * len(responses))
    hook_gathers, calls = [], []
    gather = Coordinator._PartitionedParameterCoordinator__all_gather_params

    def counting_gather(self, params, *args, **kwargs):
        hook_gathers.extend(p for p in params if p.ds_status.name == "NOT_AVAILABLE")
        return gather(self, params, *args, **kwargs)

    class CountingGathered(deepspeed.zero.GatheredParameters):
        def __enter__(self):
            calls.append(1)
            return super().__enter__()

    monkeypatch.setattr(Coordinator, "_PartitionedParameterCoordinator__all_gather_params", counting_gather)
    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", CountingGathered)
    prompts = {"input_ids": torch.randint(5, 500, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long)}
    prompts["attention_mask"][0, :2] = 0  # a left-padded row
    ours = ppo_models.generate(prompts, greedy=True).sequences
    assert len(calls) == 1 and hook_gathers == []  # one gather for the call, none per decoding step
    ppo_models.actor.module.eval()
    with torch.no_grad():  # the same greedy tokens as generate through DeepSpeed's hooks, step by step
        theirs = ppo_models.actor.module.generate(
            **prompts,
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=ppo_models.tokenizer.eos_token_id,
            pad_token_id=ppo_models.tokenizer.pad_token_id,
        )
    assert hook_gathers  # the hooked path does gather per step
    assert torch.equal(ours, theirs[:, : ours.shape[1]])


def test_actor_logprobs_with_the_head_on_response_positions_only_equal_the_full_logits() -> None:
    model = test_rollout.tiny_model()
    batch = test_rollout.prompts([5, 9, 3, 12])
    sequences = torch.cat([batch["input_ids"], torch.randint(3, 97, (4, 6))], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.ones(4, 6, dtype=torch.long)], dim=1)
    with torch.no_grad():
        ours, entropy = actor_logprobs(model, sequences, mask, 12, 0.7, entropy=True)
        full = model(input_ids=sequences, attention_mask=mask, position_ids=models.position_ids(mask)).logits
    expected = full[:, 11:-1] / 0.7
    torch.testing.assert_close(ours, ppo_math.logprobs_of(expected, sequences[:, 12:]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, ppo_math.entropy_of(expected), rtol=1e-5, atol=1e-5)


def test_a_micro_batch_cut_to_its_used_columns_gives_the_same_logprobs() -> None:
    model = test_rollout.tiny_model()
    batch = test_rollout.prompts([5, 9, 3, 12])
    sequences = torch.cat([batch["input_ids"], torch.randint(3, 97, (4, 6))], dim=1)
    response = torch.tensor([[1] * 4 + [0] * 2, [1] * 6, [1] * 2 + [0] * 4, [1] * 6])
    mask = torch.cat([batch["attention_mask"], response], dim=1)
    rows = torch.tensor([0, 2])  # the short prompts and responses: 7 leading and 2 trailing columns unused
    first, length = used_columns(mask[rows], response[rows], 12)
    assert (first, length) == (7, 4)
    with torch.no_grad():
        full = actor_logprobs(model, sequences[rows], mask[rows], 12, 0.7)[:, :length]
        cut = actor_logprobs(model, sequences[rows, first : 12 + length], mask[rows, first : 12 + length], 5, 0.7)
    torch.testing.assert_close(cut * response[rows, :length], full * response[rows, :length], rtol=1e-5, atol=1e-5)


def test_bf16_and_fp32_ppo_steps_agree(dist_process_group, tmp_path: Path) -> None:
    from rlhf import bench

    base = ["experiment=bench", "model=tiny", "model@reward_model=tiny", "logger=none", f"cache_dir={tmp_path}"]
    base += ["optimizer.actor_lr=1e-3", "optimizer.critic_lr=1e-3", "stage.max_new_tokens=16"]
    base += ["stage.global_batch=4", "hardware.micro_batch=4", "stage.prompt_width=32"]  # bf16 is emulated here
    trainers = {}
    for precision in ("fp32", "bf16"):
        cfg = compose([*base, f"hardware.precision={precision}"])
        cfg.stage.reward_from = str(bench.reward_model_folder(cfg))
        trainers[precision] = PPOTrainer(cfg, models=PPOModels(cfg, total_steps=2))
    fp32, bf16 = trainers["fp32"], trainers["bf16"]
    actor16 = bf16.models.actor
    assert next(actor16.module.parameters()).dtype == torch.bfloat16
    assert all(m.dtype == torch.float32 for m in actor16.optimizer.masters)  # fp32 masters

    torch.manual_seed(0)
    exp = fp32.generate_experience(bench.bench_prompts(fp32.tokenizer, 4, 32))
    sequences, mask = exp.sequences, exp.attention_mask
    with torch.no_grad():
        lp32 = actor_logprobs(fp32.models.actor, sequences, mask, 32, 0.7)
        lp16 = actor_logprobs(actor16, sequences, mask, 32, 0.7).float()
    assert (lp16 - lp32).abs().mean() < 0.01 * lp32.abs().mean()  # bf16 forward ~ fp32 forward

    names = {id(p): n for n, p in actor16.module.named_parameters()}
    optimizer = actor16.optimizer
    masters = {
        names[id(p)]: master for p, master in zip(optimizer.model_params, optimizer.masters, strict=True)
    }  # the fp32 copy the bf16 optimizer steps, by parameter name
    params32 = dict(fp32.models.actor.module.named_parameters())
    before32 = {n: params32[n].detach().clone() for n in masters}
    before16 = {n: m.clone() for n, m in masters.items()}
    # the fp32 critic's graph (kept from the experience: fold_critic) is not the bf16 critic's
    stats32, stats16 = fp32.train_step(exp), bf16.train_step(exp._replace(critic_values=None))
    for key in ("policy_loss", "value_loss", "entropy"):
        assert stats16[key] == pytest.approx(stats32[key], rel=0.1, abs=0.02), key
    step32 = torch.cat([(params32[n].detach() - before32[n]).flatten() for n in masters])
    step16 = torch.cat([(masters[n] - before16[n]).flatten() for n in masters])
    assert step16.abs().max() > 0
    assert torch.nn.functional.cosine_similarity(step32, step16, dim=0) > 0.98  # the same update, in bf16


def dropout_model_folder(folder: Path, rate: float = 0.5) -> Path:
    """A tiny llama with attention dropout, and a reward model folder on it, with the embedded tokenizer."""
    cfg = compose(["experiment=tiny", "stage=ppo", "logger=none"])
    tokenizer = models.load_tokenizer(cfg.model)
    config = models.tiny_config(cfg.model, tokenizer)
    config.attention_dropout = rate
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config)
    lm.save_pretrained(folder / "lm")
    tokenizer.save_pretrained(folder / "lm")
    reward = models.reward_model_from_lm(lm)
    models.save_reward_model(
        reward, reward.state_dict(), tokenizer, folder / "reward", DType.fp32, {"mean": 0, "std": 1}
    )
    return folder


def test_no_dropout_is_active_in_any_of_the_four_ppo_models(tmp_path: Path, dist_process_group) -> None:
    folder = dropout_model_folder(tmp_path)
    assert models.dropout_sites(AutoModelForCausalLM.from_pretrained(folder / "lm"))  # dropout there to disable
    cfg = compose(
        [
            *PPO_SMALL,
            "logger=none",
            "stage.max_steps=1",
            f"stage.init_from={folder / 'lm'}",
            f"stage.reward_from={folder / 'reward'}",
        ]
    )
    ppo_models = PPOModels(cfg)
    four = (ppo_models.actor, ppo_models.reference, ppo_models.critic, ppo_models.reward_model)
    for model in (m.module for m in four):
        assert models.dropout_sites(model) == []
    ppo_models.train_mode()  # training mode: two forward passes agree, so old and new log-probs match at the start
    ids = torch.randint(5, 500, (2, 12))
    first, second = ppo_models.actor(input_ids=ids).logits, ppo_models.actor(input_ids=ids).logits
    assert torch.equal(first, second)


def test_the_critic_starts_on_the_scale_of_the_normalised_scores(tmp_path: Path, tiny_reward: Path) -> None:
    folder = tmp_path / "reward"
    shutil.copytree(tiny_reward, folder)
    (folder / models.REWARD_STATS).write_text(json.dumps({"mean": 0.7, "std": 2.5}))
    cfg = compose([*PPO_SMALL, "logger=none", "stage.max_steps=1", f"stage.reward_from={folder}"])
    ppo_models = PPOModels(cfg)
    ids = torch.randint(5, 500, (3, 10))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        raw = ppo_models.reward_model(ids, mask)
        critic = ppo_models.critic(ids, mask)
    torch.testing.assert_close(critic, (raw - 0.7) / 2.5, rtol=1e-4, atol=1e-5)  # what PPO's normalised score is


def test_two_ranks_sample_different_responses_to_the_same_prompt(dist_process_group, monkeypatch) -> None:
    cfg = compose([*PPO_SMALL, "logger=none", "stage.max_steps=1", "stage.temperature=1.5", "eval.gold_prompts=0"])
    ppo_models = PPOModels(cfg, reward_fn=lambda prompts, responses: [0.0] * len(responses))

    def sample(rank: int) -> torch.Tensor:
        monkeypatch.setattr(dist, "rank", lambda: rank)
        trainer = PPOTrainer(cfg, models=ppo_models)  # sets up, seeding this rank's sampling
        return trainer.generate_experience(trainer.prompts[:4]).sequences

    rank0, rank1, rank0_again = sample(0), sample(1), sample(0)
    assert torch.equal(rank0, rank0_again)  # reproducible per rank
    assert not torch.equal(rank0, rank1)


def function_reward_trainer(*overrides: str) -> PPOTrainer:
    """A one-iteration PPO trainer on tiny models, rewarded by a function of the response text."""
    cfg = compose(
        [*PPO_SMALL, "logger=none", "stage.max_steps=1", "hardware.micro_batch=4", "eval.gold_prompts=0", *overrides]
    )
    ppo_models = PPOModels(cfg, reward_fn=lambda prompts, responses: [float(len(r) % 3) for r in responses])
    return PPOTrainer(cfg, models=ppo_models)


def test_ema_is_updated_after_every_actor_optimizer_step(dist_process_group) -> None:
    trainer = function_reward_trainer("stage.ema_beta=0.5", "stage.ppo_epochs=2", "stage.mini_batches=2")
    ppo_models = trainer.models
    before = {n: t.clone() for n, t in trainer.ema.items()}
    trainer.train_step(trainer.generate_experience(trainer.prompt_batch(0)))
    assert trainer.ema_updates == 4 == ppo_models.actor.global_steps  # 2 epochs x 2 mini-batches
    actor = trainer._actor_state()
    name = next(n for n in actor if "q_proj" in n)
    assert not torch.equal(trainer.ema[name], before[name]) and not torch.equal(trainer.ema[name], actor[name])


def test_samples_per_prompt_repeats_each_prompt_and_steps_on_all_its_rollouts(dist_process_group) -> None:
    trainer = function_reward_trainer(
        "stage.global_batch=4", "stage.samples_per_prompt=3", "stage.ppo_epochs=1", "stage.mini_batches=3"
    )
    ppo_models = trainer.models
    batch = trainer.prompt_batch(0)
    prompts = [row["prompt"] for row in batch]
    assert len(batch) == 12 and len(set(prompts)) == 4
    assert all(prompts[i] == prompts[i - i % 3] for i in range(12))  # each prompt 3 times in a row
    exp = trainer.generate_experience(batch)
    assert len({tuple(s.tolist()) for s in exp.sequences[:3]}) > 1  # sampled apart, not copied
    trainer.train_step(exp)
    assert ppo_models.actor.global_steps == 3  # 12 rollouts in 3 mini-batches of one micro-batch each


def test_rollouts_that_do_not_split_into_mini_batches_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="12 rollouts must split into stage.mini_batches=5"):
        compose([*PPO_SMALL, "stage.global_batch=4", "stage.samples_per_prompt=3", "stage.mini_batches=5"])


def test_a_group_estimator_builds_trains_and_checkpoints_no_critic(dist_process_group) -> None:
    trainer = function_reward_trainer("stage.global_batch=4", "stage.samples_per_prompt=2", "stage.advantage=rloo")
    ppo_models = trainer.models
    assert ppo_models.critic is None and list(trainer.engines()) == ["actor"]
    exp = trainer.generate_experience(trainer.prompt_batch(0))
    pairs = (exp.scores - trainer.kl_ctl.value * exp.kl).view(-1, 2)
    expected = torch.stack([pairs[:, 0] - pairs[:, 1], pairs[:, 1] - pairs[:, 0]], dim=1).flatten()
    assert exp.advantages[:, 0].tolist() == pytest.approx(expected.tolist(), abs=1e-5)  # token 0 is always valid
    assert torch.equal(exp.advantages, exp.advantages[:, :1] * exp.response_mask)  # one per response, 0 after it
    stats = trainer.train_step(exp)
    assert "value_loss" not in stats and ppo_models.actor.global_steps >= 1
    outcome = trainer.run_step()  # a whole iteration: its step log shows no value loss (not a nan)
    assert "ppo/value_loss" not in outcome.shown and "ppo/policy_loss" in outcome.shown


@pytest.mark.parametrize("estimator", ppo_math.ESTIMATORS)
def test_every_estimator_trains_on_one_loop_and_resumes_exactly_with_a_lora_actor_under_zero3(
    dist_process_group, estimator: str, tmp_path: Path
) -> None:
    """Only gae has a critic; reinforce++ whitens per-token returns; each logs the group and clip figures; a run
    resumed from the checkpoint after step 1 takes the same step 2 as the uninterrupted run."""
    overrides = [
        "stage.global_batch=4", "stage.samples_per_prompt=2", f"stage.advantage={estimator}", "stage.kl_coef=0.1",
        "stage.max_steps=2", "stage.checkpoint_interval=1", "model.lora.dim=4",
        "model.lora.target_modules=[q_proj,v_proj]", "stage.actor_zero_stage=3", "stage.critic_zero_stage=3",
    ]  # fmt: skip
    runs = []
    for resumed in (False, True):
        trainer = function_reward_trainer(*overrides)
        trainer.checkpoints = checkpoint.Checkpointer(trainer, trainer.cfg, tmp_path, None, stop=None)
        if resumed:
            trainer.checkpoints.load(checkpoint.latest(tmp_path))
        else:
            assert (trainer.models.critic is not None) == (estimator == "gae")
            check_advantages(trainer, estimator)
            outcome = trainer.run_step()
            logged = {"ppo/clipfrac_low", "ppo/clipfrac_high", "ppo/truncated_frac", "ppo/flat_group_frac"}
            assert logged <= set(outcome.metrics)
            trainer.checkpoints.step_done(trainer.total_steps)  # the loop's checkpoint after step 1
        assert trainer.step == 1 and trainer.models.actor.zero_optimization_stage() == 3
        runs.append(trainer.run_step().metrics)
    uninterrupted, after_resume = runs
    for key in ("ppo/reward_mean", "ppo/policy_loss", "ppo/kl", "ppo/entropy"):
        assert after_resume[key] == pytest.approx(uninterrupted[key], rel=1e-4, abs=1e-5), key
    assert ("ppo/value_loss" in after_resume) == (estimator == "gae")


def check_advantages(trainer: PPOTrainer, estimator: str) -> None:
    """reinforce++: per-token returns whitened over the batch, the scores less the group mean with a baseline."""
    exp = trainer.generate_experience(trainer.prompt_batch(0))
    if estimator.startswith("reinforce_plus_plus"):
        m = exp.response_mask.float()
        assert ppo_math.masked_mean(exp.advantages, m).item() == pytest.approx(0.0, abs=1e-5)
        assert ppo_math.masked_var(exp.advantages, m).item() == pytest.approx(1.0, abs=1e-3)
        baseline = estimator.endswith("baseline")
        scores = ppo_math.subtract_group_mean(exp.scores, 2) if baseline else exp.scores
        torch.testing.assert_close(exp.rewards.sum(dim=1), scores - 0.1 * exp.kl)


def test_a_prompts_samples_stay_together_on_one_rank(dist_process_group) -> None:
    trainer = function_reward_trainer("stage.global_batch=4", "stage.samples_per_prompt=3", "stage.advantage=rloo")
    trainer.world = 2
    shares = []
    for rank in (0, 1):
        trainer.rank = rank
        rows = [tuple(row["input_ids"]) for row in trainer.prompt_batch(0)]
        groups = [rows[i : i + 3] for i in range(0, len(rows), 3)]
        assert len(groups) == 2 and all(len(set(group)) == 1 for group in groups)  # whole groups, in a row
        shares.append({group[0] for group in groups})
    assert len(shares[0] | shares[1]) == 4  # the ranks share the global batch, no prompt twice


def test_without_a_kl_penalty_no_reference_model_is_built(dist_process_group) -> None:
    trainer = function_reward_trainer("stage.kl_coef=0", "eval.gold_prompts=4")
    assert trainer.models.reference is None
    outcome = trainer.run_step()
    assert outcome.metrics["ppo/kl"] == 0.0
    evaluation = trainer.evaluate("end")
    assert "eval/gold_score" in evaluation and "eval/kl" not in evaluation  # nothing to measure a KL to


def test_the_kl_in_the_loss_leaves_the_rewards_and_adds_a_loss_term(dist_process_group) -> None:
    trainer = function_reward_trainer(
        "stage.global_batch=4", "stage.samples_per_prompt=2", "stage.advantage=grpo", "stage.kl_in_loss=true",
        "stage.kl_estimator=k3", "stage.kl_coef=0.1",
    )  # fmt: skip
    exp = trainer.generate_experience(trainer.prompt_batch(0))
    torch.testing.assert_close(exp.rewards.sum(dim=1), exp.scores)  # no KL shaping
    stats = trainer.train_step(exp)
    assert stats["kl_loss"] >= 0  # k3 is never negative


def test_rollout_gold_scores_the_reward_on_pairs_of_answers_to_one_prompt(dist_process_group) -> None:
    from rlhf.stages.ppo_experience import Experience, rollout_gold

    # prompt a: the right answer outscores the wrong one; prompt b: it does not; c has no built-in answer (nan)
    exp = Experience._make([None] * len(Experience._fields))._replace(
        reward=torch.tensor([2.0, 1.0, 1.5, 1.8, 5.0]),
        gold=torch.tensor([1.0, 0.0, 1.0, 0.0, float("nan")]),
        texts=[("a", "", 0.0), ("a", "", 0.0), ("b", "", 0.0), ("b", "", 0.0), ("c", "", 0.0)],
    )
    figures = rollout_gold(exp)
    assert figures["ppo/gold_mean"] == 0.5
    assert figures["ppo/reward_gold_pair_acc"] == 0.5
    assert figures["ppo/reward_gold_auc"] == pytest.approx(0.75)  # pooled: 3 of the 4 right-wrong pairs


def test_reward_functions_from_the_config_are_weighted_with_the_reward_model(
    tmp_path: Path, tiny_reward: Path, monkeypatch
) -> None:
    (tmp_path / "own_rewards.py").write_text(
        "def brevity(prompts, completions, chosen, family, **rest):  # the built-in rows' other columns\n"
        "    assert len(chosen) == len(family) == len(completions)\n"
        "    return [-len(c) / 10 for c in completions]\n"
    )
    monkeypatch.chdir(tmp_path)
    funcs = "stage.reward_funcs=[model,own_rewards:brevity,rlhf.data.builtin:gold_reward]"
    one = [*PPO_SMALL, "logger=none", "stage.max_steps=1", "eval.gold_prompts=0"]
    cfg = compose([*one, f"stage.reward_from={tiny_reward}", funcs, "stage.reward_weights=[1,0.5,2]"])
    trainer = PPOTrainer(cfg, models=PPOModels(cfg))
    exp = trainer.generate_experience(trainer.prompt_batch(0))
    parts, stats = exp.reward_parts, trainer.models.reward_stats
    assert set(parts) == {"model", "brevity", "gold_reward"}
    assert parts["brevity"].tolist() == pytest.approx([-len(text) / 10 for _, text, _ in exp.texts])
    model = (parts["model"] - stats["mean"]) / stats["std"]  # the reward model's score on its normalised scale
    torch.testing.assert_close(exp.reward, model + 0.5 * parts["brevity"] + 2 * parts["gold_reward"])
    metrics, _ = trainer._iteration_metrics(exp, trainer.train_step(exp), 1.0, 1.0)
    assert metrics["reward/brevity_mean"] == pytest.approx(parts["brevity"].mean().item(), abs=1e-5)
    assert metrics["reward/gold_reward_std"] == pytest.approx(parts["gold_reward"].std(correction=0).item(), abs=1e-5)


def test_the_readme_reward_function_runs_from_a_file_beside_the_run(tmp_path: Path, tiny_reward: Path, monkeypatch):
    code = re.search(r"```python\n(def brevity\(.*?)```", README.read_text(), re.S).group(1)
    (tmp_path / "my_rewards.py").write_text(code)
    monkeypatch.chdir(tmp_path)
    one = [*PPO_SMALL, "logger=none", "stage.max_steps=1", "eval.gold_prompts=0", f"stage.reward_from={tiny_reward}"]
    cfg = compose([*one, "stage.reward_funcs=[model,my_rewards:brevity]", "stage.reward_weights=[1,0.5]"])
    trainer = PPOTrainer(cfg, models=PPOModels(cfg))
    outcome = trainer.run_step()
    assert -1.0 <= outcome.metrics["reward/brevity_mean"] <= 0.0 and "reward/model_mean" in outcome.metrics


def test_a_reward_function_alone_needs_no_reward_model(dist_process_group) -> None:
    one = [*PPO_SMALL, "logger=none", "stage.max_steps=1", "eval.gold_prompts=0", "stage.global_batch=4"]
    group = ["stage.advantage=rloo", "stage.samples_per_prompt=2"]
    cfg = compose([*one, *group, "stage.reward_funcs=[rlhf.data.builtin:gold_reward]"])
    trainer = PPOTrainer(cfg, models=PPOModels(cfg))
    assert trainer.models.reward_model is None and trainer.models.critic is None
    outcome = trainer.run_step()
    assert set(outcome.metrics) >= {"reward/gold_reward_mean", "ppo/policy_loss"}


def test_a_group_estimator_needs_two_samples_per_prompt() -> None:
    with pytest.raises(ConfigError, match="stage.advantage=grpo compares each response"):
        compose([*PPO_SMALL, "stage.advantage=grpo"])


def full_weights(engine, zero_stage: int) -> list[torch.Tensor]:
    return list(dist.full_state_dict(engine, zero_stage).values())


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_the_critics_experience_forward_folds_into_its_update_with_the_same_step(dist_process_group, zero_stage):
    one_pass = ("stage.ppo_epochs=1", "stage.mini_batches=1", "hardware.micro_batch=8")
    trainers = [function_reward_trainer(*one_pass, f"hardware.zero_stage={zero_stage}") for _ in range(2)]
    assert all(t.fold_critic for t in trainers)
    trainers[1].fold_critic = False
    assert not function_reward_trainer("stage.ppo_epochs=2").fold_critic
    assert not function_reward_trainer("stage.ppo_epochs=1", "stage.mini_batches=1").fold_critic  # 2 micro-batches
    lora_dropout = ("reward_model.lora.dim=4", "reward_model.lora.dropout=0.1")
    lora_dropout += ("reward_model.lora.target_modules=[q_proj]",)
    assert not function_reward_trainer(*one_pass, *lora_dropout).fold_critic  # noisy values: the experience's own
    results = []
    for trainer in trainers:
        critic = trainer.models.critic
        forwards: list[int] = []
        critic.module.register_forward_hook(lambda *_, calls=forwards: calls.append(1))
        torch.manual_seed(0)
        exp = trainer.generate_experience(trainer.prompt_batch(0))
        assert (exp.critic_values is not None) == trainer.fold_critic
        before = full_weights(critic, zero_stage)
        stats = trainer.train_step(exp)
        step = [p - b for p, b in zip(full_weights(critic, zero_stage), before, strict=True)]
        results.append((exp, stats, step, len(forwards)))
    (folded, stats, step, forwards), (plain, plain_stats, plain_step, plain_forwards) = results
    assert (forwards, plain_forwards) == (1, 2)  # the experience's pass only, against a second in the update
    assert torch.equal(folded.sequences, plain.sequences) and torch.equal(folded.values, plain.values)
    assert stats["value_loss"] == pytest.approx(plain_stats["value_loss"], rel=1e-5)
    assert max(s.abs().max().item() for s in step) > 1e-5  # the critic moved, and by the same step
    assert max((s - p).abs().max().item() for s, p in zip(step, plain_step, strict=True)) < 1e-7
