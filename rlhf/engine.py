"""DeepSpeed engines: the config built from `hardware`/`optimizer`/`stage`, the optimizer, and the LR schedule."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import sys
from functools import partial

import torch
from omegaconf import DictConfig

from rlhf import rewards
from rlhf.config import DType, grad_accum_steps, ppo_rollouts, world_size
from rlhf.optim import KahanAdamW, MasterWeightAdamW
from rlhf.stage_schemas import Schedule

log = logging.getLogger(__name__)


def lr_factor(step: int, warmup: int, total: int, schedule: Schedule, min_ratio: float) -> float:
    """Multiplier of the base LR at optimizer step `step`: linear warmup, then cosine/linear decay or constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == Schedule.constant or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == Schedule.cosine else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


def quiet_initialize(**kwargs):
    """`deepspeed.initialize` without the memory report it prints to stdout for every bf16 engine (a PPO run
    builds four); the report is shown when the call fails."""
    import deepspeed

    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            return deepspeed.initialize(**kwargs)
    except BaseException:
        sys.stdout.write(captured.getvalue())
        raise


def zero_stage_of(cfg: DictConfig, own: int | None) -> int:
    """A model's ZeRO stage: its own setting where one is given (>= 0), else hardware.zero_stage."""
    return cfg.hardware.zero_stage if own is None or own < 0 else own


def deepspeed_config(cfg: DictConfig, zero_stage: int | None = None, accumulation: int | None = None) -> dict:
    """The DeepSpeed config of a training engine (ZeRO stage and gradient accumulation default to the run's)."""
    hw = cfg.hardware
    zero_stage = zero_stage_of(cfg, zero_stage)
    accumulation = grad_accum_steps(cfg) if accumulation is None else accumulation
    zero: dict = {"stage": zero_stage}
    if zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=10_000, stage3_prefetch_bucket_size=5e7)
        if hw.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": hw.accelerator != "cpu"}
    if cfg.optimizer.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": hw.accelerator != "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": hw.micro_batch,
        "gradient_accumulation_steps": accumulation,
        "zero_optimization": zero,
        "bf16": {"enabled": hw.precision == DType.bf16},
        "fp16": {"enabled": hw.precision == DType.fp16, "loss_scale_window": 100},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "train_batch_size": hw.micro_batch * accumulation * world_size(cfg),
        "gradient_clipping": cfg.stage.grad_clip,
    }
    return config


def ppo_accumulation(cfg: DictConfig) -> int:
    """Micro-batches per PPO optimizer step on each rank: the iteration's rollouts split into `mini_batches`."""
    per_rank = ppo_rollouts(cfg.stage) // world_size(cfg)
    return per_rank // (cfg.stage.mini_batches * cfg.hardware.micro_batch)


def stage_configs(cfg: DictConfig, name: str) -> dict[str, dict]:
    """The DeepSpeed configs of a stage's engines by role, as the stage will build them (PPO's frozen reference
    and reward model included)."""
    stage = cfg.stage
    if name == "sft":
        return {"model": deepspeed_config(cfg)}
    if name == "reward":
        return {"reward_model": deepspeed_config(cfg, stage.zero_stage)}
    if name == "dpo":
        reference = {} if stage.loss == "simpo" else {"reference": frozen_config(cfg, cfg.hardware.zero_stage)}
        return {"model": deepspeed_config(cfg)} | reference
    configs = {"actor": deepspeed_config(cfg, stage.actor_zero_stage, ppo_accumulation(cfg))}
    if stage.advantage == "gae":
        configs["critic"] = deepspeed_config(cfg, stage.critic_zero_stage, ppo_accumulation(cfg))
    if stage.kl_coef > 0:
        configs["reference"] = frozen_config(cfg, zero_stage_of(cfg, stage.actor_zero_stage))
    if rewards.MODEL in stage.reward_funcs:
        configs["reward_model"] = frozen_config(cfg, cfg.hardware.zero_stage)
    return configs


