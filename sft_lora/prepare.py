"""Prompt/completion chat examples → `input_ids` + `labels`, the same tokens as TRL's own preparation, faster, cached.

TRL's `SFTTrainer` prepares a conversational prompt/completion dataset one row at a time, tokenizing the prompt and
then prompt + completion (two tokenizer calls per row), and then runs three more passes (labels, truncation,
filter). Here each batch of rows is rendered with the chat template and tokenized in one batched fast-tokenizer
call (prompts and full conversations together), and labels and truncation happen in the same pass: ~3× TRL's
rows/s on the benchmark's records (README, Performance). The rows TRL trains on are identical to TRL's — same
`input_ids`, same `labels` (tests/test_perf.py). The prepared file keeps every record, one row each, with two more
columns for the pre-flight report (`preflight.py`): the untruncated length and the prompt length; the trainer
reads the same file, minus the rows truncation leaves without a label (TRL drops those). It is written to an Arrow
file keyed by the dataset's content fingerprint, the tokenizer, the chat template and max_length, so a second run
with the same inputs reads it back instead of tokenizing again. Output rows stream to disk, so memory stays
bounded however many records there are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

VERSION = "4"  # bump when the output of `prepare_rows` changes, so old cache files are not reused
BATCH = 1000
# The report's columns (Trainer drops them before collating): untruncated length, where the first answer starts,
# untruncated loss tokens, and whether the template renders a prompt differently once its answer follows.
LENGTH, PROMPT, LOSS, DRIFT = "untruncated_length", "prompt_length", "untruncated_loss", "template_drift"


def unsupported(args, dataset) -> str | None:
    """Why this preparation cannot stand in for TRL's on `dataset` with `args`, or None when it can."""
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        return "not a map-style datasets.Dataset"
    columns = set(dataset.column_names)
    if "input_ids" in columns:
        return "already tokenized"
    if not {"prompt", "completion"} <= columns or columns & {"tools", "chat_template_kwargs", "images"}:
        return "not a plain conversational prompt/completion dataset"
    return unsupported_settings(args)


def unsupported_settings(args) -> str | None:
    """Why the SFTConfig `args` asks for something this preparation does not do, or None."""
    if args.completion_only_loss is False or args.assistant_only_loss:
        return "completion_only_loss=False or assistant_only_loss=True"
    if args.truncation_mode != "keep_start":
        return f"truncation_mode={args.truncation_mode}"
    if (args.dataset_kwargs or {}).get("skip_prepare_dataset"):
        return "dataset_kwargs.skip_prepare_dataset"
    return None


def cache_dir() -> Path:
    """Where prepared datasets are kept: $SFT_LORA_CACHE, else beside the datasets cache (HF_DATASETS_CACHE)."""
    import datasets

    return Path(os.environ.get("SFT_LORA_CACHE") or datasets.config.HF_DATASETS_CACHE) / "sft_lora_prepared"


