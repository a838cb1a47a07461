"""Records → chat examples: read json/jsonl/dir/hub records, validate them, weight and mix several files, split eval.
A record, `{input, output, source?}` or a conversation, becomes TRL's prompt/completion form (`turns.chat`)."""

import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from .config import DataArgs, RecipeError, looks_like_hub_id
from .text import first_line
from .turns import chat
from .values import coerce, suggest

KEYS = ("path", "source", "weight", "split")  # of a data entry
# Records turned into Arrow at a time. Converting all records' Python objects at once peaked at 6.1 GiB RSS for
# 1 M records (~250 tokens each); in chunks only one chunk's Python objects are alive at a time (1.1 GiB).
CHUNK = 20_000
READ_BAR_DELAY = 2.0  # seconds of reading before its progress bar shows (1 M records take ~30 s; small files none)
MAX_ROWS = 100_000_000  # rows an entry's weight may make: 0.8 GB of row index (1e8 × weight 1 took 142 GiB, a crash)
SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")  # a JSON escape that may decode to half a UTF-16 pair


@dataclass(frozen=True)
class Entry:
    """One file of `data.path`: `source` names its records that have no source of their own; `weight` samples it;
    `split` of a hub dataset or DatasetDict dir (else `data.split`); `label` names it (each split on its own)."""

    path: str
    source: str | None = None
    weight: float = 1.0
    split: str | None = None

    @property
    def label(self) -> str:
        return self.path if self.split is None or Path(self.path).is_file() else f"{self.path}[{self.split}]"


class BadRecord(str):
    """Why a record could not be read (bad JSON, bad UTF-8); it fails the run or is skipped like any bad one."""


def entries(value: Any, key: str = "data.path") -> list[Entry]:
    """`data.path` / `data.eval_path` (a path or a list of paths and {path, source, weight, split}) as entries."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError(f"{key} is an empty list; give at least one data file")
    out = []
    for n, item in enumerate(items):
        where = f"{key}[{n}]" if isinstance(value, list) else key
        item = {"path": item} if isinstance(item, str) else item
        if not isinstance(item, dict):
            raise ValueError(f"{where}: an entry is a path or a mapping {{path, source, weight, split}}, got {item!r}")
        if unknown := [str(name) for name in item if name not in KEYS]:
            raise ValueError(f"{where}: unknown key '{unknown[0]}' ({', '.join(KEYS)}){suggest(unknown[0], KEYS)}")
        path, source, weight = item.get("path"), item.get("source"), coerce(item.get("weight", 1), float, 1.0)
        if not isinstance(path, str) or not path:
            raise ValueError(f"{where}: needs a path (.json, .jsonl, a saved dataset dir or a hub id)")
        for name in ("source", "split"):
            if item.get(name) is not None and not isinstance(item[name], str):
                raise ValueError(f"{where}.{name} must be a string, got {item[name]!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
            raise ValueError(f"{where}.weight must be a number > 0 (0.5 = half the records, 2 = each twice), "
                             f"got {weight!r}")
        out.append(Entry(path, source, float(weight), item.get("split")))
    return out


def paths(value: Any) -> list[str]:
    """The file paths (or hub ids) of `data.path` / `data.eval_path`; [] when unset."""
    return [e.path for e in entries(value)] if value else []


def read_records(path: str, args: DataArgs, key: str = "data.path", split: str | None = None
                 ) -> Iterable[tuple[int, Any]]:
    """(number, record) pairs (the line of a .jsonl, read lazily; the record's number in a .json, a dir, a hub
    dataset: see `locate`, its `split`, else `data.split`); errors name `key`, the recipe key the path came from."""
    p, split, kind = Path(path), split or args.split, Path(path).suffix.lower()  # UP.JSONL is a .jsonl file
    if kind in (".json", ".jsonl") and p.is_file():
        try:
            handle = p.open("rb")
        except OSError as exc:
            raise RecipeError(f"{p}: cannot read the data file ({exc.strerror}); check {key}") from None
        return _jsonl_records(handle) if kind == ".jsonl" else _json_records(p, handle)
    if p.is_dir():  # also one named .jsonl: datasets' JSON builder read it as a hub dataset, no file:line
        from datasets import DatasetDict, load_from_disk
        try:
            dataset = load_from_disk(str(p))
        except Exception as exc:  # FileNotFoundError, ValueError, pyarrow's: all mean "not a saved dataset"
            raise RecipeError(f"{p}: not a dataset directory ({first_line(exc)}); {key} takes .json, .jsonl, a "
                              "save_to_disk directory or a hub dataset id") from None
        if isinstance(dataset, DatasetDict) and split not in dataset:
            raise RecipeError(f"{p}: no split '{split}' (has {', '.join(dataset)}); set data.split or the "
                              "entry's split")
        return enumerate((dataset[split] if isinstance(dataset, DatasetDict) else dataset).to_list(), 1)
    if p.is_file():
        raise RecipeError(f"{p}: unsupported data format '{p.suffix}'; use .json, .jsonl, a save_to_disk "
                          "directory or a hub dataset id")
    found(path, key)  # else a hub id, never a .json or .jsonl name
    from datasets import load_dataset
    try:
        return enumerate(load_dataset(path, split=split).to_list(), 1)
    except Exception as exc:  # hub errors come in many types: named with their reason (a split, the network …)
        raise RecipeError(f"{path}: could not load hub dataset ({type(exc).__name__}: {first_line(exc)}); check "
                          f"{key}, its split and the network") from None


def found(path: str, key: str) -> None:
    """RecipeError unless `path` (of recipe key `key`) exists or reads as a hub id; a run checks every data path so
    before comparing a checkpoint's data (a mistyped path, read as a hub id, blamed the checkpoints)."""
    if not Path(path).exists() and not looks_like_hub_id(path):
        relative = "" if Path(path).is_absolute() else f" (relative to the working directory, {Path.cwd()})"
        raise RecipeError(f"{Path(path)}: data file not found{relative}; check {key}")


