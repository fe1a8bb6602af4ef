"""Each stage's processed data: the mix's rows for the stage, tokenised (SFT examples, reward pairs, PPO prompts and
PTX blocks), built once through the data cache (whose key hashes this module, not the trainers)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from omegaconf import DictConfig

from rlhf.config import cache_dir
from rlhf.data import ptx_texts, stage_rows
from rlhf.data.cache import cache_key, shared
from rlhf.data.tokenize import PromptFormat, encode_pair, encode_prompts, encode_sft, text_blocks

log = logging.getLogger(__name__)


def sft_examples(tokenizer, data_cfg: DictConfig) -> dict:
    """{"train", "eval": prompt + answer examples with labels on the answer, "counts": rows per source}."""
    fmt = PromptFormat.for_tokenizer(tokenizer, data_cfg)
    data = stage_rows(data_cfg, "sft")

    def encode(rows: list[dict]) -> list[dict]:
        encoded = [encode_sft(tokenizer, fmt, r["prompt"], r["chosen"], data_cfg) for r in rows]
        kept = [e for e in encoded if e is not None]
        if len(kept) < len(encoded):
            log.warning("sft: %d rows dropped (no answer token fits data.max_answer_len)", len(encoded) - len(kept))
        return kept

    return {"train": encode(data.train), "eval": encode(data.eval), "counts": data.counts}


def reward_pairs(tokenizer, data_cfg: DictConfig) -> dict:
    """{"train", "eval": encoded chosen/rejected pairs marked as data pairs, "counts": rows per source}."""
    fmt = PromptFormat.for_tokenizer(tokenizer, data_cfg)
    data = stage_rows(data_cfg, "reward")

    def encode(rows: list[dict]) -> list[dict]:
        return [
            encode_pair(tokenizer, fmt, r["prompt"], r["chosen"], r["rejected"], data_cfg)
            | {"kind": "data", "builtin": "family" in r}
            for r in rows
        ]

    return {"train": encode(data.train), "eval": encode(data.eval), "counts": data.counts}


def ppo_prompts(tokenizer, data_cfg: DictConfig) -> dict:
    """{"train": encoded prompts, "dropped": prompts too long to keep, "counts": rows per source, "ptx": token blocks
    of the PTX documents}."""
    fmt = PromptFormat.for_tokenizer(tokenizer, data_cfg)
    rows = stage_rows(data_cfg, "ppo")

    def encode(rows: list[dict]) -> list[dict]:  # one at a time, so a dropped prompt cannot shift the others
        return [  # the row's other columns stay for the reward functions (rlhf.rewards)
            {**row, "input_ids": ids}
            for row in rows
            for ids in encode_prompts(tokenizer, fmt, [row["prompt"]], data_cfg.max_prompt_len)[0]
        ]

    train = encode(rows.train)
    block = data_cfg.max_prompt_len + data_cfg.max_answer_len
    return {
        "train": train,
        "dropped": len(rows.train) - len(train),
        "counts": rows.counts,
        "ptx": text_blocks(tokenizer, ptx_texts(data_cfg), block),
    }


BUILDERS: dict[str, Callable[..., dict]] = {"sft": sft_examples, "reward": reward_pairs, "ppo": ppo_prompts}


def processed(cfg: DictConfig, stage: str, tokenizer) -> dict:
    """The stage's processed data, built once (rank 0) through the data cache and shared with the other ranks."""
    key = cache_key(cfg.data, stage, tokenizer)
    return shared(cache_dir(cfg), key, lambda: BUILDERS[stage](tokenizer, cfg.data), cfg.data.rebuild)
