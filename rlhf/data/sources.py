"""Local data files in the generic formats, read row by row with validation that names the file, row and field.

Formats: `pairs` (prompt, chosen, rejected) and `sft` (prompt, answer), each with a `columns` mapping
from these names to the file's own column names. Files: .jsonl, .json (a list of objects), .csv, .parquet.
A bad row (undecodable line, missing or empty field, wrong type, chosen identical to rejected) is skipped and
counted, or with `strict` an error naming the source, the row number and the field.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.data.formats import ADAPTERS

FORMAT_FIELDS = {"pairs": ("prompt", "chosen", "rejected"), "sft": ("prompt", "answer")}
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


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


def raw_rows(path: Path) -> Iterator[tuple[int, object]]:
    """(1-based row number, raw row) of a local file; a JSON line that does not decode yields its RowError."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    yield number, RowError(str(path), number, f"undecodable: {err}")
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json source must hold a list of objects (use .jsonl for one per line)")
        yield from enumerate(data, start=1)
    elif suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as handle:
            yield from enumerate(csv.DictReader(handle), start=2)  # row numbers as a spreadsheet shows them
    elif suffix == ".parquet":
        from datasets import Dataset

        yield from enumerate(Dataset.from_parquet(str(path)), start=1)
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r} (supported: {', '.join(FILE_SUFFIXES)})")


def validated_row(raw: object, fmt: str, columns: Mapping[str, str], source: str, number: int) -> dict:
    """The row in this project's field names, or a RowError saying which field is wrong."""
    if isinstance(raw, RowError):
        raise raw
    if not isinstance(raw, Mapping):
        raise RowError(source, number, f"wrong type: a row must be an object, got {type(raw).__name__}")
    row = {}
    for name in FORMAT_FIELDS[fmt]:
        column = columns.get(name, name)
        if column not in raw or raw[column] is None:
            raise RowError(source, number, f"missing field: {column!r}")
        value = raw[column]
        if not isinstance(value, str):
            raise RowError(source, number, f"wrong type: field {column!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise RowError(source, number, f"empty field: {column!r}")
        row[name] = value
    if fmt == "pairs" and row["chosen"].strip() == row["rejected"].strip():
        raise RowError(source, number, "chosen identical to rejected")
    if fmt == "sft":
        row["chosen"] = row.pop("answer")
    return row


def read_local(path: str | Path, fmt: str, columns: Mapping[str, str], strict: bool) -> tuple[list[dict], ReadReport]:
    """Every valid row of a local file; bad rows skipped and counted, or the first raised when `strict`."""
    path = Path(path).expanduser()
    if fmt not in FORMAT_FIELDS:
        raise ValueError(f"unknown data format {fmt!r} for {path} (known: {', '.join(FORMAT_FIELDS)})")
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
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


def load_splits(location: str, from_hub: bool) -> dict[str, Iterable]:
    """The raw rows of a published dataset by split: from the hub, a `save_to_disk` folder, DeepSpeed-Chat's
    local layout (data/train.json, data/eval.json), a folder of data files named by split, or one file."""
    import datasets

    if from_hub:
        return dict(datasets.load_dataset(location))
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
            split: json.loads((path / "data" / f"{split}.json").read_text(encoding="utf-8"))
            for split in ("train", "eval")
            if (path / "data" / f"{split}.json").is_file()
        }
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in FILE_SUFFIXES)
    if not files:
        raise FileNotFoundError(
            f"{path}: no dataset there (a save_to_disk folder, data/train.json, or .parquet/.json/.jsonl/.csv files)"
        )
    splits: dict[str, list] = {}
    for file in files:
        split = "train" if file.name.startswith("train") else "eval"
        splits.setdefault(split, []).extend(raw for _, raw in raw_rows(file))
    return splits


def read_adapted(location: str, fmt: str, from_hub: bool, strict: bool) -> tuple[list[dict], ReadReport]:
    """Every usable row of a published dataset through its adapter; each row keeps its split (train or eval)."""
    adapter = ADAPTERS[fmt]
    rows: list[dict] = []
    report = ReadReport()
    for split, records in load_splits(location, from_hub).items():
        for number, raw in enumerate(records, start=1):
            try:
                if isinstance(raw, RowError):
                    raise raw
                try:
                    row = adapter(raw)
                except (ValueError, AttributeError, TypeError) as err:
                    raise RowError(f"{location} [{split}]", number, str(err)) from err
            except RowError as err:
                if strict:
                    raise
                report.skip(err)
                continue
            row["split"] = "train" if split == "train" else "eval"
            rows.append(row)
    report.kept = len(rows)
    return rows, report
