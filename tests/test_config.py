"""Composition of every option of every group; schema and cross-field errors."""

from __future__ import annotations

import re
import shlex
from importlib.metadata import distribution
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from rlhf.compose import compose
from rlhf.config import CONF_DIR, ConfigError, grad_accum_steps, stage_config, world_size
from tests.conftest import run_cli

README = Path(__file__).parent.parent / "README.md"
GROUPS = ["model", "hardware", "stage", "data", "optimizer", "logger", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_validates(group: str, option: str) -> None:
    overrides = [f"{group}={option}"]
    if option == "local":
        overrides.append("model.path=/some/model")
    if group == "hardware":
        overrides += [f"stage.{name}.global_batch=1024" for name in ("sft", "reward", "ppo")]  # fits every preset
    if option == "adamw-offload":
        overrides.append("hardware.zero_stage=2")  # ZeRO-Offload partitions optimizer states
    cfg = compose(overrides)
    OmegaConf.to_yaml(cfg, resolve=True)
    if group != "experiment":
        assert cfg[group].name == option
    stage_cfgs = [stage_config(cfg, s) for s in cfg.stage.stages] if cfg.stage.name == "pipeline" else [cfg]
    for sub in stage_cfgs:  # PPO's micro-batches split its rollouts, the other stages' their global batch
        per_step = sub.stage.global_batch * (sub.stage.samples_per_prompt if sub.stage.name == "ppo" else 1)
        assert per_step % (world_size(sub) * sub.hardware.micro_batch) == 0


def test_every_group_has_options() -> None:
    for group in GROUPS:
        assert options(group), group


def test_model_hardware_specialisation_applies() -> None:
    cfg = compose(["experiment=opt-1.3b-1gpu"])
    assert cfg.model.name == "opt-1.3b" and cfg.hardware.name == "1xA100-80G"
    assert cfg.hardware.micro_batch == 16  # from conf/model_hardware/opt-1.3b_1xA100-80G.yaml
    assert grad_accum_steps(stage_config(cfg, "sft")) == 8  # DeepSpeed-Chat's 16 x 8 accumulation
    assert cfg.model.lora.dim == 128


def test_64_gpu_preset_has_hostfile_and_world_size() -> None:
    cfg = compose(["hardware=64xA100-80G", "stage=sft", "stage.global_batch=512"])
    assert world_size(cfg) == 64 and cfg.hardware.hostfile


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (
            ["hardware=cpu-2proc", "stage=sft", "stage.global_batch=12"],
            "stage.global_batch=12 must be a positive multiple",
        ),
        (
            ["hardware=cpu-2proc", "stage.reward.global_batch=12"],
            "stage.reward.global_batch=12 must be a positive multiple",
        ),
        (["stage.ppo.kl_estimator=k9"], "stage.ppo.kl_estimator=k9 must be k1 or k3"),
        (["stage.stages=[ppo,sft]"], "must keep the order ['sft', 'reward', 'dpo', 'ppo']"),
        (["stage.stages=[sft,kto]"], "must be distinct names from ['sft', 'reward', 'dpo', 'ppo']"),
        (["stage.stages=[sft,ppo]"], "runs ppo without reward: set stage.ppo.reward_from"),
        (["hardware.expected_mfu=2"], "hardware.expected_mfu=2.0 must be in (0, 1]"),
        (["model=tiny", "model.arch.num_heads=0"], "model.source=tiny needs model.arch.hidden_size"),
        (["hardware.zero_stage=4"], "hardware.zero_stage=4 must be 0, 1, 2 or 3"),
        (["model.lora.dim=8"], "model.lora.dim=8 needs a non-empty model.lora.target_modules"),
        (
            ["model.lora.only_optimize_lora=true"],
            "model.lora.only_optimize_lora=true needs model.lora.dim > 0",
        ),
        (["optimizer.lr=0"], "optimizer.lr=0.0 must be > 0"),
        (
            ["hardware.precision=fp16"],
            "hardware.precision=fp16 is not supported with hardware.accelerator=cpu",
        ),
        (["optimizer=adamw-offload"], "optimizer.offload=true needs hardware.zero_stage >= 1"),
        (["hardware.offload_params=true"], "hardware.offload_params=true needs hardware.zero_stage=3"),
        (
            ["optimizer.master_weights=false", "hardware.precision=fp32"],
            "optimizer.master_weights=false (bf16 weights with a Kahan compensation) needs hardware.precision=bf16",
        ),
        (["model=local"], "model.source=local needs model.path"),
        (["data.split=[0,0,0]"], "data.split=[0.0, 0.0, 0.0] must be three non-negative shares"),
        (["hardware.nodes=2"], "hardware.nodes=2 needs hardware.hostfile"),
    ],
)
def test_cross_field_rules_name_the_keys(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        compose(overrides)
    assert fragment in str(err.value)


def test_cli_prints_the_composed_config(tmp_path: Path) -> None:
    result = run_cli(["--cfg", "job", "model=tiny"], tmp_path)
    assert result.returncode == 0, result.stderr
    cfg = OmegaConf.create(result.stdout)
    assert cfg.model.name == "tiny" and cfg.stage.name == "pipeline"
    assert list(cfg.stage.stages) == ["sft", "reward", "ppo"] and cfg.stage.ppo.name == "ppo"


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["model.dtyp=bf16"], "model.dtyp is not an option of ModelConfig (did you mean model.dtype?)"),
        (["stage=sft", "stage.max_step=3"], "stage.max_step is not an option of SFTStageConfig (did you mean"),
        (["hardware.zero_stage=abc"], "could not be converted to Integer"),
        (["hardware.precision=fp8"], "Invalid value 'fp8', expected one of [auto, fp32, bf16, fp16]"),
        (["model=no-such-model"], "model=no-such-model: no such option; choose one of llama-2-7b, local, opt-1.3b"),
    ],
)
def test_cli_schema_errors_are_one_message_and_exit_2(tmp_path: Path, args: list[str], fragment: str) -> None:
    result = run_cli(args, tmp_path)
    assert result.returncode == 2  # bad input, as every other kind
    assert fragment in result.stderr and "Traceback" not in result.stderr and "use +" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.safetensors"))


