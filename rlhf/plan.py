"""The dry run (`rlhf dry_run=true`): per stage, memory per device against the hardware's, tokens, time and cost,
worked out from the configs alone (no weights are loaded), and what to change when a stage will not fit.

Memory per device, for a model of P parameters of which T train, on N devices under ZeRO stage z (mixed precision
keeps an fp32 master copy; DeepSpeed's own estimators are shown beside ours for the trained models' states):
  weights     P x bytes(precision), / N under ZeRO-3, 0 with parameter offload
  gradients   T x bytes(precision), / N under ZeRO-2 and 3
  optimizer   T x (8 Adam moments + 4 master copy when not fp32, + 4 fp32 gradient buffer in bf16 at ZeRO-0; or
              8 + 2 Kahan compensation with optimizer.master_weights=false), / N under ZeRO-1 to 3, 0 with offload
  activations micro-batch x sequence x layers x (34 h + 5 heads x sequence) bytes in 16 bits (x2 in fp32), about
              2 h bytes per token and layer with gradient checkpointing; plus the fp32 logits of the micro-batch;
              in PPO at least the KV cache of all a rank's rollouts, sampled at once (2 x layers x tokens x h x bytes)
Time is FLOPs (6 P per trained token, 2 P per forward token, 8 P with checkpointing) over
hardware.peak_tflops x hardware.expected_mfu per device; PPO's sampling (2 P per token) at hardware.generation_mfu.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from rlhf.config import DType, Source, cache_dir, ppo_rollouts, save_resolved, stage_config, world_size
from rlhf.engine import stage_configs, zero_stage_of
from rlhf.progress import format_seconds, markdown_table
from rlhf.stage_schemas import data_share

log = logging.getLogger("rlhf")

GB = 1024**3
BYTES = {DType.fp32: 4, DType.bf16: 2, DType.fp16: 2}  # per value at a precision
HEADROOM = 0.9  # plan to use at most this share of a device's memory (allocator fragmentation, buffers)
TRAINED = {"sft": ["model"], "reward": ["reward_model"], "dpo": ["model"], "ppo": ["model", "reward_model"]}


class PlanError(ValueError):
    """A model whose size cannot be known without loading it; the message says which keys to set."""


@dataclass
class Arch:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    gated: bool
    tied: bool

    def params(self) -> int:
        """Parameter count (embeddings, attention with grouped KV heads, MLP, norms; biases ignored)."""
        kv = self.hidden * self.kv_heads // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * kv
        mlp = (3 if self.gated else 2) * self.hidden * self.ffn
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * (attention + mlp + 2 * self.hidden) + embeddings + self.hidden

    def largest_layer(self) -> int:
        return max(
            self.vocab * self.hidden, 2 * self.hidden * self.hidden + (3 if self.gated else 2) * self.hidden * self.ffn
        )

    def lora_params(self, dim: int) -> int:
        """LoRA parameters with every transformer-block linear layer adapted (the usual `layers.` target)."""
        kv = self.hidden * self.kv_heads // self.heads
        attention = dim * ((self.hidden + self.hidden) * 2 + (self.hidden + kv) * 2)
        mlp = (3 if self.gated else 2) * dim * (self.hidden + self.ffn)
        return self.layers * (attention + mlp)


def arch_of(model_cfg: DictConfig, root: Path) -> Arch:
    """The model's shape from `model.arch`, else from its config.json when that is on disk (a local folder, the
    converted embedded model, or the hub cache); no weights are read."""
    a = model_cfg.arch
    if a.hidden_size <= 0:
        config = _config_on_disk(model_cfg, root)
        if config is None:
            raise PlanError(
                f"model {model_cfg.name}: its size is unknown without downloading it; set model.arch.hidden_size, "
                "num_layers, num_heads, intermediate_size and vocab_size for a dry run"
            )
        return Arch(
            hidden=config["hidden_size"],
            layers=config["num_hidden_layers"],
            heads=config["num_attention_heads"],
            kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            ffn=config.get("intermediate_size") or config.get("ffn_dim") or 4 * config["hidden_size"],
            vocab=config["vocab_size"],
            gated=config.get("model_type") in ("llama", "mistral", "qwen2", "gemma", "smollm3"),
            tied=config.get("tie_word_embeddings", True),
        )
    return Arch(
        hidden=a.hidden_size,
        layers=a.num_layers,
        heads=a.num_heads,
        kv_heads=a.num_kv_heads or a.num_heads,
        ffn=a.intermediate_size,
        vocab=a.vocab_size,
        gated=a.gated_mlp,
        tied=a.tied_embeddings,
    )


def model_params(model_cfg: DictConfig, root: Path) -> int | None:
    """A model option's parameter count from its shape (None when unknown without loading it)."""
    try:
        return arch_of(model_cfg, root).params()
    except (PlanError, OSError, KeyError, ValueError):
        return None


