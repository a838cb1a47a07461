"""Prompt/completion chat examples → `input_ids` + `labels`: TRL's exact rows (tests/test_perf.py), ~3× faster (one
batched render + tokenizer call per batch, labels and truncation in the same pass; README, Performance), cached."""

import dataclasses
import functools
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import RecipeError
from .turns import multi_turn, special_text_rows, tokenize_conversations

logger = logging.getLogger(__name__)

UNWRITABLE: set[Path] = set()  # cache directories said to be unwritable
VERSION = "6"  # bump when the output of `prepare_rows` changes, so old cache files are not reused
# The report's columns (Trainer drops them before collating): untruncated length, where the first answer starts,
# untruncated loss tokens, and whether the template renders a prompt differently once its answer follows.
LENGTH, PROMPT, LOSS, DRIFT = "untruncated_length", "prompt_length", "untruncated_loss", "template_drift"


def unsupported(args, dataset=None) -> str | None:
    """Why this preparation cannot stand in for TRL's under the SFTConfig `args` (on `dataset`, if given), or None."""
    if dataset is not None:
        from datasets import Dataset
        if not isinstance(dataset, Dataset):
            return "not a map-style datasets.Dataset"
        columns = set(dataset.column_names)
        if "input_ids" in columns:
            return "already tokenized"
        if not {"prompt", "completion"} <= columns or columns & {"tools", "chat_template_kwargs", "images"}:
            return "not a plain conversational prompt/completion dataset"
    if args.completion_only_loss is False or args.assistant_only_loss:
        return "completion_only_loss=False or assistant_only_loss=True"
    if args.truncation_mode != "keep_start":
        return f"truncation_mode={args.truncation_mode}"
    if (args.dataset_kwargs or {}).get("skip_prepare_dataset"):
        return "dataset_kwargs.skip_prepare_dataset"
    return None


def eval_packed(args, trl_prepares: bool) -> bool:
    """Whether the eval rows are packed: TRL packs them (`eval_packing`, else `packing`) in its own preparation only,
    which sft_lora skips unless the training rows are packed."""
    return bool(args.packing if args.eval_packing is None else args.eval_packing) and (args.packing or trl_prepares)


def prepare_rows(dataset, tokenizer, max_length: int | None, *, num_proc: int | None = None,
                 cache: Path | None | bool = True, completion_only: bool = True, template_kwargs: dict | None = None):
    """Every record of `dataset` as `input_ids` + `labels` (-100 outside the completion, unless not
    `completion_only`), cut to `max_length` (keep the start; None: no cut), one row per record (kept columns such as
    `source` beside), plus the report's columns. `cache`: True (the default directory), a directory, or False."""
    import datasets
    kept = [c for c in dataset.column_names if c not in ("prompt", "completion")]  # e.g. `source`, as TRL keeps it
    int32 = datasets.Value("int32")
    features = datasets.Features({"input_ids": datasets.Sequence(int32), "labels": datasets.Sequence(int32),
                                  LENGTH: int32, PROMPT: int32, LOSS: int32, DRIFT: datasets.Value("bool"),
                                  **{c: dataset.features[c] for c in kept}})
    warned: list[bool] = []

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], LENGTH: [], PROMPT: [], LOSS: [], DRIFT: []}
        for ids, spans, drift in tokenize_conversations(tokenizer, batch["prompt"], batch["completion"],
                                                        template_kwargs or {}):
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

    file = _cache_file(cache, dataset, tokenizer, max_length, template_kwargs) if completion_only else None
    def tokenized(**where):
        return dataset.map(tokenize, batched=True, batch_size=1000, remove_columns=["prompt", "completion"],
                           features=features, num_proc=num_proc, desc="Tokenizing (sft_lora)", **where)

    if not file:
        return tokenized(keep_in_memory=True)
    try:
        return tokenized(cache_file_name=file, load_from_cache_file=True)
    except OSError as exc:  # the cache's disk filled up while writing: it is only a cache
        print(f"notice: {Path(file).parent}: cannot write the prepared-data cache ({exc.strerror or exc}); "
              "preparing in memory (set SFT_LORA_CACHE to a directory with free space)")
        return tokenized(keep_in_memory=True)


