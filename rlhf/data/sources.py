"""Local data files in the generic formats, read row by row with validation that names the file, row and field.

Formats: `pairs` (prompt, chosen, rejected), `sft` (prompt, answer, or one `messages` conversation) and `text`
(pre-training text for PPO's PTX loss), each with a `columns` mapping from these names to the file's own column
names. A prompt may be a string or a list of chat messages ({role, content}) ending with a user turn; an answer may
be a string or a list of messages ending with the assistant's turn. Files: .jsonl, .json (a list of objects), .csv,
.parquet, and for `text` also .txt (documents separated by blank lines).
A bad row (undecodable line, missing or empty field, wrong type, chosen identical to rejected) is skipped and
counted, or with `strict` an error naming the source, the row number and the field.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.data.formats import ADAPTERS

FORMAT_FIELDS = {"pairs": ("prompt", "chosen", "rejected"), "sft": ("prompt", "answer"), "text": ("text",)}
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
ROLES = ("system", "user", "assistant")


class RowError(ValueError):
    """One unusable row: where it is and what is wrong with it."""

    def __init__(self, source: str, row: int, reason: str) -> None:
        super().__init__(f"{source}: row {row}: {reason}")
        self.reason = reason


@dataclass
class ReadReport:
    """How many rows a source gave and why the others were skipped."""

    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)

    def skip(self, error: RowError) -> None:
        self.skipped[error.reason.split(":")[0]] += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(str(error))


def json_lines(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, object) per non-blank line; a line that does not decode yields its RowError."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                yield number, RowError(str(path), number, f"undecodable: {err}")


def raw_rows(path: Path) -> Iterator[tuple[int, object]]:
    """(1-based row number, raw row) of a local file; a JSON line that does not decode yields its RowError."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from json_lines(path)
    elif suffix == ".json":
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError:  # JSON Lines under a .json name, as `datasets`' json loader accepts
            yield from json_lines(path)
            return
        yield from enumerate(data if isinstance(data, list) else [data], start=1)
    elif suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as handle:
            yield from enumerate(csv.DictReader(handle), start=2)  # row numbers as a spreadsheet shows them
    elif suffix == ".parquet":
        from datasets import Dataset

        yield from enumerate(Dataset.from_parquet(str(path)), start=1)
    elif suffix == ".txt":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text ({err})") from err
        documents = (doc.strip() for doc in re.split(r"\n\s*\n", text))
        yield from enumerate(({"text": doc} for doc in documents if doc), start=1)
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r} (supported: {', '.join(FILE_SUFFIXES)})")


def _messages(value: list, column: str, source: str, number: int) -> list[dict[str, str]]:
    """A chat transcript checked turn by turn: each an object with a known role and non-empty string content."""
    if not value:
        raise RowError(source, number, f"empty field: {column!r}")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, Mapping) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise RowError(source, number, f"wrong type: {column}[{i}] must be {{role, content}}")
        if not turn["content"].strip():
            raise RowError(source, number, f"empty field: {column}[{i}].content")
        turns.append({"role": turn["role"], "content": turn["content"]})
    return turns


