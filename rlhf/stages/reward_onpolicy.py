"""The reward stage's on-policy pairs (InstructGPT's recipe): the SFT policy answers the reward share's built-in
prompts, the gold scorer grades the answers, and right/wrong answers to one prompt become preference pairs. Sampled
once per policy and settings, kept in the data cache and in the run folder (a resumed run reads them back)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from rlhf import dist, gold, models
from rlhf.config import cache_dir
from rlhf.data import DataError, builtin, onpolicy, stage_rows
from rlhf.data.tokenize import PromptFormat, encode_pair

log = logging.getLogger("rlhf.stages.reward")

ONPOLICY_FILE = "onpolicy_pairs.json"


def with_onpolicy_pairs(
    cfg: DictConfig, tokenizer, out_dir: Path, train_pairs: list[dict], eval_pairs: list[dict]
) -> tuple[list[dict], list[dict], dict[str, int]]:
    """The reward stage's training and held-out pairs with the built-in static pairs replaced by pairs of the
    policy's own answers (see rlhf.data.onpolicy), keeping `static_fraction` of the training pairs static and other
    sources' pairs as they are; and the count of each kind of pair, for the run's summary."""
    op = cfg.stage.onpolicy
    fmt = PromptFormat.for_tokenizer(tokenizer, cfg.data)
    sampled = {
        split: [p for p in pairs if p["kind"] in op.kinds] for split, pairs in onpolicy_rows(cfg, out_dir).items()
    }

    def encode(rows: list[dict]) -> list[dict]:
        return [
            encode_pair(tokenizer, fmt, r["prompt"], r["chosen"], r["rejected"], cfg.data)
            | {k: r[k] for k in ("kind", "policy_chosen", "policy_rejected")}
            for r in rows
        ]

    train, evaluation = encode(sampled["train"]), encode(sampled["eval"])
    static_only = op.static_fraction >= 1
    if not evaluation or not (train or static_only):
        raise DataError(
            f"on-policy pairs: {len(train)} training and {len(evaluation)} held-out pairs from the policy's "
            "answers; the policy needs right and wrong answers (more prompts or samples, or a higher temperature)"
        )
    static = [p for p in train_pairs if p["builtin"]]
    rng = random.Random(cfg.seed)
    n_static = len(static) if static_only else round(len(train) * op.static_fraction / (1 - op.static_fraction))
    train += rng.sample(static, min(n_static, len(static)))
    train += [p for p in train_pairs if not p["builtin"]]
    rng.shuffle(train)
    evaluation += [p for p in eval_pairs if not p["builtin"]]
    counts = {f"onpolicy_{k}": n for k, n in onpolicy.kind_counts(sampled["train"]).items()}
    counts |= {f"onpolicy_eval_{k}": n for k, n in onpolicy.kind_counts(sampled["eval"]).items()}
    log.info(
        "on-policy pairs, train %s + %d static, held-out %s",
        onpolicy.kind_counts(sampled["train"]),
        min(n_static, len(static)),
        onpolicy.kind_counts(sampled["eval"]),
    )
    return train, evaluation, counts


def onpolicy_rows(cfg: DictConfig, out_dir: Path) -> dict[str, list[dict]]:
    """Pairs of the policy's graded answers to the reward share's built-in prompts (train and held-out). Sampled
    once per policy and settings: kept in the data cache (other runs from the same policy reuse them) and in
    `<run>/reward/onpolicy_pairs.json` (a resumed run reads them back)."""
    path = out_dir / ONPOLICY_FILE
    if path.is_file():
        return json.loads(path.read_text())
    cache = cache_dir(cfg) / "data" / f"onpolicy-{onpolicy_key(cfg)}.json"
    if cache.is_file() and not cfg.data.rebuild:
        log.info("on-policy pairs from the data cache: %s", cache)
        pairs = json.loads(cache.read_text())
    else:
        pairs = sample_onpolicy(cfg)
    if dist.rank() == 0:
        for target in (cache, path):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(pairs))
            os.replace(tmp, target)
    dist.barrier()
    return pairs


def onpolicy_key(cfg: DictConfig) -> str:
    """What the sampled pairs depend on: the policy (its folder's files, or the model option and seed), the
    on-policy settings, the data, the world size (ranks sample apart), the precision and the code that samples
    and grades."""
    op = cfg.stage.onpolicy
    folder = Path(cfg.stage.policy_from or models.model_location(cfg.model, cache_dir(cfg)))
    files = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(folder.glob("*")) if f.is_file()]
    settings = OmegaConf.to_container(op)
    settings.pop("kinds")  # chosen from the sampled pairs: the sample does not depend on it
    payload = {
        "policy": [str(folder.resolve()), files, OmegaConf.to_container(cfg.model, enum_to_str=True), cfg.seed],
        "onpolicy": settings,
        "data": OmegaConf.to_container(cfg.data, enum_to_str=True) | {"rebuild": False},
        "world": dist.world_size(),
        "precision": cfg.hardware.precision.value,
        "code": [hashlib.sha256(Path(m.__file__).read_bytes()).hexdigest() for m in (onpolicy, builtin, gold)],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def sample_onpolicy(cfg: DictConfig) -> dict[str, list[dict]]:
    """Every rank answers its share of the prompts `samples_per_prompt` times; the graded answers become pairs
    (rlhf.data.onpolicy.build_pairs), gathered on every rank."""
    op = cfg.stage.onpolicy
    rank, world = dist.rank(), dist.world_size()
    started = time.perf_counter()
    data = stage_rows(cfg.data, "reward")
    policy_tokenizer = models.load_tokenizer(cfg.model, cache_dir(cfg))
    policy = models.load_causal_lm(cfg.model, policy_tokenizer, cfg.seed, cfg.stage.policy_from, cache_dir(cfg))
    policy = policy.to(models.TORCH_DTYPES[cfg.hardware.precision]).eval()  # sampled as PPO samples it
    torch.manual_seed(dist.rank_seed(cfg.seed))
    fmt = PromptFormat.for_tokenizer(policy_tokenizer, cfg.data)
    out = {}
    train_rows = [] if op.static_fraction >= 1 else data.train  # static pairs only: the held-out ones alone
    for split, rows, count in (("train", train_rows, op.train_prompts), ("eval", data.eval, op.eval_prompts)):
        gradable = [r for r in rows if "family" in r and builtin.reference_answer(r["prompt"]) is not None]
        encoded = gold.encode_rows(gradable[: count or None], policy_tokenizer, fmt, cfg.data.max_prompt_len)
        mine = encoded[rank::world]
        answers: dict[str, list[str]] = {}
        split_started = time.perf_counter()  # the rate of this split's answers alone
        for batch in gold.answers(
            policy, policy_tokenizer, mine, op.batch, op.max_new_tokens, op.temperature, op.samples_per_prompt
        ):
            for row, text in zip(batch.rows, batch.texts, strict=True):
                answers.setdefault(row["prompt"], []).append(text)
            if rank == 0:
                elapsed = time.perf_counter() - split_started
                log.info(
                    "%s: the policy answered %d/%d %s prompts x %d (%.1f answers/s)",
                    cfg.stage.name,
                    min(len(answers) * world, len(encoded)),
                    len(encoded),
                    split,
                    op.samples_per_prompt,
                    len(answers) * op.samples_per_prompt / elapsed,
                )
        rng = random.Random(dist.rank_seed(cfg.seed))
        pairs = [
            pair
            for row in mine
            for pair in onpolicy.build_pairs(
                row,
                answers[row["prompt"]],
                [builtin.grade(row["prompt"], a) for a in answers[row["prompt"]]],
                op.pairs_per_prompt,
                rng,
            )
        ]
        out[split] = [p for share in dist.all_gather_objects(pairs) for p in share]
    log.info("on-policy pairs sampled in %.0f s", time.perf_counter() - started)
    return out