def _config_on_disk(model_cfg: DictConfig, root: Path) -> dict | None:
    candidates = []
    if model_cfg.source == Source.local:
        candidates.append(Path(model_cfg.path) / "config.json")
    elif model_cfg.source == Source.hub:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_cfg.path, "config.json")
        if isinstance(cached, str):
            candidates.append(Path(cached))
    for path in candidates:
        if path.is_file():
            return json.loads(path.read_text())
    return None


@dataclass
class Setup:
    """What decides the memory of one stage on one device; `advice` varies it."""

    zero: dict[str, int]  # per trained model
    micro_batch: int
    checkpointing: dict[str, bool]
    lora: dict[str, bool]
    offload_optimizer: bool
    offload_params: bool
    master_weights: bool = True


def model_states(arch: Arch, trainable: int, zero: int, world: int, precision: DType, setup: Setup) -> dict:
    """Bytes per device of a trained model's weights, gradients and optimizer states."""
    b = BYTES[precision]
    weights = arch.params() * b + (trainable * b if trainable != arch.params() else 0)
    weights = 0 if (zero == 3 and setup.offload_params) else weights / (world if zero == 3 else 1)
    grads = trainable * b / (world if zero >= 2 else 1)
    own = precision == DType.bf16 and zero == 0  # rlhf.optim: fp32 masters and gradients, or a Kahan compensation
    optim = trainable * (10 if own and not setup.master_weights else 8 + (precision != DType.fp32) * 4 + own * 4)
    optim = 0 if setup.offload_optimizer else optim / (world if zero >= 1 else 1)
    return {"weights": weights, "grads": grads, "optim": optim}


def activations(arch: Arch, micro: int, seq: int, precision: DType, checkpointing: bool) -> float:
    scale = 2 if precision == DType.fp32 else 1
    if checkpointing:
        per_layer = 2 * arch.hidden
        one_layer = micro * seq * (34 * arch.hidden + 5 * arch.heads * seq) * scale
    else:
        per_layer = 34 * arch.hidden + 5 * arch.heads * seq
        one_layer = 0
    logits = micro * seq * arch.vocab * 4 * 2  # fp32 logits and their gradient
    return micro * seq * arch.layers * per_layer * scale + one_layer + logits


def trainable_params(arch: Arch, model_cfg: DictConfig, lora_on: bool) -> int:
    dim = model_cfg.lora.dim if model_cfg.lora.dim > 0 else 128
    if not lora_on:
        return arch.params()
    return arch.lora_params(dim)


def stage_memory(cfg: DictConfig, name: str, archs: dict[str, Arch], setup: Setup) -> dict:
    """Per-device bytes of one stage, split into weights, gradients, optimizer states and activations."""
    hw, data = cfg.hardware, cfg.data
    world, precision = world_size(cfg), hw.precision
    trained = TRAINED[name]
    total = {"weights": 0.0, "grads": 0.0, "optim": 0.0, "activations": 0.0}
    ds_states = 0.0
    seq = data.max_prompt_len + (cfg.stage.max_new_tokens if name == "ppo" else data.max_answer_len)
    micro = setup.micro_batch * (2 if name in ("reward", "dpo") else 1)  # pairs: chosen and rejected rows
    for key in trained:
        arch = archs[key]
        role = "critic" if (name == "ppo" and key == "reward_model") else key
        trainable = trainable_params(arch, cfg[key], setup.lora[key])
        states = model_states(arch, trainable, setup.zero[role], world, precision, setup)
        for k, v in states.items():
            total[k] += v
        total["activations"] = max(
            total["activations"], activations(arch, micro, seq, precision, setup.checkpointing[key])
        )
        ds_states += deepspeed_estimate(arch, trainable, setup.zero[role], cfg, setup)
    if name == "dpo" and cfg.stage.loss != "simpo" and not cfg.stage.precompute_reference:  # a frozen reference
        total["weights"] += archs["model"].params() * BYTES[precision] / (world if setup.zero["model"] == 3 else 1)
    if name == "ppo":  # frozen reference (actor's shape) and reward model, partitioned like the actor under ZeRO-3
        b = BYTES[precision]
        for key, role in (("model", "model"), ("reward_model", "critic")):
            zero3 = setup.zero[role] == 3
            total["weights"] += archs[key].params() * b / (world if zero3 else 1)
        actor = archs["model"]
        per_rank = ppo_rollouts(cfg.stage) // world
        kv_cache = 2 * actor.layers * per_rank * seq * actor.hidden * actor.kv_heads // actor.heads * b
        total["activations"] = max(total["activations"], kv_cache)
    total["total"] = sum(total.values())
    total["ds_model_states"] = ds_states
    return total