def test_cli_cross_field_error_exits_before_loading(tmp_path: Path) -> None:
    result = run_cli(["model=tiny", "hardware=cpu-2proc", "stage=sft", "stage.global_batch=12"], tmp_path)
    assert result.returncode == 2
    assert "stage.global_batch=12 must be a positive multiple" in result.stdout + result.stderr
    assert "Loading" not in result.stdout + result.stderr


def test_gpu_preset_without_gpus_stops_with_a_clear_message(tmp_path: Path) -> None:
    result = run_cli(["experiment=opt-1.3b-1gpu"], tmp_path)
    assert result.returncode == 2
    assert "hardware=1xA100-80G needs CUDA GPUs and none is visible here" in result.stdout + result.stderr


def test_each_pipeline_stage_gets_its_own_optimizer_settings(tmp_path: Path, dist_process_group) -> None:
    from rlhf.stages.reward import RewardTrainer
    from rlhf.tracking import Tracker

    cfg = compose(
        [
            "experiment=quickstart",
            "logger=none",
            "stage.reward.optimizer.lr=3e-5",
            "stage.ppo.optimizer.schedule=constant",
            "stage.ppo.optimizer.actor_lr=2e-6",
            "hardware.zero_stage=1",
            "stage.reward.zero_stage=0",  # DeepSpeed-Chat trains its reward model at ZeRO 0 beside a ZeRO-3 actor
        ]
    )
    sft, reward, ppo = (stage_config(cfg, name) for name in ("sft", "reward", "ppo"))
    assert sft.optimizer.lr == cfg.optimizer.lr == 1e-3 and sft.optimizer.schedule == "cosine"
    assert reward.optimizer.lr == 3e-5 and reward.optimizer.schedule == "cosine"
    assert ppo.optimizer.schedule == "constant" and ppo.optimizer.actor_lr == 2e-6 and ppo.optimizer.lr == 1e-3
    reward.stage.max_steps = 2
    trainer = RewardTrainer(reward, tmp_path, Tracker.off(reward, "reward"))  # not in the cwd
    trainer.setup()
    assert trainer.engine.get_lr()[0] == pytest.approx(3e-5 / 2)  # the reward stage's LR, in its warmup (2 steps)
    assert trainer.engine.zero_optimization_stage() == 0 and sft.hardware.zero_stage == 1


