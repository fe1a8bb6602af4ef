"""What `rlhf` runs: one stage, or the three stages in a row. In a pipeline each stage's final model feeds the
next, each stage is its own W&B run in the run's group, and one table at the end says what each stage cost and gave.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from rlhf import gold
from rlhf.config import RESOLVED_CONFIG_NAME, Accelerator, save_resolved, stage_config
from rlhf.launch import check_run_dir, leads_run, run_stage
from rlhf.progress import format_seconds, markdown_table
from rlhf.stage_schemas import data_share

log = logging.getLogger("rlhf")

RESULT_KEYS = {  # the quality figures a stage's row shows, start -> end
    "sft": [("eval_loss_start", "eval_loss", "eval loss"), ("gold_score_start", "gold_score", "gold")],
    "reward": [("eval_acc_start", "eval_acc", "held-out acc")],
    "dpo": [("eval_acc_start", "eval_acc", "held-out acc"), ("gold_score_start", "gold_score", "gold")],
    "ppo": [
        # PPO's reward (the reward model's score normalised, plus any reward functions): on the rollouts, with the
        # EOS penalty and clip, and on the greedy answers to the held-out prompts
        ("reward_first", "reward_last", "train reward"),
        ("reward_start", "reward", "held-out reward"),
        ("gold_score_start", "gold_score", "gold"),
    ],
}


def hand_over(sub: DictConfig, outputs: dict[str, str]) -> None:
    """Point a stage at the outputs of the stages before it, unless the config names its own inputs: the SFT output
    is the policy the reward stage samples (and, with `from_policy`, starts from) and the policy DPO trains; PPO's
    actor and reward model are the SFT and reward outputs."""
    if sub.stage.name == "reward" and "sft" in outputs and not sub.stage.policy_from:
        sub.stage.policy_from = outputs["sft"]
    if sub.stage.name == "dpo" and "sft" in outputs and not sub.stage.init_from:
        sub.stage.init_from = outputs["sft"]
    if sub.stage.name == "ppo":
        if not sub.stage.init_from and "sft" in outputs:
            sub.stage.init_from = outputs["sft"]
        if not sub.stage.reward_from and "reward" in outputs:
            sub.stage.reward_from = outputs["reward"]


def result_text(summary: dict) -> str:
    """A stage's result in one cell: each figure start -> end; the gold change with its paired 95% interval, the
    reward model's accuracy with its interval and the PPO actor's KL to the reference."""
    parts = []
    for start, end, label in RESULT_KEYS.get(summary["stage"], []):
        if end in summary:
            before = f"{summary[start]:.3g} -> " if start in summary else ""
            parts.append(f"{label} {before}{summary[end]:.3g}")
    if "gold_delta" in summary:
        parts.append(
            f"gold {summary['gold_delta'] * 100:+.1f} pts [{summary['gold_delta_low'] * 100:+.1f}, "
            f"{summary['gold_delta_high'] * 100:+.1f}] (n={summary['gold_n']})"
        )
    if "eval_acc_ci_low" in summary:
        parts.append(
            f"acc 95% [{summary['eval_acc_ci_low']:.3g}, {summary['eval_acc_ci_high']:.3g}] on "
            f"{summary['eval_pairs']:.0f} pairs"
        )
        if "eval_acc_policy" in summary:
            parts.append(f"on the policy's right/wrong pairs {summary['eval_acc_policy']:.3g}")
    if summary["stage"] == "ppo" and "kl" in summary:
        parts.append(f"KL {summary['kl']:.3g} nats (held-out), {summary.get('kl_last', float('nan')):.3g} (rollouts)")
    pair_acc = summary.get("reward_gold_pair_acc", math.nan) if summary["stage"] == "ppo" else math.nan
    if not math.isnan(pair_acc):
        parts.append(f"reward orders right/wrong answers to a prompt {pair_acc:.3g} (rollouts)")
    return ", ".join(parts)


def gold_evaluations(run_dir: Path, names: list[str]) -> dict[str, gold.GoldRecord]:
    """The held-out gold evaluations of a pipeline's stages, by model: base (SFT's start), sft, dpo, ppo (the start
    of DPO or PPO is the SFT model again and is left out when it answered alike)."""
    labels = {("sft", "start"): "base", ("sft", "end"): "sft", ("dpo", "start"): "dpo start", ("dpo", "end"): "dpo"}
    labels |= {("ppo", "start"): "ppo start", ("ppo", "end"): "ppo"}
    found: dict[str, gold.GoldRecord] = {}
    for name in names:
        for when, record in gold.load(run_dir / name).items():
            label = labels.get((name, when))
            if label in ("ppo start", "dpo start") and "sft" in found and found["sft"].correct == record.correct:
                continue
            if label:
                found[label] = record
    return found


def gold_changes(evaluations: dict[str, gold.GoldRecord]) -> dict[str, dict]:
    """Every paired change between the evaluations (base -> sft, sft -> ppo, base -> ppo, ...)."""
    order = list(evaluations)
    changes = {}
    for i, before in enumerate(order):
        for after in order[i + 1 :]:
            if evaluations[before].prompts == evaluations[after].prompts:
                change = gold.compare(evaluations[before], evaluations[after])
                changes[f"{before} -> {after}"] = {
                    "diff": change.diff.value,
                    "low": change.diff.low,
                    "high": change.diff.high,
                    "p_value": change.p_value,
                    "gained": change.gained,
                    "lost": change.lost,
                    "n": change.n,
                    "text": change.text(),
                }
    return changes


def gold_report(evaluations: dict[str, gold.GoldRecord], changes: dict[str, dict]) -> str:
    """The gold score of every stage's model per task family, and the paired changes, as text."""
    if not evaluations:
        return ""
    lines = ["held-out gold score (greedy answers; 95% intervals):", markdown_table(gold.family_table(evaluations))]
    lines += [f"{pair}: {change['text']}" for pair, change in changes.items()]
    return "\n".join(lines)


