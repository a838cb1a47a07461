"""Data files → (number, record) pairs: .json / .jsonl (gzipped too) read here, line by line, so every bad record is
named by file:line; .parquet, .csv, .arrow, `save_to_disk` directories and hub datasets through `datasets`."""

import gzip
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .config import DataArgs, RecipeError, looks_like_hub_id
from .text import first_line

FORMATS = ".json, .jsonl (either gzipped), .parquet, .csv, .arrow, a save_to_disk directory or a hub dataset id"
SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")  # a JSON escape that may decode to half a UTF-16 pair


class BadRecord(str):
    """Why a record could not be read (bad JSON, bad UTF-8); it fails the run or is skipped like any bad one."""


def read_records(path: str, args: DataArgs, key: str = "data.path", split: str | None = None
                 ) -> Iterable[tuple[int, Any]]:
    """(number, record) pairs (the line of a .jsonl, read lazily; the record's number in a .json, a dir, a hub
    dataset: see `locate`, its `split`, else `data.split`); errors name `key`, the recipe key the path came from."""
    p, given, kind = Path(path), split, "".join(Path(path.lower()).suffixes[-2:])  # UP.JSONL is a .jsonl file
    split = split or args.split
    if kind.removesuffix(".gz").endswith((".json", ".jsonl")) and p.is_file():
        try:
            handle = gzip.open(p) if kind.endswith(".gz") else p.open("rb")
        except OSError as exc:
            raise RecipeError(f"{p}: cannot read the data file ({exc.strerror}); check {key}") from None
        return _json_records(p, handle) if kind.removesuffix(".gz").endswith(".json") else _jsonl_records(p, handle)
    if p.is_dir():  # also one named .jsonl: datasets' JSON builder read it as a hub dataset, no file:line
        from datasets import DatasetDict, load_from_disk
        try:
            dataset = load_from_disk(str(p))
        except Exception as exc:  # FileNotFoundError, ValueError, pyarrow's: all mean "not a saved dataset"
            raise RecipeError(f"{p}: not a dataset directory ({first_line(exc)}); {key} takes {FORMATS}") from None
        if isinstance(dataset, DatasetDict) and split not in dataset:
            raise RecipeError(f"{p}: no split '{split}' (has {', '.join(dataset)}); set data.split or the "
                              "entry's split")
        if given and not isinstance(dataset, DatasetDict):  # ignored, it read every record: the eval set's too
            raise RecipeError(f"{p}: a saved Dataset, not a DatasetDict, has no split '{given}'; remove the entry's "
                              "split")
        return _rows(dataset[split] if isinstance(dataset, DatasetDict) else dataset)
    if p.is_file() and kind.endswith((".parquet", ".csv", ".arrow")):  # datasets' own builders, no network
        from datasets import load_dataset
        try:
            kind = kind.rpartition(".")[2]  # a CSV cell is text: "007", "None", "NA" and "" as written, not 7, null
            text = {"features": _text_columns(p), "keep_default_na": False} if kind == "csv" else {}
            return _rows(load_dataset(kind, data_files=str(p), split="train", **text))
        except Exception as exc:  # pyarrow's, pandas' parser errors …
            raise RecipeError(f"{p}: cannot read the {kind} file ({first_line(exc)}); check "
                              f"{key}") from None
    if p.is_file():
        raise RecipeError(f"{p}: unsupported data format '{p.suffix}'; use {FORMATS}")
    if p.exists():  # a pipe (`<(zcat d.jsonl.gz)`), a device: neither a data file nor a hub id
        raise RecipeError(f"{p}: not a regular file; save the data to a file and set {key} to it")
    found(path, key)  # else a hub id, never a .json or .jsonl name
    from datasets import load_dataset
    try:
        return _rows(load_dataset(path, split=split))
    except Exception as exc:  # hub errors come in many types: named with their reason (a split, the network …)
        raise RecipeError(f"{path}: could not load hub dataset ({type(exc).__name__}: {first_line(exc)}); check "
                          f"{key}, its split and the network") from None


def _text_columns(p: Path):
    import csv

    from datasets import Features, Value
    with p.open(newline="", encoding="utf-8-sig") as handle:
        return Features({name: Value("string") for name in next(csv.reader(handle), [])})