def _json_records(p: Path, handle) -> list[tuple[int, Any]]:
    """(number, record) pairs of a .json array; a file that is not valid is an error as a whole."""
    with handle:
        data = handle.read().removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is not part of the data
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
    jsonl = Path(path).suffix.lower() == ".jsonl" and Path(path).is_file()
    return f"{path}:{number}" if jsonl else f"{path}: record {number}"


def _jsonl_records(handle) -> Iterator[tuple[int, Any]]:
    with handle:
        for n, line in enumerate(handle, 1):
            line = line.removeprefix(b"\xef\xbb\xbf") if n == 1 else line  # a byte-order mark is no part of the data
            if line.strip():
                record = _parse(line, "each line must be one JSON record")[0]
                yield n, _surrogate_free(record) if SURROGATE.search(line) else record


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


def examples(records: Iterable[tuple[int, Any]], args: DataArgs, entry: Entry) -> tuple[dict[str, list], int, str]:
    """(prompt/completion/source/entry/number columns, records skipped, the first skipped one's message) of (number,
    record) pairs; a bad record fails the run (`data.on_bad_record: fail`, the default) or is skipped (`skip`)."""
    prompts, completions, sources, numbers, skipped, first_skipped = [], [], [], [], 0, ""
    for number, record in records:
        turns = record if isinstance(record, BadRecord) else chat(record, args)
        if isinstance(turns, str):
            if args.on_bad_record != "skip":
                raise RecipeError(f"{locate(entry.label, number)}: {turns}")
            skipped += 1
            first_skipped = first_skipped or f"{locate(entry.label, number)}: {turns}"
            continue
        prompts.append(turns[0])
        completions.append(turns[1])
        sources.append(record.get(args.source_field) or entry.source or "default")
        numbers.append(number)
    return {"prompt": prompts, "completion": completions, "source": sources, "entry": [entry.label] * len(prompts),
            "number": numbers}, skipped, first_skipped  # the report names a record by entry and number (`locate`)


