"""The data seam: rows for a stage from the configured mix.

A row is a dict with `prompt`, `chosen` and, where the source has one, `rejected`. Each source is shuffled with the
data seed, cut into an eval part and a train part, and each part into the per-stage shares of `data.split`
(SFT, reward, PPO) so no stage sees another's rows.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import NamedTuple

import torch
from omegaconf import DictConfig

from rlhf.data import builtin
from rlhf.data.sources import FORMAT_FIELDS, ReadReport, read_adapted, read_local

log = logging.getLogger(__name__)

STAGE_INDEX = {"sft": 0, "reward": 1, "ppo": 2}
REPEAT_WARNING = 4  # a source drawn more than this many times over in a blend is warned about


class DataError(ValueError):
    """Data that cannot be used: the message names the source and what is wrong."""


def source_label(source: DictConfig) -> str:
    return source.name or Path(source.path).name


def source_rows(source: DictConfig, data_cfg: DictConfig) -> tuple[list[dict], ReadReport]:
    """All valid rows of one source and how many were skipped (bad rows are an error with `data.strict`)."""
    if source.name == "builtin" and not source.path:
        rows = [
            {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "family": p.family}
            for p in builtin.generate(data_cfg.builtin_size, data_cfg.seed, data_cfg.builtin_families)
        ]
        return rows, ReadReport(kept=len(rows))
    try:
        if source.path and source.format in FORMAT_FIELDS and not Path(source.path).expanduser().is_dir():
            rows, report = read_local(source.path, source.format, dict(source.columns), data_cfg.strict)
        else:
            from_hub = not source.path
            rows, report = read_adapted(
                source.path or source.name,
                source.format or source.name,
                from_hub,
                data_cfg.strict,
                dict(source.columns),
            )
    except (OSError, ValueError) as err:
        raise DataError(f"data source {source_label(source)}: {err}") from err
    if not rows:
        skipped = sum(report.skipped.values())
        why = f"all {skipped} skipped, first: {report.first_errors[0]}" if skipped else "it is empty"
        raise DataError(f"data source {source_label(source)}: no usable rows ({why})")
    if report.skipped:
        log.warning(
            "data source %s: %d rows kept, %d skipped (%s); first: %s",
            source_label(source),
            report.kept,
            sum(report.skipped.values()),
            ", ".join(f"{k} {v}" for k, v in report.skipped.items()),
            report.first_errors[0],
        )
    return rows, report


def ptx_texts(data_cfg: DictConfig) -> list[str]:
    """The documents of the PTX source (`data.ptx`), shuffled with the data seed; empty when there is none."""
    if not (data_cfg.ptx.path or data_cfg.ptx.name):
        return []
    rows, _ = source_rows(data_cfg.ptx, data_cfg)
    random.Random(data_cfg.seed).shuffle(rows)
    return [row["text"] for row in rows]


def usable_in(source: DictConfig, stage: str) -> bool:
    """Whether `stage` draws from `source`: a stage its `stages` name (all when empty); rows without a rejected
    answer serve SFT and PPO prompts, never the reward model."""
    if source.stages and stage not in source.stages:
        return False
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


class StageData(NamedTuple):
    train: list[dict]
    eval: list[dict]
    counts: dict[str, int]  # training rows drawn from each source


def blend_counts(available: list[int], weights: list[float]) -> list[int]:
    """Rows to draw from each source so the mix follows the weights; the mix is as large as its sources together.
    A source with no rows for the stage takes no share."""
    active = [w if n else 0.0 for n, w in zip(available, weights, strict=True)]
    total_weight = sum(active)
    if total_weight == 0:
        return [0] * len(available)
    return [round(sum(available) * w / total_weight) for w in active]


def blend(parts: list[list[dict]], weights: list[float], rng: random.Random) -> tuple[list[dict], list[int]]:
    """The weighted mix of `parts`: a source short of its share is repeated, one with more is subsampled."""
    counts = blend_counts([len(p) for p in parts], weights)
    mix: list[dict] = []
    for rows, count in zip(parts, counts, strict=True):
        if rows:
            repeats, rest = divmod(count, len(rows))
            mix.extend(rows * repeats + rng.sample(rows, rest))
    rng.shuffle(mix)
    return mix, counts


def held_out_split(source: DictConfig, data_cfg: DictConfig) -> tuple[list[dict], list[dict]]:
    """One source's (eval, train) rows, shuffled with the data seed: its dataset's own split where it has one,
    else the first `data.eval_fraction` of the rows held out. No stage trains on the eval rows."""
    rows, _ = source_rows(source, data_cfg)
    random.Random(data_cfg.seed).shuffle(rows)
    if any(row.get("split") == "eval" for row in rows):
        return [r for r in rows if r["split"] == "eval"], [r for r in rows if r["split"] != "eval"]
    n_eval = max(1, round(len(rows) * data_cfg.eval_fraction))
    return rows[:n_eval], rows[n_eval:]


GOLD_SPLITS = ("test", "validation")


def gold_rows(data_cfg: DictConfig, split: str, count: int) -> list[dict]:
    """Held-out built-in prompts for the gold score: the built-in source's eval rows (held out from every stage),
    alternately assigned to `test` (the figures a run reports) and `validation` (for choosing settings, so the
    reported figures are not tuned on), the first `count` of `split`. Empty when the mix has no built-in source."""
    for source in data_cfg.sources:
        if source.name == "builtin" and not source.path:
            eval_part, _ = held_out_split(source, data_cfg)
            return eval_part[GOLD_SPLITS.index(split) :: 2][:count]
    return []


def stage_rows(data_cfg: DictConfig, stage: str) -> StageData:
    """The (train, eval) rows of the mix for `stage`, deterministic for `data.seed`, with the per-source counts.

    Each source is split on its own (its dataset's train/eval split, else `data.eval_fraction`), each part cut by
    the per-stage shares; the training parts are then blended by the sources' weights. Eval rows are not blended.
    """
    index = STAGE_INDEX[stage]
    train_parts: list[list[dict]] = []
    evaluation: list[dict] = []
    labels: list[str] = []
    weights: list[float] = []
    for source in data_cfg.sources:
        if not usable_in(source, stage):
            continue
        eval_part, train_part = held_out_split(source, data_cfg)
        shares = list(source.split if source.split is not None else data_cfg.split)
        start, end = split_shares(len(eval_part), shares)[index]
        evaluation.extend(eval_part[start:end])
        start, end = split_shares(len(train_part), shares)[index]
        train_parts.append(train_part[start:end])
        if source.split is None and not (source.name == "builtin" and not source.path):
            log.info(
                "data source %s has no split of its own: data.split=%s gives stage %s %d of its %d training rows "
                "(set split: on the source, e.g. [1, 0, 0] for SFT only)",
                source_label(source),
                shares,
                stage,
                end - start,
                len(train_part),
            )
        labels.append(source_label(source))
        weights.append(source.weight)
    train, drawn = blend(train_parts, weights, random.Random(data_cfg.seed + index))
    if not train:
        raise DataError(
            f"the data mix {data_cfg.name!r} leaves no training rows for stage {stage} "
            f"(data.split={list(data_cfg.split)})"
        )
    counts = dict(zip(labels, drawn, strict=True))
    for label, part, count, weight in zip(labels, train_parts, drawn, weights, strict=True):
        if part and count > REPEAT_WARNING * len(part):
            log.warning(
                "data source %s: its %d training rows for %s are repeated %.0fx to fill its weight's share (weight "
                "%g, %.0f%% of the mix): lower its weight or add rows, or it will be memorised",
                label,
                len(part),
                stage,
                count / len(part),
                weight,
                100 * count / len(train),
            )
    log.info(
        "data mix for %s: %s; %d eval rows",
        stage,
        ", ".join(f"{k} {n} ({n / len(train):.1%})" for k, n in counts.items()),
        len(evaluation),
    )
    return StageData(train, evaluation, counts)


def batch_indices(count: int, global_batch: int, seed: int, step: int, rank: int, world: int) -> list[int]:
    """This rank's example indices for optimizer step `step`: a fresh permutation each epoch, a pure function of
    (seed, step), so a resumed run sees exactly the data an uninterrupted one would."""
    steps_per_epoch = count // global_batch
    epoch, within = divmod(step, steps_per_epoch)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch))
    return order[within * global_batch : (within + 1) * global_batch][rank::world].tolist()


def eval_share(count: int, limit: int, rank: int, world: int) -> range:
    """This rank's indices of the first `limit` of `count` eval examples: the same examples are evaluated at any
    world size (so runs compare), in equal shares (under ZeRO-3 every rank must run the same forward passes)."""
    total = min(count, limit)
    total -= total % world
    return range(rank, total, world)


def plan_steps(count: int, stage_cfg: DictConfig, what: str) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps) for `count` training examples under the stage's global batch,
    epochs and max_steps; too few examples for one batch is a DataError."""
    per_epoch = count // stage_cfg.global_batch
    if per_epoch == 0:
        raise DataError(f"{count} {what} are fewer than one global batch (stage.global_batch={stage_cfg.global_batch})")
    total = stage_cfg.epochs * per_epoch
    if stage_cfg.max_steps > total:
        log.warning(
            "%s: max_steps=%d is capped at %d steps (%d epoch(s) of %d %s in batches of %d); raise epochs for more",
            stage_cfg.name,
            stage_cfg.max_steps,
            total,
            stage_cfg.epochs,
            count,
            what,
            stage_cfg.global_batch,
        )
    return per_epoch, min(total, stage_cfg.max_steps) if stage_cfg.max_steps > 0 else total
