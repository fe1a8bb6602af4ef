"""The rules a composed config must keep that span fields (a schema checks one field's type), and keys no schema
defines. `validate` raises one ConfigError listing every broken rule with its keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from rlhf import rewards
from rlhf.config import (
    Accelerator,
    ConfigError,
    Launcher,
    Precision,
    Source,
    ppo_rollouts,
    stage_config,
    world_size,
)
from rlhf.data import builtin, onpolicy
from rlhf.data.formats import ADAPTERS
from rlhf.data.sources import FORMAT_FIELDS
from rlhf.ppo import functional as ppo_math
from rlhf.preference import DPO_LOSSES
from rlhf.stage_schemas import DATA_SHARES, PIPELINE_ORDER, STAGE_SCHEMAS, PipelineStageConfig

Need = Callable[[bool, str], None]  # records the message when the rule does not hold


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


def hardware_rules(cfg: DictConfig, need: Need) -> None:
    """The hardware group: ZeRO stage, world size, precision and offload."""
    hw, opt = cfg.hardware, cfg.optimizer
    need(0 <= hw.zero_stage <= 3, f"hardware.zero_stage={hw.zero_stage} must be 0, 1, 2 or 3")
    need(hw.nodes >= 1, f"hardware.nodes={hw.nodes} must be >= 1")
    need(hw.procs_per_node >= 1, f"hardware.procs_per_node={hw.procs_per_node} must be >= 1")
    need(hw.micro_batch >= 1, f"hardware.micro_batch={hw.micro_batch} must be >= 1")
    need(hw.peak_tflops > 0, f"hardware.peak_tflops={hw.peak_tflops} must be > 0")
    need(0 < hw.expected_mfu <= 1, f"hardware.expected_mfu={hw.expected_mfu} must be in (0, 1]")
    need(0 < hw.generation_mfu <= 1, f"hardware.generation_mfu={hw.generation_mfu} must be in (0, 1]")
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
    need(
        opt.master_weights or hw.precision in (Precision.bf16, Precision.auto),
        "optimizer.master_weights=false (bf16 weights with a Kahan compensation) needs hardware.precision=bf16 (got "
        f"{hw.precision.value})",
    )
    need(
        hw.nodes == 1 or hw.launcher != Launcher.deepspeed or bool(hw.hostfile),
        f"hardware.nodes={hw.nodes} needs hardware.hostfile (pdsh starts every node from here), or "
        "hardware.launcher=no_ssh (one rlhf per node) or slurm (one per device)",
    )
    need(
        0 <= hw.node_rank < hw.nodes,
        f"hardware.node_rank={hw.node_rank} must be in 0 .. hardware.nodes - 1 = {hw.nodes - 1}",
    )
    need(
        hw.launcher != Launcher.no_ssh or hw.nodes == 1 or bool(hw.master_addr),
        f"hardware.launcher=no_ssh over hardware.nodes={hw.nodes} needs hardware.master_addr (node 0's address)",
    )
    need(0 < hw.master_port < 65536, f"hardware.master_port={hw.master_port} must be a port, 1 .. 65535")


def model_rules(cfg: DictConfig, need: Need) -> None:
    """The model and reward_model groups: source, length, the tiny architecture, LoRA."""
    data = cfg.data
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


def optimizer_rules(cfg: DictConfig, need: Need) -> None:
    """The optimizer group."""
    opt = cfg.optimizer
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


def stage_rules(cfg: DictConfig, need: Need) -> None:
    """Every stage: lengths, cadences, checkpoints, the global batch; the on-policy kinds of the reward and DPO
    stages, DPO's loss."""
    hw, stage = cfg.hardware, cfg.stage
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
    if stage.name == "reward":
        zero = stage.zero_stage
        need(-1 <= zero <= 3, f"stage.zero_stage={zero} must be -1 (hardware.zero_stage) or 0-3")
        need(
            not cfg.optimizer.offload or zero != 0,
            "optimizer.offload=true needs ZeRO >= 1: the reward stage's stage.zero_stage=0 turns it off",
        )
    if stage.name in ("reward", "dpo"):
        unknown = [kind for kind in stage.onpolicy.kinds if kind not in onpolicy.KINDS]
        need(
            bool(stage.onpolicy.kinds) and not unknown,
            f"stage.onpolicy.kinds={list(stage.onpolicy.kinds)} must name some of {', '.join(onpolicy.KINDS)}",
        )
    if stage.name == "dpo":
        need(stage.loss in DPO_LOSSES, f"stage.loss={stage.loss} must be one of {', '.join(DPO_LOSSES)}")
        need(stage.beta > 0, f"stage.beta={stage.beta} must be > 0")
        need(
            0 <= stage.label_smoothing < 0.5,
            f"stage.label_smoothing={stage.label_smoothing} must be in [0, 0.5) (the share of flipped labels)",
        )
        need(stage.rpo_alpha >= 0, f"stage.rpo_alpha={stage.rpo_alpha} must be >= 0 (the chosen answers' NLL weight)")
    if stage.name == "ppo":  # micro-batches split the rollouts (global_batch x samples_per_prompt), checked below
        need(
            stage.global_batch >= world_size(cfg) and stage.global_batch % world_size(cfg) == 0,
            f"stage.global_batch={stage.global_batch} prompts must be a positive multiple of the world size "
            f"{world_size(cfg)}",
        )
    else:
        per_step = max(world_size(cfg) * hw.micro_batch, 1)  # a zero micro-batch has its own message above
        need(
            stage.global_batch >= per_step and stage.global_batch % per_step == 0,
            f"stage.global_batch={stage.global_batch} must be a positive multiple of world size x "
            f"hardware.micro_batch = {world_size(cfg)} x {hw.micro_batch} = {per_step}",
        )


