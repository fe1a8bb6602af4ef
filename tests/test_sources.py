"""Local data files in the generic formats: column mapping, row validation with row numbers, stage use."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlhf.compose import compose
from rlhf.config import ConfigError, DataConfig
from rlhf.data import DataError, plan_steps, stage_rows
from rlhf.data.sources import RowError, read_local

GOOD = {"question": "What is 1 + 1?", "good": "2", "bad": "3"}


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_bytes(b"\n".join(line.encode() if isinstance(line, str) else line for line in lines) + b"\n")
    return path


@pytest.fixture
def messy_jsonl(tmp_path: Path) -> Path:
    return write_jsonl(
        tmp_path / "mine.jsonl",
        [
            json.dumps(GOOD),  # row 1
            json.dumps({"question": "Q2", "good": "same", "bad": "same"}),  # row 2: chosen == rejected
            "{not json",  # row 3: undecodable
            json.dumps({"question": "Q4", "good": "yes"}),  # row 4: missing 'bad'
            json.dumps({"question": "Q5", "good": 5, "bad": "no"}),  # row 5: wrong type
            json.dumps({"question": "  ", "good": "a", "bad": "b"}),  # row 6: empty
            b"\xff\xfe not utf-8",  # row 7: undecodable bytes
            json.dumps({"question": "Q8", "good": "a", "bad": "b"}),  # row 8
        ],
    )


COLUMNS = {"prompt": "question", "chosen": "good", "rejected": "bad"}


def test_lenient_read_keeps_good_rows_and_counts_the_rest(messy_jsonl: Path) -> None:
    rows, report = read_local(messy_jsonl, "pairs", COLUMNS, strict=False)
    assert rows == [
        {"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"},
        {"prompt": "Q8", "chosen": "a", "rejected": "b"},
    ]
    assert report.kept == 2 and sum(report.skipped.values()) == 6
    assert report.skipped == {
        "chosen identical to rejected": 1,
        "undecodable": 2,
        "missing field": 1,
        "wrong type": 1,
        "empty field": 1,
    }


@pytest.mark.parametrize(
    "keep_lines,row,fragment",
    [
        (2, 2, "chosen identical to rejected"),
        (3, 3, "undecodable"),
        (4, 4, "missing field: 'bad'"),
        (5, 5, "wrong type: field 'good' must be a string, got int"),
        (6, 6, "empty field: 'question'"),
    ],
)
def test_strict_read_names_source_row_and_field(messy_jsonl: Path, keep_lines: int, row: int, fragment: str) -> None:
    lines = messy_jsonl.read_bytes().split(b"\n")
    path = write_jsonl(messy_jsonl.with_name("cut.jsonl"), [lines[0], lines[keep_lines - 1]])
    with pytest.raises(RowError) as err:
        read_local(path, "pairs", COLUMNS, strict=True)
    assert f"cut.jsonl: row 2: {fragment}" in str(err.value)


def test_csv_and_json_and_sft_format(tmp_path: Path) -> None:
    with open(tmp_path / "a.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "answer"])
        writer.writeheader()
        writer.writerow({"prompt": "Hi", "answer": "Hello"})
        writer.writerow({"prompt": "", "answer": "x"})
    rows, report = read_local(tmp_path / "a.csv", "sft", {}, strict=False)
    assert rows == [{"prompt": "Hi", "chosen": "Hello"}] and report.first_errors == [
        f"{tmp_path / 'a.csv'}: row 3: empty field: 'prompt'"
    ]
    (tmp_path / "b.json").write_text(json.dumps([{"prompt": "P", "chosen": "C", "rejected": "R"}, "junk"]))
    rows, report = read_local(tmp_path / "b.json", "pairs", {}, strict=False)
    assert len(rows) == 1 and "row 2: wrong type: a row must be an object, got str" in report.first_errors[0]


def test_a_rows_other_plain_columns_are_kept_for_the_reward_functions(tmp_path: Path) -> None:
    row = {"question": "2+2?", "answer": "4", "target": 4, "tags": ["math"], "meta": {"a": 1}, "source": None}
    (tmp_path / "q.jsonl").write_text(json.dumps(row) + "\n")
    rows, _ = read_local(tmp_path / "q.jsonl", "sft", {"prompt": "question"}, strict=True)
    assert rows == [{"target": 4, "source": None, "prompt": "2+2?", "chosen": "4"}]  # lists and objects are not


def test_missing_file_and_unknown_format_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data file not found"):
        read_local(tmp_path / "none.jsonl", "pairs", {}, strict=False)
    with pytest.raises(ValueError, match="unknown data format 'dpo'"):
        read_local(tmp_path / "none.jsonl", "dpo", {}, strict=False)


def test_mix_of_builtin_and_local_sft_file(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "sft.jsonl", [json.dumps({"prompt": f"P{i}", "answer": f"A{i}"}) for i in range(50)])
    data = OmegaConf.merge(
        OmegaConf.structured(DataConfig),
        {
            "name": "mix",
            "builtin_size": 300,
            "sources": [{"name": "builtin"}, {"path": str(path), "format": "sft", "split": [1, 0, 0]}],
        },
    )
    sft = stage_rows(data, "sft")
    assert len({r["prompt"] for r in sft.train + sft.eval if r["prompt"].startswith("P")}) == 50  # all go to SFT
    reward = stage_rows(data, "reward")
    assert not any(r["prompt"].startswith("P") for r in reward.train)  # no rejected answers: never for the RM
    assert set(reward.counts) == {"builtin"}


def test_blend_follows_the_weights(tmp_path: Path) -> None:
    for name in ("a", "b"):
        rows = [json.dumps({"prompt": f"{name}{i}", "chosen": "x", "rejected": "y"}) for i in range(1000)]
        write_jsonl(tmp_path / f"{name}.jsonl", rows)
    data = OmegaConf.merge(
        OmegaConf.structured(DataConfig),
        {
            "name": "blend",
            "split": [1, 0, 0],
            "sources": [
                {"path": str(tmp_path / "a.jsonl"), "format": "pairs", "weight": 3.0},
                {"path": str(tmp_path / "b.jsonl"), "format": "pairs", "weight": 1.0},
            ],
        },
    )
    sft = stage_rows(data, "sft")
    share_a = sum(r["prompt"].startswith("a") for r in sft.train) / len(sft.train)
    assert abs(share_a - 0.75) < 0.01 and sft.counts == {"a.jsonl": 1350, "b.jsonl": 450}
    assert len({r["prompt"] for r in sft.train if r["prompt"].startswith("a")}) == 900  # all of a, some twice


def test_bad_source_configs_fail_validation_and_missing_files_fail_loading(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"data.sources\[1\].format='dpo' must be one of pairs, sft, text, Anthropic/hh-rlhf"
    ):
        compose([f"data.sources=[{{name: builtin}},{{path: {tmp_path}/x.jsonl, format: dpo}}]"])
    cfg = compose([f"data.sources=[{{path: {tmp_path}/x.jsonl, format: pairs}}]"])
    with pytest.raises(DataError, match="data source x.jsonl: data file not found"):
        stage_rows(cfg.data, "sft")


def test_inspection_report_shows_counts_skips_and_examples(messy_jsonl: Path) -> None:
    from rlhf.preview import report

    source = f"{{path: {messy_jsonl}, format: pairs, columns: {{prompt: question, chosen: good, rejected: bad}}}}"
    text = report(["model=tiny", "data.builtin_size=600", f"data.sources=[{{name: builtin}},{source}]"])
    assert "| mine.jsonl | 1 | 2 | chosen identical to rejected 1, undecodable 2, missing field 1" in text
    assert "| builtin | 108 | 108 | 216 |" in text  # mine.jsonl's one training row lands in the reward share
    assert "| mine.jsonl | 0 | 108 | 0 |" in text  # equal weights: repeated to half of the reward mix
    assert "<|im_start|>assistant" in text and "--- rejected:" in text


def test_processed_data_cache_hits_and_misses(tmp_path: Path, messy_jsonl: Path) -> None:
    from rlhf.data.cache import cache_key, cached

    class Tok:
        name_or_path, pad_token, eos_token, chat_template = "tok", "<p>", "<e>", "t"

        def __len__(self) -> int:
            return 10

    tok = Tok()
    data = OmegaConf.merge(
        OmegaConf.structured(DataConfig),
        {
            "name": "x",
            "sources": [{"path": str(messy_jsonl), "format": "pairs", "columns": COLUMNS}],
        },
    )
    builds = []

    def build() -> dict:
        builds.append(1)
        return {"train": [{"input_ids": [1, 2]}], "counts": {"mine.jsonl": 1}}

    key = cache_key(data, "sft", tok)
    assert cached(tmp_path, key, build) == (build(), False)
    assert cached(tmp_path, key, build)[1] is True
    assert cached(tmp_path, key, build, rebuild=True)[1] is False
    assert cache_key(data, "reward", tok) != key
    assert cache_key(OmegaConf.merge(data, {"seed": 1}), "sft", tok) != key
    assert cache_key(OmegaConf.merge(data, {"rebuild": True}), "sft", tok) == key
    messy_jsonl.write_bytes(messy_jsonl.read_bytes() + json.dumps(GOOD).encode() + b"\n")
    assert cache_key(data, "sft", tok) != key  # the file changed
    assert not list((tmp_path / "data").glob("*.tmp-*"))


USER = {"role": "user", "content": "Name a colour."}


def test_chat_message_rows_in_pairs_and_sft_formats(tmp_path: Path) -> None:
    reply = [{"role": "assistant", "content": "Blue."}]
    worse = [{"role": "assistant", "content": "No."}]
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            json.dumps({"prompt": [USER], "chosen": reply, "rejected": worse}),  # row 1: conversational, explicit
            json.dumps({"chosen": [USER, *reply], "rejected": [USER, *worse]}),  # row 2: the prompt implicit
            json.dumps({"prompt": [USER, *reply], "chosen": "a", "rejected": "b"}),  # row 3: prompt ends with answer
            json.dumps({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}),  # row 4
            json.dumps({"prompt": "Plain?", "chosen": reply, "rejected": "No."}),  # row 5: mixed, same answer text
        ],
    )
    rows, report = read_local(path, "pairs", {}, strict=False)
    assert rows == [{"prompt": [USER], "chosen": "Blue.", "rejected": "No."}] * 2 + [
        {"prompt": "Plain?", "chosen": "Blue.", "rejected": "No."}
    ]
    assert report.first_errors == [
        f"{path}: row 3: wrong type: the prompt in 'prompt' must end with a user turn",
        f"{path}: row 4: wrong type: prompt[0] must be {{role, content}}",
    ]
    sft = write_jsonl(
        tmp_path / "sft.jsonl",
        [
            json.dumps({"messages": [{"role": "system", "content": "Be brief."}, USER, *reply]}),
            json.dumps({"messages": [USER]}),
            json.dumps({"prompt": [USER], "answer": reply}),
        ],
    )
    rows, report = read_local(sft, "sft", {}, strict=False)
    assert rows == [
        {"prompt": [{"role": "system", "content": "Be brief."}, USER], "chosen": "Blue."},
        {"prompt": [USER], "chosen": "Blue."},
    ]
    assert report.first_errors == [f"{sft}: row 2: wrong type: field 'messages' must be a list of 2 or more turns"]


def test_text_format_reads_documents_and_feeds_only_ptx(tmp_path: Path) -> None:
    from rlhf.data import ptx_texts

    (tmp_path / "corpus.txt").write_text("First document,\non two lines.\n\n\n  Second one.  \n")
    rows, _ = read_local(tmp_path / "corpus.txt", "text", {}, strict=True)
    assert rows == [{"text": "First document,\non two lines."}, {"text": "Second one."}]
    write_jsonl(tmp_path / "c.jsonl", [json.dumps({"body": "Doc A"}), json.dumps({"body": 3})])
    rows, report = read_local(tmp_path / "c.jsonl", "text", {"text": "body"}, strict=False)
    assert rows == [{"text": "Doc A"}] and "row 2: wrong type: field 'body'" in report.first_errors[0]
    with pytest.raises(ValueError, match="can only be read with format text"):
        read_local(tmp_path / "corpus.txt", "pairs", {}, strict=False)

    cfg = compose(["model=tiny", f"data.ptx.path={tmp_path}/corpus.txt"])
    assert sorted(ptx_texts(cfg.data)) == ["First document,\non two lines.", "Second one."]
    assert ptx_texts(compose(["model=tiny"]).data) == []
    with pytest.raises(ConfigError, match="data.ptx.format='pairs': the PTX source must be format text"):
        compose([f"data.ptx={{path: {tmp_path}/corpus.txt, format: pairs}}"])
    with pytest.raises(ConfigError, match=r"data.sources\[0\].format=text: plain text feeds only PPO's PTX loss"):
        compose([f"data.sources=[{{path: {tmp_path}/corpus.txt, format: text}}]"])


def test_generic_format_from_a_dataset_folder(tmp_path: Path) -> None:
    import datasets

    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"q": f"Q{i}", "a": f"A{i}"} for i in range(4)]),
            "test": datasets.Dataset.from_list([{"q": "Qt", "a": "At"}]),
        }
    ).save_to_disk(str(tmp_path / "ds"))
    cfg = compose(
        [
            "model=tiny",
            f"data.sources=[{{path: {tmp_path}/ds, format: sft, split: [1, 0, 0], columns: {{prompt: q, answer: a}}}}]",
        ]
    )
    data = stage_rows(cfg.data, "sft")
    assert [r["prompt"] for r in data.eval] == ["Qt"] and len(data.train) == 4


def test_a_missing_column_lists_the_rows_fields_and_a_misspelt_column_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mine.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([["question", "good", "bad"], ["Q1", "a", "b"]])
    with pytest.raises(RowError) as err:
        read_local(path, "pairs", {}, strict=True)
    assert str(err.value) == (
        f"{path}: row 2: missing field: 'chosen'; the row has question, good, bad: name the one to use with the "
        "source's columns:, e.g. {chosen: <yours>}"
    )
    rows, _ = read_local(path, "pairs", COLUMNS, strict=True)  # the hint's fix reads it
    assert rows == [{"prompt": "Q1", "chosen": "a", "rejected": "b"}]
    with pytest.raises(
        ConfigError,
        match=r"data.sources\[0\].columns.promt: not a field of format pairs \(its fields: "
        r"prompt, chosen, rejected, messages\); did you mean prompt\?",
    ):
        compose([f"data.sources=[{{path: {path}, format: pairs, columns: {{promt: question}}}}]"])


def test_a_source_without_its_own_split_says_what_the_stage_gets_and_heavy_repeats_are_warned(
    tmp_path: Path, caplog
) -> None:
    path = write_jsonl(tmp_path / "sft.jsonl", [json.dumps({"prompt": f"P{i}", "answer": f"A{i}"}) for i in range(20)])
    data = OmegaConf.merge(
        OmegaConf.structured(DataConfig),
        {
            "name": "mix",
            "builtin_size": 1200,
            "sources": [{"name": "builtin", "weight": 3.0}, {"path": str(path), "format": "sft"}],
        },
    )
    with caplog.at_level("INFO"):
        sft = stage_rows(data, "sft")
    mine = sum(r["prompt"].startswith("P") for r in sft.train)
    assert (
        "data source sft.jsonl has no split of its own: data.split=[2.0, 4.0, 4.0] gives stage sft 4 of its 18 "
        "training rows" in caplog.text
    )
    assert f"data source sft.jsonl: its 4 training rows for sft are repeated {mine / 4:.0f}x" in caplog.text
    assert mine / 4 > 4
    caplog.clear()
    with caplog.at_level("INFO"):
        stage_rows(
            OmegaConf.merge(
                data,
                {
                    "sources": [
                        {"name": "builtin"},
                        {"path": str(path), "format": "sft", "split": [1, 0, 0], "weight": 0.05},
                    ]
                },
            ),
            "sft",
        )
    assert "no split of its own" not in caplog.text and "repeated" not in caplog.text


def test_max_steps_capped_by_the_epochs_says_so(caplog) -> None:
    stage = OmegaConf.create({"name": "sft", "global_batch": 4, "epochs": 1, "max_steps": 10})
    with caplog.at_level("WARNING"):
        assert plan_steps(9, stage, "SFT examples") == (2, 2)
    assert "sft: max_steps=10 is capped at 2 steps (1 epoch(s) of 9 SFT examples in batches of 4)" in caplog.text
    caplog.clear()
    assert plan_steps(9, OmegaConf.merge(stage, {"max_steps": 2}), "SFT examples") == (2, 2)
    assert "capped" not in caplog.text


def test_rlhf_data_previews_an_sft_only_source_and_answers_help_and_typos_in_one_line(tmp_path: Path) -> None:
    from rlhf.preview import report

    rows = [json.dumps({"prompt": f"Say {i}", "chosen": f"{i}", "rejected": "No."}) for i in range(20)]
    source = f"{{path: {write_jsonl(tmp_path / 'sft.jsonl', rows)}, format: pairs, split: [1, 0, 0]}}"
    text = report(["model=tiny", f"data.sources=[{source}]"])
    assert "### sft" in text and "No rows for reward: " in text and "No rows for ppo: " in text
    command = [sys.executable, "-m", "rlhf.preview"]
    shown = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "`rlhf-data`: what a data option gives each stage" in shown.stdout
    typo = subprocess.run([*command, "model=tiny", "data.max_prompt=5"], capture_output=True, text=True, timeout=120)
    assert typo.returncode == 2 and "data.max_prompt is not an option of DataConfig (did you mean" in typo.stderr
    assert "Traceback" not in typo.stderr


def test_a_source_named_for_some_stages_feeds_only_those_with_its_shares_kept() -> None:
    every = compose(["experiment=tiny", "data.builtin_size=400"]).data
    limited = "data.sources=[{name: builtin, stages: [sft, reward]}]"
    some = compose(["experiment=tiny", "data.builtin_size=400", limited])
    assert len(stage_rows(some.data, "sft").train) == len(stage_rows(every, "sft").train)  # 2 of 2 + 4 + 4, as before
    with pytest.raises(DataError, match="leaves no training rows for stage ppo"):
        stage_rows(some.data, "ppo")
    with pytest.raises(ConfigError, match=r"data.sources\[0\].stages=\['rl'\] must name some of sft, reward, ppo"):
        compose(["experiment=tiny", "data.sources=[{name: builtin, stages: [rl]}]"])