def pipeline_table(summaries: list[dict]) -> list[dict[str, object]]:
    """DeepSpeed-Chat's end-of-run table: per stage, wall time, throughput, estimated cost and the result."""
    rows: list[dict[str, object]] = [
        {
            "stage": s["stage"],
            "model": s["model"],
            "world_size": s["world_size"],
            "steps": s.get("steps", ""),
            "wall": format_seconds(s["wall_s"]),
            "samples_per_s": s.get("samples_per_s", float("nan")),
            "tokens_per_s": s.get("tokens_per_s", float("nan")),
            "est_cost_usd": s["est_cost_usd"],
            "result": result_text(s),
        }
        for s in summaries
    ]
    rows.append(
        {
            "stage": "total",
            "model": "",
            "world_size": "",
            "steps": "",
            "wall": format_seconds(sum(s["wall_s"] for s in summaries)),
            "samples_per_s": "",
            "tokens_per_s": "",
            "est_cost_usd": sum(s["est_cost_usd"] for s in summaries),
            "result": "",
        }
    )
    return rows


def next_step_hint(summary: dict) -> str:
    output = summary["output"]
    if summary["stage"] == "reward":
        return f"score responses with it: rlhf-score {output} --prompt '...' --response '...'"
    return f"chat with it: rlhf-chat {output}"


UNITS = {"sft": "SFT examples", "reward": "reward pairs", "dpo": "DPO pairs", "ppo": "PPO prompts"}


