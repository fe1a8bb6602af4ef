"""The rollout engine: batched sampling for PPO, faster than `transformers.generate` (`stage.rollout=engine`).

Llama-family models run on `decoder.LlamaDecoder` (fused, prepacked weights; finished rows leave the batch); other
models run their own forward over a `transformers` static cache. Both handle left-padded prompts through position
ids and one preallocated boolean mask that each step extends by one column (no mask is rebuilt), compute logits for
the last position only, and return the log-probs of the sampled tokens so PPO need not recompute them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import StaticCache

from rlhf import decoder


@dataclass
class Rollout:
    sequences: torch.Tensor  # [B, W + n] prompt + response ids, padded after each row's EOS
    logprobs: torch.Tensor | None  # [B, n] each sampled token's log-prob under logits / temperature (0 after EOS)


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
    # inverse-CDF sampling: torch.multinomial draws an exponential per vocabulary entry (8 ms a step here). The sum
    # runs in float64: in float32, tokens after a dominant one lose masses under 1e-7 to rounding (a bias by id).
    cumulative = probs.double().cumsum(dim=-1)
    uniform = 1.0 - torch.rand(len(probs), 1, generator=generator, device=probs.device, dtype=torch.float64)  # (0, 1]
    token = torch.searchsorted(cumulative, uniform * cumulative[:, -1:])
    return token.squeeze(-1).clamp(max=probs.shape[-1] - 1)


class _StaticCacheStepper:
    """Any causal LM's own forward over a preallocated `transformers` static cache; rows stay in the batch."""

    drops_rows = False

    def __init__(self, model, batch: int, max_len: int) -> None:
        self.model, self.max_len = model, max_len
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, start: int, allowed: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(*allowed.shape[:2], self.max_len, dtype=torch.bool, device=allowed.device)
        mask[:, :, : allowed.shape[2]] = allowed
        return self.model(
            input_ids=ids,
            attention_mask=mask[:, None],
            position_ids=positions,
            past_key_values=self.cache,
            cache_position=torch.arange(start, start + ids.shape[1], device=ids.device),
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]


class _DecoderStepper(decoder.LlamaDecoder):
    drops_rows = True


def stepper(model, batch: int, max_len: int):
    """The fastest way this engine has to run `model`: the lean decoder where it covers the model."""
    if decoder.unsupported(model) is None:
        return _DecoderStepper(model, batch, max_len)
    return _StaticCacheStepper(model, batch, max_len)


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
) -> Rollout:
    """Sample responses to left-padded prompts: they stop at EOS (padded after it) or at `max_new_tokens`; EOS cannot
    be sampled before `min_new_tokens`; `temperature=0` decodes greedily (log-probs then under the raw logits)."""
    batch, width = input_ids.shape
    device = input_ids.device
    total = width + max_new_tokens
    step_model = stepper(model, batch, total)
    valid = torch.zeros(batch, total, dtype=torch.bool, device=device)
    valid[:, :width] = attention_mask.bool()
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    eye = torch.eye(width, dtype=torch.bool, device=device)  # padding attends to itself
    positions = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    logits = step_model.forward(input_ids, positions, 0, (valid[:, None, :width] & causal) | eye)
    next_position = positions[:, -1] + 1
    tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=input_ids.dtype, device=device)
    logprobs = torch.zeros(batch, max_new_tokens, device=device)
    rows = torch.arange(batch, device=device)  # the original index of each row still in the batch
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    steps = 0
    for step in range(max_new_tokens):
        scaled = logits.float() / temperature if temperature > 0 else logits.float()
        distribution = torch.log_softmax(scaled, dim=-1)  # PPO's, before EOS is held back
        if step < min_new_tokens:
            logits[:, eos_token_id] = float("-inf")
        token = sample_next(logits, temperature, top_p, generator).masked_fill(finished, pad_token_id)
        chosen = distribution.gather(1, token[:, None]).squeeze(1)
        tokens[rows, step] = token
        logprobs[rows, step] = chosen.masked_fill(finished, 0.0)
        finished = finished | (token == eos_token_id)
        steps = step + 1
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        if step_model.drops_rows and bool(finished.any()):
            keep = (~finished).nonzero().squeeze(1)
            step_model.keep(keep)
            rows, valid, next_position = rows[keep], valid[keep], next_position[keep]
            token, finished = token[keep], finished[keep]
        column = width + step
        valid[:, column] = True
        position = (next_position + step)[:, None]
        logits = step_model.forward(token[:, None], position, column, valid[:, None, : column + 1])
    return Rollout(torch.cat([input_ids, tokens[:, :steps]], dim=1), logprobs[:, :steps])
