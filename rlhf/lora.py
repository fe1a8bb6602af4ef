"""LoRA through peft: `model.lora.*` mapped onto peft's LoraConfig and injected in place (the model keeps its own
class and module names), folded into the base weights for generation and for saving in Hugging Face format, and the
adapter saved in peft's format, loadable with `PeftModel.from_pretrained`."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig
from peft import LoraConfig, PeftModel, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

ADAPTER = "default"  # peft's name for the one adapter a model carries
ADAPTER_DIR = "adapter"  # beside the merged model: <stage>/final/adapter
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # how PeftModel names the wrapped model's parameters in a saved adapter


def target_names(model: nn.Module, substrings: list[str]) -> list[str]:
    """peft's `target_modules` for our substrings of Linear module names: the Linears' leaf names (q_proj, ...) when
    those pick exactly the same Linears, else their full names (peft matches a name exactly or as a suffix)."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    chosen = [name for name in linears if any(s in name for s in substrings)]
    leaves = sorted({name.rpartition(".")[2] for name in chosen})
    same_by_leaf = [name for name in linears if name.rpartition(".")[2] in leaves] == chosen
    return leaves if same_by_leaf else chosen


def apply_lora(model: nn.Module, lora_cfg: DictConfig) -> int:
    """Inject LoRA into every Linear whose name contains a target substring; return how many (0 when none matches:
    the caller says what that means for its model option). The wrapped Linears' own weights are frozen; the rest
    train unless `only_optimize_lora`."""
    if lora_cfg.dim <= 0:
        return 0
    targets = target_names(model, list(lora_cfg.target_modules))
    if not targets:
        return 0
    trainable = {name: param.requires_grad for name, param in model.named_parameters()}
    config = LoraConfig(
        r=lora_cfg.dim, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout, target_modules=targets
    )
    inject_adapter_in_model(config, model, ADAPTER)
    if not lora_cfg.only_optimize_lora:  # peft freezes all but the adapters: give the rest back what it had
        for name, param in model.named_parameters():
            if ".lora_" not in name and ".base_layer." not in name:
                param.requires_grad_(trainable[name])
    return len(lora_layers(model))


def lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [module for module in model.modules() if isinstance(module, LoraLayer)]


def base_weight(module: nn.Module) -> torch.Tensor:
    """A Linear's weight, or a LoRA layer's base weight once the update is merged into it (the decoder packs it)."""
    if isinstance(module, LoraLayer):
        if not module.merged:
            raise ValueError("the decoder needs LoRA merged into the base weights (see lora.merged_lora)")
        return module.get_base_layer().weight
    return module.weight


@contextmanager
def merged_lora(model: nn.Module) -> Iterator[None]:
    """Fold each LoRA update into its base weight for the duration (generation then runs the base Linears) and put
    the original weights back afterwards, bit for bit: peft's unmerge subtracts the update again, which in bf16
    would drift a little at every rollout."""
    layers = lora_layers(model)
    saved = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    with torch.no_grad():
        for layer in layers:
            layer.merge(adapter_names=[ADAPTER])
    try:
        yield
    finally:
        with torch.no_grad():
            for layer, weight in zip(layers, saved, strict=True):
                layer.unmerge()
                layer.get_base_layer().weight.copy_(weight)


def lora_scalings(model: nn.Module) -> dict[str, float]:
    """Each LoRA layer's module name -> alpha / rank."""
    return {name: m.scaling[ADAPTER] for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def merge_lora_state_dict(state: dict[str, torch.Tensor], scalings: dict[str, float]) -> dict[str, torch.Tensor]:
    """A plain state dict from one with LoRA entries: W + scaling * B A folded into each LoRA layer's base weight,
    under the Linear's own name. `scalings` from `lora_scalings`. Works on gathered (full) tensors, so it serves
    every ZeRO stage alike."""
    merged = {k: v for k, v in state.items() if ".lora_" not in k}
    for prefix, scaling in scalings.items():
        base = f"{prefix}.base_layer."
        for key in [k for k in merged if k.startswith(base)]:
            merged[f"{prefix}.{key[len(base) :]}"] = merged.pop(key)
        weight = merged[f"{prefix}.weight"]
        delta = state[f"{prefix}.lora_B.{ADAPTER}.weight"].float() @ state[f"{prefix}.lora_A.{ADAPTER}.weight"].float()
        merged[f"{prefix}.weight"] = (weight.float() + scaling * delta).to(weight.dtype)
    return merged


def save_adapter(state: dict[str, torch.Tensor], model: nn.Module, base: str, folder: Path) -> None:
    """The adapter in peft's format (`adapter_config.json`, `adapter_model.safetensors`) from a full state dict of
    `model`; `base` is the model folder or hub id it applies to."""
    from safetensors.torch import save_file

    config = copy.deepcopy(model.peft_config[ADAPTER])
    config.base_model_name_or_path, config.task_type = base, "CAUSAL_LM"
    weights = {
        PEFT_PREFIX + name.replace(f".{ADAPTER}.", "."): value.contiguous()
        for name, value in state.items()
        if ".lora_" in name
    }
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file(weights, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder).expanduser() / ADAPTER_CONFIG).is_file()


def adapter_base(folder: str | Path) -> str:
    """The model folder or hub id a saved adapter applies to (its `base_model_name_or_path`)."""
    return json.loads((Path(folder).expanduser() / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or ""


def merge_saved_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """`model` (the adapter's base) with a saved adapter loaded through peft and merged in: a plain model again."""
    return PeftModel.from_pretrained(model, str(Path(folder).expanduser())).merge_and_unload()
