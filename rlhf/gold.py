"""The gold score: greedy answers to held-out verifiable prompts, graded by the built-in scorer.

Every stage that claims to improve the policy answers the same held-out prompts (`data.gold_rows`) before and
after, so two evaluations pair prompt by prompt: a stage's gain comes with a paired 95% interval, per task family.
Each rank answers an equal share; the per-prompt outcomes are gathered on rank 0 and kept in `<stage>/gold.json`,
from which the pipeline pairs any two evaluations (the base model against the PPO output, say).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from rlhf import dist, models, rollout, stats
from rlhf.data import builtin
from rlhf.data.tokenize import PromptFormat, encode_prompts, pad_left
from rlhf.ppo import functional as ppo_math

GOLD_FILE = "gold.json"


class Answers(NamedTuple):
    """Greedy answers to one batch of prompts. B rows, prompt width W, response width R."""

    rows: list[dict]  # the prompts' rows ({prompt, family, input_ids})
    sequences: torch.Tensor  # [B, W + R] left-padded prompt then response
    attention_mask: torch.Tensor  # [B, W + R]
    response_mask: torch.Tensor  # [B, R] 1 up to and including the first EOS (the first token always)
    width: int
    texts: list[str]


def encode_rows(rows: list[dict], tokenizer, fmt: PromptFormat, max_prompt_len: int) -> list[dict]:
    """The rows with their prompts' generation ids; a prompt longer than `max_prompt_len` is left out."""
    encoded = []
    for row in rows:
        for ids in encode_prompts(tokenizer, fmt, [row["prompt"]], max_prompt_len)[0]:
            encoded.append({**row, "input_ids": ids})
    return encoded


def my_share(rows: list[dict]) -> list[dict]:
    """This rank's rows: every world-th, and the same count on every rank (ZeRO-3 ranks generate in step)."""
    world = dist.world_size()
    usable = len(rows) - len(rows) % world
    return rows[:usable][dist.rank() :: world]


@torch.no_grad()
def answers(
    model,
    tokenizer,
    rows: list[dict],
    batch: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    samples_per_prompt: int = 1,
) -> Iterator[Answers]:
    """Answers of `model` (a plain model: see rollout.GenerationModel) to `rows`, `batch` prompts at a time:
    greedy at temperature 0, else sampled, `samples_per_prompt` per prompt (rows repeated in the result)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    device = next(model.parameters()).device
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        prompts = pad_left([r["input_ids"] for r in chunk], pad)
        width = prompts["input_ids"].shape[1]
        sequences = rollout.generate(
            model,
            prompts["input_ids"].to(device),
            prompts["attention_mask"].to(device),
            max_new_tokens,
            eos,
            pad,
            temperature=temperature,
            samples_per_prompt=samples_per_prompt,
        ).sequences.cpu()
        resp_mask = rollout.response_mask(sequences[:, width:], eos)
        resp_mask[:, 0] = 1
        texts = [
            tokenizer.decode(seq[width:][m.bool()], skip_special_tokens=True)
            for seq, m in zip(sequences, resp_mask, strict=True)
        ]
        mask = torch.cat([prompts["attention_mask"].repeat_interleave(samples_per_prompt, dim=0), resp_mask], dim=1)
        rows_out = [row for row in chunk for _ in range(samples_per_prompt)]
        yield Answers(rows_out, sequences, mask, resp_mask, width, texts)


def grade(rows: list[dict], texts: list[str]) -> list[float]:
    """The gold score (1 right, 0 wrong) of each answer to a built-in prompt."""
    return [builtin.grade(row["prompt"], text) for row, text in zip(rows, texts, strict=True)]


class GoldRecord(NamedTuple):
    """One evaluation's per-prompt outcomes, in the order of the held-out prompts (all ranks gathered)."""

    prompts: list[str]
    families: list[str]
    correct: list[float]
    responses: list[str]


def gather(rows: list[dict], correct: list[float], responses: list[str]) -> GoldRecord | None:
    """This rank's outcomes (from `my_share`) merged over all ranks into prompt order; None except on rank 0."""
    mine = [(r["prompt"], r["family"], c, t) for r, c, t in zip(rows, correct, responses, strict=True)]
    shares = dist.gather_objects(mine)
    if shares is None:
        return None
    ordered = [item for group in zip(*shares, strict=True) for item in group]  # rank r holds items r, r + W, ...
    return GoldRecord(*(list(column) for column in zip(*ordered, strict=True))) if ordered else None