def _dataset(entry: Entry, args: DataArgs, key: str = "data.path"):
    """The records of one entry as a Dataset of prompt/completion/source/entry, converted `CHUNK` at a time."""
    from datasets import Dataset, concatenate_datasets
    from datasets.utils import tqdm  # datasets' bars: off where HF_DATASETS_DISABLE_PROGRESS_BARS says so
    records = iter(read_records(entry.path, args, key, entry.split))
    parts, total, skipped, first_skipped = [], 0, 0, ""
    with tqdm(desc=f"Reading {entry.label}", unit=" records", delay=READ_BAR_DELAY) as bar:
        while chunk := list(islice(records, CHUNK)):
            columns, bad, first_bad = examples(chunk, args, entry)
            total, skipped, first_skipped = total + len(chunk), skipped + bad, first_skipped or first_bad
            if columns["prompt"]:
                parts.append(Dataset.from_dict(columns))
            bar.update(len(chunk))
    if not total:
        raise RecipeError(f"{entry.label}: no records; the data file is empty")
    if skipped == total:
        raise RecipeError(f"{entry.label}: all {total} records are bad (first: {first_skipped}); fix the data")
    if skipped:
        print(f"notice: {entry.label}: skipped {skipped} bad of {total} records (data.on_bad_record: skip); "
              f"first: {first_skipped}")
    return concatenate_datasets(parts)


def weighted(dataset, entry: Entry, seed: int):
    """`dataset` (the records of `entry`) sampled by its weight: each record int(weight) times, plus round(fraction
    × n) records drawn by `seed` (kept in file order)."""
    import numpy as np
    if entry.weight == 1:
        return dataset
    n, whole, part = len(dataset), int(entry.weight), entry.weight - int(entry.weight)
    if n * entry.weight > MAX_ROWS:  # the index alone would take 8 bytes a row
        raise RecipeError(f"{entry.label}: weight {entry.weight:g} makes {n * entry.weight:,.0f} rows of its {n:,} "
                          f"records, more than {MAX_ROWS:,}; lower the weight")
    extra = np.sort(np.random.default_rng(seed).permutation(n)[:round(part * n)])
    if not whole and not len(extra):
        raise RecipeError(f"{entry.label}: weight {entry.weight:g} leaves none of its {n} records; raise the weight")
    return dataset.select(np.concatenate([np.tile(np.arange(n), whole), extra]))


def load_datasets(args: DataArgs, seed: int = 42):
    """(train, eval or None) Datasets of prompt/completion/source/entry: every entry of `data.path` weighted and,
    with `data.eval_split`, split on its own before weighting."""
    from datasets import concatenate_datasets
    train, held_out = [], []
    for n, entry in enumerate(entries(args.path)):
        records = _dataset(entry, args)
        if args.eval_split and not args.eval_path:
            size, split = len(records), args.eval_split
            # under half a record held out: refused (0.01 of 4 would hold out 25 %); datasets holds out ceil(share)
            if size * split < 0.5 or size - math.ceil(size * split) < 1:
                none, fix = ("eval", "raise") if size * split < 0.5 else ("training", "lower")
                raise RecipeError(f"{entry.label}: data.eval_split={split} leaves no {none} record of {size}; {fix} it "
                                  "or set data.eval_path")
            records, test = records.train_test_split(test_size=args.eval_split, seed=seed).values()  # train, test
            held_out.append(test)
        train.append(weighted(records, entry, seed + n))
    if args.eval_path:
        evaluation = entries(args.eval_path, "data.eval_path")
        held_out = [weighted(_dataset(e, args, "data.eval_path"), e, seed + n) for n, e in enumerate(evaluation)]
    return concatenate_datasets(train), concatenate_datasets(held_out) if held_out else None