def param_groups(model: torch.nn.Module, opt_cfg: DictConfig, lr: float | None = None) -> list[dict]:
    """Trainable parameters split into decayed, non-decayed (biases, norms) and LoRA (own LR) groups."""
    lr = opt_cfg.lr if lr is None else lr
    groups = {
        "decay": {"params": [], "weight_decay": opt_cfg.weight_decay, "lr": lr},
        "no_decay": {"params": [], "weight_decay": 0.0, "lr": lr},
        "lora": {"params": [], "weight_decay": 0.0, "lr": opt_cfg.lora_lr},
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_" in name:
            key = "lora"
        elif param.ndim < 2 or "norm" in name.lower() or name.endswith(".bias"):
            key = "no_decay"
        else:
            key = "decay"
        groups[key]["params"].append(param)
    return [g for g in groups.values() if g["params"]]


def build_optimizer(model: torch.nn.Module, opt_cfg: DictConfig, lr: float | None = None) -> torch.optim.Optimizer:
    groups = param_groups(model, opt_cfg, lr)
    betas = tuple(opt_cfg.betas)
    if opt_cfg.offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=groups[0]["lr"], betas=betas, eps=opt_cfg.eps, adamw_mode=True)
    # fused: one vectorised kernel over all tensors, much faster on CPU than the per-tensor loop (docs/performance.md)
    return torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=betas, eps=opt_cfg.eps, fused=True)


def initialize(
    model: torch.nn.Module,
    cfg: DictConfig,
    total_steps: int,
    lr: float | None = None,
    zero_stage: int | None = None,
    accumulation: int | None = None,
):
    """A DeepSpeed training engine for `model` with AdamW (or CPU Adam) and the configured schedule; `lr`,
    `zero_stage` and `accumulation` override the run's (PPO's actor and critic differ)."""
    opt = cfg.optimizer
    config = deepspeed_config(cfg, zero_stage, accumulation)
    if config["bf16"]["enabled"] and config["zero_optimization"]["stage"] == 0 and not opt.offload:
        # bf16 without ZeRO: our fp32-master (or Kahan-compensated) AdamW, built before the model is rounded, not
        # DeepSpeed's per-tensor wrapper; DeepSpeed then runs the bf16 model as is and leaves clipping to the optimizer
        groups = param_groups(model, opt, lr)
        kind = MasterWeightAdamW if opt.master_weights else KahanAdamW
        optimizer = kind(
            groups, max_grad_norm=cfg.stage.grad_clip, lr=groups[0]["lr"], betas=tuple(opt.betas), eps=opt.eps
        )
        model.to(torch.bfloat16)
        config["bf16"]["enabled"], config["gradient_clipping"] = False, 0.0
    else:
        if config["bf16"]["enabled"] and not opt.master_weights:
            log.warning(
                "optimizer.master_weights=false applies at ZeRO 0 without offload; this engine (ZeRO %d) keeps "
                "DeepSpeed's fp32 masters",
                config["zero_optimization"]["stage"],
            )
        optimizer = build_optimizer(model, opt, lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        partial(
            lr_factor,
            warmup=opt.warmup_steps,
            total=total_steps,
            schedule=opt.schedule,
            min_ratio=opt.min_lr_ratio,
        ),
    )
    engine, *_ = quiet_initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=config)
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        # alone, DeepSpeed's all-reduce only flattens every gradient into a buffer and copies it back (a cost per
        # step, docs/performance.md); ZeRO stages need the call, as it fills their gradient partitions
        engine.enable_backward_allreduce = False
    return engine


def frozen_config(cfg: DictConfig, zero_stage: int) -> dict:
    """The DeepSpeed config of a model that only runs forward (PPO's reference and reward models): no optimizer;
    ZeRO-3 partitions it (and `hardware.offload_params` puts it in CPU memory) when the run uses ZeRO-3."""
    hw = cfg.hardware
    zero: dict = {"stage": 3 if zero_stage == 3 else 0}
    if zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = 10_000
        if hw.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": hw.accelerator != "cpu"}
    return {
        "train_micro_batch_size_per_gpu": hw.micro_batch,
        "train_batch_size": hw.micro_batch * world_size(cfg),
        "zero_optimization": zero,
        "bf16": {"enabled": hw.precision == DType.bf16},
        "fp16": {"enabled": hw.precision == DType.fp16},
        "steps_per_print": 10**9,
    }


def initialize_frozen(model: torch.nn.Module, cfg: DictConfig, zero_stage: int):
    """A DeepSpeed engine of `frozen_config` for a model that only runs forward."""
    model.requires_grad_(False)
    engine, *_ = quiet_initialize(model=model, config=frozen_config(cfg, zero_stage))
    engine.eval()
    return engine