def _rows(dataset) -> Iterator[tuple[int, dict]]:
    """(number, record) pairs of a datasets.Dataset, read 1,000 rows at a time (to_list() of 1 M records held them
    all as Python objects at once)."""
    number = 0
    for batch in dataset.with_format(None).iter(batch_size=1_000):  # a saved format (numpy, pandas) as Python
        for values in zip(*batch.values(), strict=True):
            number += 1
            yield number, dict(zip(batch, values, strict=True))


def identity(path: str, split: str) -> tuple[str, str | None]:
    """(where, split) naming the records a data entry reads, to tell eval data that is training data: a file or a
    saved Dataset has no split (one given was ignored), a DatasetDict's split directory `dd/train` is (dd, train)."""
    where = os.path.realpath(path) if os.path.exists(path) else path  # a link: what it names
    parent, name = os.path.split(where)
    if os.path.isfile(os.path.join(parent, "dataset_dict.json")):
        return parent, name
    splits = os.path.isfile(os.path.join(where, "dataset_dict.json")) or not os.path.exists(where)  # a hub id too
    return where, split if splits else None


def found(path: str, key: str) -> None:
    """RecipeError unless `path` (of recipe key `key`) exists or reads as a hub id; a run checks every data path so
    before comparing a checkpoint's data (a mistyped path, read as a hub id, blamed the checkpoints)."""
    if not Path(path).exists() and not looks_like_hub_id(path):
        relative = "" if Path(path).is_absolute() else f" (relative to the working directory, {Path.cwd()})"
        raise RecipeError(f"{Path(path)}: data file not found{relative}; check {key}")


def _json_records(p: Path, handle) -> list[tuple[int, Any]]:
    """(number, record) pairs of a .json array; a file that is not valid is an error as a whole."""
    try:
        with handle:
            data = handle.read().removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is not part of the data
    except (OSError, EOFError) as exc:  # gzip: not gzip data, cut short
        raise RecipeError(f"{p}: cannot read the data file ({first_line(exc)}); fix or replace the file") from None
    if not data.strip():
        return []  # an empty file, said as such by the caller
    records, line = _parse(data, "fix the file or use .jsonl")
    if isinstance(records, BadRecord):
        raise RecipeError(f"{p}:{line}: {records}" if line else f"{p}: {records}")
    if not isinstance(records, list):
        raise RecipeError(f"{p}: a .json data file must hold a list of records, got {type(records).__name__}")
    return list(enumerate([_surrogate_free(r) for r in records] if SURROGATE.search(data) else records, 1))


def locate(path: str, number: int) -> str:
    """Where record `number` of the data file `path` is: `file:line` (.jsonl) or `file: record N`."""
    jsonl = path.lower().endswith((".jsonl", ".jsonl.gz")) and Path(path).is_file()
    return f"{path}:{number}" if jsonl else f"{path}: record {number}"


def _jsonl_records(p: Path, handle) -> Iterator[tuple[int, Any]]:
    with handle:
        try:
            for n, line in enumerate(handle, 1):
                line = line.removeprefix(b"\xef\xbb\xbf") if n == 1 else line  # a byte-order mark is not data
                if line.strip():
                    record = _parse(line, "each line must be one JSON record")[0]
                    yield n, _surrogate_free(record) if SURROGATE.search(line) else record
        except (OSError, EOFError) as exc:  # gzip: not gzip data, cut short
            raise RecipeError(f"{p}: cannot read the data file ({first_line(exc)}); fix or replace the file") from None


def _parse(data: bytes, fix: str) -> tuple[Any, int | None]:
    """(the JSON value of `data`, or a BadRecord saying why there is none, ending in `fix`; the line it names)."""
    try:
        return json.loads(data.decode("utf-8")), None
    except UnicodeDecodeError as exc:
        return BadRecord("not valid UTF-8; re-encode the file as UTF-8"), data[: exc.start].count(b"\n") + 1
    except json.JSONDecodeError as exc:
        return BadRecord(f"not valid JSON ({exc.msg}); {fix}"), exc.lineno
    except RecursionError:
        return BadRecord(f"not valid JSON (nested too deeply); {fix}"), None


def _surrogate_free(record: Any) -> Any:
    """`record`, or a BadRecord when a string holds a lone UTF-16 surrogate (Arrow would fail on it deep inside)."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        return BadRecord(f"holds a lone UTF-16 surrogate ({ascii(exc.object[exc.start])}), which is not text; fix "
                         "the record")
    return record
