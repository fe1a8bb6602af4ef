"""Several nodes: per-node launch without ssh (two "nodes" on this machine), the launcher commands, and SLURM's one
task per device (by composition and its rendezvous from SLURM's variables)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from rlhf import checkpoint, dist
from rlhf.compose import compose
from rlhf.config import ConfigError
from rlhf.launch import join_slurm_job, launcher_command, leads_run
from tests.conftest import read_summary, start_cli, wait_for
from tests.test_ppo import PPO_SMALL, tiny_reward  # noqa: F401 (a fixture)
from tests.test_resume import stage_runs

TWO_NODES = ["hardware=cpu-2proc", "hardware.nodes=2", "hardware.procs_per_node=1", "hardware.launcher=no_ssh"]


def start_nodes(args: list[str], tmp_path: Path, round_: str) -> list[subprocess.Popen]:
    """`rlhf <args>` once per node, as SLURM or Kubernetes would start it on each, each in its own folder."""
    return [start_cli([*args, f"hardware.node_rank={node}"], tmp_path / round_ / f"node{node}") for node in (0, 1)]


def finish(nodes: list[subprocess.Popen], tmp_path: Path, round_: str) -> tuple[list[int], str]:
    """Each node's exit code, and the ends of their logs."""
    codes = [node.wait(timeout=400) for node in nodes]
    logs = "\n".join((tmp_path / round_ / f"node{n}" / "cli.out").read_text()[-3000:] for n in (0, 1))
    return codes, logs


def test_two_nodes_without_ssh_run_zero3_grpo_stop_together_and_resume(tmp_path: Path, tiny_reward: Path) -> None:  # noqa: F811
    run_dir = tmp_path / "run"
    args = [
        *PPO_SMALL,
        *TWO_NODES,
        "hardware.master_addr=127.0.0.1",
        f"hardware.master_port={dist.free_port()}",
        "hardware.zero_stage=3",
        "hardware.threads_per_proc=1",
        "stage.advantage=grpo",  # a group estimator across ranks: each prompt's samples on one rank
        "stage.samples_per_prompt=2",
        "stage.kl_in_loss=true",
        "stage.kl_estimator=k3",
        "stage.max_steps=3",
        "stage.checkpoint_interval=1",
        "eval.gold_prompts=4",
        f"stage.reward_from={tiny_reward}",
        f"hydra.run.dir={run_dir}",
    ]
    nodes = start_nodes(args, tmp_path, "first")
    wait_for(tmp_path / "run", "ppo/checkpoints/step-0000001", nodes[0])
    nodes[0].send_signal(signal.SIGTERM)  # node 0 is preempted: every rank stops at one step with a checkpoint
    codes, logs = finish(nodes, tmp_path, "first")
    assert codes == [128 + signal.SIGTERM] * 2, logs
    assert "stopped by SIGTERM on every worker" in logs and "failed" not in logs
    for node in (0, 1):  # each node's command to continue is its own
        text = (tmp_path / "first" / f"node{node}" / "cli.out").read_text()
        command = re.search(r"on every worker; continue with: rlhf (.*)", text).group(1).split()
        assert command == [f"resume={run_dir}", *args[:-1], f"hardware.node_rank={node}"]  # hydra.* left out
    latest = checkpoint.latest(checkpoint.stage_folder(run_dir, "ppo"))
    manifest = checkpoint.read_manifest(latest)
    assert {"rng/rank0.pt", "rng/rank1.pt"} <= set(manifest["files"]) and manifest["step"] < 3
    assert not [f for f in manifest["files"] if f.startswith("critic")]  # GRPO trains and saves no critic
    assert not (run_dir / "ppo" / "final").exists()

    nodes = start_nodes([*args, "resume=auto"], tmp_path, "resumed")
    codes, logs = finish(nodes, tmp_path, "resumed")
    assert codes == [0, 0], logs
    summary = read_summary(run_dir, "ppo")
    assert summary["world_size"] == 2 and summary["steps"] == 3 and summary["resumed_from_step"] == manifest["step"]
    assert len(stage_runs(run_dir, "ppo")) == 2  # one W&B run, written by rank 0 in each invocation
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2
    assert (run_dir / "ppo" / "final" / "config.json").is_file()
    assert "node_rank: 0" in (run_dir / "config.resolved.yaml").read_text()  # the lead's record


def test_the_launcher_command_per_launcher() -> None:
    one = launcher_command(compose(["hardware=cpu-2proc"]), "")
    assert "--hostfile" not in one and one[-4:] == ["--num_gpus", "2", "--module", "rlhf.launch"]
    pdsh = launcher_command(compose(["experiment=opt-66b-64gpu", "hardware.master_addr=10.0.0.1"]), "/job/hostfile")
    assert pdsh[3:13] == [
        "--hostfile",
        "/job/hostfile",
        "--num_nodes",
        "8",
        "--master_port",
        "29500",
        "--master_addr",
        "10.0.0.1",
        "--num_gpus",
        "8",
    ]
    per_node = compose(
        ["experiment=opt-66b-64gpu", "hardware.launcher=no_ssh", "hardware.node_rank=3", "hardware.master_addr=n0"]
    )
    command = launcher_command(per_node, "hosts")
    assert command[command.index("--no_ssh") + 1 : command.index("--no_ssh") + 3] == ["--node_rank", "3"]
    assert not leads_run(per_node) and leads_run(compose(["experiment=opt-66b-64gpu"]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["hardware.launcher=no_ssh", "hardware.node_rank=8"], "hardware.node_rank=8 must be in 0 .. "),
        (["hardware.launcher=no_ssh"], "hardware.launcher=no_ssh over hardware.nodes=8 needs hardware.master_addr"),
        (["hardware.hostfile=", "hardware.master_addr=x"], "hardware.nodes=8 needs hardware.hostfile"),
        (["hardware.master_port=70000"], "hardware.master_port=70000 must be a port"),
    ],
)
def test_multinode_settings_are_checked(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        compose(["experiment=opt-66b-64gpu", *overrides])


def test_slurm_launcher_composes_one_task_per_device() -> None:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from rlhf.config import CONF_DIR, register_configs

    register_configs()
    overrides = ["+sweep=scaling", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hardware=64xA100-80G"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=[*overrides, "hardware.launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (8, 8, 8)
    assert dict(cfg.hydra.sweeper.params) == {"model": "opt-1.3b,opt-6.7b,opt-13b", "hardware": "1xA100-80G,8xA100-80G"}


def test_a_slurm_task_joins_its_job_as_the_rank_slurm_gives_it(monkeypatch) -> None:
    cfg = compose(["experiment=opt-66b-64gpu", "hardware.launcher=slurm", "hardware.master_port=29511"])
    exported = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    for key in (*exported, "SLURM_PROCID", "SUBMITIT_EXECUTOR"):  # set, then unset: restored to their state after
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    assert "not in a SLURM job" in join_slurm_job(cfg)
    slurm = {
        "SLURM_JOB_ID": "42",
        "SLURM_PROCID": "9",
        "SLURM_NTASKS": "64",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NUM_NODES": "8",
        "SLURM_JOB_NODELIST": "gpu[001-008]",
    }
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    assert join_slurm_job(cfg) is None and not leads_run(cfg)
    rendezvous = {k: os.environ[k] for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    assert rendezvous == {
        "MASTER_ADDR": "gpu001",
        "MASTER_PORT": "29511",
        "RANK": "9",
        "WORLD_SIZE": "64",
        "LOCAL_RANK": "1",
    }
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert "the SLURM job has 8 tasks but hardware.nodes x hardware.procs_per_node is 64" in join_slurm_job(cfg)
