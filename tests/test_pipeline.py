"""The three stages in one command, chat with its result, dry-run plans, the CPU scaling sweep and its report."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from rlhf import dashboard, pipeline, report
from rlhf.chat import Chat, interactive, resolve_model_dir
from rlhf.compose import compose
from rlhf.pipeline import result_text
from rlhf.plan import dry_run, plan
from rlhf.tracking import STEP_METRIC, run_group
from tests.conftest import run_cli, single_run_dir, wandb_records

SHORT = ["stage.sft.max_steps=6", "stage.reward.max_steps=6", "stage.ppo.max_steps=2", "eval.gold_prompts=8"]


def wandb_run_records(run_dir: Path) -> list[dict]:
    """The run records (name, group, job type, config) of every offline W&B run under `run_dir`."""
    folders = sorted(run_dir.rglob("offline-run-*"))
    return [next(r["run"] for r in wandb_records(folder) if r.get("type") == "run") for folder in folders]


def config_value(run: dict, dotted: str):
    node = run["config"]["update"]
    for key in dotted.split("."):
        node = node[key]
    return node["value"] if isinstance(node, dict) and "value" in node else node


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("quickstart")
    result = run_cli(["experiment=quickstart", *SHORT], cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (cwd / "cli-output.txt").write_text(result.stdout + result.stderr)
    return single_run_dir(cwd)


def test_a_run_prints_its_step_log_without_loading_bars_or_deepspeed_memory_reports(quickstart_run: Path) -> None:
    output = (quickstart_run.parents[2] / "cli-output.txt").read_text()
    assert "sft step 6/6" in output and "pipeline done" in output
    for noise in ("Loading weights", "Writing model shards", "begin bf16_optimizer", "CPU Virtual Memory"):
        assert noise not in output


def test_help_lists_the_options_a_user_can_choose(tmp_path: Path) -> None:
    result = run_cli(["--help"], tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("rlhf: InstructGPT-style RLHF")
    assert "stage: dpo, pipeline, ppo, reward, sft\n" in result.stdout and "_schema" not in result.stdout


def test_quickstart_pipeline_runs_three_stages_in_one_group(quickstart_run: Path) -> None:
    summaries = {s: json.loads((quickstart_run / s / "summary.json").read_text()) for s in ("sft", "reward", "ppo")}
    assert summaries["sft"]["steps"] == 6 and summaries["reward"]["steps"] == 6 and summaries["ppo"]["steps"] == 2
    pipeline = json.loads((quickstart_run / "pipeline.json").read_text())
    assert pipeline["outputs"] == {s: summaries[s]["output"] for s in summaries}
    # each stage fed the next: PPO's actor is the SFT output, its reward model the reward output
    ppo_cfg = (quickstart_run / "ppo" / "config.resolved.yaml").read_text()
    assert f"init_from: {summaries['sft']['output']}" in ppo_cfg
    assert f"reward_from: {summaries['reward']['output']}" in ppo_cfg
    table = (quickstart_run / "pipeline.md").read_text()
    for stage in ("sft", "reward", "ppo", "total"):
        assert f"| {stage} |" in table
    assert "samples_per_s" in table and "est_cost_usd" in table
    # the held-out gold score at every stage, on the same prompts, with the paired changes between them
    assert "held-out gold score" in table and "| all |" in table
    assert set(pipeline["gold"]) == {"base", "sft", "ppo"}  # PPO's start is the SFT model: shown once
    assert {"base -> sft", "sft -> ppo", "base -> ppo"} <= set(pipeline["gold_changes"])
    change = pipeline["gold_changes"]["base -> ppo"]
    assert change["n"] == 8 and change["low"] <= change["diff"] <= change["high"]
    assert summaries["sft"]["gold_n_start"] == 8 and "gold_delta" in summaries["ppo"]
    assert pipeline["gold"]["sft"] == json.loads((quickstart_run / "ppo" / "gold.json").read_text())["start"]
    assert (
        f"policy_from: {summaries['sft']['output']}" in (quickstart_run / "reward" / "config.resolved.yaml").read_text()
    )

    runs = wandb_run_records(quickstart_run)
    assert sorted(r["job_type"] for r in runs) == ["ppo", "reward", "sft"]
    assert {r["run_group"] for r in runs} == {run_group(quickstart_run)}  # the date folder and the run folder
    for run in runs:
        assert config_value(run, "hardware.world_size") == 1
        assert config_value(run, "model.params_m") > 0


def logged_by_stage(run_dir: Path) -> dict[str, dict]:
    """What each stage's offline W&B run holds: its history keys, summary keys and run record (config)."""
    logged = {}
    for folder in sorted(run_dir.rglob("offline-run-*")):
        records = wandb_records(folder)
        run = next(r["run"] for r in records if r.get("type") == "run")
        history = set().union(*(r["history"]["item"] for r in records if r.get("type") == "history"))
        summary = set().union(*(r["summary"].get("update", {}) for r in records if r.get("type") == "summary"))
        metrics = [r["metric"] for r in records if r.get("type") == "metric"]
        axes = {m.get("glob_name"): m.get("step_metric") for m in metrics}
        logged[run["job_type"]] = {"history": history, "summary": summary, "run": run, "axes": axes}
    return logged


