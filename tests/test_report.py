"""`rlhf-report` on a sweep's summaries: the table, and plots that read right (axes from 0, whole process counts,
labelled series, the ideal scaling line, what the runs shared)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rlhf import report  # noqa: E402


def fake_sweep(root: Path) -> Path:
    for i, (model, params, world, tokens) in enumerate(
        [
            ("tiny", 3.28, 1, 1000.0),
            ("tiny", 3.28, 2, 1500.0),
            ("tiny-large", 20.1, 1, 300.0),
            ("tiny-large", 20.1, 2, 420.0),
        ]
    ):
        run = root / f"{i}-sft-{model}"
        (run / "sft").mkdir(parents=True)
        summary = {
            "stage": "sft",
            "model": model,
            "model_params_m": params,
            "hardware": "cpu" if world == 1 else "cpu-2proc",
            "world_size": world,
            "host_cpus": 2,
            "wall_s": 100_000 / tokens,
            "tokens_per_s": tokens,
            "eval_loss": 5.0,
            "eval_tokens": 531,
        }
        (run / "sft" / "summary.json").write_text(json.dumps(summary))
    return root


def test_report_plots_start_at_zero_count_whole_processes_and_show_ideal_scaling(tmp_path: Path, monkeypatch) -> None:
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    rows = report.write_report([fake_sweep(tmp_path / "sweep")], tmp_path / "out")
    assert len(rows) == 4 and (tmp_path / "out" / "report.csv").read_text().count("\n") == 5
    assert "eval_tokens" in (tmp_path / "out" / "report.md").read_text().splitlines()[2]  # the table header
    by_world = next(f for f in figures if "Scaling with processes" in f._suptitle.get_text())
    assert "the processes share 2 CPU cores" in by_world._suptitle.get_text()
    wall, throughput = by_world.axes
    for ax in (wall, throughput):
        assert ax.get_ylim()[0] == 0
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2"]
    legend = [t.get_text() for t in throughput.get_legend().get_texts()]
    assert "sft, 3.28M parameters" in legend and "ideal: one process x processes" in legend
    ideal = [line for line in throughput.get_lines() if line.get_linestyle() == "--"]
    assert sorted(tuple(line.get_ydata()) for line in ideal) == [(300.0, 600.0), (1000.0, 2000.0)]
    by_size = next(f for f in figures if "Cost against model size" in f._suptitle.get_text())
    assert "sft, 2 processes" in [t.get_text() for t in by_size.axes[0].get_legend().get_texts()]


def test_the_dschat_tables_sweep_plans_every_published_cell_beside_its_figure(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    result = run_cli(["-m", "+sweep=dschat-tables", f"hydra.sweep.dir={tmp_path}/sweep", "logger=none"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = report.write_report([tmp_path / "sweep"], tmp_path / "out")
    assert len(rows) == 15  # 5 models x 3 hardware options, each planned
    published = [r for r in rows if r["dschat_hours"] != ""]
    assert {(r["model"], r["hardware"]) for r in published} == set(report.DSCHAT_STEP3)
    for row in published:
        assert row["tokens"] == 1030 * 256 * 512  # the published workload: 135M tokens of 256 + 256
        assert row["plan_over_dschat"] == row["plan_hours"] / row["dschat_hours"] > 0
        assert (row["dominant_term"] != "") == (not 0.5 <= row["plan_over_dschat"] <= 2)
    cell = next(r for r in rows if (r["model"], r["hardware"]) == ("opt-30b", "8xA100-80G"))
    # 30B: 16 bytes per parameter over 8 devices; the fp16 KV cache of 32 rollouts of 512 tokens (48 layers, 7168)
    assert cell["fits"] == "NO" and cell["memory_gb"] == "85 of 72: states 64 + activations 21"
    assert "Plans beside DeepSpeed-Chat" in (tmp_path / "out" / "report.md").read_text()
