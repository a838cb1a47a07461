"""Records → chat examples: load `{input, output, source}` from json/jsonl/dir/hub, validate, split eval.

Each record becomes TRL's conversational prompt/completion form: the prompt is the (system and) user turn, the
completion the assistant turn. TRL then renders both with the model's chat template and puts loss on the
completion only — the answer and the template's end-of-turn token — which is what we want.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import DataArgs, RecipeError


class BadRecord:
    """A record that could not be read (bad JSON, bad UTF-8); `to_examples` fails or skips it like any bad one."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def read_records(path: str, args: DataArgs) -> list[tuple[str, Any]]:
    """(where, record) pairs from a .json array, .jsonl, a `save_to_disk` directory or a hub dataset id.

    `where` names the record in errors: `file:line` for .jsonl, `file: record N` otherwise. A .jsonl line that is
    not valid UTF-8 or JSON becomes a `BadRecord`; a .json file that is not valid is an error as a whole."""
    p = Path(path)
    if p.suffix == ".jsonl":
        return [(f"{p}:{n}", _parse_json_line(line)) for n, line in enumerate(_read_bytes(p).split(b"\n"), 1)
                if line.strip()]
    if p.suffix == ".json":
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
        if not isinstance(records, list):
            raise RecipeError(f"{p}: a .json data file must hold a list of records, got {type(records).__name__}")
        return _numbered(p, records)
    if p.is_dir():
        from datasets import DatasetDict, load_from_disk

        dataset = load_from_disk(str(p))
        if isinstance(dataset, DatasetDict):
            if args.split not in dataset:
                raise RecipeError(f"{p}: no split '{args.split}' (has {', '.join(dataset)}); set data.split")
            dataset = dataset[args.split]
        return _numbered(p, dataset.to_list())
    if p.is_file():
        raise RecipeError(f"{p}: unsupported data format '{p.suffix}'; use .json, .jsonl, a save_to_disk "
                          "directory or a hub dataset id")
    if p.suffix or path.startswith((".", "/", "~")):
        raise RecipeError(f"{p}: data file not found; check data.path")
    from datasets import load_dataset

    try:
        return _numbered(path, load_dataset(path, split=args.split).to_list())
    except Exception as exc:  # hub errors come in many types; all mean the same to the user
        reason = type(exc).__name__
        raise RecipeError(f"{path}: could not load hub dataset ({reason}); check data.path and network") from None


def _numbered(origin: str | Path, records: list[Any]) -> list[tuple[str, Any]]:
    return [(f"{origin}: record {n}", record) for n, record in enumerate(records, 1)]


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
        return json.loads(text)
    except json.JSONDecodeError as exc:
        return BadRecord(f"not valid JSON ({exc.msg}); each line must be one JSON record")


def _problem(record: Any, args: DataArgs) -> str | None:
    """What is wrong with one record, or None."""
    if isinstance(record, BadRecord):
        return record.reason
    if not isinstance(record, dict):
        return f"expected an object with '{args.input_field}' and '{args.output_field}', got {type(record).__name__}"
    for key in (args.input_field, args.output_field):
        if key not in record:
            return f"missing '{key}' (set data.input_field/output_field if it is named differently)"
        if not isinstance(record[key], str):
            return f"'{key}' must be a string, got {type(record[key]).__name__}"
    if not record[args.output_field].strip():
        return f"'{args.output_field}' is empty; there is nothing to learn from it"
    source = record.get(args.source_field)
    if source is not None and not isinstance(source, str):
        return f"'{args.source_field}' must be a string, got {type(source).__name__}"
    return None


def to_examples(records: list[tuple[str, Any]], args: DataArgs, origin: str) -> dict[str, list]:
    """Validate (where, record) pairs and turn them into prompt/completion columns (plus `source`).

    A bad record fails the run (`data.on_bad_record: fail`, the default) or is skipped and counted (`skip`)."""
    if not records:
        raise RecipeError(f"{origin}: no records; the data file is empty")
    prompts, completions, sources, skipped = [], [], [], []
    system, prefix = [], ""
    if args.system_prompt and args.fold_system_prompt:  # the template has no usable system role
        prefix = f"{args.system_prompt}\n\n"
    elif args.system_prompt:
        system = [{"role": "system", "content": args.system_prompt}]
    for where, record in records:
        problem = _problem(record, args)
        if problem:
            if args.on_bad_record != "skip":
                raise RecipeError(f"{where}: {problem}")
            skipped.append(f"{where}: {problem}")
            continue
        prompts.append([*system, {"role": "user", "content": prefix + record[args.input_field]}])
        completions.append([{"role": "assistant", "content": record[args.output_field]}])
        sources.append(record.get(args.source_field) or "default")
    if skipped and not prompts:
        raise RecipeError(f"{origin}: all {len(records)} records are bad (first: {skipped[0]}); fix the data")
    if skipped:
        print(f"notice: {origin}: skipped {len(skipped)} bad of {len(records)} records (data.on_bad_record: skip); "
              f"first: {skipped[0]}")
    return {"prompt": prompts, "completion": completions, "source": sources}


def load_datasets(args: DataArgs, seed: int = 42):
    """(train, eval or None) as `datasets.Dataset`s of prompt/completion/source."""
    from datasets import Dataset

    train = Dataset.from_dict(to_examples(read_records(args.path, args), args, args.path))
    if args.eval_path:
        return train, Dataset.from_dict(to_examples(read_records(args.eval_path, args), args, args.eval_path))
    if args.eval_split:
        if round(len(train) * args.eval_split) < 1:
            raise RecipeError(f"{args.path}: data.eval_split={args.eval_split} leaves no eval record of "
                              f"{len(train)}; raise it or set data.eval_path")
        split = train.train_test_split(test_size=args.eval_split, seed=seed)
        return split["train"], split["test"]
    return train, None
