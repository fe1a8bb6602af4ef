"""The rollout engine against `transformers.generate`: the same greedy tokens, EOS handling and left padding."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from rlhf import decoder, rollout
from rlhf.data.tokenize import pad_left
from rlhf.rollout import response_mask
from rlhf.stages.ppo_models import actor_logprobs

EOS, PAD = 2, 0


def tiny_model(seed: int = 0, config_class: type = LlamaConfig) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = config_class(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.5,  # large random weights: greedy tokens vary from step to step and row to row
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def prompts(lengths: list[int], seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, 97, (n,), generator=gen).tolist() for n in lengths]
    return pad_left(rows, PAD)


def hf_greedy(model, batch: dict, new: int, eos: int) -> torch.Tensor:
    return model.generate(**batch, max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=PAD)


def test_greedy_matches_generate_token_for_token_with_left_padding() -> None:
    model = tiny_model()
    batch = prompts([5, 9, 3, 12])
    ours = rollout.generate(model, batch["input_ids"], batch["attention_mask"], 16, EOS, PAD, temperature=0).sequences
    theirs = hf_greedy(model, batch, 16, EOS)
    assert ours.shape == theirs.shape == (4, 12 + 16)
    assert torch.equal(ours, theirs)
    assert len(set(ours[:, 12:].flatten().tolist())) > 5  # a real test: varied tokens


def test_rows_stop_at_eos_and_the_loop_ends_when_all_have() -> None:
    model = tiny_model()
    batch = prompts([5, 9, 3, 12])
    free = rollout.generate(model, batch["input_ids"], batch["attention_mask"], 16, EOS, PAD, temperature=0).sequences
    eos = int(free[1, 12 + 3])  # row 1's fourth token becomes the end-of-sequence token
    ours = rollout.generate(model, batch["input_ids"], batch["attention_mask"], 16, eos, PAD, temperature=0).sequences
    theirs = hf_greedy(model, batch, 16, eos)
    assert torch.equal(ours, theirs[:, : ours.shape[1]])
    row = ours[1, 12:].tolist()
    stop = row.index(eos)
    assert stop <= 3 and all(t == PAD for t in row[stop + 1 :])
    everyone = torch.full((4, 12), eos)  # every row ends on its first token: one step, no more
    single = rollout.generate(model, everyone, torch.ones_like(everyone), 16, eos, PAD, temperature=0).sequences
    assert single.shape[1] <= 12 + 16


def test_sampling_follows_temperature_and_top_p() -> None:
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]] * 2000)
    gen = torch.Generator().manual_seed(0)
    tight = rollout.sample_next(logits, 1.0, 0.5, gen)
    assert (tight == 2).all()  # the top token alone holds more than half of the mass
    loose = rollout.sample_next(logits, 1.0, 1.0, gen)
    share = (loose == 2).float().mean().item()
    expected = torch.softmax(logits[0], dim=0)[2].item()
    assert abs(share - expected) < 0.04
    hot = rollout.sample_next(logits, 5.0, 1.0, gen)
    assert (hot == 2).float().mean().item() < share - 0.2


@pytest.mark.slow
def test_greedy_matches_generate_on_the_embedded_model() -> None:
    from rlhf.compose import compose
    from rlhf.data import builtin
    from rlhf.data.tokenize import PromptFormat, encode_prompts
    from rlhf.models import load_causal_lm, load_tokenizer

    cfg = compose(["stage=ppo"])
    tokenizer = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, tokenizer, 0).eval()
    fmt = PromptFormat.for_tokenizer(tokenizer, cfg.data)
    ids, _ = encode_prompts(tokenizer, fmt, [p.prompt for p in builtin.generate(8, 3)], 192)
    batch = pad_left(ids, tokenizer.pad_token_id)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ours = rollout.generate(model, batch["input_ids"], batch["attention_mask"], 32, eos, pad, temperature=0).sequences
    theirs = model.generate(**batch, max_new_tokens=32, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    assert torch.equal(ours, theirs[:, : ours.shape[1]])


def test_min_new_tokens_keeps_eos_out_and_matches_generate() -> None:
    model = tiny_model()
    batch = prompts([5, 9, 3, 12])
    free = rollout.generate(model, batch["input_ids"], batch["attention_mask"], 16, EOS, PAD, temperature=0).sequences
    eos = int(free[0, 12])  # row 0's first token: with it as EOS, row 0 would stop at once
    ours = rollout.generate(
        model, batch["input_ids"], batch["attention_mask"], 16, eos, PAD, temperature=0, min_new_tokens=16
    ).sequences
    theirs = model.generate(
        **batch, max_new_tokens=16, min_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=PAD
    )
    assert ours.shape == (4, 12 + 16) and not (ours[:, 12:] == eos).any()
    assert torch.equal(ours, theirs)


def test_models_outside_the_decoder_run_their_own_forward_and_match_generate() -> None:
    model = tiny_model(config_class=Qwen2Config)
    assert "qwen2" in decoder.unsupported(model)
    assert isinstance(rollout.stepper(model, 4, 28), rollout._StaticCacheStepper)
    assert isinstance(rollout.stepper(tiny_model(), 4, 28), rollout._DecoderStepper)
    batch = prompts([5, 9, 3, 12])
    ours = rollout.generate(model, batch["input_ids"], batch["attention_mask"], 16, EOS, PAD, temperature=0).sequences
    assert torch.equal(ours, hf_greedy(model, batch, 16, EOS)[:, : ours.shape[1]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rollout_logprobs_equal_a_fresh_forward(dtype: torch.dtype) -> None:
    """PPO reuses them as its old log-probs: they must be the actor's, at the sampling temperature, EOS included."""
    model = tiny_model().to(dtype)
    batch = prompts([5, 9, 3, 12])
    free = rollout.generate(model, batch["input_ids"], batch["attention_mask"], 16, EOS, PAD, temperature=0)
    eos = int(free.sequences[2, 12 + 5])  # row 2 stops early: its log-probs end at its EOS
    out = rollout.generate(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        16,
        eos,
        PAD,
        temperature=0.7,
        generator=torch.Generator().manual_seed(3),
        min_new_tokens=2,
    )
    mask = response_mask(out.sequences[:, 12:], eos)
    full_mask = torch.cat([batch["attention_mask"], mask], dim=1)
    with torch.no_grad():
        fresh = actor_logprobs(model, out.sequences, full_mask, 12, 0.7).float()
    assert out.logprobs.shape == fresh.shape and mask.sum() < mask.numel()  # some row did stop early
    assert torch.equal(out.logprobs * mask, out.logprobs)  # 0 after EOS
    gap = ((out.logprobs - fresh) * mask).abs().max()
    if dtype == torch.float32:
        assert gap < 1e-4
    else:  # within bf16's own error: the gap between the bf16 and the fp32 forward of the same tokens
        with torch.no_grad():
            exact = actor_logprobs(model.float(), out.sequences, full_mask, 12, 0.7)
        assert gap <= ((fresh - exact) * mask).abs().max()
    assert (fresh * mask).sum() < -1.0  # sampled at 0.7 from large random weights: real log-probs, not ~0


def test_several_samples_per_prompt_share_the_prompt_and_equal_repeated_prompts() -> None:
    model = tiny_model()
    batch = prompts([5, 9, 3])
    shared = rollout.generate(
        model, batch["input_ids"], batch["attention_mask"], 10, EOS, PAD, temperature=0, samples_per_prompt=3
    )
    repeated = rollout.generate(
        model,
        batch["input_ids"].repeat_interleave(3, dim=0),
        batch["attention_mask"].repeat_interleave(3, dim=0),
        10,
        EOS,
        PAD,
        temperature=0,
    )
    assert shared.sequences.shape[0] == 9
    assert torch.equal(shared.sequences, repeated.sequences)  # greedy: the three copies of a prompt agree
    torch.testing.assert_close(shared.logprobs, repeated.logprobs)
    torch.manual_seed(0)
    sampled = rollout.generate(
        model, batch["input_ids"], batch["attention_mask"], 10, EOS, PAD, temperature=1.5, samples_per_prompt=3
    ).sequences
    assert torch.equal(sampled[:, :9], batch["input_ids"].repeat_interleave(3, dim=0))
    assert not torch.equal(sampled[0, 9:], sampled[1, 9:])  # sampled copies of one prompt differ
