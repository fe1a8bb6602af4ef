"""Reward functions named in the config (rlhf.rewards): loading by import path or file, the checks on what a
function returns (each failure names the function and the row), the weighted sum and the columns functions get."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rlhf import rewards
from rlhf.data import builtin
from rlhf.rewards import RewardFunction, RewardFunctionError

PROMPTS = ["What is 2 + 3?", "Say hi", "What is 4 + 4?"]
COMPLETIONS = ["5", "hi", "9"]


def function(fn) -> RewardFunction:
    return RewardFunction("mine:fn", 1.0, fn)


def test_load_imports_by_path_and_file_with_weights(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "load_me.py").write_text("def brevity(prompts, completions, **columns):\n    return [1.0]\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "file_rewards.py").write_text("def brevity(prompts, completions, **columns):\n    return []\n")
    monkeypatch.chdir(tmp_path)
    names = ["model", "rlhf.data.builtin:gold_reward", "load_me:brevity", f"{tmp_path}/sub/file_rewards.py:brevity"]
    funcs = rewards.load(names, [1.0, 2.0, 0.5, 0.25])
    assert [f.fn for f in funcs[:2]] == [None, builtin.gold_reward]
    assert [f.weight for f in funcs] == [1.0, 2.0, 0.5, 0.25]
    assert funcs[2].fn([], []) == [1.0] and funcs[3].fn([], []) == []
    keys = [f.key for f in funcs]  # metric names: the function's own, the whole path where two share it
    assert keys[:2] == ["model", "gold_reward"] and keys[2] != keys[3] and "brevity" in keys[2] + keys[3]
    assert [f.weight for f in rewards.load(["model", "rlhf.data.builtin:gold_reward"], [])] == [1.0, 1.0]


@pytest.mark.parametrize(
    ("names", "weights", "message"),
    [
        ([], [], "stage.reward_funcs is empty"),
        (["model"], [1.0, 2.0], "has 2 weights for 1 reward functions"),
        (["model", "model"], [], "names a function twice"),
        (["gold_reward"], [], "expected `model`, an import path `module:function`"),
        (["no_such_module_here:f"], [], "cannot import 'no_such_module_here'"),
        (["/nowhere/rewards.py:f"], [], "cannot import '/nowhere/rewards.py' (no file /nowhere/rewards.py)"),
        (["rlhf.data.builtin:nothing"], [], "'rlhf.data.builtin' has no 'nothing'"),
        (["rlhf.data.builtin:FAMILIES"], [], "'FAMILIES' is a list, not callable"),
    ],
)
def test_a_reward_function_that_cannot_be_used_is_named(names: list, weights: list, message: str) -> None:
    with pytest.raises(RewardFunctionError) as err:
        rewards.load(names, weights)
    assert message in str(err.value)


def test_call_gives_one_float_per_completion_and_nan_for_none() -> None:
    got = rewards.call(function(lambda p, c, **_: [1, None, 0.5]), PROMPTS, COMPLETIONS, {})
    assert got[0] == 1.0 and math.isnan(got[1]) and got[2] == 0.5
    tensor = rewards.call(function(lambda p, c, **_: torch.tensor([1.0, 2.0, 3.0])), PROMPTS, COMPLETIONS, {})
    assert tensor.tolist() == [1.0, 2.0, 3.0]


def test_call_passes_the_rows_other_columns_by_name() -> None:
    seen = {}

    def reference_match(prompts, completions, answer, **rest):
        seen.update(rest, answer=answer)
        return [float(c == a) for c, a in zip(completions, answer, strict=True)]

    rows = [{"prompt": p, "input_ids": [1], "answer": a} for p, a in zip(PROMPTS, ["5", "hi", "8"], strict=True)]
    rows[1]["source"] = "chat"
    columns = rewards.columns_of(rows)
    assert columns == {"answer": ["5", "hi", "8"], "source": [None, "chat", None]}
    assert rewards.call(function(reference_match), PROMPTS, COMPLETIONS, columns).tolist() == [1.0, 1.0, 0.0]
    assert seen["source"] == [None, "chat", None]


def fails_on_hi(prompts, completions, **_):
    return [1 / (c != "hi") for c in completions]


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (fails_on_hi, "reward function mine:fn raised ZeroDivisionError: division by zero on row 1 of the batch "
         "(prompt 'Say hi')"),
        (lambda p, c, **_: [1.0], "returned 1 values for 3 completions"),
        (lambda p, c, **_: 1.0, "returned a float for 3 completions"),
        (lambda p, c, **_: "abc", "returned a str for 3 completions"),
        (lambda p, c, **_: [1.0, "0.5", 1.0], "returned a str ('0.5') for row 1 of the batch (prompt 'Say hi')"),
        (lambda p, c, **_: [1.0, 1.0, float("nan")], "returned nan for row 2 of the batch (prompt 'What is 4 + 4?')"),
        (lambda p, c, **_: [True, 1.0, 1.0], "returned a bool (True) for row 0"),
        (lambda p, c: [1.0] * 3, "raised TypeError"),  # no **columns to take the rows' other fields
    ],
)  # fmt: skip
def test_a_function_that_raises_or_returns_a_bad_value_stops_naming_it_and_the_row(fn, message: str) -> None:
    with pytest.raises(RewardFunctionError) as err:
        rewards.call(function(fn), PROMPTS, COMPLETIONS, {"answer": ["5", "hi", "8"]})
    assert message in str(err.value)


def test_combine_weights_the_functions_and_skips_their_nones() -> None:
    funcs = [RewardFunction("model", 1.0), RewardFunction("a:gold", 2.0, print), RewardFunction("b:short", -0.5, print)]
    parts = {
        "model": torch.tensor([0.5, -1.0, 0.0]),
        "gold": torch.tensor([1.0, math.nan, 0.0]),
        "short": torch.tensor([2.0, 4.0, math.nan]),
    }
    assert rewards.combine(funcs, parts, PROMPTS).tolist() == [1.5, -3.0, 0.0]


def test_combine_refuses_a_completion_no_function_scores() -> None:
    funcs = [RewardFunction("a:gold", 1.0, print)]
    with pytest.raises(RewardFunctionError, match=r"no reward function scores row 1 of the batch \(prompt 'Say hi'\)"):
        rewards.combine(funcs, {"gold": torch.tensor([1.0, math.nan, 0.0])}, PROMPTS)


def test_the_built_in_gold_reward_grades_built_in_prompts_and_skips_others() -> None:
    pair = builtin.generate(4, seed=3)[0]
    got = builtin.gold_reward([pair.prompt, pair.prompt, [{"role": "user", "content": "hi"}], "Say hi"],
                              [pair.chosen, pair.rejected, "hi", "hi"])  # fmt: skip
    assert got == [1.0, 0.0, None, None]