def tokenizer_sha256(tokenizer) -> str:
    """What decides the token ids: vocabulary and rules, special tokens, chat template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [type(tokenizer).__name__, backend.to_str() if backend is not None else repr(tokenizer.get_vocab()),
             repr(sorted(tokenizer.special_tokens_map.items())), str(tokenizer.chat_template)]
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def prepare_rows(dataset, tokenizer, max_length: int | None, *, num_proc: int | None = None,
                 cache: Path | None | bool = True, completion_only: bool = True, template_kwargs: dict | None = None):
    """Every record of `dataset` (prompt/completion chat columns) as `input_ids` + `labels` (-100 outside the
    completion, unless not `completion_only`), truncated to `max_length` (keep the start; None = no truncation), one
    row per record, with the untruncated length (`LENGTH`) and the completion start (`PROMPT`); `trainable` gives
    the rows TRL trains on.

    `cache`: True = the default cache directory, a Path = that directory, False/None = in memory, no cache."""
    from importlib.metadata import version

    import datasets

    from .turns import render_template, tokenize_conversations

    kept = [c for c in dataset.column_names if c not in ("prompt", "completion")]  # e.g. `source`, as TRL keeps it
    int32 = datasets.Value("int32")
    features = datasets.Features({"input_ids": datasets.Sequence(int32), "labels": datasets.Sequence(int32),
                                  LENGTH: int32, PROMPT: int32, LOSS: int32, DRIFT: datasets.Value("bool"),
                                  **{c: dataset.features[c] for c in kept}})
    warned: list[bool] = []
    template: list[str | None] = []  # looked up at the first conversation: TRL's template module imports for seconds

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], LENGTH: [], PROMPT: [], LOSS: [], DRIFT: []}
        if not template and any(len(c) > 1 for c in batch["completion"]):
            template.append(render_template(tokenizer))
        for ids, spans, drift in tokenize_conversations(tokenizer, batch["prompt"], batch["completion"],
                                                        template[0] if template else None, template_kwargs):
            if drift and not warned:
                warned.append(True)
                logger.warning("the chat template renders the prompt differently once the answer follows; the "
                               "completion starts where they diverge (as in TRL)")
            labels = [-100] * len(ids) if completion_only else list(ids)
            for start, end in spans if completion_only else ():
                labels[start:end] = ids[start:end]
            out[LENGTH].append(len(ids))
            out[PROMPT].append(spans[0][0])
            out[LOSS].append(sum(end - start for start, end in spans) if completion_only else len(ids))
            out[DRIFT].append(drift)
            out["labels"].append(labels[:max_length])
            out["input_ids"].append(ids[:max_length])
        return out

    kwargs: dict[str, Any] = {"batched": True, "batch_size": BATCH, "remove_columns": ["prompt", "completion"],
                              "features": features, "num_proc": num_proc, "desc": "Tokenizing (sft_lora)"}
    directory = _writable(cache_dir() if cache is True else Path(cache)) if cache else None
    if directory is not None and datasets.is_caching_enabled() and completion_only:
        key = hashlib.sha256("\0".join([VERSION, dataset._fingerprint, tokenizer_sha256(tokenizer), version("trl"),
                                        repr(sorted((template_kwargs or {}).items())),
                                        str(max_length)]).encode()).hexdigest()[:32]
        kwargs.update(cache_file_name=str(directory / f"{key}.arrow"), load_from_cache_file=True)
    else:
        kwargs["keep_in_memory"] = True
    return dataset.map(tokenize, **kwargs)


def has_labels(rows):
    """Per row of `prepare_rows`' output, whether a label is left after truncation (numpy bool array)."""
    import pyarrow.compute as pc

    table = rows.with_format("arrow")[:]  # honours a selection (indices mapping); zero-copy otherwise
    return (pc.list_value_length(table.column("input_ids")).to_numpy() > table.column(PROMPT).to_numpy())


def trainable(rows):
    """The rows TRL trains on: those truncation leaves with a label (TRL drops the others), in order."""
    import numpy as np

    keep = has_labels(rows)
    return rows if keep.all() else rows.select(np.flatnonzero(keep), keep_in_memory=True)


def prepare(dataset, tokenizer, max_length: int | None, *, num_proc: int | None = None,
            cache: Path | None | bool = True):
    """`trainable(prepare_rows(...))`: `dataset` as TRL would train on it, rows left without a label dropped."""
    return trainable(prepare_rows(dataset, tokenizer, max_length, num_proc=num_proc, cache=cache))


