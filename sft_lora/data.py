"""Records → chat examples: load records from json/jsonl/dir/hub, validate, weight and mix files, split eval.

A record is `{input, output, source?}` (one exchange) or a conversation (`turns.py`: OpenAI `messages` or ShareGPT
`conversations`), told apart by its keys. Each becomes TRL's conversational prompt/completion form: the prompt is
the (system and) first user turn, the completion the rest. TRL renders a one-turn completion with the model's chat
template and puts loss on it only — the answer and the template's end-of-turn token — which is what we want;
longer completions are tokenized by `turns.tokenize_turns`, with loss on the assistant turns only.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

from .config import DataArgs, RecipeError, first_line, looks_like_hub_id
from .mix import Entry, concatenated, entries, weighted
from .turns import conversation, is_conversation, split, with_system


class BadRecord:
    """A record that could not be read (bad JSON, bad UTF-8); `to_examples` fails or skips it like any bad one."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def read_records(path: str, args: DataArgs) -> Iterable[tuple[str, Any]]:
    """(where, record) pairs from a .json array, .jsonl, a `save_to_disk` directory or a hub dataset id.

    `where` names the record in errors: `file:line` for .jsonl, `file: record N` otherwise. A .jsonl line that is
    not valid UTF-8 or JSON becomes a `BadRecord`; a .json file that is not valid is an error as a whole. A .jsonl
    file is read lazily, line by line (1 M records: see `CHUNK`)."""
    p = Path(path)
    if p.suffix == ".jsonl":
        if not p.is_file():
            raise RecipeError(f"{p}: data file not found; check data.path")
        return _jsonl_records(p)
    if p.suffix == ".json":
        return _json_records(p)
    if p.is_dir():
        from datasets import DatasetDict, load_from_disk

        try:
            dataset = load_from_disk(str(p))
        except Exception as exc:  # FileNotFoundError, ValueError, pyarrow's: all mean "not a saved dataset"
            raise RecipeError(f"{p}: not a dataset directory ({first_line(exc)}); data.path takes .json, .jsonl, a "
                              "save_to_disk directory or a hub dataset id") from None
        if isinstance(dataset, DatasetDict):
            if args.split not in dataset:
                raise RecipeError(f"{p}: no split '{args.split}' (has {', '.join(dataset)}); set data.split")
            dataset = dataset[args.split]
        return _numbered(p, dataset.to_list())
    if p.is_file():
        raise RecipeError(f"{p}: unsupported data format '{p.suffix}'; use .json, .jsonl, a save_to_disk "
                          "directory or a hub dataset id")
    if not looks_like_hub_id(path):
        raise RecipeError(f"{p}: data file not found; check data.path")
    from datasets import load_dataset

    try:
        return _numbered(path, load_dataset(path, split=args.split).to_list())
    except Exception as exc:  # hub errors come in many types; all mean the same to the user
        reason = type(exc).__name__
        raise RecipeError(f"{path}: could not load hub dataset ({reason}); check data.path and network") from None


def _json_records(p: Path) -> list[tuple[str, Any]]:
    """(where, record) pairs of a .json array; a file that is not valid is an error as a whole."""
    data = _read_bytes(p)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise RecipeError(f"{p}:{line}: not valid UTF-8; re-encode the file as UTF-8") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{p}:{exc.lineno}: not valid JSON ({exc.msg}); fix the file or use .jsonl") from None
    except RecursionError:
        raise RecipeError(f"{p}: not valid JSON (nested too deeply); fix the file") from None
    if not isinstance(records, list):
        raise RecipeError(f"{p}: a .json data file must hold a list of records, got {type(records).__name__}")
    if SURROGATE.search(data):
        records = [_surrogate_free(record) for record in records]
    return _numbered(p, records)


def _numbered(origin: str | Path, records: list[Any]) -> list[tuple[str, Any]]:
    return [(f"{origin}: record {n}", record) for n, record in enumerate(records, 1)]


def _jsonl_records(p: Path) -> Iterator[tuple[str, Any]]:
    try:
        handle = p.open("rb")
    except OSError as exc:
        raise RecipeError(f"{p}: cannot read the data file ({exc.strerror}); check data.path") from None
    with handle:
        for n, line in enumerate(handle, 1):
            if n == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is not part of the data
            if line.strip():
                yield f"{p}:{n}", _parse_json_line(line)


def _read_bytes(p: Path) -> bytes:
    if not p.is_file():
        raise RecipeError(f"{p}: data file not found; check data.path")
    return p.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is not part of the data


def _parse_json_line(line: bytes) -> Any:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return BadRecord("not valid UTF-8; re-encode the file as UTF-8")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        return BadRecord(f"not valid JSON ({exc.msg}); each line must be one JSON record")
    except RecursionError:
        return BadRecord("not valid JSON (nested too deeply); each line must be one JSON record")
    return _surrogate_free(record) if SURROGATE.search(line) else record

SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")  # a JSON escape that may decode to half a UTF-16 pair