def ppo_rules(cfg: DictConfig, need: Need) -> None:
    """The PPO stage: sampling, estimator, reward functions, mini-batches, lengths."""
    hw, stage, data = cfg.hardware, cfg.stage, cfg.data
    if stage.name != "ppo":
        return
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
        stage.advantage in ppo_math.ESTIMATORS,
        f"stage.advantage={stage.advantage} must be one of {', '.join(ppo_math.ESTIMATORS)}",
    )
    need(
        stage.loss_aggregation in ("token-mean", "seq-mean"),
        f"stage.loss_aggregation={stage.loss_aggregation} must be token-mean or seq-mean",
    )
    need(stage.clip_range > 0, f"stage.clip_range={stage.clip_range} must be > 0")
    need(
        stage.clip_range_high >= 0,
        f"stage.clip_range_high={stage.clip_range_high} must be >= 0 (0: the same as clip_range)",
    )
    need(
        stage.advantage not in ppo_math.GROUP_ESTIMATORS or stage.samples_per_prompt >= 2,
        f"stage.advantage={stage.advantage} compares each response with the others to its prompt: it needs "
        f"stage.samples_per_prompt >= 2 (it is {stage.samples_per_prompt})",
    )
    try:
        rewards.load(list(stage.reward_funcs), list(stage.reward_weights))
    except rewards.RewardFunctionError as err:
        need(False, str(err))
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


def data_rules(cfg: DictConfig, need: Need) -> None:
    """The data group: split, sources and their formats, lengths, template."""
    data = cfg.data
    need(
        len(data.split) == 3 and all(s >= 0 for s in data.split) and sum(data.split) > 0,
        f"data.split={list(data.split)} must be three non-negative shares (SFT, reward, PPO) with a positive sum",
    )
    need(0 < data.eval_fraction < 1, f"data.eval_fraction={data.eval_fraction} must be in (0, 1)")
    families = [f.name for f in builtin.FAMILIES]
    unknown = [name for name in data.builtin_families if name not in families]
    need(not unknown, f"data.builtin_families: no family {', '.join(unknown)}; the families: {', '.join(families)}")
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
        fields = (*FORMAT_FIELDS[source.format], "messages") if source.format in ("pairs", "sft") else ()
        for key in source.columns if fields else ():
            close = difflib.get_close_matches(str(key), fields, n=1)
            need(
                key in fields,
                f"data.sources[{i}].columns.{key}: not a field of format {source.format} (its fields: "
                f"{', '.join(fields)})" + (f"; did you mean {close[0]}?" if close else ""),
            )
        unknown_stages = [name for name in source.stages if name not in DATA_SHARES]
        need(
            not unknown_stages,
            f"data.sources[{i}].stages={list(source.stages)} must name some of {', '.join(DATA_SHARES)} (DPO "
            "trains on the reward share)",
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

    for rules in (hardware_rules, model_rules, optimizer_rules, stage_rules, ppo_rules, data_rules):
        rules(cfg, need)

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
        ppo = cfg.stage.ppo
        if "ppo" in stages and "reward" not in stages and not ppo.reward_from and rewards.MODEL in ppo.reward_funcs:
            errors.append(
                "stage.stages runs ppo without reward: set stage.ppo.reward_from=<run>/reward/final (a reward output), "
                "or reward PPO with functions alone (stage.ppo.reward_funcs=[rlhf.data.builtin:gold_reward])"
            )
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))
