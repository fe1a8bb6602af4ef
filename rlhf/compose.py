"""Composing a config from command-line overrides, as `rlhf` would: the Python API (`compose`), the CLI's check that
overrides compose at all (`composition_problem`), and the overrides a run was started with (`recorded_overrides`).
"""

from __future__ import annotations

import re
from contextlib import suppress
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rlhf.config import CONF_DIR, ConfigError, prepare, register_configs
from rlhf.validation import unknown_keys, validate


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
    """The overrides a run started with (Hydra's record in the run directory), without `resume`: `rlhf
    resume=<dir>` alone continues the run with them."""
    record = run_dir / ".hydra" / "overrides.yaml"
    if not record.is_file():
        return []
    return [str(o) for o in OmegaConf.load(record) if not str(o).startswith("resume=")]


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
