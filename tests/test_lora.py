"""LoRA: wrapping, which parameters train, and merging into a plain state dict."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, LlamaConfig

from rlhf.config import LoraConfig
from rlhf.lora import LoRALinear, apply_lora, lora_scalings, merge_lora_state_dict


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    return AutoModelForCausalLM.from_config(config)


def lora_cfg(**kw) -> OmegaConf:
    return OmegaConf.structured(LoraConfig(**kw))


def test_only_lora_parameters_are_trainable() -> None:
    model = tiny_llama()
    wrapped = apply_lora(model, lora_cfg(dim=4, target_modules=["self_attn.q_proj", "mlp."], only_optimize_lora=True))
    assert wrapped == 2 * 4  # q_proj + 3 MLP projections per layer
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)


def test_merged_state_dict_gives_the_same_outputs() -> None:
    model = tiny_llama()
    apply_lora(model, lora_cfg(dim=4, alpha=8.0, target_modules=["proj"]))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_b.normal_()
    ids = torch.randint(0, 128, (2, 9))
    expected = model(input_ids=ids).logits
    merged = merge_lora_state_dict(model.state_dict(), lora_scalings(model))
    assert not any("lora_" in k or ".base." in k for k in merged)
    plain = tiny_llama()
    plain.load_state_dict(merged)
    torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