def deepspeed_estimate(arch: Arch, trainable: int, zero: int, cfg: DictConfig, setup: Setup) -> float:
    """DeepSpeed's own estimate of a trained model's states per device (mixed precision, its buffer factors)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    hw = cfg.hardware
    if zero == 3:
        _, device, _ = estimate_zero3_model_states_mem_needs(
            trainable,
            arch.largest_layer(),
            hw.procs_per_node,
            hw.nodes,
            cpu_offload=setup.offload_optimizer,
            cpu_offload_params=setup.offload_params,
        )
    else:
        _, device = estimate_zero2_model_states_mem_needs(
            trainable, hw.procs_per_node, hw.nodes, cpu_offload=setup.offload_optimizer
        )
    frozen = (arch.params() - trainable) * BYTES[hw.precision]  # base weights under LoRA
    return device + frozen / (world_size(cfg) if zero == 3 else 1)


@dataclass
class DataShape:
    """A stage's training rows, their mean prompt and answer tokens (~4 characters each, capped at the maximum)."""

    rows: int
    prompt_tokens: float
    answer_tokens: float


def data_shape(cfg: DictConfig, name: str) -> DataShape | None:
    """The shape of a stage's data when the mix can be read here (built-in, local), else None: nothing downloads."""
    from rlhf.data import stage_rows, usable_in

    name = data_share(name)
    hub = [s.name for s in cfg.data.sources if usable_in(s, name) and not s.path and s.name != "builtin"]
    if hub:  # lengths at their maxima; steps only from stage.max_steps
        if cfg.stage.max_steps <= 0:
            log.warning("dry run: the %s rows come from the hub (%s); set stage.max_steps for estimates", name, hub[0])
        return None
    try:
        rows = stage_rows(cfg.data, name).train
    except Exception as err:  # noqa: BLE001 — e.g. a hub source without network: steps stay unknown
        log.warning("dry run: cannot read the %s rows here (%s); set stage.max_steps for estimates", name, err)
        return None

    def tokens(value, cap: int) -> float:
        text = value if isinstance(value, str) else " ".join(m["content"] for m in value)
        return min(cap, len(text) / 4 + 16)

    sample = rows[:512]
    answer_key = "chosen" if sample and "chosen" in sample[0] else "answer"
    return DataShape(
        rows=len(rows),
        prompt_tokens=sum(tokens(r["prompt"], cfg.data.max_prompt_len) for r in sample) / max(1, len(sample)),
        answer_tokens=sum(tokens(r.get(answer_key, ""), cfg.data.max_answer_len) for r in sample) / max(1, len(sample)),
    )