def test_a_single_stage_applies_its_own_optimizer_settings() -> None:
    cfg = compose(["experiment=tiny", "stage=reward", "stage.optimizer.lr=4e-4", "stage.optimizer.warmup_steps=0"])
    assert cfg.optimizer.lr == 4e-4 and cfg.optimizer.warmup_steps == 0


def test_precision_auto_is_bf16_only_where_the_cpu_computes_it(tmp_path: Path) -> None:
    from rlhf.compose import native_bf16
    from rlhf.config import Accelerator

    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    avx512 = tmp_path / "avx512"
    avx512.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_bf16\n")
    amx = tmp_path / "amx"
    amx.write_text("flags\t\t: avx2 avx512f amx_tile amx_bf16\n")
    assert native_bf16(Accelerator.cpu, avx2)[0] is False
    assert native_bf16(Accelerator.cpu, avx512) == (True, "the CPU has avx512_bf16")
    assert native_bf16(Accelerator.cpu, amx)[0] is True
    assert native_bf16(Accelerator.cpu, tmp_path / "missing")[0] is False
    expected = "bf16" if native_bf16(Accelerator.cpu)[0] else "fp32"
    assert compose(["stage=sft"]).hardware.precision == expected  # resolved when the run is composed
    assert compose(["stage=sft", "hardware.precision=fp32"]).hardware.precision == "fp32"
    assert compose(["experiment=tiny", "stage=sft"]).hardware.precision == "fp32"  # tiny models pin fp32


def deepspeed_chat_rows() -> list[tuple[str, list[str]]]:
    """The README's DeepSpeed-Chat map: (flag, overrides) per row that names overrides."""
    text = README.read_text().split("## Coming from DeepSpeed-Chat", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1].startswith("`"):
            rows.append((cells[0], re.split(r" (?![^\[]*\])", cells[1].strip("`"))))  # spaces outside [...]
    return rows


@pytest.mark.parametrize(("flag", "overrides"), deepspeed_chat_rows(), ids=[r[0] for r in deepspeed_chat_rows()])
def test_each_deepspeed_chat_flag_maps_to_an_override_that_takes_its_value(flag: str, overrides: list[str]) -> None:
    cfg = compose(overrides)
    for override in overrides:
        key, value = override.split("=", 1)
        if key == "experiment":  # a preset: it composes and validates
            continue
        if "." not in key:  # a group choice: model@reward_model=opt-350m, optimizer=adamw-offload
            assert OmegaConf.select(cfg, key.split("@")[-1]).name == value, flag
            continue
        expected, actual = yaml.safe_load(value), OmegaConf.select(cfg, key, throw_on_missing=True)
        actual = OmegaConf.to_container(actual) if OmegaConf.is_config(actual) else actual
        if isinstance(expected, str) and isinstance(actual, float):  # YAML reads 5e-6 (no dot) as text
            expected = float(expected)
        if isinstance(expected, list) and expected and isinstance(expected[0], dict):
            actual = [{k: row[k] for k in want} for row, want in zip(actual, expected, strict=True)]
        assert actual == expected, (flag, override, actual)


def test_the_deepspeed_chat_map_covers_the_flags_users_ask_for() -> None:
    flags = " ".join(flag for flag, _ in deepspeed_chat_rows())
    wanted = "--actor-model --reward-model --deployment-type --step --data_path --data_split --zero_stage --lora_dim"
    wanted += " --lora_module_name --only_optimize_lora --enable_hybrid_engine --offload --enable_ema --unsup_coef"
    wanted += " --unsupervised_dataset_name --actor_learning_rate --critic_learning_rate --ppo_epochs"
    wanted += " --per_device_generation_batch_size --max_prompt_seq_len --max_answer_seq_len"
    assert [f for f in wanted.split() if f not in flags] == []