@dataclass
class Prepared:
    """The datasets of a run, prepared once: what the trainer gets, and what the pre-flight report reads."""

    args: Any
    """The trainer's copy of the run's SFTConfig, adapted to the data prepared here (TRL's preparation skipped)."""
    train: Any
    """What the trainer trains on: `trainable(rows)`, or the chat records where TRL prepares them itself."""
    eval: Any
    """Likewise for evaluation (None without an eval set)."""
    records: Any
    """The training chat records (prompt/completion/source); row i of `rows` is record i."""
    eval_records: Any
    rows: Any
    """Every training record as `prepare_rows` tokenized it (rows TRL drops included); None where TRL prepares."""
    eval_rows: Any
    max_length: int | None
    """Where the rows are cut (the recipe's max_length; padding-free clears it on the SFTConfig afterwards)."""
    unsupported: str | None = None
    """Why TRL prepares the data itself (`unsupported`), or None."""


def prepare_datasets(args, tokenizer, train_dataset, eval_dataset=None, template_kwargs: dict | None = None
                     ) -> Prepared:
    """Tokenize with `prepare_rows` where it gives TRL's exact result; otherwise leave the datasets to TRL.

    Without packing the prepared rows are already truncated, so TRL's preparation is skipped; padding-free then needs
    `max_length=None` (TRL's rule: it does not truncate padding-free rows itself). With packing TRL still packs (bfd
    truncates each document to max_length, as TRL's own path does). `Prepared.args` is the trainer's SFTConfig: the
    resolved one (`args`, left as resolved) rebuilt with those changes by `dataclasses.replace`, so its checks run."""
    from accelerate import PartialState

    prepared = Prepared(args, train_dataset, eval_dataset, train_dataset, eval_dataset, None, None, args.max_length)
    if args.eos_token is not None:  # TRL sets it in __init__, after we tokenize: the chat template renders it
        tokenizer.eos_token = args.eos_token
    reason = next(filter(None, (unsupported(args, d) for d in (train_dataset, eval_dataset) if d is not None)), None)
    from .turns import multi_turn

    if reason and any(multi_turn(d) for d in (train_dataset, eval_dataset) if d is not None):
        from .config import RecipeError

        raise RecipeError(f"multi-turn conversations need sft_lora's data preparation, which does not apply "
                          f"({reason}); drop that setting or set data.mask_history: true")
    if reason:
        if args.padding_free and not args.packing:
            logger.warning("padding-free batches need sft_lora's data preparation, which does not apply (%s); "
                           "training on padded batches", reason)
            prepared.args = dataclasses.replace(args, padding_free=False)
        prepared.unsupported = reason
        return prepared
    eval_packing = args.packing if args.eval_packing is None else args.eval_packing
    # Per machine: the cache is on local disk unless shared; each machine's first process fills it, the others read it.
    with PartialState().local_main_process_first():
        prepared.rows = prepare_rows(train_dataset, tokenizer, None if args.packing else args.max_length,
                                     num_proc=args.dataset_num_proc, template_kwargs=template_kwargs)
        if eval_dataset is not None:
            prepared.eval_rows = prepare_rows(eval_dataset, tokenizer, None if eval_packing else args.max_length,
                                              num_proc=args.dataset_num_proc, template_kwargs=template_kwargs)
    prepared.train = trainable(prepared.rows)
    prepared.eval = trainable(prepared.eval_rows) if eval_dataset is not None else None
    if not args.packing:
        if args.shuffle_dataset:  # what TRL's skipped preparation would have done
            prepared.train = prepared.train.shuffle(seed=args.seed)
        skip = {"dataset_kwargs": {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}}
        prepared.args = dataclasses.replace(args, **skip, **({"max_length": None} if args.padding_free else {}))
    return prepared


def _writable(directory: Path) -> Path | None:
    """`directory`, created if missing, or None (with a notice) when it cannot be written: prepare in memory."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        print(f"notice: {directory}: cannot write the prepared-data cache ({exc.strerror}); preparing in memory "
              "(set SFT_LORA_CACHE to a writable directory to cache it)")
        return None
    return directory


def is_cached(dataset) -> bool:
    """Whether a prepared dataset was read back from (or written to) cache files rather than held in memory."""
    return bool(getattr(dataset, "cache_files", None))
