"""Prompts for generation: too-long prompts dropped and counted, left padding; PTX text cut into blocks."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from rlhf.config import DataConfig, ModelConfig
from rlhf.data.tokenize import PromptFormat, encode_prompts, pad_left, text_blocks, used_columns
from rlhf.models import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(OmegaConf.structured(ModelConfig(name="tiny", source="tiny")))


def test_too_long_prompts_are_dropped_and_counted(tokenizer) -> None:
    fmt = PromptFormat.for_tokenizer(tokenizer, OmegaConf.structured(DataConfig(name="x")))
    prompts = ["Add 2 and 3.", "word " * 200, [{"role": "user", "content": "Sort: b a"}]]
    kept, dropped = encode_prompts(tokenizer, fmt, prompts, max_len=64)
    assert dropped == 1 and len(kept) == 2
    assert tokenizer.decode(kept[0]).rstrip().endswith("<|im_start|>assistant")
    batch = pad_left(kept, tokenizer.pad_token_id)
    width = max(map(len, kept))
    assert batch["input_ids"].shape == (2, width)
    short = min(range(2), key=lambda i: len(kept[i]))
    pad = width - len(kept[short])
    assert pad > 0 and batch["attention_mask"][short, :pad].sum() == 0 and batch["attention_mask"][short, pad:].all()
    assert batch["input_ids"][short, :pad].eq(tokenizer.pad_token_id).all()
    assert batch["input_ids"][:, -1].tolist() == [ids[-1] for ids in kept]  # every prompt ends at the same place


def test_text_blocks_join_documents_with_eos(tokenizer) -> None:
    blocks = text_blocks(tokenizer, ["one two three", "four five six seven"], block_len=4)
    stream = [t for b in blocks for t in b]
    assert all(len(b) == 4 for b in blocks) and tokenizer.eos_token_id in stream
    assert tokenizer.decode(stream).startswith("one two three")


def test_used_columns_drop_padding_shared_by_every_row_only() -> None:
    attention = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 0, 0]])
    response = attention[:, 4:]  # prompt width 4: responses of 3 and 2 tokens, then padding
    assert used_columns(attention, response, 4) == (2, 3)
    assert used_columns(attention, response, 4, min_prompt_width=3) == (1, 3)  # stage.prompt_width is kept
    assert used_columns(attention[:, :4], response[:, :0], 4) == (2, 1)  # no response yet: one column kept