def _surrogate_free(record: Any) -> Any:
    """`record`, or a BadRecord when a string holds a lone UTF-16 surrogate (Arrow would fail on it deep inside)."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        return BadRecord(f"holds a lone UTF-16 surrogate ({ascii(exc.object[exc.start])}), which is not text; fix "
                         "the record")
    return record


def _turns(record: Any, args: DataArgs) -> list[dict[str, str]] | str:
    """One record's chat turns (an {input, output} record: a user and an assistant turn), or what is wrong."""
    if isinstance(record, BadRecord):
        return record.reason
    source = record.get(args.source_field) if isinstance(record, dict) else None
    if source is not None and not isinstance(source, str):
        return f"'{args.source_field}' must be a string, got {type(source).__name__}"
    if is_conversation(record):
        return conversation(record)
    if not isinstance(record, dict):
        return f"expected an object with '{args.input_field}' and '{args.output_field}', got {type(record).__name__}"
    for key in (args.input_field, args.output_field):
        if key not in record:
            return f"missing '{key}' (set data.input_field/output_field if it is named differently)"
        if not isinstance(record[key], str):
            return f"'{key}' must be a string, got {type(record[key]).__name__}"
    if not record[args.output_field].strip():
        return f"'{args.output_field}' is empty; there is nothing to learn from it"
    return [{"role": "user", "content": record[args.input_field]},
            {"role": "assistant", "content": record[args.output_field]}]


def to_examples(records: list[tuple[str, Any]], args: DataArgs, origin: str) -> dict[str, list]:
    """Validate (where, record) pairs and turn them into prompt/completion columns (plus `source`, and `entry`:
    `origin`).

    A bad record fails the run (`data.on_bad_record: fail`, the default) or is skipped and counted (`skip`)."""
    columns, skipped, first_skipped = _convert(records, args)
    _check_counts(origin, len(records), skipped, first_skipped)
    return {**columns, "entry": [origin] * len(columns["prompt"])}


def _convert(records: Iterable[tuple[str, Any]], args: DataArgs, default_source: str | None = None
             ) -> tuple[dict[str, list], int, str | None]:
    """(prompt/completion/source columns, number of records skipped, the first skipped one's message)."""
    prompts, completions, sources, skipped, first_skipped = [], [], [], 0, None
    for where, record in records:
        turns = _turns(record, args)
        if isinstance(turns, str):
            if args.on_bad_record != "skip":
                raise RecipeError(f"{where}: {turns}")
            skipped += 1
            first_skipped = first_skipped or f"{where}: {turns}"
            continue
        prompt, completion = split(with_system(turns, args.system_prompt, args.fold_system_prompt),
                                   args.mask_history)
        prompts.append(prompt)
        completions.append(completion)
        sources.append(record.get(args.source_field) or default_source or "default")
    return {"prompt": prompts, "completion": completions, "source": sources}, skipped, first_skipped


def _check_counts(origin: str, total: int, skipped: int, first_skipped: str | None) -> None:
    if not total:
        raise RecipeError(f"{origin}: no records; the data file is empty")
    if skipped == total:
        raise RecipeError(f"{origin}: all {total} records are bad (first: {first_skipped}); fix the data")
    if skipped:
        print(f"notice: {origin}: skipped {skipped} bad of {total} records (data.on_bad_record: skip); "
              f"first: {first_skipped}")


# Records turned into Arrow at a time. Converting all records' Python objects at once peaked at 6.1 GiB RSS for
# 1 M records (~250 tokens each); in chunks only one chunk's Python objects are alive at a time (1.1 GiB).
CHUNK = 20_000


def _dataset(entry: Entry, args: DataArgs):
    """The records of one data entry as a Dataset of prompt/completion/source/entry, converted `CHUNK` records at a
    time (`entry` names the file the record came from, for the report's mix table)."""
    from datasets import Dataset, concatenate_datasets

    records = iter(read_records(entry.path, args))
    parts, total, skipped, first_skipped = [], 0, 0, None
    while chunk := list(islice(records, CHUNK)):
        columns, bad, first_bad = _convert(chunk, args, entry.source)
        total, skipped, first_skipped = total + len(chunk), skipped + bad, first_skipped or first_bad
        if columns["prompt"]:
            parts.append(Dataset.from_dict({**columns, "entry": [entry.path] * len(columns["prompt"])}))
    _check_counts(entry.path, total, skipped, first_skipped)
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def load_datasets(args: DataArgs, seed: int = 42):
    """(train, eval or None) as `datasets.Dataset`s of prompt/completion/source/entry, every entry of `data.path`
    weighted (`mix.weighted`) and, with `data.eval_split`, split on its own before weighting."""
    train, held_out = [], []
    for n, entry in enumerate(entries(args.path)):
        records = _dataset(entry, args)
        if args.eval_split and not args.eval_path:
            if round(len(records) * args.eval_split) < 1:
                raise RecipeError(f"{entry.path}: data.eval_split={args.eval_split} leaves no eval record of "
                                  f"{len(records)}; raise it or set data.eval_path")
            if len(records) - math.ceil(len(records) * args.eval_split) < 1:  # datasets' rounding
                raise RecipeError(f"{entry.path}: data.eval_split={args.eval_split} leaves no training record of "
                                  f"{len(records)}; lower it or set data.eval_path")
            split = records.train_test_split(test_size=args.eval_split, seed=seed)
            records = split["train"]
            held_out.append(split["test"])
        train.append(weighted(records, entry, seed + n))
    if args.eval_path:
        evaluation = entries(args.eval_path, "data.eval_path")
        held_out = [weighted(_dataset(e, args), e, seed + n) for n, e in enumerate(evaluation)]
    return concatenated(train), concatenated(held_out) if held_out else None

