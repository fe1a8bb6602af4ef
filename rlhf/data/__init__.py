"""The data seam: rows for a stage from the configured mix.

A row is a dict with `prompt`, `chosen` and, where the source has one, `rejected`. Each source is shuffled with the
data seed, cut into an eval part and a train part, and each part into the per-stage shares of `data.split`
(SFT, reward, PPO) so no stage sees another's rows.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from omegaconf import DictConfig

from rlhf.data import builtin
from rlhf.data.sources import FORMAT_FIELDS, read_adapted, read_local

log = logging.getLogger(__name__)

STAGE_INDEX = {"sft": 0, "reward": 1, "ppo": 2}


class DataError(ValueError):
    """Data that cannot be used: the message names the source and what is wrong."""


def source_label(source: DictConfig) -> str:
    return source.name or Path(source.path).name


def source_rows(source: DictConfig, data_cfg: DictConfig) -> list[dict]:
    """All valid rows of one source; bad rows of a file are skipped and counted (or an error with `data.strict`)."""
    if source.name == "builtin" and not source.path:
        return [
            {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "family": p.family}
            for p in builtin.generate(data_cfg.builtin_size, data_cfg.seed)
        ]
    try:
        if source.path and source.format in FORMAT_FIELDS:
            rows, report = read_local(source.path, source.format, dict(source.columns), data_cfg.strict)
        else:
            from_hub = not source.path
            rows, report = read_adapted(
                source.path or source.name, source.format or source.name, from_hub, data_cfg.strict
            )
    except (OSError, ValueError) as err:
        raise DataError(f"data source {source_label(source)}: {err}") from err
    if report.skipped:
        log.warning(
            "data source %s: %d rows kept, %d skipped (%s); first: %s",
            source_label(source),
            report.kept,
            sum(report.skipped.values()),
            ", ".join(f"{k} {v}" for k, v in report.skipped.items()),
            report.first_errors[0],
        )
    return rows


def usable_in(source: DictConfig, stage: str) -> bool:
    """Rows without a rejected answer serve SFT and PPO prompts, never the reward model."""
    return not (source.format == "sft" and stage == "reward")


def split_shares(count: int, shares: list[float]) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of `count` items in proportion to `shares`, covering all items."""
    total = sum(shares)
    bounds = [0]
    acc = 0.0
    for share in shares:
        acc += share
        bounds.append(round(count * acc / total))
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def stage_rows(data_cfg: DictConfig, stage: str) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows of the mix for `stage`, deterministic for `data.seed`."""
    index = STAGE_INDEX[stage]
    train: list[dict] = []
    evaluation: list[dict] = []
    for source in data_cfg.sources:
        if not usable_in(source, stage):
            continue
        rows = source_rows(source, data_cfg)
        random.Random(data_cfg.seed).shuffle(rows)
        if any(row.get("split") == "eval" for row in rows):  # the dataset's own train/eval split
            parts = ([r for r in rows if r["split"] == "eval"], [r for r in rows if r["split"] != "eval"])
        else:
            n_eval = max(1, round(len(rows) * data_cfg.eval_fraction))
            parts = (rows[:n_eval], rows[n_eval:])
        shares = list(source.split if source.split is not None else data_cfg.split)
        for part, out in zip(parts, (evaluation, train), strict=True):
            start, end = split_shares(len(part), shares)[index]
            out.extend(part[start:end])
    if not train:
        raise DataError(
            f"the data mix {data_cfg.name!r} leaves no training rows for stage {stage} "
            f"(data.split={list(data_cfg.split)})"
        )
    return train, evaluation