def test_the_report_writes_a_w_and_b_dashboard_whose_panels_plot_what_the_runs_logged(
    quickstart_run: Path, tmp_path: Path, monkeypatch
) -> None:
    assert report.main([str(quickstart_run), "--out", str(tmp_path / "report")]) == 0
    spec = json.loads((tmp_path / "report" / dashboard.SPEC_FILE).read_text())
    assert spec["project"] == "rlhf" and spec["groups"] == [run_group(quickstart_run)]
    panels = {section["name"]: section["panels"] for section in spec["sections"]}
    assert list(panels) == ["Learning", "Scaling", "Runs side by side", "Sample responses"]
    logged = logged_by_stage(quickstart_run)
    for panel in panels["Learning"]:  # every curve's keys are logged per step by some stage
        assert any(set(panel["y"]) <= stage["history"] for stage in logged.values()), panel
        assert panel["x"] == STEP_METRIC
    for stage in logged.values():  # W&B's own panels plot every metric against the stage's step too
        assert stage["axes"]["*"] == STEP_METRIC and STEP_METRIC in stage["history"]
    learning = {key for panel in panels["Learning"] for key in panel["y"]}
    assert {"ppo/reward_mean", "ppo/kl", "eval/gold_score", "sft/loss", "reward/acc"} <= learning
    assert len(panels["Scaling"]) == 3 * 3 * 2  # 3 stages x (wall time, samples/s, tokens/s) x (size, world size)
    for panel in panels["Scaling"]:
        stage, key = panel["y"].removeprefix("summary:").split("/")
        assert f"{stage}/{key}" in logged[stage]["summary"], panel
        assert config_value(logged[stage]["run"], panel["x"].removeprefix("config:")) > 0
    assert panels["Sample responses"] == [{"kind": "table", "title": "ppo samples", "key": "ppo/samples"}]
    assert any(key.startswith("ppo/samples.") for key in logged["ppo"]["history"])

    import wandb
    import wandb_workspaces.workspaces as ws

    assert report.main([str(quickstart_run), "--out", str(tmp_path / "report"), "--wandb"]) == 2  # no key
    saved = []
    monkeypatch.setenv("WANDB_API_KEY", "local-0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setattr(
        wandb, "Api", lambda: SimpleNamespace(default_entity="me", client=SimpleNamespace(app_url="https://w.b"))
    )
    monkeypatch.setattr(
        ws.internal,
        "upsert_view2",
        lambda view: saved.append(view) or {"upsertView": {"view": {"name": "v1", "id": "1"}}},
    )
    assert report.main([str(quickstart_run), "--out", str(tmp_path / "report"), "--wandb"]) == 0
    (view,) = saved  # the workspace sent: the spec's sections and panels, in the user's default entity
    assert (view.entity, view.project, view.display_name) == ("me", "rlhf", spec["name"])
    sections = view.spec.section.panel_bank_config.sections
    assert [s.name for s in sections] == list(panels) and [len(s.panels) for s in sections] == [
        len(p) for p in panels.values()
    ]