def check_stage_data(cfg: DictConfig, names: list[str]) -> str | None:
    """Why a stage would run out of data, found before the first stage starts (rather than after SFT has trained):
    too few training rows in the mix for one global batch, naming the pipeline's own key. The reward stage's
    on-policy pairs are counted only once sampled, so that stage is checked from its static pairs only when it uses
    no on-policy pairs."""
    from rlhf.data import DataError, stage_rows

    for name in names:
        sub = stage_config(cfg, name).stage
        if name in ("reward", "dpo") and sub.onpolicy.samples_per_prompt > 0:
            continue
        try:
            count = len(stage_rows(cfg.data, data_share(name)).train)
        except DataError as err:
            return str(err)
        if count < sub.global_batch:
            return (
                f"the data mix gives stage {name} {count} {UNITS[name]}, fewer than one global batch "
                f"(stage.{name}.global_batch={sub.global_batch}): lower it or add data"
            )
    return None


def run(cfg: DictConfig, run_dir: Path) -> int:
    """Run the configured stage, or each stage of a pipeline; return the exit code (0 on success, 2 for unusable
    input, else the workers')."""
    if cfg.hardware.accelerator == Accelerator.cuda and not torch.cuda.is_available():
        log.error(
            "hardware=%s needs CUDA GPUs and none is visible here; use hardware=cpu or hardware=cpu-2proc",
            cfg.hardware.name,
        )
        return 2
    lead = leads_run(cfg)  # the other nodes (or SLURM tasks) of a run leave its folder's records to the lead
    problem = check_run_dir(cfg, run_dir) if lead else None
    if problem:
        log.error("%s", problem)
        return 2
    if lead and not (run_dir / RESOLVED_CONFIG_NAME).is_file():  # a resumed run keeps the record it started with
        save_resolved(cfg, run_dir)
    if cfg.stage.name == "pipeline":
        return run_pipeline(cfg, run_dir, lead)
    return run_stage(cfg, run_dir, run_dir / RESOLVED_CONFIG_NAME if lead else None)


def run_pipeline(cfg: DictConfig, run_dir: Path, lead: bool = True) -> int:
    """Run `stage.stages` in order; stop at the first stage that fails and return its exit code. Only the `lead`
    process writes the stages' configs and the pipeline's report."""
    names = list(cfg.stage.stages)
    problem = check_stage_data(cfg, [n for n in names if not (run_dir / n / "summary.json").is_file()])
    if problem:
        log.error("pipeline not started: %s", problem)
        return 2
    outputs: dict[str, str] = {}
    summaries: list[dict] = []
    started = time.perf_counter()
    for i, name in enumerate(names, start=1):
        sub = stage_config(cfg, name)
        hand_over(sub, outputs)
        log.info(
            "pipeline: stage %d/%d, %s (elapsed %s)", i, len(names), name, format_seconds(time.perf_counter() - started)
        )
        config_path = save_resolved(sub, run_dir / name) if lead else None
        code = run_stage(sub, run_dir, config_path)  # a finished stage returns at once
        if code != 0:
            log.error("pipeline stopped in stage %s (exit code %d); outputs so far: %s", name, code, outputs or "none")
            return code
        summary = json.loads((run_dir / name / "summary.json").read_text())
        outputs[name] = summary["output"]
        summaries.append(summary)
    if not lead:
        log.info("pipeline done; the lead process writes its report in %s", run_dir)
        return 0
    table = markdown_table(pipeline_table(summaries))
    evaluations = gold_evaluations(run_dir, names)
    changes = gold_changes(evaluations)
    report = gold_report(evaluations, changes)
    final = summaries[-1]
    (run_dir / "pipeline.md").write_text(f"{table}\n\n{report}\n\nfinal model: {final['output']}\n")
    record = {"stages": summaries, "outputs": outputs, "gold": {k: r._asdict() for k, r in evaluations.items()}}
    (run_dir / "pipeline.json").write_text(json.dumps(record | {"gold_changes": changes}, indent=2))
    log.info(
        "pipeline done in %s\n%s\n\n%s\nfinal model: %s\n%s",
        format_seconds(time.perf_counter() - started),
        table,
        report,
        final["output"],
        next_step_hint(final),
    )
    return 0
