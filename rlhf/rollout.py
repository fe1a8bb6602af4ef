"""The rollout engine: batched sampling for PPO under our control, the base for a rollout faster than
`transformers.generate` (on this CPU it matches generate's speed so far, no more; `stage.rollout=engine` opts in).

Left-padded prompts are handled through position ids and one preallocated KV cache with a preallocated boolean
attention mask, which each step only extends by one column (no mask is rebuilt); the prompt pass computes logits for
the last position only; finished rows keep emitting padding and the loop ends when every row has finished.
"""

from __future__ import annotations

import torch
from transformers import StaticCache


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """One token per row from the last-position logits: greedy when temperature is 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # keep the smallest prefix reaching top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    min_new_tokens: int = 0,
) -> torch.Tensor:
    """Prompt + response ids ([batch, width + n], n <= max_new_tokens): responses stop at EOS and are padded after
    it; EOS cannot be sampled before `min_new_tokens`. `input_ids` are left-padded; `temperature=0` decodes
    greedily."""
    batch, width = input_ids.shape
    device = input_ids.device
    total = width + max_new_tokens
    cache = StaticCache(config=model.config, max_cache_len=total)
    valid = torch.zeros(batch, total, dtype=torch.bool, device=device)
    valid[:, :width] = attention_mask.bool()
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    prompt_mask = valid[:, None, None, :].expand(batch, 1, width, total).clone()
    prompt_mask[:, :, :, :width] &= causal
    prompt_mask[:, :, :, :width] |= torch.eye(width, dtype=torch.bool, device=device)  # padding attends to itself
    positions = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids,
        attention_mask=prompt_mask,
        position_ids=positions,
        past_key_values=cache,
        cache_position=torch.arange(width, device=device),
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]
    next_position = positions[:, -1:] + 1
    tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=input_ids.dtype, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    steps = 0
    for step in range(max_new_tokens):
        if step < min_new_tokens:
            logits[:, eos_token_id] = float("-inf")
        token = sample_next(logits, temperature, top_p, generator)
        token = token.masked_fill(finished, pad_token_id)
        tokens[:, step] = token
        finished |= token == eos_token_id
        steps = step + 1
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        column = width + step
        valid[:, column] = True
        logits = model(
            input_ids=token[:, None],
            attention_mask=valid[:, None, None, :],
            position_ids=next_position + step,
            past_key_values=cache,
            cache_position=torch.tensor([column], device=device),
            use_cache=True,
        ).logits[:, -1]
    return torch.cat([input_ids, tokens[:, :steps]], dim=1)