def _cache_file(cache: Path | None | bool, dataset, tokenizer, max_length: int | None, template_kwargs) -> str | None:
    """The Arrow file that caches these rows, keyed by all that decides them, in `cache` (True: $SFT_LORA_CACHE, else
    beside the datasets cache); None (with a notice when it cannot be written): prepare in memory."""
    from importlib.metadata import version

    import datasets
    if not cache:
        return None
    directory = Path(os.environ.get("SFT_LORA_CACHE") or datasets.config.HF_DATASETS_CACHE) / "sft_lora_prepared" \
        if cache is True else Path(cache)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()  # can a file be written there?
    except OSError as exc:
        if directory not in UNWRITABLE:  # said once, not again for the eval rows
            UNWRITABLE.add(directory)
            print(f"notice: {directory}: cannot write the prepared-data cache ({exc.strerror}); preparing in memory "
                  "(set SFT_LORA_CACHE to a writable directory to cache it)")
        return None
    if not datasets.is_caching_enabled():
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)  # the token ids: vocabulary and rules, special tokens
    key = hashlib.sha256("\0".join([VERSION, dataset._fingerprint, type(tokenizer).__name__,
                                    backend.to_str() if backend is not None else repr(tokenizer.get_vocab()),
                                    repr(sorted(tokenizer.special_tokens_map.items())), str(tokenizer.chat_template),
                                    *map(version, ("trl", "transformers", "tokenizers")),
                                    repr(sorted((template_kwargs or {}).items())), str(max_length)]).encode())
    file = directory / f"{key.hexdigest()[:32]}.arrow"
    try:
        if file.is_file():  # one cut short or overwritten (a full disk, a crash): prepared again, not an Arrow error
            datasets.Dataset.from_file(str(file))
    except Exception as exc:  # pyarrow.ArrowInvalid, OSError …
        print(f"notice: {file}: the prepared-data cache file is unreadable ({type(exc).__name__}); preparing it again")
        file.unlink()
    return str(file)


def trainable(rows, cut: int | None = None):
    """The rows TRL trains on: those truncation leaves with a label (TRL drops the others), in order; `cut`: where
    rows prepared whole are cut later (packing's bfd), None where nothing is."""
    import numpy as np
    import pyarrow.compute as pc
    table = rows.with_format("arrow")[:]  # honours a selection (indices mapping); zero-copy otherwise
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy()
    keep = (lengths if cut is None else np.minimum(lengths, cut)) > table.column(PROMPT).to_numpy()
    return rows if keep.all() else rows.select(np.flatnonzero(keep), keep_in_memory=True)


@dataclass
class Prepared:
    """The datasets of a run, prepared once: what the trainer gets, and what the pre-flight report reads."""

    args: Any  # the trainer's SFTConfig, adapted to the data prepared here (TRL's preparation skipped)
    train: Any  # what the trainer trains on: `trainable(rows)`, or the chat records where TRL prepares them itself
    eval: Any  # likewise for evaluation (None without an eval set)
    records: Any  # the training chat records (prompt and source once `rows` holds them); row i of `rows` is record i
    eval_records: Any
    rows: Any  # every training record as `prepare_rows` tokenized it (rows TRL drops included); None where TRL prepares
    eval_rows: Any
    max_length: int | None  # where rows are cut (the recipe's; padding-free clears it on the SFTConfig afterwards)
    unsupported: str | None = None  # why TRL prepares the data itself (`unsupported`), or None
    template_kwargs: dict = dataclasses.field(default_factory=dict)  # every render's template variables
    special_text: tuple = (0, None, None)  # `turns.special_text_rows` of the training records (their answers go)

    @functools.cached_property
    def records_by_source(self) -> dict[str, dict[str, int]]:
        """{"train": {source: records}, "eval": …}: for the run's summary and each checkpoint's model card."""
        from .rows import records_by_source
        return {"train": records_by_source(self.records), "eval": records_by_source(self.eval_records)}


