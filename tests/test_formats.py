"""The published dataset schemas, each from a local copy written here: adapters, split handling, bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from rlhf.data.formats import ADAPTERS, parse_transcript
from rlhf.data.sources import RowError, read_adapted

HH = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2 + 2?\n\nAssistant:"

SAMPLES = {
    "Anthropic/hh-rlhf": (
        {"chosen": HH + " It is 4.", "rejected": HH + " It is 5."},
        {"chosen": "no turns here", "rejected": "nor here"},
    ),
    "Dahoas/rm-static": (
        {"prompt": HH, "response": " It is 4.", "chosen": " It is 4.", "rejected": " It is 5."},
        {"prompt": HH, "response": "", "chosen": "", "rejected": "x"},
    ),
    "Dahoas/full-hh-rlhf": (
        {"prompt": HH, "response": " It is 4.", "chosen": " It is 4.", "rejected": " It is 5."},
        {"prompt": "\n\nAssistant: I start", "chosen": "a", "rejected": "b"},
    ),
    "Dahoas/synthetic-instruct-gptj-pairwise": (
        {"prompt": "What is 2 + 2?", "chosen": "It is 4.", "rejected": "It is 5."},
        {"prompt": "What is 2 + 2?", "chosen": None, "rejected": "It is 5."},
    ),
    "yitingxie/rlhf-reward-datasets": (
        {"prompt": HH[: -len("\n\nAssistant:")], "chosen": "Assistant: It is 4.", "rejected": "Assistant: It is 5."},
        {"prompt": 7, "chosen": "Assistant: a", "rejected": "Assistant: b"},
    ),
    "openai/webgpt_comparisons": (
        {
            "question": {"full_text": "What is 2 + 2?"},
            "answer_0": "It is 5 [1].",
            "answer_1": "It is 4 [2][3].",
            "score_0": -1.0,
            "score_1": 1.0,
        },
        {"question": {"full_text": "Q"}, "answer_0": "a", "answer_1": "b", "score_0": 0.0, "score_1": 0.0},
    ),
    "stanfordnlp/SHP": (
        {"history": "What is 2 + 2?", "human_ref_A": "It is 5.", "human_ref_B": "It is 4.", "labels": 0},
        {"history": "Q", "human_ref_A": "a", "human_ref_B": "b", "labels": None},
    ),
}


def test_transcripts_become_messages() -> None:
    assert parse_transcript(HH + " It is 4.") == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "It is 4."},
    ]


@pytest.mark.parametrize("fmt", list(SAMPLES))
def test_adapter_maps_the_published_schema(fmt: str) -> None:
    good, bad = SAMPLES[fmt]
    row = ADAPTERS[fmt](good)
    assert row["prompt"][-1] == {"role": "user", "content": "What is 2 + 2?"}
    assert row["chosen"].rstrip(".") == "It is 4" and row["rejected"].rstrip(".") == "It is 5"
    with pytest.raises(ValueError):
        ADAPTERS[fmt](bad)


def test_multi_turn_history_is_kept() -> None:
    row = ADAPTERS["Anthropic/hh-rlhf"](SAMPLES["Anthropic/hh-rlhf"][0])
    assert [t["role"] for t in row["prompt"]] == ["user", "assistant", "user"]


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet_files", "jsonl_file"])
def test_local_copies_load_with_their_splits(tmp_path: Path, layout: str) -> None:
    good, bad = SAMPLES["Dahoas/rm-static"]
    train, test = [good, good, bad], [good]
    if layout == "save_to_disk":
        DatasetDict({"train": Dataset.from_list(train), "test": Dataset.from_list(test)}).save_to_disk(tmp_path / "ds")
        location = tmp_path / "ds"
    elif layout == "parquet_files":
        (tmp_path / "ds").mkdir()
        Dataset.from_list(train).to_parquet(tmp_path / "ds" / "train-00000.parquet")
        Dataset.from_list(test).to_parquet(tmp_path / "ds" / "test-00000.parquet")
        location = tmp_path / "ds"
    else:
        location = tmp_path / "rm.jsonl"
        location.write_text("\n".join(json.dumps(r) for r in train + test) + "\n")
    rows, report = read_adapted(str(location), "Dahoas/rm-static", from_hub=False, strict=False)
    assert len(rows) == 3 and report.kept == 3 and sum(report.skipped.values()) == 1
    expected_eval = 0 if layout == "jsonl_file" else 1
    assert sum(r["split"] == "eval" for r in rows) == expected_eval
    with pytest.raises(RowError, match=r"\[train\]: row 3: missing or empty field: 'chosen'"):
        read_adapted(str(location), "Dahoas/rm-static", from_hub=False, strict=True)


def test_deepspeed_chat_local_jsonfile_layout(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    row = {"prompt": " Human: Hi Assistant:", "chosen": "Hello", "rejected": "Go away"}
    (tmp_path / "data" / "train.json").write_text(json.dumps([row, row]))
    (tmp_path / "data" / "eval.json").write_text(json.dumps({**row, "prompt": "Say hi."}) + "\n")  # JSON Lines
    rows, _ = read_adapted(str(tmp_path), "local/jsonfile", from_hub=False, strict=True)
    assert [r["split"] for r in rows] == ["train", "train", "eval"]
    assert rows[0]["prompt"] == [{"role": "user", "content": "Hi"}]
    assert rows[2]["prompt"] == [{"role": "user", "content": "Say hi."}]


def test_eval_split_prefers_validation_and_adapted_rows_are_checked(tmp_path: Path) -> None:
    good = SAMPLES["stanfordnlp/SHP"][0]
    same = {**good, "human_ref_B": good["human_ref_A"]}
    (tmp_path / "shp" / "askscience").mkdir(parents=True)
    for name, rows in [("train.json", [good, same]), ("validation.json", [good]), ("test.json", [good, good])]:
        (tmp_path / "shp" / "askscience" / name).write_text("\n".join(json.dumps(r) for r in rows))
    rows, report = read_adapted(str(tmp_path / "shp"), "stanfordnlp/SHP", from_hub=False, strict=False)
    assert [r["split"] for r in rows] == ["train", "eval"]  # validation is the eval split; test is left out
    assert report.skipped == {"chosen identical to rejected": 1}


def test_hh_transcripts_must_share_their_history() -> None:
    with pytest.raises(ValueError, match="differ before their last answer"):
        ADAPTERS["Anthropic/hh-rlhf"]({"chosen": HH + " It is 4.", "rejected": "\n\nHuman: Other\n\nAssistant: 5"})


def test_hub_load_failure_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def script_dataset(name: str) -> None:
        raise RuntimeError("Dataset scripts are no longer supported, but found webgpt_comparisons.py")

    monkeypatch.setattr(datasets, "load_dataset", script_dataset)
    with pytest.raises(ValueError, match="cannot load 'openai/webgpt_comparisons' from the hub.*point the source's"):
        read_adapted("openai/webgpt_comparisons", "openai/webgpt_comparisons", from_hub=True, strict=False)


def test_transcript_prompt_renders_every_turn_with_the_chat_template() -> None:
    from omegaconf import OmegaConf

    from rlhf.config import DataConfig, ModelConfig
    from rlhf.data.tokenize import IGNORE_INDEX, PromptFormat, encode_sft
    from rlhf.models import load_tokenizer

    tokenizer = load_tokenizer(OmegaConf.structured(ModelConfig(name="tiny", source="tiny")))
    data_cfg = OmegaConf.structured(DataConfig(name="x"))
    row = ADAPTERS["Anthropic/hh-rlhf"](SAMPLES["Anthropic/hh-rlhf"][0])
    for template in ("chat", "plain"):
        fmt = PromptFormat.for_tokenizer(tokenizer, OmegaConf.merge(data_cfg, {"template": template}))
        encoded = encode_sft(tokenizer, fmt, row["prompt"], row["chosen"], data_cfg)
        prompt_ids = [
            t for t, label in zip(encoded["input_ids"], encoded["labels"], strict=True) if label == IGNORE_INDEX
        ]
        prompt_text = tokenizer.decode(prompt_ids)
        assert "Hi there" in prompt_text and "Hello!" in prompt_text and "What is 2 + 2?" in prompt_text
        answer = tokenizer.decode([t for t in encoded["labels"] if t != IGNORE_INDEX])
        assert answer.strip().startswith("It is 4.") and "Hi there" not in answer
