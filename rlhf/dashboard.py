"""The W&B dashboard of a run or a sweep: the panels a reader needs, saved as a W&B workspace with wandb-workspaces.

`rlhf-report <folder>` writes the dashboard's spec beside the report (`wandb_workspace.json`: the W&B project, the
runs' groups and the panels, each naming the metric keys it plots); `rlhf-report --wandb <folder>` also saves it to
W&B as a workspace of the project, filtered to those groups. The spec is this module's own small format, readable
and checked offline; wandb-workspaces builds the workspace from it. Runs logged offline must be synced first
(`wandb sync <run>/wandb/offline-run-*`): a workspace shows what the W&B server holds.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from rlhf.tracking import STEP_METRIC, run_group

SPEC_FILE = "wandb_workspace.json"

# Per step, per run: (title, metric keys) for each stage present (the keys each stage logs, rlhf/stages/*).
LEARNING = {
    "sft": [("SFT loss (train, held-out)", ["sft/loss", "sft/eval_loss"])],
    "reward": [
        ("reward model loss (train, held-out)", ["reward/loss", "reward/eval_loss"]),
        ("reward model accuracy on held-out pairs", ["reward/acc"]),
    ],
    "dpo": [
        ("DPO loss (train, held-out)", ["dpo/loss", "dpo/eval/loss"]),
        ("DPO implicit reward accuracy (train, held-out)", ["dpo/rewards/accuracies", "dpo/eval/rewards/accuracies"]),
        ("DPO reward margin", ["dpo/rewards/margins"]),
    ],
    "ppo": [
        ("PPO reward of the rollouts", ["ppo/reward_mean"]),
        ("KL to the reference (rollouts, held-out answers)", ["ppo/kl", "eval/kl"]),
        ("PPO policy loss", ["ppo/policy_loss"]),
        ("PPO entropy", ["ppo/entropy"]),
        ("PPO clip fraction (low, high)", ["ppo/clipfrac_low", "ppo/clipfrac_high"]),
        ("response length (tokens)", ["ppo/response_len"]),
        ("truncated responses (hit max_new_tokens)", ["ppo/truncated_frac"]),
    ],
}
CRITIC = ("PPO value loss (critic)", ["ppo/value_loss"])
GOLD = ("gold score: held-out prompts, greedy, graded by the verifier", ["eval/gold_score"])
SCALING_X = {"model size (M parameters)": "model.params_m", "world size (devices)": "hardware.world_size"}
SCALING_Y = {"wall time (s)": "wall_s", "samples/s": "samples_per_s", "tokens/s": "tokens_per_s"}
SAMPLES = {"ppo": "ppo/samples"}


def run_folders(summaries: list[Path]) -> list[Path]:
    """The run folders (each holding config.resolved.yaml) of stage summaries `<run>/<stage>/summary.json`."""
    return sorted({p.parent.parent for p in summaries if (p.parent.parent / "config.resolved.yaml").is_file()})


def workspace_spec(summaries: list[Path], title: str) -> dict:
    """The dashboard of the runs whose stage summaries are `summaries`: the W&B project (of the first run), the runs'
    W&B groups, and sections of panels (per-step learning curves of each stage present and the gold score; wall time,
    samples/s and tokens/s of each stage against model size and world size; the runs side by side; PPO's sample
    responses)."""
    folders = run_folders(summaries)
    if not folders:
        raise FileNotFoundError("no run folder (config.resolved.yaml beside the stage folders) to build a dashboard of")
    configs = {folder: OmegaConf.load(folder / "config.resolved.yaml") for folder in folders}
    stages = [s for s in LEARNING if any(p.parent.name == s for p in summaries)]
    first = configs[folders[0]]
    learning = [panel for stage in stages for panel in LEARNING[stage]]
    if "ppo" in stages and any(uses_critic(cfg) for cfg in configs.values()):
        learning.append(CRITIC)
    if any(s in stages for s in ("sft", "dpo", "ppo")):
        learning.append(GOLD)
    scaling = [
        {"kind": "scatter", "title": f"{stage}: {y_name} by {x_name}", "x": f"config:{x}", "y": f"summary:{stage}/{y}"}
        for stage in stages
        for y_name, y in SCALING_Y.items()
        for x_name, x in SCALING_X.items()
    ]
    sections = [
        {
            "name": "Learning",
            "panels": [{"kind": "line", "title": t, "x": STEP_METRIC, "y": keys} for t, keys in learning],
        },
        {"name": "Scaling", "panels": scaling},
        {"name": "Runs side by side", "panels": [{"kind": "runs", "title": "config and summary of each run"}]},
    ]
    tables = [{"kind": "table", "title": f"{s} samples", "key": SAMPLES[s]} for s in stages if s in SAMPLES]
    if tables:
        sections.append({"name": "Sample responses", "panels": tables})
    return {
        "entity": first.logger.entity or "",
        "project": first.logger.project,
        "name": title,
        "groups": sorted({cfg.logger.group or run_group(folder) for folder, cfg in configs.items()}),
        "sections": sections,
    }


def uses_critic(cfg) -> bool:
    """Whether the run's PPO stage trains a critic (GAE), whose value loss is then worth a panel."""
    stage = cfg.stage.ppo if "ppo" in cfg.stage else cfg.stage
    return stage.get("advantage", "gae") == "gae"


def write_spec(spec: dict, folder: Path) -> Path:
    path = folder / SPEC_FILE
    path.write_text(json.dumps(spec, indent=2) + "\n")
    return path


def build_workspace(spec: dict, entity: str):
    """The wandb-workspaces Workspace of a spec (nothing is sent: `.save()` publishes it)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    def axis(name: str):
        kind, _, key = name.partition(":")
        return wr.Config(key) if kind == "config" else wr.SummaryMetric(key)

    def panel(p: dict):
        if p["kind"] == "line":
            return wr.LinePlot(title=p["title"], x=p["x"], y=list(p["y"]))
        if p["kind"] == "scatter":
            return wr.ScatterPlot(title=p["title"], x=axis(p["x"]), y=axis(p["y"]))
        if p["kind"] == "table":
            return wr.WeavePanelSummaryTable(table_name=p["key"])
        return wr.RunComparer(diff_only="split")

    sections = [
        ws.Section(name=s["name"], is_open=True, panels=[panel(p) for p in s["panels"]]) for s in spec["sections"]
    ]
    return ws.Workspace(
        entity=entity,
        project=spec["project"],
        name=spec["name"],
        sections=sections,
        runset_settings=ws.RunsetSettings(filters=ws.And(ws.Metric("Group").isin(spec["groups"]))),
    )


def publish(spec: dict) -> str:
    """Save the spec's workspace to W&B (a key must be configured); its URL."""
    import wandb

    entity = spec["entity"] or wandb.Api().default_entity
    return build_workspace(spec, entity).save().url
