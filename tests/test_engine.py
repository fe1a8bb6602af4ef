"""LR schedules and the DeepSpeed config built from the composed config."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.compose import compose
from rlhf.engine import deepspeed_config, lr_factor
from rlhf.optim import KahanAdamW, MasterWeightAdamW
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


def adamw_trajectory(kind: str, weights: list[torch.Tensor], steps: int = 200) -> list[torch.Tensor]:
    """The weights after `steps` AdamW steps (lr 1e-4, clipping at 1) on the same random gradients: `fp32` torch's
    AdamW in fp32 (the reference), `masters` MasterWeightAdamW, `kahan` KahanAdamW, `bf16` torch's AdamW on bf16
    weights (pure bf16, no compensation)."""
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    settings = {"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.01}
    groups = [{"params": params}]
    if kind in ("fp32", "bf16"):
        optimizer = torch.optim.AdamW(groups, fused=True, **settings)
    else:
        optimizer = (MasterWeightAdamW if kind == "masters" else KahanAdamW)(groups, max_grad_norm=1.0, **settings)
    if kind != "fp32":
        for p in params:
            p.data = p.data.to(torch.bfloat16)
    grads = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=grads).add_(0.3).to(p.dtype)  # a drift every step shares
        if kind in ("fp32", "bf16"):
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
    if kind in ("masters", "kahan"):
        return [optimizer.master_of(p) for p in params]
    return [p.detach().float() for p in params]


def test_kahan_bf16_adamw_follows_the_fp32_step_where_pure_bf16_loses_it() -> None:
    torch.manual_seed(0)
    weights = [torch.randn(64, 64) * 0.5, torch.ones(64), torch.randn(300) * 0.05]
    reference = adamw_trajectory("fp32", weights)
    moved = torch.cat([(r - w).flatten() for r, w in zip(reference, weights, strict=True)]).abs().mean()

    def error(kind: str) -> float:
        got = adamw_trajectory(kind, weights)
        return torch.cat([(g - r).flatten() for g, r in zip(got, reference, strict=True)]).abs().mean() / moved

    kahan, masters, pure = error("kahan"), error("masters"), error("bf16")
    assert masters < 0.01 and kahan < 0.02  # both follow the fp32 step
    assert pure > 0.3  # rounding to bf16 at every step loses most of the update


def test_kahan_adamw_state_round_trips_and_starts_from_the_fp32_weights() -> None:
    torch.manual_seed(0)
    weight = torch.randn(32, 16)
    param = torch.nn.Parameter(weight.clone())
    optimizer = KahanAdamW([{"params": [param]}], max_grad_norm=1.0, lr=1e-3)
    param.data = param.data.to(torch.bfloat16)
    torch.testing.assert_close(optimizer.master_of(param), weight, rtol=2e-5, atol=0)  # the cast's rounding kept
    param.grad = torch.randn(32, 16).to(torch.bfloat16)
    optimizer.step()
    other = torch.nn.Parameter(param.detach().clone())
    restored = KahanAdamW([{"params": [other]}], max_grad_norm=1.0, lr=1e-3)
    restored.load_state_dict(optimizer.state_dict())
    for p in (param, other):
        p.grad = torch.ones(32, 16, dtype=torch.bfloat16)
    optimizer.step(), restored.step()
    assert torch.equal(param, other) and torch.equal(optimizer.master_of(param), restored.master_of(other))
    assert optimizer.state[param]["step"].item() == 2
