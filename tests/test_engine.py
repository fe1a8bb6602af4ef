"""LR schedules and the DeepSpeed config built from the composed config."""

from __future__ import annotations

import math

import pytest

from rlhf.compose import compose
from rlhf.engine import deepspeed_config, lr_factor
from rlhf.stage_schemas import Schedule


def test_warmup_then_cosine_reaches_min_ratio() -> None:
    factors = [lr_factor(s, warmup=4, total=20, schedule=Schedule.cosine, min_ratio=0.1) for s in range(20)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))
    assert lr_factor(20, 4, 20, Schedule.cosine, 0.1) == pytest.approx(0.1)
    mid = lr_factor(12, 4, 20, Schedule.cosine, 0.0)
    assert mid == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_linear_and_constant_schedules() -> None:
    assert lr_factor(5, 0, 10, Schedule.linear, 0.0) == pytest.approx(0.5)
    assert lr_factor(10, 0, 10, Schedule.linear, 0.2) == pytest.approx(0.2)
    assert lr_factor(7, 0, 10, Schedule.constant, 0.0) == 1.0


def test_deepspeed_config_follows_hardware_and_stage() -> None:
    cfg = compose(["hardware=cpu-2proc", "stage=sft", "stage.global_batch=32", "hardware.precision=bf16"])
    ds = deepspeed_config(cfg)
    assert ds["train_batch_size"] == 32
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4  # 32 / (2 ranks x 4)
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == cfg.stage.grad_clip


def test_offload_settings_reach_deepspeed() -> None:
    cfg = compose(["optimizer=adamw-offload", "stage=sft", "hardware.zero_stage=3", "hardware.offload_params=true"])
    zero = deepspeed_config(cfg)["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_process_at_zero_0_skips_the_all_reduce_with_the_same_update(dist_process_group, precision) -> None:
    import torch

    from rlhf.engine import initialize
    from rlhf.models import load_causal_lm, load_tokenizer

    cfg = compose(["experiment=tiny", "stage=sft", f"hardware.precision={precision}", "hardware.micro_batch=2"])
    tokenizer = load_tokenizer(cfg.model)
    ids = torch.randint(5, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    weights = []
    for all_reduce in (False, True):
        engine = initialize(load_causal_lm(cfg.model, tokenizer, seed=3), cfg, total_steps=4, accumulation=1)
        assert engine.enable_backward_allreduce is False
        engine.enable_backward_allreduce = all_reduce
        for _ in range(2):
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
        weights.append(torch.cat([p.detach().float().flatten() for p in engine.module.parameters()]))
    assert torch.equal(weights[0], weights[1])
    start = load_causal_lm(cfg.model, tokenizer, seed=3).to(next(engine.module.parameters()).dtype)
    assert not torch.equal(torch.cat([p.detach().float().flatten() for p in start.parameters()]), weights[0])