def prepare_datasets(args, tokenizer, train_dataset, eval_dataset=None, template_kwargs: dict | None = None
                     ) -> Prepared:
    """Tokenize with `prepare_rows` where it gives TRL's exact result, skipping TRL's preparation; otherwise leave
    the datasets to TRL. Without packing the rows come truncated; padding-free then needs `max_length=None` (TRL's
    rule). With packing TRL still packs (bfd cuts each document, as TRL's own path does). `Prepared.args`: `args`
    rebuilt with those changes by `dataclasses.replace`, so its checks run."""
    from accelerate import PartialState
    if args.eos_token is not None:  # TRL sets it in __init__, after we tokenize: the chat template renders it
        if tokenizer.convert_tokens_to_ids(args.eos_token) in (None, tokenizer.unk_token_id):  # would be <unk>
            raise RecipeError(f"training.eos_token: '{args.eos_token}' is not a token of this tokenizer; name the "
                              "chat template's end-of-turn token, or remove training.eos_token")
        tokenizer.eos_token = args.eos_token
    prepared = Prepared(args, train_dataset, eval_dataset, train_dataset, eval_dataset, None, None, args.max_length,
                        template_kwargs=template_kwargs or {}, special_text=special_text_rows(train_dataset, tokenizer))
    datasets = [d for d in (train_dataset, eval_dataset) if d is not None]
    reason = next(filter(None, (unsupported(args, d) for d in datasets)), None)
    if reason and any(multi_turn(d) for d in datasets):
        raise RecipeError(f"multi-turn conversations need sft_lora's data preparation, which does not apply "
                          f"({reason}); drop that setting or set data.mask_history: true")
    if reason:
        return _left_to_trl(prepared, reason)
    eval_packing = eval_packed(args, trl_prepares=False)
    # Per machine: the cache is on local disk unless shared; each machine's first process fills it, the others read it.
    with PartialState().local_main_process_first():
        prepared.rows = prepare_rows(train_dataset, tokenizer, None if args.packing else args.max_length,
                                     num_proc=args.dataset_num_proc, template_kwargs=template_kwargs)
        if eval_dataset is not None:
            prepared.eval_rows = prepare_rows(eval_dataset, tokenizer, None if eval_packing else args.max_length,
                                              num_proc=args.dataset_num_proc, template_kwargs=template_kwargs)
    # From here the rows stand for the records: of these only the prompts (the smoke check, the report's examples),
    # sources and file positions are read again, so their answers need no memory (README, Performance, Scale).
    kept = ("prompt", "source", "entry", "number")
    prepared.records, prepared.eval_records = (None if d is None else d.select_columns(
        [c for c in kept if c in d.column_names]) for d in (train_dataset, eval_dataset))
    prepared.train = trainable(prepared.rows)
    # evaluation drops an eval row that packing's cut leaves without a label, as it drops one truncation leaves so: it
    # was kept, and a source of such rows alone evaluated to a loss of 0.0 (training packs them, as TRL does)
    eval_cut = None if eval_packing and args.packing_strategy != "bfd" else args.max_length
    prepared.eval = trainable(prepared.eval_rows, eval_cut) if eval_dataset is not None else None
    if not args.packing:
        if args.shuffle_dataset:  # what TRL's skipped preparation would have done
            prepared.train = prepared.train.shuffle(seed=args.seed)
        skip = {"dataset_kwargs": {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}}
        prepared.args = dataclasses.replace(args, **skip, **({"max_length": None} if args.padding_free else {}))
    return prepared


def _left_to_trl(prepared: Prepared, reason: str) -> Prepared:
    """`prepared` for TRL's own preparation (`reason`: why ours does not apply): padded batches, and each record with
    its template variables in TRL's `chat_template_kwargs` column (left out, Qwen3 trained prompts chat never shows)."""
    prepared.unsupported, args = reason, prepared.args
    if args.padding_free and not args.packing:
        logger.warning("padding-free batches need sft_lora's data preparation, which does not apply (%s); "
                       "training on padded batches", reason)
        prepared.args = dataclasses.replace(args, padding_free=False)
    if kwargs := prepared.template_kwargs:
        prepared.train, prepared.eval = (d if d is None else d.map(lambda batch: {"chat_template_kwargs": [
            kwargs] * len(batch["prompt"])}, batched=True) for d in (prepared.train, prepared.eval))
    return prepared


def load_inputs(recipe):
    """(tokenizer, the run's datasets prepared once: `Prepared`); the rows' length notice or error
    (`rows.check_lengths`) said, for --check as for training."""
    import pyarrow

    from .data import load_datasets
    from .hub import check_reachable
    from .model import load_tokenizer
    from .rows import check_lengths
    from .turns import template_kwargs

    check_reachable(recipe)  # a hub id with no network: one line now, not a minute of retries
    train_set, eval_set = load_datasets(recipe.data, seed=recipe.training.seed)
    tokenizer = load_tokenizer(recipe.model, recipe.data, recipe.training.eos_token)
    kwargs = template_kwargs(tokenizer.chat_template, recipe.data.chat_template_kwargs)
    data = prepare_datasets(recipe.training, tokenizer, train_set, eval_set, kwargs)
    del train_set, eval_set  # what `data` no longer holds (the records' answers) …
    pyarrow.default_memory_pool().release_unused()  # … goes back to the system now, not at Arrow's next allocation
    check_lengths(recipe, tokenizer, data)
    return tokenizer, data
