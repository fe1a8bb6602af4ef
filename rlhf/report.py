"""`rlhf-report`: compare runs from their stage summaries: a markdown table, a CSV, PNG plots of time and
throughput against model size and world size, and of what each run learned (gold change and reward-model accuracy
with their 95% intervals), with the settings that differ between the runs.

    rlhf-report outputs/multirun/<date>/<time>-scaling-cpu            a sweep (every job under it)
    rlhf-report outputs/<run-a> outputs/<run-b> --out reports/ab      any runs, side by side
    rlhf-report --wandb outputs/multirun/<date>/<time>-scaling-cpu    and save its W&B dashboard (a workspace)

The W&B dashboard's spec (wandb_workspace.json: the runs' groups and the panels) is always written beside the report;
--wandb saves it to the W&B project as a workspace (runs logged offline: `wandb sync` them first).

Dry runs under the folders (plan.json) are set beside DeepSpeed-Chat's published step-3 hours and dollars for the same
model and hardware (plans.md; `rlhf -m +sweep=dschat-tables` plans every cell of its tables).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from rlhf import dashboard, tracking
from rlhf.progress import markdown_table

STAGES = ("sft", "reward", "dpo", "ppo")
COLUMNS = [
    "stage",
    "model",
    "params_m",
    "hardware",
    "world_size",
    "host_cpus",
    "steps",
    "wall_s",
    "samples_per_s",
    "tokens_per_s",
    "est_cost_usd",
    "peak_rss_gb",
    "peak_device_gb",
    "eval_loss",
    "eval_tokens",
    "eval_acc",
    "eval_acc_ci_low",
    "eval_acc_ci_high",
    "eval_acc_policy",
    "reward_last",
    "kl_last",
    "kl",
    "gold_score_start",
    "gold_score",
    "gold_delta",
    "gold_delta_low",
    "gold_delta_high",
    "settings",
    "run",
]


# DeepSpeed-Chat's published step-3 figures (its README's tables; OPT-350M reward model, 135M tokens, 256 + 256):
# (model, hardware) -> (hours, dollars; None where it gives none)
DSCHAT_STEP3 = {
    ("opt-6.7b", "8xA100-80G"): (4.1, 132),
    ("opt-13b", "8xA100-80G"): (9.0, 290),
    ("opt-30b", "8xA100-80G"): (18.0, 580),
    ("opt-66b", "8xA100-80G"): (2.1 * 24, 1620),
    ("opt-6.7b", "8xA100-40G"): (5.7, None),
    ("opt-13b", "8xA100-40G"): (10.8, None),
    ("opt-30b", "8xA100-40G"): (1.85 * 24, None),
    ("opt-13b", "64xA100-80G"): (1.25, 320),
    ("opt-30b", "64xA100-80G"): (4.0, 1024),
    ("opt-66b", "64xA100-80G"): (7.5, 1920),
    ("opt-175b", "64xA100-80G"): (20.0, 5120),
}


def plan_rows(paths: list[Path]) -> list[dict[str, object]]:
    """The PPO plans of the dry runs under `paths` beside DeepSpeed-Chat's published time and cost for the same model
    and hardware, with the ratio and, where they differ by more than 2x, the term that dominates our estimate; and
    the memory per device against what the plan may use, split into model states and activations (in PPO the
    sampler's KV cache), which says why a cell does not fit."""
    from omegaconf import OmegaConf

    from rlhf.config import RESOLVED_CONFIG_NAME
    from rlhf.plan import HEADROOM

    rows: list[dict[str, object]] = []
    for plan_path in sorted(p for path in paths for p in path.rglob("plan.json")):
        cfg = OmegaConf.load(plan_path.parent / RESOLVED_CONFIG_NAME)
        for stage in json.loads(plan_path.read_text())["stages"]:
            if stage["stage"] != "ppo" or not isinstance(stage["est_s"], int | float):
                continue
            hours, dollars = DSCHAT_STEP3.get((cfg.model.name, cfg.hardware.name), (None, None))
            ours = stage["est_s"] / 3600
            ratio = ours / hours if hours else None
            generation = stage["est_gen_frac"]
            hw, note = cfg.hardware, ""
            if ratio is not None and not 0.5 <= ratio <= 2:
                note = (
                    f"sampling, {generation:.0%} of ours (hardware.generation_mfu={hw.generation_mfu:g})"
                    if generation > 0.5
                    else f"training and forwards, {1 - generation:.0%} (hardware.expected_mfu={hw.expected_mfu:g})"
                )
            rows.append(
                {
                    "model": cfg.model.name,
                    "params_b": round(stage["params_m"] / 1000, 1),
                    "hardware": cfg.hardware.name,
                    "fits": stage["fits"],
                    "tokens": stage["tokens"],
                    "plan_hours": ours,
                    "plan_usd": stage["est_cost_usd"],
                    "dschat_hours": hours if hours is not None else "",
                    "dschat_usd": dollars if dollars is not None else "",
                    "plan_over_dschat": ratio if ratio is not None else "",
                    "sampling_share": generation,
                    "dominant_term": note,
                    "memory_gb": (
                        f"{stage['total_gb']:.0f} of {stage['device_gb'] * HEADROOM:.0f}: states "
                        f"{stage['weights_gb'] + stage['grads_gb'] + stage['optim_gb']:.0f} + activations "
                        f"{stage['activations_gb']:.0f}"
                    ),
                }
            )
    return sorted(rows, key=lambda r: (str(r["hardware"]), r["params_b"]))


def find_summaries(paths: list[Path]) -> list[Path]:
    """Every `<run>/<stage>/summary.json` under the given run or sweep folders."""
    found: list[Path] = []
    for path in paths:
        found += [p for p in sorted(path.rglob("summary.json")) if p.parent.name in STAGES]
    return found


def row_of(path: Path) -> dict[str, object]:
    summary = json.loads(path.read_text())
    row: dict[str, object] = {key: summary.get(key, "") for key in COLUMNS}
    row["params_m"] = summary.get("model_params_m") or ""
    row["run"] = str(path.parent.parent)
    row["settings"] = overrides_of(path.parent.parent)
    return row


def overrides_of(run: Path) -> list[str]:
    """The command-line overrides a run was started with (Hydra's record of them)."""
    record = run / ".hydra" / "overrides.yaml"
    if not record.is_file():
        return []
    from omegaconf import OmegaConf

    return [str(item) for item in OmegaConf.load(record)]


def varying_settings(rows: list[dict]) -> None:
    """Keep in each row's `settings` only the overrides that differ between the runs (a sweep's axes)."""
    common = set.intersection(*(set(row["settings"]) for row in rows)) if rows else set()
    for row in rows:
        row["settings"] = " ".join(o for o in row["settings"] if o not in common)


def sort_key(row: dict) -> tuple:
    params = row["params_m"] if isinstance(row["params_m"], (int, float)) else 0.0
    return STAGES.index(row["stage"]) if row["stage"] in STAGES else 9, params, row["world_size"], row["run"]


def series_label(stage: str, key: str, value: object) -> str:
    if key == "world_size":
        return f"{stage}, {value} process{'es' if value != 1 else ''}"
    return f"{stage}, {value:g}M parameters" if isinstance(value, (int, float)) else f"{stage}, {value}"


def hardware_note(rows: list[dict]) -> str:
    """What the runs ran on, and that the processes of a CPU run share the machine's cores (so more processes
    cannot scale like more GPUs)."""
    hardware = sorted({str(r["hardware"]) for r in rows if r["hardware"]})
    cpus = sorted({int(r["host_cpus"]) for r in rows if isinstance(r["host_cpus"], int)})
    note = ", ".join(hardware)
    if cpus and any("cpu" in h for h in hardware):
        note += f"; the processes share {'/'.join(map(str, cpus))} CPU cores"
    return note + "; one run per point (no repeats, so no error bars)"


def plot(rows: list[dict], out: Path) -> list[Path]:
    """Wall time and tokens/s against model size (a line per stage and world size) and against world size (a line
    per stage and model size, with the ideal linear scaling from one process dashed); axes from 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for x_key, series_key, x_label, name, title in (
        ("params_m", "world_size", "model parameters (M)", "scaling_model_size.png", "Cost against model size"),
        ("world_size", "params_m", "world size (processes)", "scaling_world_size.png", "Scaling with processes"),
    ):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for ax, y_key, y_label in (
            (axes[0], "wall_s", "stage wall time (s)"),
            (axes[1], "tokens_per_s", "training tokens/s"),
        ):
            series: dict[tuple, list[tuple[float, float]]] = {}
            for row in rows:
                if isinstance(row[x_key], (int, float)) and isinstance(row[y_key], (int, float)):
                    series.setdefault((row["stage"], row[series_key]), []).append((row[x_key], row[y_key]))
            for (stage, value), points in sorted(series.items(), key=lambda kv: str(kv[0])):
                points.sort()
                label = series_label(stage, series_key, value)
                (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
                if x_key == "world_size" and y_key == "tokens_per_s" and points[0][0] == 1 and len(points) > 1:
                    ideal = [points[0][1] * p[0] for p in points]
                    ax.plot([p[0] for p in points], ideal, linestyle="--", color=line.get_color(), alpha=0.6)
            xs = sorted({p[0] for points in series.values() for p in points})
            if x_key == "world_size" and xs:
                ax.set_xticks(xs, [str(int(x)) for x in xs])
            ax.set_ylim(bottom=0)
            ax.set_xlim(left=0)
            ax.set_xlabel(x_label)
            ax.set_ylabel(y_label)
            ax.grid(alpha=0.3)
            if series:
                handles, labels = ax.get_legend_handles_labels()
                if x_key == "world_size" and y_key == "tokens_per_s":
                    handles.append(plt.Line2D([], [], linestyle="--", color="grey"))
                    labels.append("ideal: one process x processes")
                ax.legend(handles, labels, fontsize=8)
        fig.suptitle(f"{title} ({hardware_note(rows)})", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(out / name)
    return written


def plot_learning(rows: list[dict], out: Path) -> list[Path]:
    """What each run's stages gave, with 95% intervals: the gold change of SFT and PPO (paired, in points) and the
    reward model's held-out accuracy; one bar per run and stage. Nothing when no run measured either."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("gold change (points, paired 95% interval)", [r for r in rows if r["gold_delta"] != ""], "gold_delta"),
        ("reward model held-out accuracy (95% interval)", [r for r in rows if r["eval_acc_ci_low"] != ""], "eval_acc"),
    ]
    panels = [p for p in panels if p[1]]
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4 + 0.25 * max(len(p[1]) for p in panels)))
    for ax, (title, chosen, key) in zip([axes] if len(panels) == 1 else axes, panels, strict=True):
        scale = 100 if key == "gold_delta" else 1
        low_key, high_key = (
            (f"{key}_low", f"{key}_high") if key == "gold_delta" else ("eval_acc_ci_low", "eval_acc_ci_high")
        )
        labels = [f"{r['stage']} {r['settings'] or Path(str(r['run'])).name}"[:60] for r in chosen]
        values = [float(r[key]) * scale for r in chosen]
        errors = [
            [v - float(r[low_key]) * scale for v, r in zip(values, chosen, strict=True)],
            [float(r[high_key]) * scale - v for v, r in zip(values, chosen, strict=True)],
        ]
        ax.barh(range(len(chosen)), values, xerr=errors, capsize=3, color="tab:blue", alpha=0.7)
        ax.set_yticks(range(len(chosen)), labels, fontsize=7)
        ax.axvline(0 if key == "gold_delta" else 0.5, color="grey", linewidth=0.8)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(out / "learning.png", dpi=100)
    plt.close(fig)
    return [out / "learning.png"]


