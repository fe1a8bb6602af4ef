"""Composing a config from command-line overrides, as `rlhf` would: the Python API (`compose`), what every run does
to a composed config (`prepare`: the precision resolved, a stage's own optimizer settings applied), the CLI's check
that overrides compose at all (`composition_problem`), and the overrides a run was started with.
"""

from __future__ import annotations

import re
from contextlib import suppress
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rlhf.config import CONF_DIR, Accelerator, ConfigError, Precision, apply_stage_optimizer, register_configs
from rlhf.validation import unknown_keys, validate

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with bf16 matrix instructions


def native_bf16(accelerator: Accelerator, cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[bool, str]:
    """Whether the device computes bf16 natively (an NVIDIA GPU from Ampere on; a CPU with AVX-512 BF16 or AMX),
    and why. Without those instructions bf16 matrix products are emulated, many times slower than fp32."""
    if accelerator == Accelerator.cuda:
        import torch

        if not torch.cuda.is_available():
            return True, "CUDA is not visible here; bf16 assumed for the GPU"
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name()} {'computes' if ok else 'does not compute'} bf16 natively"
    try:
        flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return False, "the CPU's instruction sets are unknown (no /proc/cpuinfo flags)"
    found = [flag for flag in CPU_BF16_FLAGS if flag in flags]
    if found:
        return True, f"the CPU has {' and '.join(found)}"
    return False, "the CPU has neither AVX-512 BF16 nor AMX (bf16 would be emulated)"


def resolve_precision(cfg: DictConfig) -> str | None:
    """Replace hardware.precision=auto by bf16 where the device computes it natively, else fp32; return what was
    decided and why (None when the precision was given)."""
    if cfg.hardware.precision != Precision.auto:
        return None
    native, why = native_bf16(cfg.hardware.accelerator)
    cfg.hardware.precision = Precision.bf16 if native else Precision.fp32
    return f"hardware.precision=auto -> {cfg.hardware.precision.value}: {why}"


def prepare(cfg: DictConfig) -> str | None:
    """What every run does to a composed config before validating it: resolve the precision and apply a single
    stage's own optimizer settings (a pipeline applies each stage's in `stage_config`). Returns the precision note."""
    note = resolve_precision(cfg)
    if cfg.stage.name != "pipeline":
        apply_stage_optimizer(cfg)
    return note


def composition_problem(overrides: list[str]) -> str | None:
    """Why these overrides do not compose into a config, or None (rule violations are left to `validate`). For a
    key the schemas lack, the closest option rather than Hydra's hint to add it with `+`."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        compose(overrides)
    except ConfigError:
        return None
    except (HydraException, OmegaConfBaseException) as err:
        missing = re.match(r"Could not override '([^']+)'", str(err))
        if missing:
            key = missing.group(1)
            added = [f"+{o}" if o.split("=", 1)[0] == key else o for o in overrides]
            with suppress(HydraException, OmegaConfBaseException, ConfigError):
                from hydra import compose as hydra_compose
                from hydra import initialize_config_dir

                with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                    problems = unknown_keys(hydra_compose(config_name="config", overrides=added))
                if problems:
                    return "; ".join(problems)
        choice = re.search(r"Could not find '([\w/]+)/([^']+)'", str(err))
        if choice:
            group, name = choice.groups()
            options = sorted(f.stem for f in (CONF_DIR / group).glob("*.yaml"))
            return f"{group.replace('/', '.')}={name}: no such option; choose one of {', '.join(options)}"
        cause = f" ({err.__cause__})" if err.__cause__ else ""
        return f"{err}{cause}".replace("\n", " ")
    return None


def recorded_overrides(run_dir: Path) -> list[str]:
    """The overrides a run started with, without `resume`: `rlhf resume=<dir>` alone continues the run with them.
    Inside the `rlhf` of that run, its own (each node's `rlhf` of a multi-node run has its own; they share Hydra's
    record in the run directory, which the last one wrote); else Hydra's record."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() and Path(HydraConfig.get().runtime.output_dir) == run_dir:
        overrides = list(HydraConfig.get().overrides.task)
    else:
        record = run_dir / ".hydra" / "overrides.yaml"
        overrides = list(OmegaConf.load(record)) if record.is_file() else []
    return [str(o) for o in overrides if not str(o).startswith("resume=")]


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The config the `rlhf` command would build for these overrides, validated (Python API and tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    prepare(cfg)
    validate(cfg)
    return cfg