def stage_work(cfg: DictConfig, name: str, archs: dict[str, Arch], shape: DataShape | None) -> dict:
    """Steps, tokens and FLOPs of one stage (at the maximum lengths when the data cannot be read here)."""
    stage, data = cfg.stage, cfg.data
    if stage.max_steps > 0:
        steps = stage.max_steps
    elif shape is not None:
        steps = max(1, shape.rows * stage.epochs // stage.global_batch)
    else:
        return {"steps": None, "tokens": None, "flops": None}
    prompt = shape.prompt_tokens if shape else data.max_prompt_len
    answer = shape.answer_tokens if shape else data.max_answer_len
    if name == "ppo":
        seq = prompt + stage.max_new_tokens
        samples = steps * ppo_rollouts(stage)
        actor, critic = archs["model"].params(), archs["reward_model"].params()
        ckpt = 8 if cfg.model.gradient_checkpointing else 6
        generation = samples * 2 * actor * seq  # prefill and decoding
        flops = generation + samples * (
            2 * (2 * actor + 2 * critic) * seq  # actor, reference, critic and reward forwards
            + stage.ppo_epochs * ckpt * (actor + critic) * seq
        )
        return {"steps": steps, "tokens": int(samples * seq), "flops": flops, "generation_flops": generation}
    key = TRAINED[name][0]
    seq = prompt + answer
    sequences = steps * stage.global_batch * (2 if name in ("reward", "dpo") else 1)
    ckpt = 8 if cfg[key].gradient_checkpointing else 6
    ckpt += 2 if name == "dpo" and stage.loss != "simpo" else 0  # the reference's forward
    return {"steps": steps, "tokens": int(sequences * seq), "flops": ckpt * archs[key].params() * sequences * seq}


def base_setup(cfg: DictConfig, name: str) -> Setup:
    hw, stage = cfg.hardware, cfg.stage
    zero = {"model": hw.zero_stage}
    if name == "reward":
        zero = {"reward_model": zero_stage_of(cfg, stage.zero_stage)}
    if name == "ppo":
        zero = {r: zero_stage_of(cfg, stage[f"{own}_zero_stage"]) for r, own in (("model", "actor"), ("critic",) * 2)}
    return Setup(
        zero=zero,
        micro_batch=hw.micro_batch,
        checkpointing={k: cfg[k].gradient_checkpointing for k in ("model", "reward_model")},
        lora={k: cfg[k].lora.dim > 0 and cfg[k].lora.only_optimize_lora for k in ("model", "reward_model")},
        offload_optimizer=cfg.optimizer.offload,
        offload_params=hw.offload_params,
        master_weights=cfg.optimizer.master_weights,
    )


def advice(cfg: DictConfig, name: str, archs: dict[str, Arch], setup: Setup, limit: float) -> list[str]:
    """Changes that would make a stage fit, each with the memory it leads to; cumulative until one fits."""
    stage_prefix = "stage." if cfg.stage.name == name else f"stage.{name}."
    keys = {"model": "actor_zero_stage", "critic": "critic_zero_stage", "reward_model": "zero_stage"}  # a stage's own
    changes = []
    if world_size(cfg) > 1:  # ZeRO partitions over devices: one device gains nothing from a higher stage
        for role in setup.zero:
            if setup.zero[role] < 3:
                key = keys.get(role) if name in ("ppo", "reward") else None
                override = f"{stage_prefix}{key}=3" if key else "hardware.zero_stage=3"
                changes.append((override, lambda s, r=role: s.zero.__setitem__(r, 3)))
    at_zero = [f"{stage_prefix}{key}=2" for key in keys.values() if cfg.stage.get(key, -1) == 0]  # set to 0 here
    at_zero += ["hardware.zero_stage=2"] if cfg.hardware.zero_stage == 0 else []
    offload = " ".join(["optimizer=adamw-offload", *at_zero])  # CPU Adam needs ZeRO >= 1
    changes.append((f"{offload} (optimizer states in CPU memory)", lambda s: setattr(s, "offload_optimizer", True)))
    for key in ("model", "reward_model"):
        if key not in TRAINED[name]:
            continue
        if not setup.lora[key]:
            lora = f"{key}.lora.dim=128 {key}.lora.target_modules=[layers.] {key}.lora.only_optimize_lora=true"
            changes.append((lora, lambda s, k=key: s.lora.__setitem__(k, True)))
        if not setup.checkpointing[key]:
            checkpointing = f"{key}.gradient_checkpointing=true"
            changes.append((checkpointing, lambda s, k=key: s.checkpointing.__setitem__(k, True)))

    def offload_params(s: Setup) -> None:
        s.offload_params = True
        for role in s.zero:
            s.zero[role] = 3

    to_three = " ".join(["hardware.zero_stage=3", *(f"{stage_prefix}{k}=3" for k in keys.values() if k in cfg.stage)])
    changes.append((f"{to_three} hardware.offload_params=true (parameters in CPU memory)", offload_params))
    micro = setup.micro_batch
    while micro > 1:
        micro //= 2
        changes.append((f"hardware.micro_batch={micro}", lambda s, m=micro: setattr(s, "micro_batch", m)))
    lines, current = [], copy.deepcopy(setup)
    for text, apply in changes:
        alone = copy.deepcopy(setup)
        apply(alone)
        apply(current)
        alone_gb = stage_memory(cfg, name, archs, alone)["total"] / GB
        together_gb = stage_memory(cfg, name, archs, current)["total"] / GB
        lines.append(f"{text}: {alone_gb:.1f} GB alone, {together_gb:.1f} GB with the changes above")
        if together_gb <= limit:
            lines.append(f"=> fits ({together_gb:.1f} GB <= {limit:.1f} GB) with all of the changes above")
            return lines
    lines.append("=> does not fit even with all of these: use more devices (a larger hardware option)")
    return lines


def plan(cfg: DictConfig) -> tuple[list[dict], dict[str, list[str]]]:
    """The plan's rows (one per stage) and, for stages that do not fit, the advice."""
    root = cache_dir(cfg)
    archs = {key: arch_of(cfg[key], root) for key in ("model", "reward_model")}
    names = list(cfg.stage.stages) if cfg.stage.name == "pipeline" else [cfg.stage.name]
    limit = cfg.hardware.device_memory_gb * HEADROOM
    rows, advised = [], {}
    for name in names:
        sub = stage_config(cfg, name) if cfg.stage.name == "pipeline" else cfg
        setup = base_setup(sub, name)
        memory = stage_memory(sub, name, archs, setup)
        work = stage_work(sub, name, archs, data_shape(sub, name))
        devices, hw = world_size(sub), sub.hardware
        seconds = generation_s = None
        if work["flops"] is not None:
            peak = devices * hw.peak_tflops * 1e12
            generation_s = work.get("generation_flops", 0.0) / (peak * hw.generation_mfu)
            seconds = generation_s + (work["flops"] - work.get("generation_flops", 0.0)) / (peak * hw.expected_mfu)
        fits = memory["total"] / GB <= limit
        rows.append(
            {
                "stage": name,
                "world_size": devices,
                "zero": ", ".join(f"{role} {z}" for role, z in setup.zero.items()),
                "params_m": round(archs["model" if name != "reward" else "reward_model"].params() / 1e6, 1),
                "weights_gb": memory["weights"] / GB,
                "grads_gb": memory["grads"] / GB,
                "optim_gb": memory["optim"] / GB,
                "activations_gb": memory["activations"] / GB,
                "total_gb": memory["total"] / GB,
                "deepspeed_states_gb": memory["ds_model_states"] / GB,
                "device_gb": float(hw.device_memory_gb),
                "fits": "yes" if fits else "NO",
                "steps": work["steps"] if work["steps"] is not None else "?",
                "tokens": work["tokens"] if work["tokens"] is not None else "?",
                "est_time": format_seconds(seconds) if seconds is not None else "?",
                "est_s": seconds if seconds is not None else "?",
                "est_gen_frac": generation_s / seconds if seconds else "?",
                "est_cost_usd": seconds / 3600 * devices * hw.cost_per_device_hour if seconds is not None else "?",
            }
        )
        if not fits:
            advised[name] = advice(sub, name, archs, setup, limit)
    return rows, advised


def dry_run(cfg: DictConfig, run_dir: Path | None = None) -> int:
    """Print (and write to the run folder) the plan; 0 when every stage fits, 1 when one does not, 2 when a model's
    size is unknown."""
    try:
        rows, advised = plan(cfg)
    except PlanError as err:
        log.error("dry run: %s", err)
        return 2
    hw = cfg.hardware
    text = [
        f"dry run: {cfg.stage.name} of {cfg.model.name} (reward/critic {cfg.reward_model.name}) on {hw.name}: "
        f"{hw.nodes} node(s) x {hw.procs_per_node} {hw.accelerator.value} device(s) of {hw.device_memory_gb:g} GB, "
        f"{hw.precision.value}, {hw.peak_tflops:g} TFLOP/s peak x {hw.expected_mfu:g} MFU ({hw.generation_mfu:g} in "
        f"PPO's sampling), ${hw.cost_per_device_hour:g} per device-hour (memory in GB per device; nothing loaded)",
        markdown_table(rows),
    ]
    for name, lines in advised.items():
        text.append(
            f"stage {name} does not fit in {hw.device_memory_gb * HEADROOM:.1f} GB per device ({HEADROOM:.0%} of "
            f"{hw.device_memory_gb:g} GB: the rest is left to the allocator and buffers); changes that help:"
        )
        text += [f"  - {line}" for line in lines]
    report = "\n".join(text)
    print(report)
    if run_dir is not None:
        for name in [row["stage"] for row in rows]:  # what DeepSpeed will be given, for a DeepSpeed user to read
            sub = stage_config(cfg, name) if cfg.stage.name == "pipeline" else cfg
            (run_dir / f"ds_config.{name}.json").write_text(json.dumps(stage_configs(sub, name), indent=2))
        (run_dir / "plan.md").write_text(report + "\n")
        (run_dir / "plan.json").write_text(json.dumps({"stages": rows, "advice": advised}, indent=2, default=str))
        save_resolved(cfg, run_dir)
    return 1 if advised else 0