def family_means(record: GoldRecord) -> dict[str, float]:
    """The gold score per task family."""
    sums: dict[str, list[float]] = {}
    for family, correct in zip(record.families, record.correct, strict=True):
        sums.setdefault(family, []).append(correct)
    return {family: sum(v) / len(v) for family, v in sorted(sums.items())}


def metrics(record: GoldRecord, prefix: str = "eval/gold") -> dict[str, float]:
    """W&B figures of one evaluation: the score with its 95% interval, the count, and the score per family."""
    score = stats.wilson_interval(sum(record.correct), len(record.correct))
    figures = {
        f"{prefix}_score": score.value,
        f"{prefix}_ci_low": score.low,
        f"{prefix}_ci_high": score.high,
        f"{prefix}_n": float(len(record.correct)),
    }
    return figures | {f"{prefix}/{family}": value for family, value in family_means(record).items()}


def summary_figures(metrics: dict[str, float], suffix: str = "") -> dict[str, float]:
    """The evaluation's figures for the stage summary: eval/gold_score -> gold_score, eval/gold/sorting ->
    gold_sorting, with `suffix` (e.g. _start)."""
    return {k.removeprefix("eval/").replace("/", "_") + suffix: v for k, v in metrics.items() if k.startswith("eval/")}


def compare(before: GoldRecord, after: GoldRecord) -> stats.PairedDifference:
    """after - before on the same prompts, with its paired interval; the records must hold the same prompts."""
    if before.prompts != after.prompts:
        raise ValueError("the two gold evaluations answered different prompts: they cannot be paired")
    return stats.paired_difference(before.correct, after.correct)


def compare_by_family(before: GoldRecord, after: GoldRecord) -> dict[str, stats.PairedDifference]:
    """`compare` within each task family."""
    out = {}
    for family in sorted(set(before.families)):
        index = [i for i, f in enumerate(before.families) if f == family]
        out[family] = stats.paired_difference([before.correct[i] for i in index], [after.correct[i] for i in index])
    return out


def save(folder: Path, records: dict[str, GoldRecord]) -> Path:
    """Write `<folder>/gold.json` ({when: record}, e.g. start and end) atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / GOLD_FILE
    tmp = path.with_name(f".{GOLD_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({when: record._asdict() for when, record in records.items()}))
    os.replace(tmp, path)
    return path


def describe(record: GoldRecord) -> str:
    """The score with its 95% interval and the prompt count, for a log line."""
    score = stats.wilson_interval(sum(record.correct), len(record.correct))
    return f"{score.text()} on {len(record.correct)} held-out prompts, greedy"


def keep(records: dict[str, GoldRecord], when: str, record: GoldRecord, folder: Path | None) -> dict[str, float]:
    """Keep `record` as evaluation `when` of `records`, saved in `<folder>/gold.json` (not without a folder); its
    W&B figures."""
    records[when] = record
    if folder is not None:
        save(folder, records)
    return metrics(record)


def load(folder: Path) -> dict[str, GoldRecord]:
    """The records of `<folder>/gold.json`; empty when there is none."""
    path = folder / GOLD_FILE
    if not path.is_file():
        return {}
    return {when: GoldRecord(**record) for when, record in json.loads(path.read_text()).items()}


def handed_over(run_dir: Path | None, init_from: str, rows: list[dict], world: int) -> GoldRecord | None:
    """The SFT stage's final gold evaluation when the next stage starts from that stage's output in the same run
    (`init_from` is `<run_dir>/sft/final`) and it answered the same held-out `rows` (as `world` ranks share them):
    the next stage's start evaluation would generate the same greedy answers again."""
    if run_dir is None or not init_from:
        return None
    sft_final = run_dir / "sft" / "final"
    if Path(init_from).resolve() != sft_final.resolve():
        return None
    record = load(run_dir / "sft").get("end")
    if record is None or record.prompts != [r["prompt"] for r in rows[: len(record.prompts)]]:
        return None
    return record if len(record.prompts) == len(rows) - len(rows) % world else None


