"""Rendering prompts with the chat template (or a plain template), tokenising, and padding batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

IGNORE_INDEX = -100
Prompt = str | list[dict[str, str]]  # a plain instruction or a multi-turn transcript ending with a user turn


@dataclass
class PromptFormat:
    """How a prompt and its answer become text: the tokenizer's chat template or a plain template."""

    use_chat: bool
    plain_template: str

    @classmethod
    def for_tokenizer(cls, tokenizer, data_cfg: DictConfig) -> PromptFormat:
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if data_cfg.template == "chat" and not has_chat:
            raise ValueError("data.template=chat but the tokenizer has no chat template; use auto or plain")
        use_chat = data_cfg.template == "chat" or (data_cfg.template == "auto" and has_chat)
        return cls(use_chat=use_chat, plain_template=data_cfg.plain_template)

    def prompt_text(self, tokenizer, prompt: Prompt) -> str:
        messages = as_messages(prompt)
        if self.use_chat:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text = ""
        for turn in messages:
            if turn["role"] == "user":
                text += self.plain_template.format(prompt=turn["content"])
            elif turn["role"] == "assistant":
                text += " " + turn["content"]
        return text

    def answer_text(self, tokenizer, prompt: Prompt, answer: str) -> str:
        """The text that follows `prompt_text` for this answer, ending with the end-of-turn marker."""
        if self.use_chat:
            messages = [*as_messages(prompt), {"role": "assistant", "content": answer}]
            full = tokenizer.apply_chat_template(messages, tokenize=False)
            head = self.prompt_text(tokenizer, prompt)
            if not full.startswith(head):
                raise ValueError("the chat template does not render the prompt as a prefix of prompt + answer")
            return full[len(head) :].rstrip("\n")
        return " " + answer + tokenizer.eos_token


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    """A prompt as chat messages: a plain string is one user turn; transcripts keep their turns."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def encode_sft(tokenizer, fmt: PromptFormat, prompt: Prompt, answer: str, data_cfg: DictConfig) -> dict | None:
    """input_ids and labels (prompt tokens masked) for one example; None when nothing of the answer fits."""
    prompt_ids = tokenizer(fmt.prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(fmt.answer_text(tokenizer, prompt, answer), add_special_tokens=False)["input_ids"]
    prompt_ids = prompt_ids[-data_cfg.max_prompt_len :]
    answer_ids = answer_ids[: data_cfg.max_answer_len]
    if not answer_ids:
        return None
    return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids}


def encode_response(tokenizer, fmt: PromptFormat, prompt: Prompt, response: str, data_cfg: DictConfig) -> list[int]:
    """Token ids of prompt + response as the reward model reads them (prompt cut from the left, the response from
    the right); the score is taken at the last token."""
    prompt_ids = tokenizer(fmt.prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(fmt.answer_text(tokenizer, prompt, response), add_special_tokens=False)["input_ids"]
    return prompt_ids[-data_cfg.max_prompt_len :] + answer_ids[: data_cfg.max_answer_len]


def response_batch(
    tokenizer, fmt: PromptFormat, prompts: list[Prompt], responses: list[str], data_cfg: DictConfig
) -> dict[str, torch.Tensor]:
    """`encode_response` of each (prompt, response), right-padded into one batch for the reward model."""
    rows = [encode_response(tokenizer, fmt, p, r, data_cfg) for p, r in zip(prompts, responses, strict=True)]
    return pad_right([{"input_ids": ids, "labels": ids} for ids in rows], tokenizer.pad_token_id)


def encode_pair(tokenizer, fmt: PromptFormat, prompt: Prompt, chosen: str, rejected: str, data_cfg: DictConfig) -> dict:
    """`encode_response` of the chosen and of the rejected answer, and how many of their tokens are the prompt's
    (DPO's log-probs are the answers')."""
    prompt_ids = tokenizer(fmt.prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    return {
        "chosen": encode_response(tokenizer, fmt, prompt, chosen, data_cfg),
        "rejected": encode_response(tokenizer, fmt, prompt, rejected, data_cfg),
        "prompt_len": min(len(prompt_ids), data_cfg.max_prompt_len),
    }


def encode_prompts(tokenizer, fmt: PromptFormat, prompts: list[Prompt], max_len: int) -> tuple[list[list[int]], int]:
    """Token ids of each prompt for generation, and how many were dropped for being longer than `max_len`.

    A too-long prompt is dropped rather than cut: cutting either end loses the instruction or the generation cue.
    """
    kept: list[list[int]] = []
    for prompt in prompts:
        ids = tokenizer(fmt.prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        if len(ids) <= max_len:
            kept.append(ids)
    return kept, len(prompts) - len(kept)


def text_blocks(tokenizer, texts: list[str], block_len: int) -> list[list[int]]:
    """Documents joined with EOS and cut into blocks of `block_len` tokens (the short tail is dropped)."""
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return [stream[i : i + block_len] for i in range(0, len(stream) - block_len + 1, block_len)]


def pad_left(sequences: list[list[int]], pad_id: int, min_width: int = 0) -> dict[str, torch.Tensor]:
    """Left-pad prompts for generation so every row's next token is at the same position: to the longest row, or
    to `min_width` if that is wider."""
    width = max(min_width, *(len(ids) for ids in sequences))
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, ids in enumerate(sequences):
        if ids:
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            attention_mask[i, width - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def used_columns(
    attention_mask: torch.Tensor, response_mask: torch.Tensor, prompt_width: int, min_prompt_width: int = 0
) -> tuple[int, int]:
    """The columns a slice of a left-padded prompt + response batch needs, as (first, response_len): it drops the
    leading columns that are padding in every row (keeping at least `min_prompt_width` prompt columns) and the
    response columns after the last one any row uses. Nothing computed on the rest is used: it is masked everywhere."""
    padding = (attention_mask[:, :prompt_width] == 0).all(dim=0).long()
    first = min(int(padding.cumprod(dim=0).sum()), max(prompt_width - min_prompt_width, 0))
    used = response_mask.any(dim=0).nonzero()
    return first, int(used.max()) + 1 if len(used) else 1


def pad_right(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest row: input_ids, attention_mask, labels (pad positions ignored)."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def answer_pair_batch(pairs: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """`pair_batch` with an `answer_mask` (1 on each row's answer tokens), for the log-probs of the answers."""
    batch = pair_batch(pairs, pad_id)
    starts = torch.tensor([p["prompt_len"] for p in pairs] * 2).unsqueeze(1)
    positions = torch.arange(batch["input_ids"].shape[1]).unsqueeze(0)
    batch["answer_mask"] = ((positions >= starts) & batch["attention_mask"].bool()).long()
    return batch


def pair_batch(pairs: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows of tokenised pairs in one right-padded batch, so one forward pass scores
    both."""
    rows = [{"input_ids": p[k], "labels": p[k]} for k in ("chosen", "rejected") for p in pairs]
    batch = pad_right(rows, pad_id)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