def _field(raw: Mapping, column: str, source: str, number: int) -> str | list[dict[str, str]]:
    if column not in raw or raw[column] is None:
        present = ", ".join(map(str, raw)) or "no fields"
        hint = f"; the row has {present}: name the one to use with the source's columns:, e.g. {{{column}: <yours>}}"
        raise RowError(source, number, f"missing field: {column!r}" + (hint if column not in raw else ""))
    value = raw[column]
    if isinstance(value, list):
        return _messages(value, column, source, number)
    if not isinstance(value, str):
        raise RowError(source, number, f"wrong type: field {column!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RowError(source, number, f"empty field: {column!r}")
    return value


def _answer(value: str | list, column: str, source: str, number: int) -> str:
    """An answer given as messages is the content of its final assistant turn."""
    if isinstance(value, str):
        return value
    if value[-1]["role"] != "assistant":
        raise RowError(source, number, f"wrong type: field {column!r} must end with an assistant turn")
    return value[-1]["content"]


def validated_row(raw: object, fmt: str, columns: Mapping[str, str], source: str, number: int) -> dict:
    """The row in this project's field names, or a RowError saying which field is wrong.

    Pairs without a prompt column whose answers are whole conversations take the prompt from the chosen one;
    sft rows without a prompt column may hold one `messages` conversation ending with the answer.
    """
    if isinstance(raw, RowError):
        raise raw
    if not isinstance(raw, Mapping):
        raise RowError(source, number, f"wrong type: a row must be an object, got {type(raw).__name__}")
    if fmt == "text":
        column = columns.get("text", "text")
        text = _field(raw, column, source, number)
        if not isinstance(text, str):
            raise RowError(source, number, f"wrong type: field {column!r} must be a string, got list")
        return {"text": text}
    prompt_column = columns.get("prompt", "prompt")
    messages_column = columns.get("messages", "messages")
    if fmt == "sft" and prompt_column not in raw and messages_column in raw:
        conversation = _field(raw, messages_column, source, number)
        if isinstance(conversation, str) or len(conversation) < 2:
            raise RowError(source, number, f"wrong type: field {messages_column!r} must be a list of 2 or more turns")
        prompt, answers = conversation[:-1], {"chosen": _answer(conversation, messages_column, source, number)}
    else:
        answer_fields = ("chosen", "rejected") if fmt == "pairs" else ("answer",)
        values = {name: _field(raw, columns.get(name, name), source, number) for name in answer_fields}
        if prompt_column in raw or not isinstance(values[answer_fields[0]], list):
            prompt = _field(raw, prompt_column, source, number)
        else:
            prompt = values[answer_fields[0]][:-1]
        answers = {
            "chosen" if name == "answer" else name: _answer(value, columns.get(name, name), source, number)
            for name, value in values.items()
        }
    if isinstance(prompt, list) and (not prompt or prompt[-1]["role"] != "user"):
        raise RowError(source, number, f"wrong type: the prompt in {prompt_column!r} must end with a user turn")
    if fmt == "pairs" and answers["chosen"].strip() == answers["rejected"].strip():
        raise RowError(source, number, "chosen identical to rejected")
    read = {prompt_column, messages_column, *(columns.get(name, name) for name in ("chosen", "rejected", "answer"))}
    return {**_other_columns(raw, read), "prompt": prompt, **answers}


def _other_columns(raw: Mapping, read: set[str]) -> dict:
    """The row's columns this project does not read whose values are plain (a string, number or null): kept for PPO's
    reward functions, which get them by name (a reference answer, a test case, a label)."""
    plain = (str, int, float, bool, type(None))
    return {k: v for k, v in raw.items() if k not in read and isinstance(k, str) and isinstance(v, plain)}


def read_local(path: str | Path, fmt: str, columns: Mapping[str, str], strict: bool) -> tuple[list[dict], ReadReport]:
    """Every valid row of a local file; bad rows skipped and counted, or the first raised when `strict`."""
    path = Path(path).expanduser()
    if fmt not in FORMAT_FIELDS:
        raise ValueError(f"unknown data format {fmt!r} for {path} (known: {', '.join(FORMAT_FIELDS)})")
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix.lower() == ".txt" and fmt != "text":
        raise ValueError(f"{path}: a .txt file holds plain text; it can only be read with format text, not {fmt}")
    rows: list[dict] = []
    report = ReadReport()
    for number, raw in raw_rows(path):
        try:
            rows.append(validated_row(raw, fmt, columns, str(path), number))
        except RowError as err:
            if strict:
                raise
            report.skip(err)
    report.kept = len(rows)
    return rows, report


SPLIT_PREFIXES = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation"}
SPLIT_PREFIXES |= {"test": "test", "eval": "eval"}
EVAL_SPLITS = ("validation", "test", "eval")  # the first of these a dataset has is its eval split


def split_of(file: Path) -> str:
    """The split a data file belongs to by its name (train-00000.parquet, validation.json, ...); train if unnamed."""
    name = file.name.lower()
    return next((split for prefix, split in SPLIT_PREFIXES.items() if name.startswith(prefix)), "train")


def load_splits(location: str, from_hub: bool) -> dict[str, Iterable]:
    """The raw rows of a dataset by split: from the hub, a `save_to_disk` folder, DeepSpeed-Chat's local layout
    (data/train.json, data/eval.json), a folder of data files named by split (searched recursively), or one file."""
    import datasets

    if from_hub:
        try:
            return dict(datasets.load_dataset(location))
        except Exception as err:  # noqa: BLE001 — the hub and `datasets` raise many types; all mean "cannot load"
            raise ValueError(
                f"cannot load {location!r} from the hub ({type(err).__name__}: {err}); download a copy "
                "(e.g. its parquet files) and point the source's `path` at it"
            ) from err
    path = Path(location).expanduser()
    if path.is_file():
        return {"train": (raw for _, raw in raw_rows(path))}
    if not path.is_dir():
        raise FileNotFoundError(f"data path not found: {path}")
    if (path / "dataset_dict.json").is_file():
        return dict(datasets.load_from_disk(str(path)))
    if (path / "dataset_info.json").is_file():
        return {"train": datasets.load_from_disk(str(path))}
    if (path / "data" / "train.json").is_file():
        return {
            split: [raw for _, raw in raw_rows(path / "data" / f"{split}.json")]
            for split in ("train", "eval")
            if (path / "data" / f"{split}.json").is_file()
        }
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in FILE_SUFFIXES and ".git" not in p.parts)
    if not files:
        raise FileNotFoundError(
            f"{path}: no dataset there (a save_to_disk folder, data/train.json, or .parquet/.json/.jsonl/.csv files)"
        )
    splits: dict[str, list] = {}
    for file in files:
        splits.setdefault(split_of(file), []).extend(raw for _, raw in raw_rows(file))
    return splits


def read_adapted(
    location: str, fmt: str, from_hub: bool, strict: bool, columns: Mapping[str, str] | None = None
) -> tuple[list[dict], ReadReport]:
    """Every usable row of a dataset through its adapter (or a generic format with `columns`); each row keeps its
    split (train or eval)."""
    adapter = ADAPTERS.get(fmt)
    rows: list[dict] = []
    report = ReadReport()
    splits = load_splits(location, from_hub)
    eval_split = next((name for name in EVAL_SPLITS if name in splits), None)
    for split, records in splits.items():
        if split not in ("train", eval_split):
            continue
        for number, raw in enumerate(records, start=1):
            try:
                if isinstance(raw, RowError):
                    raise raw
                if adapter is None:
                    row = validated_row(raw, fmt, columns or {}, f"{location} [{split}]", number)
                else:
                    try:
                        row = adapter(raw)
                        if row["chosen"].strip() == row["rejected"].strip():
                            raise ValueError("chosen identical to rejected")
                        if not row["chosen"].strip() or not row["rejected"].strip():
                            raise ValueError("empty field: an answer is empty after adapting")
                    except (ValueError, AttributeError, TypeError) as err:
                        raise RowError(f"{location} [{split}]", number, str(err)) from err
            except RowError as err:
                if strict:
                    raise
                report.skip(err)
                continue
            row["split"] = "train" if split == "train" else "eval"  # the other eval-like splits are left out
            rows.append(row)
    report.kept = len(rows)
    return rows, report
