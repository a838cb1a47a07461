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


def read_records(path: str, args: DataArgs) -> list[dict[str, Any]]:
    """Raw records from a .json array, .jsonl, a `save_to_disk` directory or a hub dataset id."""
    p = Path(path)
    if p.suffix == ".jsonl":
        return [_parse_json_line(p, n, line) for n, line in enumerate(_read_text(p).splitlines(), 1) if line.strip()]
    if p.suffix == ".json":
        try:
            records = json.loads(_read_text(p))
        except json.JSONDecodeError as exc:
            raise RecipeError(f"{p}:{exc.lineno}: not valid JSON ({exc.msg}); fix the file or use .jsonl") from None
        if not isinstance(records, list):
            raise RecipeError(f"{p}: a .json data file must hold a list of records, got {type(records).__name__}")
        return records
    if p.is_dir():
        from datasets import DatasetDict, load_from_disk

        dataset = load_from_disk(str(p))
        if isinstance(dataset, DatasetDict):
            if args.split not in dataset:
                raise RecipeError(f"{p}: no split '{args.split}' (has {', '.join(dataset)}); set data.split")
            dataset = dataset[args.split]
        return dataset.to_list()
    if p.suffix or p.exists() or path.startswith((".", "/", "~")):
        raise RecipeError(f"{p}: data file not found (or not .json/.jsonl/a dataset directory); check data.path")
    from datasets import load_dataset

    try:
        return load_dataset(path, split=args.split).to_list()
    except Exception as exc:  # hub errors come in many types; all mean the same to the user
        reason = type(exc).__name__
        raise RecipeError(f"{path}: could not load hub dataset ({reason}); check data.path and network") from None


def _read_text(p: Path) -> str:
    if not p.is_file():
        raise RecipeError(f"{p}: data file not found; check data.path")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = p.read_bytes()[: exc.start].count(b"\n") + 1
        raise RecipeError(f"{p}:{line}: not valid UTF-8; re-encode the file as UTF-8") from None


def _parse_json_line(p: Path, number: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise RecipeError(f"{p}:{number}: not valid JSON ({exc.msg}); each line must be one JSON record") from None


def to_examples(records: list[Any], args: DataArgs, origin: str, first: int = 1) -> dict[str, list]:
    """Validate records and turn them into prompt/completion columns (plus `source`); `first` numbers the first
    record in error messages."""
    if not records:
        raise RecipeError(f"{origin}: no records; the data file is empty")
    prompts, completions, sources = [], [], []
    system, prefix = [], ""
    if args.system_prompt and args.fold_system_prompt:  # the template has no usable system role
        prefix = f"{args.system_prompt}\n\n"
    elif args.system_prompt:
        system = [{"role": "system", "content": args.system_prompt}]
    for n, record in enumerate(records, first):
        where = f"{origin}: record {n}"
        if not isinstance(record, dict):
            raise RecipeError(f"{where}: expected an object with '{args.input_field}' and '{args.output_field}'")
        for key in (args.input_field, args.output_field):
            if key not in record:
                raise RecipeError(f"{where}: missing '{key}' (set data.input_field/output_field if it is named "
                                  "differently)")
            if not isinstance(record[key], str):
                raise RecipeError(f"{where}: '{key}' must be a string, got {type(record[key]).__name__}")
        if not record[args.output_field].strip():
            raise RecipeError(f"{where}: '{args.output_field}' is empty; there is nothing to learn from it")
        source = record.get(args.source_field)
        if source is not None and not isinstance(source, str):
            raise RecipeError(f"{where}: '{args.source_field}' must be a string, got {type(source).__name__}")
        prompts.append([*system, {"role": "user", "content": prefix + record[args.input_field]}])
        completions.append([{"role": "assistant", "content": record[args.output_field]}])
        sources.append(source or "default")
    return {"prompt": prompts, "completion": completions, "source": sources}


# Records turned into Arrow at a time from a .jsonl file. Converting all records' Python objects at once peaked at
# 6.1 GiB RSS for 1 M records (~250 tokens each); in chunks the Python objects of one chunk are alive at a time.
CHUNK = 20_000


def _jsonl_records(p: Path):
    """(record number, record) of a .jsonl file, read line by line."""
    if not p.is_file():
        raise RecipeError(f"{p}: data file not found; check data.path")
    number = 0
    with p.open("rb") as handle:
        for line_number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise RecipeError(f"{p}:{line_number}: not valid UTF-8; re-encode the file as UTF-8") from None
            if line.strip():
                number += 1
                yield number, _parse_json_line(p, line_number, line)


def _dataset(path: str, args: DataArgs):
    """The records at `path` as a Dataset of prompt/completion/source; a .jsonl file in chunks (bounded memory)."""
    from datasets import Dataset, concatenate_datasets

    if Path(path).suffix != ".jsonl":
        return Dataset.from_dict(to_examples(read_records(path, args), args, path))
    parts, chunk, first = [], [], 1
    for number, record in _jsonl_records(Path(path)):
        chunk.append(record)
        if len(chunk) == CHUNK:
            parts.append(Dataset.from_dict(to_examples(chunk, args, path, first)))
            chunk, first = [], number + 1
    if chunk or not parts:
        parts.append(Dataset.from_dict(to_examples(chunk, args, path, first)))
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def load_datasets(args: DataArgs, seed: int = 42):
    """(train, eval or None) as `datasets.Dataset`s of prompt/completion/source."""
    train = _dataset(args.path, args)
    if args.eval_path:
        return train, _dataset(args.eval_path, args)
    if args.eval_split:
        if round(len(train) * args.eval_split) < 1:
            raise RecipeError(f"{args.path}: data.eval_split={args.eval_split} leaves no eval record of "
                              f"{len(train)}; raise it or set data.eval_path")
        split = train.train_test_split(test_size=args.eval_split, seed=seed)
        return split["train"], split["test"]
    return train, None
