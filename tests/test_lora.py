"""LoRA through peft: our target substrings as peft names, which parameters train, merging for generation and into
a plain state dict."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, LlamaConfig

from rlhf.config import LoraConfig
from rlhf.lora import apply_lora, base_weight, lora_scalings, merge_lora_state_dict, merged_lora, target_names


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


def test_substring_targets_become_peft_names_that_pick_the_same_linears() -> None:
    model = tiny_llama()
    assert target_names(model, ["layers."]) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    assert target_names(model, ["self_attn.q_proj", "mlp."]) == ["down_proj", "gate_proj", "q_proj", "up_proj"]
    assert target_names(model, ["layers.1.self_attn.q"]) == ["model.layers.1.self_attn.q_proj"]  # one layer only
    assert target_names(model, ["nothing"]) == []


def test_only_lora_parameters_are_trainable() -> None:
    model = tiny_llama()
    wrapped = apply_lora(model, lora_cfg(dim=4, target_modules=["self_attn.q_proj", "mlp."], only_optimize_lora=True))
    assert wrapped == 2 * 4  # q_proj + 3 MLP projections per layer
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)


def test_without_only_lora_the_rest_trains_but_the_wrapped_linears_do_not() -> None:
    model = tiny_llama()
    model.model.norm.weight.requires_grad_(False)  # frozen before: stays frozen
    apply_lora(model, lora_cfg(dim=4, target_modules=["q_proj"]))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"model.norm.weight"} | {f"model.layers.{i}.self_attn.q_proj.base_layer.weight" for i in (0, 1)}


def test_merged_state_dict_gives_the_same_outputs() -> None:
    model = tiny_llama()
    apply_lora(model, lora_cfg(dim=4, alpha=8.0, target_modules=["proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B" in name:
                param.normal_()
    ids = torch.randint(0, 128, (2, 9))
    expected = model(input_ids=ids).logits
    merged = merge_lora_state_dict(model.state_dict(), lora_scalings(model))
    assert not any("lora_" in k or ".base_layer." in k for k in merged)
    plain = tiny_llama()
    plain.load_state_dict(merged)
    torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    with merged_lora(model):
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            base_weight(model.model.layers[0].mlp.up_proj), merged["model.layers.0.mlp.up_proj.weight"]
        )


def test_merging_for_generation_puts_the_bf16_weights_back_bit_for_bit() -> None:
    model = tiny_llama().to(torch.bfloat16)
    apply_lora(model, lora_cfg(dim=4, alpha=8.0, target_modules=["proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B" in name:
                param.normal_()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        with merged_lora(model):
            assert not torch.equal(
                model.model.layers[0].self_attn.q_proj.base_layer.weight,
                before["model.layers.0.self_attn.q_proj.base_layer.weight"],
            )
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="needs LoRA merged"):
        base_weight(model.model.layers[0].self_attn.q_proj)
