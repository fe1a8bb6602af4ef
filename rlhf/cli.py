"""The `rlhf` command: the Hydra app that composes a run and dispatches it to a stage trainer."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from rlhf.compose import composition_problem, prepare, recorded_overrides
from rlhf.config import CONF_DIR, ConfigError, Launcher, register_configs
from rlhf.validation import validate

log = logging.getLogger("rlhf")

register_configs()


def main() -> None:
    """`rlhf`: overrides that do not compose (a misspelt key, a bad type, an unknown option) are one message and exit
    code 2, like every other bad input; then the Hydra app runs. Hydra's own flags (-m, --cfg, --help, ...) go
    straight to it."""
    overrides = sys.argv[1:]
    if len(overrides) == 1 and overrides[0].startswith("resume=") and overrides[0] != "resume=auto":
        overrides = recorded_overrides(Path(overrides[0].split("=", 1)[1])) + overrides
        sys.argv[1:] = overrides
    if not any(arg.startswith("-") for arg in overrides):
        problem = composition_problem(overrides)
        if problem:
            print(f"rlhf: invalid config: {problem}", file=sys.stderr)
            sys.exit(2)
    hydra_main()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    """Validate the composed config, then run the chosen stage in this process or in launched workers."""
    note = prepare(cfg)
    if note:
        log.info("%s", note)
    try:
        validate(cfg)
    except ConfigError as err:
        log.error("%s", err)
        sys.exit(2)

    hydra_cfg = HydraConfig.get()
    if "Slurm" in hydra_cfg.launcher.get("_target_", "") and cfg.hardware.launcher != Launcher.slurm:
        log.error("hydra/launcher=slurm starts one task per device, each one rank: add hardware.launcher=slurm")
        sys.exit(2)
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN and not cfg.logger.group:
        from rlhf.tracking import run_group

        cfg.logger.group = run_group(Path(hydra_cfg.sweep.dir))  # one W&B group per sweep, named like its folder
    if cfg.dry_run:
        from rlhf.plan import dry_run

        code = dry_run(cfg, run_dir)
        if code == 2 or (code == 1 and hydra_cfg.mode != RunMode.MULTIRUN):  # a sweep plans its other jobs too
            sys.exit(code)
        return

    from rlhf.pipeline import run

    code = run(cfg, run_dir)
    if code != 0:
        sys.exit(code)


if __name__ == "__main__":
    main()
