"""PPO's reward functions, named in the config (`stage.reward_funcs`, `stage.reward_weights`): the reward model
(`model`) and Python functions by import path (`package.module:function`, a module of the directory `rlhf` runs
from included) or by file (`path/to/file.py:function`), each with a weight. A function takes the prompts as written
(strings or chat messages), the completions and the data rows' other columns as keyword lists, as TRL's do, and
returns one float per completion, or None where it does not apply. What it returns is checked: an exception, a wrong
length or a non-finite value stops the run with the function's name and the row."""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

MODEL = "model"  # the reward model of `stage.reward_from`


class RewardFunctionError(RuntimeError):
    """A reward function that cannot be loaded, raised, or returned something other than one number per completion."""


@dataclass(frozen=True)
class RewardFunction:
    name: str  # as written in the config: `model` or `module:function`
    weight: float
    fn: Callable | None = None  # None: the reward model, which the PPO engine scores itself
    key: str = ""  # its metrics' name (`reward/<key>_mean`): the function's own name where that is unambiguous

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", self.name.rsplit(":", 1)[-1])


def load(names: Sequence[str], weights: Sequence[float]) -> list[RewardFunction]:
    """The configured reward functions, imported; a RewardFunctionError says which name cannot be used and why."""
    if not names:
        raise RewardFunctionError("stage.reward_funcs is empty: name `model` (the reward model) or a function")
    if weights and len(weights) != len(names):
        raise RewardFunctionError(
            f"stage.reward_weights has {len(weights)} weights for {len(names)} reward functions {list(names)}: "
            "give one per function, or none for 1.0 each"
        )
    if len(set(names)) != len(names):
        raise RewardFunctionError(f"stage.reward_funcs names a function twice: {list(names)}")
    weights = list(weights) if weights else [1.0] * len(names)
    short = [n.rsplit(":", 1)[-1] for n in names]
    keys = [s if short.count(s) == 1 else re.sub(r"\W", "_", n) for n, s in zip(names, short, strict=True)]
    return [
        RewardFunction(n, float(w), None if n == MODEL else import_function(n), key)
        for n, w, key in zip(names, weights, keys, strict=True)
    ]


def import_function(name: str) -> Callable:
    """`module:function` imported (the current directory first on the path, for a module of one's own), or
    `path/to/file.py:function` loaded from that file."""
    module_name, _, attribute = name.rpartition(":")
    if not module_name or not attribute:
        raise RewardFunctionError(
            f"reward function {name!r}: expected `model`, an import path `module:function` or a file "
            "`path/to/file.py:function` (e.g. rlhf.data.builtin:gold_reward, or my_rewards.py:brevity)"
        )
    try:
        module = _module_of_file(module_name) if module_name.endswith(".py") else _imported(module_name)
    except (ImportError, OSError, SyntaxError) as err:
        raise RewardFunctionError(f"reward function {name!r}: cannot import {module_name!r} ({err})") from err
    fn = getattr(module, attribute, None)
    if fn is None:
        raise RewardFunctionError(f"reward function {name!r}: {module_name!r} has no {attribute!r}")
    if not callable(fn):
        raise RewardFunctionError(f"reward function {name!r}: {attribute!r} is a {type(fn).__name__}, not callable")
    return fn


def _imported(module_name: str) -> ModuleType:
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return importlib.import_module(module_name)


def _module_of_file(path: str) -> ModuleType:
    """The module a .py file defines, loaded once per file (under a name its absolute path derives)."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise FileNotFoundError(f"no file {file}")
    name = "rlhf_reward_" + re.sub(r"\W", "_", str(file))
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def _where(prompts: list, row: int) -> str:
    prompt = str(prompts[row])
    return f"row {row} of the batch (prompt {prompt[:80] + '...' if len(prompt) > 80 else prompt!r})"


def call(reward: RewardFunction, prompts: list, completions: list[str], columns: dict[str, list]) -> torch.Tensor:
    """The function's value for each completion, nan where it returned None; a RewardFunctionError naming the
    function and the row when it raises or returns anything but one finite number (or None) per completion."""
    try:
        values = reward.fn(prompts, completions, **columns)
    except Exception as err:
        raise RewardFunctionError(
            f"reward function {reward.name} raised {type(err).__name__}: {err} "
            f"on {_first_raising_row(reward, prompts, completions, columns)}"
        ) from err
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    is_list = isinstance(values, Sequence) and not isinstance(values, str | bytes)
    if not is_list or len(values) != len(completions):
        got = f"{len(values)} values" if is_list else f"a {type(values).__name__}"
        raise RewardFunctionError(
            f"reward function {reward.name} returned {got} for {len(completions)} completions: return one float "
            "(or None) per completion"
        )
    out = []
    for row, value in enumerate(values):
        if value is None:
            out.append(math.nan)
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise RewardFunctionError(
                f"reward function {reward.name} returned a {type(value).__name__} ({value!r}) for "
                f"{_where(prompts, row)}: return a float or None"
            )
        if not math.isfinite(value):
            raise RewardFunctionError(f"reward function {reward.name} returned {value} for {_where(prompts, row)}")
        out.append(float(value))
    return torch.tensor(out, dtype=torch.float)


def _first_raising_row(reward: RewardFunction, prompts: list, completions: list[str], columns: dict) -> str:
    """Where a function that raised on a batch raises on its own: the first such row, else 'the batch'."""
    for row in range(len(completions)):
        try:
            reward.fn([prompts[row]], [completions[row]], **{k: [v[row]] for k, v in columns.items()})
        except Exception:
            return _where(prompts, row)
    return f"the batch of {len(completions)} (no single row raises on its own)"


def columns_of(rows: list[dict]) -> dict[str, list]:
    """The rows' fields other than the prompt and its token ids, as the keyword lists a reward function gets (None
    for a row without a field another row has)."""
    names = dict.fromkeys(k for row in rows for k in row if k not in ("prompt", "input_ids"))
    return {name: [row.get(name) for row in rows] for name in names}


def combine(rewards: Sequence[RewardFunction], parts: dict[str, torch.Tensor], prompts: list) -> torch.Tensor:
    """The weighted sum of the functions' values (`parts`, by key) per completion, a function's None (nan) counting
    as absent; a RewardFunctionError for a completion no function scores."""
    stacked = torch.stack([parts[r.key] for r in rewards])
    weights = torch.tensor([r.weight for r in rewards], dtype=torch.float)[:, None]
    unscored = stacked.isnan().all(dim=0)
    if unscored.any():
        row = int(unscored.nonzero()[0])
        raise RewardFunctionError(
            f"no reward function scores {_where(prompts, row)}: every one of {[r.name for r in rewards]} returned "
            "None; add one that does (e.g. model)"
        )
    return (stacked.nan_to_num(0.0) * weights).sum(dim=0)


def finite_sums(values: torch.Tensor) -> tuple[float, float, int]:
    """The sum, the sum of squares and the count of the finite values (a reward function's None is nan)."""
    finite = values[values.isfinite()]
    return finite.sum().item(), (finite**2).sum().item(), len(finite)


def reward_function_metrics(keys: list[str], sums: list[float]) -> dict[str, float]:
    """Each reward function's mean and std over the rows it scored, from `finite_sums` of each in turn (summed over
    the ranks); nan for a function that scored no row."""
    metrics = {}
    for i, key in enumerate(keys):
        total, squares, n = sums[3 * i : 3 * i + 3]
        mean = total / n if n else math.nan
        metrics[f"reward/{key}_mean"] = mean
        metrics[f"reward/{key}_std"] = max(squares / n - mean**2, 0.0) ** 0.5 if n else math.nan
    return metrics