def readme_commands() -> list[list[str]]:
    """Every `rlhf...` command line in the README's shell blocks, as arguments: comments dropped, placeholders
    such as <run> filled in as a user would."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    lines = [line.split(" #")[0].strip() for block in blocks for line in block.splitlines()]
    return [shlex.split(re.sub(r"<[a-z ]+>", "filled-in", line)) for line in lines if line.startswith("rlhf")]


COMMAND_ARGS = {  # the README's commands other than `rlhf` and what their arguments are
    "rlhf-bench": "overrides",
    "rlhf-data": "overrides",
    "rlhf-chat": "folder",
    "rlhf-score": "folder",
    "rlhf-report": "folder",
}


@pytest.mark.parametrize("command", readme_commands(), ids=lambda c: " ".join(c)[:80])
def test_each_readme_command_composes(command: list[str], tmp_path: Path, monkeypatch) -> None:
    """`rlhf` and `rlhf-bench`/`rlhf-data` lines compose as written (placeholders such as <run> are only paths;
    the run to resume and the README's reward function file exist); the others name a command the package
    installs."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "filled-in").mkdir(parents=True)
    brevity = re.search(r"```python\n(def brevity\(.*?)```", README.read_text(), re.S).group(1)
    (tmp_path / "my_rewards.py").write_text(brevity)  # the README's own reward function, where it says to put it
    scripts = {entry.name for entry in distribution("rlhf").entry_points if entry.group == "console_scripts"}
    name, args = command[0], command[1:]
    assert name in scripts, f"the README uses {name}, which the package does not install"
    if name != "rlhf" and COMMAND_ARGS[name] == "folder":
        return
    overrides = [a for a in args if not a.startswith("-") and a != "job"]  # -m, --cfg job: Hydra's flags
    hydra_keys = [o for o in overrides if o.startswith("hydra")]
    if hydra_keys:  # a launcher choice: composed with Hydra's own config
        from hydra import compose as hydra_compose
        from hydra import initialize_config_dir

        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
        assert cfg.hydra.launcher._target_
        return
    compose(overrides)


BASE_OPTIONS = {  # each schema's primary YAML option: the defaults a user reads
    "stage/sft.yaml": "SFTStageConfig",
    "stage/reward.yaml": "RewardStageConfig",
    "stage/ppo.yaml": "PPOStageConfig",
    "stage/dpo.yaml": "DPOStageConfig",
    "optimizer/adamw.yaml": "OptimizerConfig",
    "logger/wandb.yaml": "LoggerConfig",
    "data/builtin.yaml": "DataConfig",
    "hardware/cpu.yaml": "HardwareConfig",
}


def disagreements(yaml_values: dict, schema_values: dict, prefix: str = "") -> list[str]:
    """Keys whose value in the YAML option differs from the schema's default (nested, lists compared whole)."""
    found = []
    for key, value in yaml_values.items():
        default = schema_values.get(key)
        if key in ("defaults", "name") or default == "???":
            continue
        if isinstance(value, dict) and isinstance(default, dict):
            found += disagreements(value, default, f"{prefix}{key}.")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            found += [f"{prefix}{key}: YAML {value}, schema {default}"] * (len(value) != len(default or []))
        elif value != getattr(default, "value", default):
            found.append(f"{prefix}{key}: YAML {value}, schema {default}")
    return found


def test_the_disagreement_finder_finds_one() -> None:
    assert disagreements({"a": 1, "b": {"c": 2}, "name": "x"}, {"a": 1, "b": {"c": 3}, "name": "???"}) == [
        "b.c: YAML 2, schema 3"
    ]


@pytest.mark.parametrize("option", sorted(BASE_OPTIONS))
def test_each_default_has_one_value_in_the_schema_and_its_yaml(option: str) -> None:
    import rlhf.config as config
    import rlhf.stage_schemas as stage_schemas

    module = stage_schemas if option.startswith("stage/") else config
    schema = OmegaConf.to_container(OmegaConf.structured(getattr(module, BASE_OPTIONS[option])))
    assert not disagreements(OmegaConf.to_container(OmegaConf.load(CONF_DIR / option)), schema)
