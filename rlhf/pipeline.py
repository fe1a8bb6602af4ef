"""The three stages in a row: each stage's final model feeds the next, each stage is its own W&B run in the run's
group, and one table at the end says what each stage cost and gave."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from rlhf.config import save_resolved, stage_config
from rlhf.progress import format_seconds, markdown_table

log = logging.getLogger("rlhf")

RESULT_KEYS = {  # the quality figures a stage's row shows, start -> end
    "sft": [("eval_loss_start", "eval_loss", "eval loss")],
    "reward": [("eval_acc_start", "eval_acc", "held-out acc")],
    "ppo": [
        ("reward_first", "reward_last", "train reward"),
        ("reward_start", "reward", "held-out reward"),
        ("gold_score_start", "gold_score", "gold"),
    ],
}


def hand_over(sub: DictConfig, outputs: dict[str, str]) -> None:
    """Point a stage at the outputs of the stages before it, unless the config names its own inputs."""
    if sub.stage.name == "ppo":
        if not sub.stage.init_from and "sft" in outputs:
            sub.stage.init_from = outputs["sft"]
        if not sub.stage.reward_from and "reward" in outputs:
            sub.stage.reward_from = outputs["reward"]


def result_text(summary: dict) -> str:
    parts = []
    for start, end, label in RESULT_KEYS.get(summary["stage"], []):
        if end in summary:
            parts.append(f"{label} {summary.get(start, float('nan')):.3g} -> {summary[end]:.3g}")
    return ", ".join(parts)


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


def run_pipeline(cfg: DictConfig, run_dir: Path) -> int:
    """Run `stage.stages` in order; stop at the first stage that fails and return its exit code."""
    from rlhf.launch import run_stage

    names = list(cfg.stage.stages)
    outputs: dict[str, str] = {}
    summaries: list[dict] = []
    started = time.perf_counter()
    for i, name in enumerate(names, start=1):
        sub = stage_config(cfg, name)
        hand_over(sub, outputs)
        log.info(
            "pipeline: stage %d/%d, %s (elapsed %s)", i, len(names), name, format_seconds(time.perf_counter() - started)
        )
        code = run_stage(sub, run_dir, save_resolved(sub, run_dir / name))  # a finished stage returns at once
        if code != 0:
            log.error("pipeline stopped in stage %s (exit code %d); outputs so far: %s", name, code, outputs or "none")
            return code
        summary = json.loads((run_dir / name / "summary.json").read_text())
        outputs[name] = summary["output"]
        summaries.append(summary)
    table = markdown_table(pipeline_table(summaries))
    final = summaries[-1]
    (run_dir / "pipeline.md").write_text(f"{table}\n\nfinal model: {final['output']}\n")
    (run_dir / "pipeline.json").write_text(json.dumps({"stages": summaries, "outputs": outputs}, indent=2))
    log.info(
        "pipeline done in %s\n%s\nfinal model: %s\n%s",
        format_seconds(time.perf_counter() - started),
        table,
        final["output"],
        next_step_hint(final),
    )
    return 0