def held_out_rows(cfg, tokenizer) -> list[dict]:
    """The held-out gold prompts of a run (`eval.gold_prompts` of `eval.gold_split`), encoded for generation."""
    from rlhf.data import gold_rows

    if cfg.eval.gold_prompts <= 0:
        return []
    rows = gold_rows(cfg.data, cfg.eval.gold_split, cfg.eval.gold_prompts)
    return encode_rows(rows, tokenizer, PromptFormat.for_tokenizer(tokenizer, cfg.data), cfg.data.max_prompt_len)


def delta_figures(records: dict[str, GoldRecord], before: str = "start", after: str = "end") -> dict[str, float]:
    """The paired change of the gold score between two evaluations for a stage summary (empty unless both exist):
    gold_delta with its 95% interval, McNemar's p and the prompts gained and lost."""
    if before not in records or after not in records:
        return {}
    change = compare(records[before], records[after])
    return {
        "gold_delta": change.diff.value,
        "gold_delta_low": change.diff.low,
        "gold_delta_high": change.diff.high,
        "gold_delta_p": change.p_value,
        "gold_gained": change.gained,
        "gold_lost": change.lost,
        "gold_n": change.n,
    }


def evaluate_policy(
    generation_model, tokenizer, rows: list[dict], cfg, reference=None
) -> tuple[GoldRecord | None, float | None]:
    """Every rank answers its share of `rows` greedily with the model `generation_model()` gives (see
    rollout.GenerationModel): the graded outcomes, gathered on rank 0 (None elsewhere), and with a `reference`
    model the policy's KL to it along the answers to the first `eval.kl_prompts` (see answers_kl; every rank)."""
    mine = my_share(rows)
    correct, texts = [], []
    kl_share = cfg.eval.kl_prompts // dist.world_size() if reference is not None else 0
    kl_sum, kl_rows = 0.0, 0
    with generation_model() as model:
        for batch in answers(model, tokenizer, mine, cfg.eval.batch, cfg.eval.max_new_tokens):
            correct += grade(batch.rows, batch.texts)
            texts += batch.texts
            count = max(0, min(len(batch.rows), kl_share - kl_rows))
            if count:
                kl_sum += answers_kl(model, reference, batch, count, cfg.hardware.micro_batch)
                kl_rows += count
    kl_sum, kl_rows = dist.all_reduce_sum([kl_sum, kl_rows])
    return gather(mine, correct, texts), (kl_sum / kl_rows if kl_rows else None)


@torch.no_grad()
def answers_kl(policy, reference, batch: Answers, rows: int, micro: int) -> float:
    """KL(policy || reference) along the first `rows` answers of `batch`: each position's whole next-token
    distributions (a real KL, not a one-sample estimate), summed over each answer's tokens and over the rows, in
    nats; `micro` rows at a time (full-vocabulary logits)."""
    total = 0.0
    for start in range(0, rows, micro):
        part = slice(start, min(start + micro, rows))
        sequences, mask = batch.sequences[part], batch.attention_mask[part]
        logits = models.response_logits(policy, sequences, mask, batch.width)
        ref_logits = models.response_logits(reference, sequences, mask, batch.width)
        kl = ppo_math.full_kl(logits, ref_logits) * batch.response_mask[part].to(logits.device)
        total += kl.sum().item()
    return total


def family_table(evaluations: dict[str, GoldRecord]) -> list[dict[str, object]]:
    """Rows of task family x evaluation (e.g. base, sft, ppo): each cell the score, the last row all families with
    their 95% intervals."""
    families = sorted({f for record in evaluations.values() for f in record.families})
    rows: list[dict[str, object]] = []
    for family in families:
        row: dict[str, object] = {"family": family}
        for label, record in evaluations.items():
            row[label] = family_means(record).get(family, float("nan"))
        row["n"] = next(iter(evaluations.values())).families.count(family)
        rows.append(row)
    total: dict[str, object] = {"family": "all"}
    for label, record in evaluations.items():
        total[label] = stats.wilson_interval(sum(record.correct), len(record.correct)).text()
    total["n"] = len(next(iter(evaluations.values())).correct)
    return [*rows, total]
