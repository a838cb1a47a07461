"""The prepared rows as the trainer trains them, figured column-wise for the pre-flight report.

The report reads the prepared dataset the trainer trains on (`prepare.prepare_rows`: one row per record, with the
untruncated length and the prompt length beside `input_ids` and `labels`). Its per-row figures — tokens and loss
tokens as trained, a trained end-of-turn token, loss tokens lost to truncation — are computed here with numpy over
the Arrow columns, `CHUNK` rows at a time: no per-row Python objects, so memory stays bounded however many records
there are (README, Performance, Scale). Where TRL prepares the data itself (`prepare.unsupported`: keep_end
truncation, assistant_only_loss …), `tokenize_like_trl` tokenizes a copy as TRL will, for the report only.
Records longer than max_length get a notice (`length_notice`), with or without the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import Recipe, RecipeError
from .prepare import DRIFT, LENGTH, LOSS, PROMPT, Prepared, prepare_rows

IGNORE = -100  # the label of a token that carries no loss
CHUNK = 10_000  # rows per numpy pass: ~2.5 M tokens, tens of MB


@dataclass(frozen=True)
class Cut:
    """Where the trainer cuts a row: at `length` tokens (None: it never does), keeping the start or the end."""

    length: int | None
    keep_end: bool = False


def trainer_cut(args, max_length: int | None) -> Cut:
    """How TRL cuts rows under `args` (the SFTConfig): `truncation_mode` at max_length; with packing, bfd cuts the
    end and the other strategies move the overflow into other rows (nothing lost)."""
    if max_length is None:
        return Cut(None)
    if args.packing:
        return Cut(max_length if args.packing_strategy == "bfd" else None)
    return Cut(max_length, args.truncation_mode == "keep_end")


def row_stats(rows, cut: Cut, stop_ids: list[int]) -> dict[str, Any]:
    """Numpy arrays, one entry per row of `rows`: `prompt` and `length` (tokens before the answer, and in all, before
    truncation), `tokens` and `loss` (tokens and loss-carrying tokens as trained), `stop` (a stop token carries
    loss), `lost_loss` (loss tokens truncation removes), `code` (index of the row's source in `names`), `entry_code`
    (index of its data file in `entry_names`), `drift` (the template renders its prompt differently once the
    answer follows)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    parts, labels = [], {"": [], "entry_": []}
    for batch in rows.with_format("arrow").iter(batch_size=CHUNK):
        parts.append(_chunk_stats(batch, cut, np.asarray(stop_ids)))
        labels[""].append(batch.column("source"))
        labels["entry_"].append(batch.column("entry") if "entry" in batch.column_names else batch.column("source"))
    keys = ("prompt", "length", "tokens", "loss", "stop", "lost_loss", "drift")
    stats: dict[str, Any] = {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0, int) for k in keys}
    for prefix, columns in labels.items():  # `names`/`code`: the sources; `entry_names`/`entry_code`: the files
        column = pa.chunked_array([c for s in columns for c in s.chunks], type=pa.string())
        stats[prefix + "names"] = sorted(pc.unique(column).to_pylist())
        stats[prefix + "code"] = pc.index_in(column, value_set=pa.array(stats[prefix + "names"], pa.string())
                                             ).to_numpy()
    return stats


def _chunk_stats(batch, cut: Cut, stop_ids) -> dict[str, Any]:
    import numpy as np
    import pyarrow.compute as pc

    labels = batch.column("labels").combine_chunks()
    bounds = labels.offsets.to_numpy().astype(np.int64)
    bounds -= bounds[0]
    stored = np.diff(bounds)
    flat = pc.list_flatten(labels).to_numpy()
    prompt, length, untruncated_loss = (batch.column(name).to_numpy().astype(np.int64) for name in (PROMPT, LENGTH,
                                                                                                   LOSS))
    carries_loss = flat != IGNORE
    keep = _kept(bounds, stored, cut)
    trained_loss = carries_loss if keep is None else carries_loss & keep
    stop = np.isin(flat, stop_ids) if keep is None else np.isin(flat, stop_ids) & keep
    loss = _per_row(trained_loss, bounds)
    return {"prompt": prompt, "length": length, "loss": loss, "stop": _per_row(stop, bounds) > 0,
            "tokens": stored if cut.length is None else np.minimum(stored, cut.length),
            "lost_loss": untruncated_loss - loss, "drift": batch.column(DRIFT).to_numpy(zero_copy_only=False)}


