"""The `rlhf` command: the Hydra app that composes a run and dispatches it to a stage trainer."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from rlhf.config import CONF_DIR, ConfigError, prepare, register_configs, validate

log = logging.getLogger("rlhf")

register_configs()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
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
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN and not cfg.logger.group:
        cfg.logger.group = Path(hydra_cfg.sweep.dir).name  # one W&B group per sweep, named like its folder
    if cfg.dry_run:
        from rlhf.plan import dry_run

        code = dry_run(cfg, run_dir)
        if code != 0:
            sys.exit(code)
        return

    from rlhf.launch import run

    code = run(cfg, run_dir)
    if code != 0:
        sys.exit(code)


if __name__ == "__main__":
    main()
