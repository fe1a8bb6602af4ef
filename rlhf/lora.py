"""LoRA written here (peft is not yet used): a frozen Linear plus a trainable low-rank update, wrapping named
modules, merging the update back for generation and for saving in Hugging Face format."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from omegaconf import DictConfig
from torch import nn


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update: y = W x + (alpha / r) * B A x."""

    def __init__(self, base: nn.Linear, dim: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.scaling = alpha / dim
        self.lora_a = nn.Parameter(torch.empty(dim, base.in_features, dtype=base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, dim, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False  # the update folded into base.weight (for generation): forward skips the low-rank path
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        return self.base(x) + (self.dropout(x) @ self.lora_a.t() @ self.lora_b.t()) * self.scaling


@contextmanager
def merged_lora(model: torch.nn.Module) -> Iterator[None]:
    """Fold each LoRA update into its base weight for the duration (generation then runs plain Linears) and put
    the original weights back afterwards."""
    wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
    saved = []
    with torch.no_grad():
        for m in wrapped:
            saved.append(m.base.weight.data.clone())
            m.base.weight.data += (m.lora_b @ m.lora_a).to(m.base.weight.dtype) * m.scaling
            m.merged = True
    try:
        yield
    finally:
        with torch.no_grad():
            for m, weight in zip(wrapped, saved, strict=True):
                m.base.weight.data.copy_(weight)
                m.merged = False


def apply_lora(model: nn.Module, lora_cfg: DictConfig) -> int:
    """Wrap every Linear whose name contains a target substring; return how many were wrapped (0 when none
    matches: the caller says what that means for its model option)."""
    if lora_cfg.dim <= 0:
        return 0
    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(t in name for t in lora_cfg.target_modules)
    ]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), lora_cfg.dim, lora_cfg.alpha, lora_cfg.dropout))
    if lora_cfg.only_optimize_lora:
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)
    return len(targets)


def merge_lora_state_dict(state: dict[str, torch.Tensor], scalings: dict[str, float]) -> dict[str, torch.Tensor]:
    """A plain state dict from one with LoRA entries: W + scaling * B A folded into each wrapped Linear's weight.

    `scalings` maps each LoRALinear's module name to its alpha / dim. Works on gathered (full) tensors, so it serves
    every ZeRO stage alike.
    """
    merged = {k: v for k, v in state.items() if ".lora_" not in k}
    for prefix, scaling in scalings.items():
        for key in [k for k in merged if k.startswith(f"{prefix}.base.")]:
            merged[f"{prefix}.{key[len(prefix) + 6 :]}"] = merged.pop(key)
        weight = merged[f"{prefix}.weight"]
        delta = state[f"{prefix}.lora_b"].float() @ state[f"{prefix}.lora_a"].float()
        merged[f"{prefix}.weight"] = (weight.float() + scaling * delta).to(weight.dtype)
    return merged


def lora_scalings(model: nn.Module) -> dict[str, float]:
    return {name: m.scaling for name, m in model.named_modules() if isinstance(m, LoRALinear)}