def write_report(paths: list[Path], out: Path) -> list[dict]:
    """Read the runs under `paths` and write report.md, report.csv and the plots to `out`; return the rows."""
    summaries = find_summaries(paths)
    rows = sorted((row_of(p) for p in summaries), key=sort_key)
    plans = plan_rows(paths)
    if not rows and not plans:
        raise FileNotFoundError(
            f"no stage summaries (<run>/<stage>/summary.json) nor plans (plan.json) under {', '.join(map(str, paths))}"
        )
    out.mkdir(parents=True, exist_ok=True)
    if plans:
        assumptions = (
            "Plans: FLOPs over peak x MFU per device (hardware.expected_mfu for training and forwards, "
            "hardware.generation_mfu for PPO's sampling), at hardware.cost_per_device_hour."
        )
        table = markdown_table(plans)
        (out / "plans.md").write_text(f"# Plans beside DeepSpeed-Chat's step 3\n\n{table}\n\n{assumptions}\n")
        if not rows:
            (out / "report.md").write_text((out / "plans.md").read_text())
            return plans
    varying_settings(rows)
    with (out / "report.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    pngs = plot(rows, out) + plot_learning(rows, out)
    shown = [{k: v for k, v in row.items() if k != "run"} | {"run": Path(str(row["run"])).name} for row in rows]
    images = "\n".join(f"![{p.stem}]({p.name})" for p in pngs)
    (out / "report.md").write_text(f"# Runs compared\n\n{markdown_table(shown)}\n\n{images}\n")
    if dashboard.run_folders(summaries):
        title = "rlhf: " + ", ".join(p.resolve().name for p in paths)
        dashboard.write_spec(dashboard.workspace_spec(summaries, title), out)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rlhf-report", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("paths", nargs="+", type=Path, help="run or sweep folders")
    parser.add_argument("--out", type=Path, help="where to write (default: the folder given, or ./report)")
    parser.add_argument("--wandb", action="store_true", help="save the runs' W&B dashboard to W&B (needs a key)")
    args = parser.parse_args(argv)
    if args.wandb and not tracking.api_key_configured():
        print("rlhf-report --wandb: no W&B key (set WANDB_API_KEY or run `wandb login`)", file=sys.stderr)
        return 2
    missing = [str(p) for p in args.paths if not p.is_dir()]
    if missing:
        print(f"rlhf-report: not a folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    out = args.out or (args.paths[0] / "report" if len(args.paths) == 1 else Path("report"))
    try:
        rows = write_report(args.paths, out)
    except FileNotFoundError as err:
        print(f"rlhf-report: {err}", file=sys.stderr)
        return 2
    print((out / "report.md").read_text().split("\n\n![")[0])
    written = [str(p) for p in (out / "report.md", out / "report.csv", out / "plans.md") if p.is_file()]
    written += [str(out / dashboard.SPEC_FILE)] if (out / dashboard.SPEC_FILE).is_file() else []
    print(f"\n{len(rows)} rows; written: {', '.join(written)} (plots beside them)")
    if args.wandb:
        if not (out / dashboard.SPEC_FILE).is_file():
            print("rlhf-report --wandb: no W&B runs under these folders (dry runs only)", file=sys.stderr)
            return 2
        print(f"W&B dashboard: {dashboard.publish(json.loads((out / dashboard.SPEC_FILE).read_text()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
