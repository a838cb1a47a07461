"""Records → chat examples: the entries of `data.path`, their records (`records.py`) validated, weighted and mixed,
the eval split. A record, `{input, output, source?}` or a conversation, becomes TRL's prompt/completion form
(`chat`)."""

import math
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from .config import DataArgs, RecipeError
from .records import FORMATS, BadRecord, locate, read_records
from .text import shortened
from .values import coerce, suggest

KEYS = ("path", "source", "weight", "split")  # of a data entry
# Records turned into Arrow at a time. Converting all records' Python objects at once peaked at 6.1 GiB RSS for
# 1 M records (~250 tokens each); in chunks only one chunk's Python objects are alive at a time (1.1 GiB).
CHUNK = 20_000
READ_BAR_DELAY = 2.0  # seconds of reading before its progress bar shows (1 M records take ~30 s; small files none)
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
MAX_ROWS = 100_000_000  # rows an entry's weight may make: 0.8 GB of row index (1e8 × weight 1 took 142 GiB, a crash)


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
            raise ValueError(f"{where}: needs a path ({FORMATS})")
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


def chat(record: Any, args) -> tuple[list[dict], list[dict]] | str:
    """(prompt, completion) turns of a record, or what is wrong: the prompt ends before the first assistant turn (the
    last with `data.mask_history`); its system turn, else `data.system_prompt`, goes atop the first user turn with
    `fold_system_prompt` (for templates without a usable system role)."""
    if not isinstance(record, dict):
        return f"expected an object with '{args.input_field}' and '{args.output_field}', got {type(record).__name__}"
    if (source := record.get(args.source_field)) is not None and not isinstance(source, str):
        return f"'{args.source_field}' must be a string, got {type(source).__name__}"
    # A null key is a missing one: a saved or hub dataset that mixes the forms has every column in every row
    conversation, pair = ([key for key in keys if record.get(key) is not None]
                          for keys in (("messages", "conversations"), (args.input_field, args.output_field)))
    if conversation and (other := [*conversation[1:], *pair]):
        return (f"has both '{conversation[0]}' and '{other[0]}'; a record is one conversation or one "
                f"{{{args.input_field}, {args.output_field}}} pair, keep one")
    if conversation:
        if isinstance(turns := _conversation(record, conversation[0]), str):
            return turns
    elif isinstance(turns := _pair(record, args), str):
        return turns
    system, turns = (turns[0]["content"], turns[1:]) if turns[0]["role"] == "system" else (args.system_prompt, turns)
    turns = opened(turns, system, args.fold_system_prompt)
    cut = len(turns) - 1 if args.mask_history else next(n for n, t in enumerate(turns) if t["role"] == "assistant")
    return turns[:cut], turns[cut:]


def _pair(record: dict, args) -> list[dict[str, str]] | str:
    """The turns of an `{input, output}` record, or what is wrong. Alpaca's `{instruction, input, output}`: the question
    is the instruction, then its input on the next line when there is one (LLaMA-Factory joins them so)."""
    if isinstance(record.get("history"), list) and record["history"]:  # Alpaca's earlier turns: refused, not dropped
        return "'history' (earlier turns) is not read; write the record as a conversation ('messages') instead"
    if record.get("instruction") is not None and args.input_field != "instruction":
        parts = [record["instruction"], record.get(args.input_field) or ""]
        if not all(isinstance(part, str) for part in parts):
            return f"'instruction' and '{args.input_field}' must be strings"
        record = {**record, args.input_field: "\n".join(part for part in parts if part.strip())}
    for key in (args.input_field, args.output_field):
        if key not in record:
            return f"missing '{key}' (set data.input_field/output_field if it is named differently)"
        if not isinstance(record[key], str):
            return f"'{key}' must be a string, got {type(record[key]).__name__}"
    if not record[args.output_field].strip():
        return f"'{args.output_field}' is empty; there is nothing to learn from it"
    if not record[args.input_field].strip():  # as an empty user turn of a conversation
        return f"'{args.input_field}' is empty; write the question that the answer follows"
    return [{"role": "user", "content": record[args.input_field]},
            {"role": "assistant", "content": record[args.output_field]}]


def opened(messages: list[dict[str, str]], system: str | None, fold: bool) -> list[dict[str, str]]:
    """`messages` opened by the system prompt: a system turn, or with `fold` (`data.fold_system_prompt`) atop the first
    user turn; training and chat both open a conversation this way."""
    if not system:
        return messages
    if fold:
        return [{"role": "user", "content": f"{system}\n\n{messages[0]['content']}"}, *messages[1:]]
    return [{"role": "system", "content": system}, *messages]


def _conversation(record: dict, key: str) -> list[dict[str, str]] | str:
    """The record's turns under `key` as {role, content} (ShareGPT's human/gpt named user/assistant), or what is
    wrong."""
    role_key, text_key = ("role", "content") if key == "messages" else ("from", "value")
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        return f"'{key}' must be a non-empty list of turns"
    out: list[dict[str, str]] = []
    for n, turn in enumerate(turns):
        if not isinstance(turn, dict) or not all(isinstance(turn.get(k), str) for k in (role_key, text_key)):
            return f"{key}[{n}] must be {{\"{role_key}\": …, \"{text_key}\": \"text\"}}"
        role = ROLES.get(turn[role_key]) if key == "conversations" else turn[role_key]
        if role not in ("system", "user", "assistant"):
            known = "system, user, assistant" if key == "messages" else ", ".join(ROLES)
            return f"{key}[{n}]: unknown role '{shortened(turn[role_key], 40)}' ({known})"
        if turn.get("weight") not in (None, 1):  # OpenAI's fine-tuning format: weight 0 = no loss on the turn
            return (f"{key}[{n}]: 'weight': {shortened(repr(turn['weight']), 20)} is not supported (every assistant "
                    "turn carries loss); remove the key, or set data.mask_history: true to train on the last one only")
        position = len(out) - (out[0]["role"] == "system" if out else 0)
        expected = "system" if n == 0 and role == "system" else ("user", "assistant")[position % 2]
        if role != expected:
            return (f"{key}[{n}]: roles out of order ({role} where {expected} belongs); a conversation is an optional "
                    "system turn, then user and assistant turns alternating")
        if not turn[text_key].strip():
            if role == "system":  # exports write one where there is none: as none (data.system_prompt applies)
                continue
            return f"{key}[{n}]: the {role} turn is empty"
        out.append({"role": role, "content": turn[text_key]})
    if not out:  # an empty system turn alone
        return f"{key}: no assistant turn; there is nothing to learn from it"
    if out[-1]["role"] != "assistant":
        return (f"{key}: no assistant turn ends the conversation" if any(t["role"] == "assistant" for t in out) else
                f"{key}: no assistant turn; there is nothing to learn from it")
    return out


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
