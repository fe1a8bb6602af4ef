"""A cache of processed (tokenised) data, keyed by everything that changes it.

The key covers the resolved data option (sources, split, seed, lengths, template), each source file's path, size and
modification time, the tokenizer (name, vocabulary size, special tokens, chat template), the stage, and the data
package's code, which reads, adapts, splits, generates, tokenises and builds each stage's entry. Entries are
written under a lock and renamed into place, so concurrent runs build once and a half-written entry is never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from rlhf import dist
from rlhf.models import file_lock

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the processed layout changes
DATA_CODE = sorted(Path(__file__).parent.glob("*.py"))  # the data package's code: reading, splitting, tokenising


def source_files(data_cfg: DictConfig) -> list[list]:
    """(path, size, mtime_ns) of every local file the mix reads."""
    found = []
    for source in [*data_cfg.sources, data_cfg.ptx]:
        if not source.path:
            continue
        path = Path(source.path).expanduser()
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            stat = file.stat() if file.exists() else None
            found.append([str(file), stat.st_size if stat else -1, stat.st_mtime_ns if stat else -1])
    return found


def cache_key(data_cfg: DictConfig, stage: str, tokenizer) -> str:
    data = OmegaConf.to_container(data_cfg, resolve=True, enum_to_str=True)
    data.pop("rebuild", None)
    payload = {
        "format": CACHE_FORMAT,
        "stage": stage,
        "data": data,
        "files": source_files(data_cfg),
        "code": [hashlib.sha256(f.read_bytes()).hexdigest() for f in DATA_CODE],
        "tokenizer": [
            tokenizer.name_or_path,
            len(tokenizer),
            tokenizer.pad_token,
            tokenizer.eos_token,
            hashlib.sha256(str(getattr(tokenizer, "chat_template", "")).encode()).hexdigest(),
        ],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def cached(root: Path, key: str, build: Callable[[], Any], rebuild: bool = False) -> tuple[Any, bool]:
    """(value, hit): the cached value for `key`, or `build()` stored under it (always rebuilt with `rebuild`)."""
    path = root / "data" / f"{key}.pt"
    with file_lock(path.with_suffix(".lock")):
        if path.is_file() and not rebuild:
            log.info("data cache hit: %s", path)
            return torch.load(path, weights_only=True), True
        log.info("data cache %s: building %s", "rebuild" if rebuild else "miss", path)
        value = build()
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        torch.save(value, tmp)
        os.replace(tmp, path)
        return value, False


def shared(root: Path, key: str, build: Callable[[], Any], rebuild: bool = False) -> Any:
    """The cached value for `key` across ranks: rank 0 builds (or rebuilds) it, the others read what it wrote."""
    if dist.rank() == 0:
        value, _ = cached(root, key, build, rebuild=rebuild)
    dist.barrier()
    if dist.rank() != 0:
        value, _ = cached(root, key, build)
    return value