def test_chat_answers_with_the_final_model(quickstart_run: Path) -> None:
    assert resolve_model_dir(quickstart_run) == quickstart_run / "ppo" / "final"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "rlhf.chat", str(quickstart_run), "--max-new-tokens", "8", "--temperature", "0"]
    one = subprocess.run([*command, "--prompt", "What is 2 + 3?"], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    assert one.stdout.endswith("\n") and one.stdout.count("\n") == 1  # one answer line (a tiny model's may be blank)
    piped = subprocess.run(command, input="What is 2 + 3?\n\nSort: b a c\n", capture_output=True, text=True, env=env)
    assert piped.returncode == 0, piped.stderr[-2000:]
    lines = piped.stdout.splitlines()  # one line per non-empty input line (a tiny model's answer may be blank)
    assert len(lines) == 2 and lines[0] == one.stdout.rstrip("\n")  # greedy: the same answer to the same prompt
    reward = subprocess.run(
        [sys.executable, "-m", "rlhf.chat", str(quickstart_run / "reward" / "final")], capture_output=True, text=True
    )
    assert reward.returncode == 2 and "is a reward model" in reward.stderr


def test_interactive_chat_keeps_history_and_clears(quickstart_run: Path, monkeypatch, capsys) -> None:
    chat = Chat(quickstart_run / "sft" / "final", temperature=0.0, top_p=1.0, max_new_tokens=4)
    typed = iter(["What is 2 + 3?", "And 3 + 4?", "clear", "quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    seen: list[int] = []
    reply = chat.reply
    monkeypatch.setattr(
        chat, "reply", lambda message, on_text=None: (seen.append(len(chat.history)), reply(message, on_text))[1]
    )
    interactive(chat)
    out = capsys.readouterr()
    assert seen == [0, 2]  # the second message is answered after the first exchange
    assert chat.history == [] and "conversation cleared" in out.err
    assert out.out.count("model> ") == 2


def test_a_subset_of_stages_reuses_earlier_outputs(quickstart_run: Path, tmp_path: Path) -> None:
    result = run_cli(
        [
            "experiment=quickstart",
            "stage.stages=[ppo]",
            "stage.ppo.max_steps=1",
            "eval.gold_prompts=8",
            f"stage.ppo.init_from={quickstart_run / 'sft' / 'final'}",
            f"stage.ppo.reward_from={quickstart_run / 'reward' / 'final'}",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = single_run_dir(tmp_path)
    assert not (run_dir / "sft").exists() and (run_dir / "ppo" / "final" / "config.json").is_file()


def test_the_learn_preset_runs_sft_then_ppo_without_a_reward_model(tmp_path: Path, dist_process_group) -> None:
    tiny = ["model=tiny", "model@reward_model=tiny", "logger=none", "optimizer.lr=1e-3", "eval.gold_prompts=8"]
    short = ["stage.sft.max_steps=2", "stage.ppo.max_steps=1", "stage.ppo.global_batch=4", "stage.ppo.max_new_tokens=8"]
    cfg = compose(["experiment=learn", *tiny, *short, "stage.ppo.samples_per_prompt=2"])
    assert pipeline.run(cfg, tmp_path / "run") == 0
    summary = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["sft", "ppo"]
    assert not (tmp_path / "run" / "reward").exists() and (tmp_path / "run" / "ppo" / "final").is_dir()


@pytest.mark.parametrize("preset", ["opt-1.3b-1gpu", "opt-13b-8gpu", "opt-66b-64gpu"])
def test_seed_presets_plan_without_loading(preset: str, tmp_path: Path) -> None:
    steps = [f"stage.{name}.max_steps=10" for name in ("sft", "reward", "ppo")]  # the hub's row counts are not read
    unknown, _ = plan(compose([f"experiment={preset}"]))
    assert {row["steps"] for row in unknown} == {"?"} and {row["fits"] for row in unknown} == {"yes"}
    cfg = compose([f"experiment={preset}", *steps])
    rows, advice = plan(cfg)
    assert [r["stage"] for r in rows] == ["sft", "reward", "ppo"] and advice == {}
    world = {"opt-1.3b-1gpu": 1, "opt-13b-8gpu": 8, "opt-66b-64gpu": 64}[preset]
    for row in rows:
        assert row["world_size"] == world and row["fits"] == "yes" and row["steps"] != "?"
        assert 0 < row["total_gb"] <= 80 and row["est_cost_usd"] > 0
        assert row["total_gb"] >= row["weights_gb"] + row["optim_gb"]
    assert dry_run(cfg, tmp_path) == 0
    assert "| ppo |" in (tmp_path / "plan.md").read_text()
    ds = {name: json.loads((tmp_path / f"ds_config.{name}.json").read_text()) for name in ("sft", "reward", "ppo")}
    sft = ds["sft"]["model"]
    assert sft["train_batch_size"] == cfg.stage.sft.global_batch and sft["fp16"]["enabled"]
    assert ds["reward"]["reward_model"]["zero_optimization"]["stage"] == 0  # DeepSpeed-Chat's step 2
    actor, critic = ds["ppo"]["actor"], ds["ppo"]["critic"]
    assert actor["zero_optimization"]["stage"] == critic["zero_optimization"]["stage"] == (0 if world == 1 else 3)
    assert actor["train_batch_size"] == cfg.stage.ppo.global_batch  # one optimizer step per iteration
    reference, reward_model = ds["ppo"]["reference"], ds["ppo"]["reward_model"]  # frozen: forward only
    assert reference["zero_optimization"]["stage"] == actor["zero_optimization"]["stage"]
    assert "optimizer" not in reward_model and reward_model["fp16"]["enabled"]


def test_dry_run_of_a_model_too_large_gives_the_changes_that_fit(tmp_path: Path) -> None:
    batches = [f"stage.{s}.global_batch=32" for s in ("sft", "reward")] + ["stage.ppo.global_batch=8"]  # x 4 samples
    cfg = compose(["model=opt-13b", "model@reward_model=opt-350m", "hardware=1xA100-80G", *batches])
    rows, advice = plan(cfg)
    assert {r["stage"]: r["fits"] for r in rows} == {"sft": "NO", "reward": "yes", "ppo": "NO"}
    assert rows[0]["total_gb"] > 150  # 13B parameters with Adam states on one device
    for stage in ("sft", "ppo"):
        assert any("optimizer=adamw-offload" in line for line in advice[stage])
        assert advice[stage][-1].startswith("=> fits")
    assert dry_run(cfg, tmp_path) == 1
    assert (
        "stage sft does not fit in 72.0 GB per device (90% of 80 GB: the rest is left to the allocator"
        in (tmp_path / "plan.md").read_text()
    )


def test_dry_run_command_exits_before_loading_weights(tmp_path: Path) -> None:
    result = run_cli(["dry_run=true", "experiment=opt-13b-8gpu"], tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "| sft | 8 |" in out and "Loading weights" not in out
    unknown = run_cli(["dry_run=true", "model=local", "model.path=/nowhere"], tmp_path)
    assert unknown.returncode == 2 and "its size is unknown without downloading it" in unknown.stdout + unknown.stderr


SWEEPS = {  # (extra overrides, the (model, world size) pairs the jobs cover)
    "model sizes": (["hardware=cpu"], {("tiny", 1), ("tiny-large", 1)}),
    "sizes x world sizes": ([], {("tiny", 1), ("tiny", 2), ("tiny-large", 1), ("tiny-large", 2)}),
}


@pytest.mark.parametrize(
    "sweep_name", ["model sizes", pytest.param("sizes x world sizes", marks=pytest.mark.slow)]
)  # the full sweep adds two 2-process jobs (two minutes); CI runs its model-size half
def test_cpu_scaling_sweep_gives_a_run_per_job_and_a_report(sweep_name: str, tmp_path: Path) -> None:
    extra, expected = SWEEPS[sweep_name]
    args = ["-m", "+sweep=scaling-cpu", "stage.max_steps=4", "stage.eval_interval=4", *extra]
    result = run_cli(args, tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (sweep,) = list((tmp_path / "outputs" / "multirun").glob("*/*-scaling-cpu"))
    jobs = sorted(p.parent for p in sweep.glob("*/sft/summary.json"))
    assert len(jobs) == len(expected)
    runs = wandb_run_records(sweep)
    assert len(runs) == len(expected) and len({r["run_group"] for r in runs}) == 1
    assert runs[0]["run_group"] == run_group(sweep) == f"{sweep.parent.name}_{sweep.name}"
    axes = {(config_value(r, "model.name"), config_value(r, "hardware.world_size")) for r in runs}
    assert axes == expected

    report = subprocess.run(
        [sys.executable, "-m", "rlhf.report", str(sweep), "--out", str(tmp_path / "report")],
        capture_output=True,
        text=True,
    )
    assert report.returncode == 0, report.stderr
    rows = list(csv.DictReader((tmp_path / "report" / "report.csv").open()))
    assert len(rows) == len(expected) and {r["world_size"] for r in rows} == {str(w) for _, w in expected}
    sizes = {r["model"]: float(r["params_m"]) for r in rows}
    assert sizes["tiny-large"] > sizes["tiny"] > 0
    assert all(float(r["wall_s"]) > 0 and float(r["tokens_per_s"]) > 0 for r in rows)
    for model in sizes:  # every world size evaluated the same examples
        assert len({r["eval_tokens"] for r in rows if r["model"] == model}) == 1
    for png in ("scaling_model_size.png", "scaling_world_size.png"):
        assert (tmp_path / "report" / png).stat().st_size > 10_000
    spec = json.loads((tmp_path / "report" / dashboard.SPEC_FILE).read_text())
    assert spec["groups"] == [run_group(sweep)]  # the dashboard shows the sweep's jobs


def same_value(got, written: str) -> bool:
    try:
        return float(got) == float(written)
    except (TypeError, ValueError):
        return str(got).lower() == written.lower()


SWEEP_DIR = Path(__file__).resolve().parents[1] / "sweeps"


@pytest.mark.parametrize("sweep", sorted(p.stem for p in SWEEP_DIR.glob("*.yaml")))
def test_every_job_of_every_sweep_composes(sweep: str) -> None:
    """A sweep file whose jobs fail to compose would only fail when a user runs it: expand its sweeper's grid and
    compose each job as `rlhf -m +sweep=<name>` would."""
    import itertools

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from rlhf.config import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        params = hydra_compose("config", overrides=[f"+sweep={sweep}"], return_hydra_config=True).hydra.sweeper.params
    grid = [[f"{key}={value}" for value in str(values).split(",")] for key, values in (params or {}).items()]
    jobs = list(itertools.product(*grid))
    assert len(jobs) >= 2, f"sweep {sweep} has a single job"
    for job in jobs:
        cfg = compose([f"+sweep={sweep}", *job])
        for override in job:
            key, value = override.split("=", 1)
            if "." in key:  # a value, not a group choice: the job gets it
                got = OmegaConf.select(cfg, key)
                assert same_value(got, value), f"{sweep}: {key} is {got}, not {value}"


def test_the_ppo_row_shows_the_reward_on_rollouts_and_held_out_answers() -> None:
    summary = {"stage": "ppo", "reward_first": -0.96, "reward_last": -1.04, "reward_start": 1.23, "reward": 1.49}
    text = result_text(summary)
    assert "train reward -0.96 -> -1.04" in text
    assert "held-out reward 1.23 -> 1.49" in text
    assert "right/wrong" not in text  # no within-prompt agreement measured: none shown
    text = result_text(summary | {"reward_gold_pair_acc": 0.625})
    assert "reward orders right/wrong answers to a prompt 0.625 (rollouts)" in text


def test_the_plan_counts_the_kahan_optimizer_s_smaller_state() -> None:
    base = ["model=opt-1.3b", "hardware=1xA100-80G", "hardware.precision=bf16", "hardware.zero_stage=0"]
    base += ["stage=sft", "stage.max_steps=10"]
    masters = plan(compose(base))[0][0]["optim_gb"]
    kahan = plan(compose([*base, "optimizer.master_weights=false"]))[0][0]["optim_gb"]
    assert kahan == pytest.approx(masters * 10 / 16)  # moments + compensation, against + masters + fp32 gradients