def _kept(bounds, stored, cut: Cut):
    """Which stored tokens the trainer keeps (a bool per token), or None when it keeps them all."""
    import numpy as np

    if cut.length is None or stored.max(initial=0) <= cut.length:
        return None
    position = np.arange(bounds[-1]) - np.repeat(bounds[:-1], stored)
    if cut.keep_end:
        return position >= np.repeat(stored - cut.length, stored)
    return position < cut.length


def _per_row(mask, bounds):
    """How many tokens of each row `mask` marks."""
    import numpy as np

    counts = np.zeros(len(mask) + 1, dtype=np.int64)
    np.cumsum(mask, out=counts[1:])
    return counts[bounds[1:]] - counts[bounds[:-1]]


def trained_row(rows, index: int, cut: Cut) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one row as trained."""
    row = rows[index]
    ids, labels = row["input_ids"], row["labels"]
    if cut.length is not None and len(ids) > cut.length:
        keep = slice(-cut.length, None) if cut.keep_end else slice(None, cut.length)
        ids, labels = ids[keep], labels[keep]
    return ids, labels


def report_rows(data: Prepared, tokenizer, which: str = "train"):
    """The rows the report reads: the prepared rows, or, where TRL prepares the data itself, the records tokenized
    as TRL will (kept on `data`, so the length notice and the report tokenize once)."""
    name = "rows" if which == "train" else "eval_rows"
    records = data.records if which == "train" else data.eval_records
    if getattr(data, name) is None and records is not None:
        setattr(data, name, tokenize_like_trl(records, tokenizer, data.args, which))
    return getattr(data, name)


def length_notice(rows, args, max_length: int | None, origin: str) -> dict[str, int] | None:
    """{records, truncated, dropped, longest} of `rows`, with a one-line notice when some records are longer than
    max_length (TRL truncates them, and drops those left without an answer token, without a word); RecipeError
    when all are. None when TRL does not truncate (no max_length, or packing, which splits sequences instead)."""
    if rows is None or max_length is None or args.packing:
        return None
    table = rows.with_format("arrow")[:]
    length, prompt = (table.column(name).to_numpy() for name in (LENGTH, PROMPT))
    cut = length > max_length
    keep_start = args.truncation_mode == "keep_start"
    n, truncated, longest = len(length), int(cut.sum()), int(length.max(initial=0))
    dropped = int((cut & (prompt >= max_length)).sum()) if keep_start else 0
    if truncated == n:
        raise RecipeError(f"{origin}: all {n} records are longer than training.max_length={max_length} tokens "
                          f"(longest {longest}); raise training.max_length or shorten the records")
    if truncated:
        lost = f"; {dropped} of them lose their whole answer and are dropped" if dropped else ""
        print(f"notice: {origin}: {truncated} of {n} records are longer than training.max_length={max_length} "
              f"tokens and are truncated (longest {longest}){lost}")
    return {"records": n, "truncated": truncated, "dropped": dropped, "longest": longest}


def check_lengths(recipe: Recipe, tokenizer, data: Prepared) -> None:
    """`length_notice` for the training and the evaluation records of a run."""
    from .data import paths

    origin = " + ".join(paths(recipe.data.path))
    length_notice(report_rows(data, tokenizer), data.args, data.max_length, origin)
    length_notice(report_rows(data, tokenizer, "eval"), data.args, data.max_length,
                  " + ".join(paths(recipe.data.eval_path)) if recipe.data.eval_path else f"{origin} (eval split)")


def records_by_source(dataset) -> dict[str, int]:
    """{source: records} of a dataset with a `source` column, counted column-wise; {} for None."""
    if dataset is None:
        return {}
    counts = dataset.with_format("arrow")[:].column("source").value_counts()
    return dict(sorted((c["values"].as_py(), c["counts"].as_py()) for c in counts))


def packing_line(lengths, args, max_length: int | None) -> tuple[str, float, float | None, int]:
    """(description, packing fill, padding fill or None, packed rows): the share of real tokens in what is fed,
    from the rows' trained lengths.

    TRL's own `pack_dataset` packs them (on a column of the lengths alone, values null: no token is copied); with
    packing off, padding-free batches (the default) have no padding, and padded ones are padded to their longest
    row, simulated in a seeded random order like the trainer's sampler."""
    import numpy as np

    strategy, batch = args.packing_strategy, int(args.per_device_train_batch_size)
    packed_rows, efficiency = 0, 0.0
    if max_length and len(lengths):
        packed_rows, efficiency = _pack(lengths, max_length, strategy)
    if args.packing:
        return (f"on ({strategy}): {packed_rows} rows of {max_length} tokens, {efficiency:.1%} filled with data",
                efficiency, None, packed_rows)
    hint = f"; packing: true would fill {efficiency:.1%} of {packed_rows} rows of {max_length}" if max_length else ""
    if args.padding_free:
        return f"off: padding-free batches of {batch} (one row each, no padding){hint}", efficiency, 1.0, packed_rows
    multiple = args.pad_to_multiple_of or 1
    shuffled = np.random.default_rng(args.seed).permutation(lengths)
    rows = np.zeros(-(-len(shuffled) // batch) * batch, dtype=np.int64)
    rows[:len(shuffled)] = shuffled
    longest = -(-rows.reshape(-1, batch).max(axis=1) // multiple) * multiple
    sizes = np.minimum(batch, len(shuffled) - np.arange(0, len(shuffled), batch))
    padded = int((longest * sizes).sum())
    padding = int(lengths.sum()) / padded if padded else 0.0
    return f"off: padded batches of {batch} are {padding:.1%} real tokens{hint}", efficiency, padding, packed_rows


def _pack(lengths, max_length: int, strategy: str) -> tuple[int, float]:
    """(packed rows, share of their tokens that are data) when TRL packs rows of these lengths."""
    import numpy as np
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable
    from trl.data_utils import pack_dataset

    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    column = pa.LargeListArray.from_arrays(pa.array(offsets), pa.nulls(int(offsets[-1])))
    packed = pack_dataset(Dataset(InMemoryTable(pa.table({"input_ids": column}))), max_length, strategy,
                          {"desc": "Pre-flight: packing"})
    import pyarrow.compute as pc

    filled = pc.sum(pc.list_value_length(packed.data.column("input_ids"))).as_py() or 0
    return len(packed), filled / (len(packed) * max_length) if len(packed) else 0.0


def tokenize_like_trl(dataset, tokenizer, args, name: str = "train"):
    """`dataset` (prompt/completion/source) → untruncated `input_ids` and `labels` with `LENGTH` and `PROMPT`, one
    row per record, as `SFTTrainer._prepare_dataset` tokenizes conversational prompt/completion data: loss on the
    completion (`completion_only_loss`, default on) and on the assistant mask (`assistant_only_loss`)."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers
    from trl.data_utils import common_prefix_length

    completion_only = args.completion_only_loss is not False  # TRL: None means on for prompt/completion data
    if not args.assistant_only_loss:  # the preparation's own batched tokenization, untruncated, in memory
        return prepare_rows(dataset, tokenizer, None, num_proc=args.dataset_num_proc, cache=False,
                            completion_only=completion_only)
    # assistant_only_loss: the template's assistant mask, one row at a time (TRL's training template if needed)
    template = None if has_generation_markers(tokenizer.chat_template) else get_training_chat_template(tokenizer)

    def tokenize_row(example: dict[str, Any]) -> dict[str, Any]:
        options = {"chat_template": template, "tools": None, "tokenize": True, "return_dict": True}
        prompt_ids = tokenizer.apply_chat_template(example["prompt"], add_generation_prompt=True, **options)
        full = tokenizer.apply_chat_template(example["prompt"] + example["completion"],
                                             return_assistant_tokens_mask=True, **options)
        ids = list(full["input_ids"])
        prompt_len = common_prefix_length(list(prompt_ids["input_ids"]), ids)
        masks = [full["assistant_masks"]]
        if completion_only:
            masks.append([0] * prompt_len + [1] * (len(ids) - prompt_len))
        labels = [token if all(bits) else IGNORE for token, *bits in zip(ids, *masks, strict=False)]
        return {"input_ids": ids, "labels": labels, LENGTH: len(ids), PROMPT: prompt_len,
                LOSS: sum(label != IGNORE for label in labels), DRIFT: False}

    return dataset.map(tokenize_row, num_proc=args.dataset_num_proc, remove_columns=["prompt", "completion"],
                       desc=f"Pre-flight: tokenizing {name} dataset")
