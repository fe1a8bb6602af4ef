"""The stage groups' structured schemas (`stage=sft|reward|ppo|pipeline`): each stage's options and defaults, and
the stage's own optimizer settings. The other groups' schemas, and what reads a composed config, are in
`rlhf.config`."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional


class Schedule(str, Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


@dataclass
class StageOptimizerConfig:
    """One stage's own optimizer settings over the `optimizer` group's (unset: the group's value), e.g.
    stage.reward.optimizer.lr=3e-5 or stage.ppo.optimizer.schedule=constant in the pipeline."""

    lr: Optional[float] = None  # noqa: UP045 (OmegaConf 2.3 needs typing.Optional)
    lora_lr: Optional[float] = None  # noqa: UP045
    actor_lr: Optional[float] = None  # noqa: UP045
    critic_lr: Optional[float] = None  # noqa: UP045
    weight_decay: Optional[float] = None  # noqa: UP045
    schedule: Optional[Schedule] = None  # noqa: UP045
    warmup_steps: Optional[int] = None  # noqa: UP045
    min_lr_ratio: Optional[float] = None  # noqa: UP045


@dataclass
class SFTStageConfig:
    name: str = "sft"
    epochs: int = 1
    max_steps: int = 20  # optimizer steps; -1 runs the full epochs
    global_batch: int = 16
    eval_interval: int = 10  # optimizer steps between evaluations (also at the end)
    checkpoint_interval: int = 10  # optimizer steps between checkpoints (0: only at the end and when stopped)
    eval_max_batches: int = 8  # eval examples: this many micro-batches in all, shared out over the ranks
    log_interval: int = 1
    grad_clip: float = 1.0
    init_from: str = ""  # a model directory to start from instead of the `model` option
    optimizer: StageOptimizerConfig = field(default_factory=StageOptimizerConfig)


@dataclass
class OnPolicyConfig:
    """Reward pairs from the policy's own answers, graded by the built-in gold scorer (InstructGPT's recipe): the
    policy answers each built-in prompt `samples_per_prompt` times, and a right and a wrong answer make a pair (see
    rlhf.data.onpolicy). Prompts of other sources keep their static pairs."""

    samples_per_prompt: int = 0  # 0: off, static pairs only
    train_prompts: int = 512  # reward-share training prompts the policy answers (0: all)
    eval_prompts: int = 200  # held-out reward-share prompts it answers for the evaluation pairs (0: all)
    pairs_per_prompt: int = 4  # at most, from one prompt's answers
    kinds: list[str] = field(default_factory=lambda: ["policy", "reference", "static"])  # pairs kept
    static_fraction: float = 0.0  # training pairs' share from the static pairs (1: static only; held-out: the policy's)
    temperature: float = 1.0
    max_new_tokens: int = 64
    batch: int = 16  # prompts answered together


@dataclass
class RewardStageConfig:
    name: str = "reward"
    epochs: int = 1
    max_steps: int = 24  # optimizer steps; -1 runs the full epochs
    global_batch: int = 16  # preference pairs per optimizer step
    eval_interval: int = 12
    checkpoint_interval: int = 12  # optimizer steps between checkpoints (0: only at the end and when stopped)
    eval_pairs: int = 400  # held-out pairs per evaluation (0: all); a tie counts as wrong
    eval_start: bool = True  # evaluate the untrained head too (a chance-level baseline)
    log_interval: int = 1
    grad_clip: float = 1.0
    init_from: str = ""  # a model directory (e.g. an SFT output) for the backbone instead of the `reward_model` option
    policy_from: str = ""  # the policy PPO will train (a pipeline hands over the SFT output; empty: the `model` option)
    from_policy: bool = False  # start the backbone from the policy's weights (unless init_from names a folder)
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    margin: float = 0.0  # the loss is -logsigmoid(r_chosen - r_rejected - margin)
    disable_dropout: bool = True  # dropout off in the reward model, as DeepSpeed-Chat and TRL train it
    zero_stage: int = -1  # -1: hardware.zero_stage (DeepSpeed-Chat trains its reward model at ZeRO 0)
    optimizer: StageOptimizerConfig = field(default_factory=StageOptimizerConfig)


@dataclass
class PPOStageConfig:
    name: str = "ppo"
    epochs: int = 1  # passes over the PPO prompts
    max_steps: int = 8  # PPO iterations (generate, then learn); -1 runs the full epochs
    global_batch: int = 8  # prompts per iteration, over all ranks
    samples_per_prompt: int = 1  # responses sampled per prompt: an iteration learns from global_batch x this many
    eval_interval: int = 4  # iterations between gold-score evaluations (also before the first and at the end)
    checkpoint_interval: int = 4  # iterations between checkpoints (0: only at the end and when stopped)
    log_interval: int = 1
    grad_clip: float = 1.0
    init_from: str = ""  # the actor: an SFT output folder (empty: the `model` option)
    reward_from: str = ""  # a reward-stage output folder (required when reward_funcs names `model`)
    reward_funcs: list[str] = field(default_factory=lambda: ["model"])  # `model` and `module:function`s (rlhf.rewards)
    reward_weights: list[float] = field(default_factory=list)  # one per reward function; empty: 1.0 each
    critic_from: str = ""  # the critic's initialisation (empty: the reward model)
    actor_zero_stage: int = -1  # -1: hardware.zero_stage
    critic_zero_stage: int = -1  # -1: hardware.zero_stage
    # generation
    max_new_tokens: int = 48
    temperature: float = 0.7
    top_p: float = 1.0
    rollout: str = "engine"  # the sampler of rlhf/rollout.py, or generate: transformers.generate
    reuse_rollout_logprobs: bool = True  # the sampler's log-probs of the sampled tokens serve as PPO's old ones
    stop_at_eos: bool = True  # false: every response has max_new_tokens tokens (fixed-length benchmarks)
    prompt_width: int = 0  # left-pad each batch's prompts to at least this many tokens (0: its longest prompt)
    # reward shaping
    kl_coef: float = 0.05
    kl_estimator: str = "k1"  # k1 or k3
    kl_target: float = 0.0  # > 0: adaptive KL controller towards this KL per sequence
    kl_horizon: int = 10000
    normalize_reward: bool = True  # (score - mean) / std with the reward model's saved statistics
    score_clip: float = 5.0
    no_eos_penalty: float = 0.0  # added to the score of a response that never reaches EOS (e.g. -1.0)
    ppo_epochs: int = 2  # learning: passes over each iteration's rollouts
    mini_batches: int = 1  # optimizer steps per PPO epoch; each accumulates 1 / mini_batches of the rollouts
    advantage: str = "gae"  # the critic's GAE, or without a critic rloo, grpo, dr_grpo, reinforce_plus_plus(_baseline)
    gamma: float = 1.0  # gae only, as are lam, whiten_advantages, value_clip and the critic's settings
    lam: float = 0.95
    whiten_advantages: bool = True
    kl_in_loss: bool = False  # the KL penalty in the actor's loss (as GRPO; use kl_estimator=k3), not in the reward
    loss_aggregation: str = "token-mean"  # or seq-mean: each response's token mean, then the mean over responses
    clip_range: float = 0.2
    clip_range_high: float = 0.0  # > 0: the upper clip 1 + this (DAPO's clip-higher); 0: 1 + clip_range
    value_clip: float = 0.2
    ema_beta: float = 0.0  # > 0: an EMA of the actor, updated each iteration (e.g. 0.9), saved beside it
    ptx_coef: float = 0.0  # > 0 with data.ptx: a language-model loss on pre-training text mixed into the actor's
    sample_table_interval: int = 10  # iterations between W&B tables of sample prompts and responses
    disable_dropout: bool = True  # dropout off in all four models: old and new log-probs then match at the start
    optimizer: StageOptimizerConfig = field(default_factory=StageOptimizerConfig)


@dataclass
class DPOStageConfig:
    """Direct preference optimisation of the policy on the reward share's pairs: no reward model, critic or
    sampling (rlhf.stages.dpo; the losses in rlhf.preference.dpo_loss)."""

    name: str = "dpo"
    epochs: int = 1
    max_steps: int = 24  # optimizer steps; -1 runs the full epochs
    global_batch: int = 16  # preference pairs per optimizer step
    eval_interval: int = 12
    checkpoint_interval: int = 12  # optimizer steps between checkpoints (0: only at the end and when stopped)
    eval_pairs: int = 400  # held-out pairs per evaluation (0: all)
    log_interval: int = 1
    grad_clip: float = 1.0
    init_from: str = ""  # the policy to train and the frozen reference: an SFT output (empty: the `model` option)
    loss: str = "sigmoid"  # sigmoid (DPO), ipo, or simpo (reference-free)
    beta: float = 0.1  # SimPO's paper uses about 2 with simpo_gamma 1
    label_smoothing: float = 0.0  # sigmoid and simpo: the assumed share of flipped labels (conservative DPO)
    simpo_gamma: float = 1.0  # simpo: the target reward margin
    rpo_alpha: float = 0.0  # weight of the chosen answers' per-token NLL added to the loss (RPO; 0: none)
    precompute_reference: bool = True  # the reference's log-probs once per pair before training, then no reference
    policy_from: str = ""  # on-policy pairs: the policy that answers (empty: init_from)
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    disable_dropout: bool = True
    optimizer: StageOptimizerConfig = field(default_factory=StageOptimizerConfig)


PIPELINE_ORDER = ("sft", "reward", "dpo", "ppo")
DATA_SHARES = ("sft", "reward", "ppo")  # the data mix's shares (data.split); DPO trains on the reward share's pairs


def data_share(stage: str) -> str:
    """The data share a stage trains on."""
    return "reward" if stage == "dpo" else stage


@dataclass
class PipelineStageConfig:
    """The three stages in a row, each with its own options (`stage.sft.*`, `stage.reward.*`, `stage.ppo.*`); the
    SFT output becomes PPO's actor and the reward output its reward model unless `stage.ppo.*_from` names others."""

    name: str = "pipeline"
    stages: list[str] = field(default_factory=lambda: ["sft", "reward", "ppo"])  # of PIPELINE_ORDER, in its order
    sft: SFTStageConfig = field(default_factory=SFTStageConfig)
    reward: RewardStageConfig = field(default_factory=RewardStageConfig)
    dpo: DPOStageConfig = field(default_factory=DPOStageConfig)
    ppo: PPOStageConfig = field(default_factory=PPOStageConfig)


STAGE_SCHEMAS: dict[str, type] = {
    "sft": SFTStageConfig,
    "reward": RewardStageConfig,
    "ppo": PPOStageConfig,
    "dpo": DPOStageConfig,
    "pipeline": PipelineStageConfig,
}
