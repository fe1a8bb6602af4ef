"""PPO's sampler: batched sampling, faster than `transformers.generate` (`stage.rollout=engine`).

Llama-family models run on `decoder.LlamaDecoder` (fused, prepacked weights; finished rows leave the batch); other
models run their own forward over a `transformers` static cache. Both handle left-padded prompts through position
ids and one preallocated boolean mask that each step extends by one column (no mask is rebuilt), compute logits for
the last position only, and return the log-probs of the sampled tokens so PPO need not recompute them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, StaticCache

from rlhf import decoder, lora, models


@dataclass
class Rollout:
    sequences: torch.Tensor  # [B, W + n] prompt + response ids, padded after each row's EOS
    logprobs: torch.Tensor | None  # [B, n] each sampled token's log-prob under logits / temperature (0 after EOS)


def response_mask(responses: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 for every response token up to and including the first EOS, 0 after it."""
    is_eos = (responses == eos_id).long()
    after_eos = (is_eos.cumsum(dim=1) - is_eos) > 0
    return (~after_eos).long()


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
    # inverse-CDF sampling: torch.multinomial draws an exponential per vocabulary entry (docs/performance.md). The sum
    # runs in float64: in float32, tokens after a dominant one lose masses under 1e-7 to rounding (a bias by id).
    cumulative = probs.double().cumsum(dim=-1)
    uniform = 1.0 - torch.rand(len(probs), 1, generator=generator, device=probs.device, dtype=torch.float64)  # (0, 1]
    token = torch.searchsorted(cumulative, uniform * cumulative[:, -1:])
    return token.squeeze(-1).clamp(max=probs.shape[-1] - 1)


class _StaticCacheStepper:
    """Any causal LM's own forward over a preallocated `transformers` static cache; rows stay in the batch."""

    drops_rows = False

    def __init__(self, model, max_len: int) -> None:
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
    return _StaticCacheStepper(model, max_len)


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
    samples_per_prompt: int = 1,
) -> Rollout:
    """Sample responses to left-padded prompts: they stop at EOS (padded after it) or at `max_new_tokens`; EOS cannot
    be sampled before `min_new_tokens`; `temperature=0` decodes greedily (log-probs then under the raw logits).
    With `samples_per_prompt` k each prompt gets k responses, rows i*k..i*k+k-1 of the result; on the lean decoder
    the prompt is encoded once and its cache copied to its k rows."""
    if samples_per_prompt > 1 and decoder.unsupported(model) is not None:  # no cache copy: encode each copy
        input_ids = input_ids.repeat_interleave(samples_per_prompt, dim=0)
        attention_mask = attention_mask.repeat_interleave(samples_per_prompt, dim=0)
        samples_per_prompt = 1
    prompts, width = input_ids.shape
    device = input_ids.device
    total = width + max_new_tokens
    step_model = stepper(model, prompts, total)
    valid = torch.zeros(prompts, total, dtype=torch.bool, device=device)
    valid[:, :width] = attention_mask.bool()
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    eye = torch.eye(width, dtype=torch.bool, device=device)  # padding attends to itself
    positions = models.position_ids(attention_mask)
    logits = step_model.forward(input_ids, positions, 0, (valid[:, None, :width] & causal) | eye)
    if samples_per_prompt > 1:
        copies = torch.arange(prompts, device=device).repeat_interleave(samples_per_prompt)
        step_model.keep(copies)
        logits, valid, positions = logits[copies], valid[copies], positions[copies]
        input_ids = input_ids[copies]
    batch = len(input_ids)
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


class GenerationModel:
    """The model to generate with, from a training engine's module: in eval mode with LoRA folded into the base
    weights. Under ZeRO-3 the parameters are gathered once per use and copied into a plain model without DeepSpeed's
    hooks (which would release and gather them again at every decoding step), as DeepSpeed-Chat's hybrid engine does
    on GPUs; it costs one full copy of the model per rank while generating. Restores the module's train/eval mode."""

    def __init__(self, module: torch.nn.Module, zero_stage: int) -> None:
        self.module, self.zero_stage = module, zero_stage
        self._copy: torch.nn.Module | None = None  # the plain copy ZeRO-3 generation runs on

    @contextmanager
    def __call__(self) -> Iterator[torch.nn.Module]:
        module, training = self.module, self.module.training
        if self.zero_stage != 3:
            with lora.merged_lora(module):
                module.eval()
                try:
                    yield module
                finally:
                    module.train(training)
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            state = lora.merge_lora_state_dict(
                {name: p.detach() for name, p in module.named_parameters()}, lora.lora_scalings(module)
            )
            if self._copy is None:  # its random initialisation must not draw from the sampling RNG: a resumed
                # run builds the copy at another point of the stream than the run it continues
                dtype = next(module.parameters()).dtype
                with torch.random.fork_rng(devices=[]):
                    self._copy = AutoModelForCausalLM.from_config(module.config, dtype=dtype)
            _, unexpected = self._copy.load_state_dict(state, strict=False)  # copies while gathered
        if unexpected:
            raise RuntimeError(f"the rollout copy of the model has no parameters named {unexpected[:3]}")
        self._copy.tie_weights()
        self._copy.eval()
        yield self._copy
