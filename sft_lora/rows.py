"""The prepared rows as the trainer trains them, figured with numpy over the Arrow columns `CHUNK` rows at a time: no
per-row Python objects, so memory stays bounded however many records there are (README, Performance, Scale)."""

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .config import Recipe, RecipeError
from .data import entries
from .prepare import DRIFT, LENGTH, LOSS, PROMPT, Prepared, eval_packed, prepare_rows

IGNORE = -100  # the label of a token that carries no loss
CHUNK = 10_000  # rows per numpy pass: ~2.5 M tokens, tens of MB


@dataclass(frozen=True)
class Cut:
    """Where the trainer cuts a row: at `length` tokens (None: it never does), keeping the start or the end."""

    length: int | None
    keep_end: bool = False


def trainer_cut(args, max_length: int | None) -> Cut:
    """How TRL cuts rows under the SFTConfig `args`: `truncation_mode` at max_length; with packing, bfd cuts the end
    and the other strategies move the overflow into other rows (nothing lost)."""
    if args.packing:
        return Cut(max_length if args.packing_strategy == "bfd" else None)
    return Cut(max_length, args.truncation_mode == "keep_end")


def stop_token_ids(recipe: Recipe, args, tokenizer) -> list[int]:
    """`turns.stop_token_ids` of the base model's generation config and training.eos_token (TRL makes it the EOS)."""
    from transformers import GenerationConfig

    from .turns import stop_token_ids as stop_ids
    try:
        config = GenerationConfig.from_pretrained(recipe.model.name_or_path, revision=recipe.model.revision)
    except Exception:  # no generation_config.json (or no network): the tokenizer's EOS is what TRL trains
        config = None
    return stop_ids(tokenizer, config, args.eos_token)


def row_stats(rows, cut: Cut, stop_ids: list[int], answers_carry_loss: bool = True) -> dict[str, Any]:
    """Numpy arrays, one entry per row: `prompt`, `length` (tokens before the answer, and in all, untruncated),
    `tokens`, `loss` (as trained), `stop` (a stop token carries loss), `lost_loss` (loss tokens truncation removes),
    `answer` (the answers' tokens, untruncated: the loss tokens when `answers_carry_loss`, else all after the prompt),
    `drift` (`prepare.DRIFT`), `code`/`entry_code` (index of the row's source/file in `names`/`entry_names`)."""
    parts, labels = [], {"": [], "entry_": []}
    for batch in rows.with_format("arrow").iter(batch_size=CHUNK):
        parts.append(_chunk_stats(batch, cut, np.asarray(stop_ids)))
        labels[""].append(batch.column("source"))
        labels["entry_"].append(batch.column("entry") if "entry" in batch.column_names else batch.column("source"))
    keys = ("prompt", "length", "tokens", "loss", "stop", "lost_loss", "drift")
    stats: dict[str, Any] = {k: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0, int) for k in keys}
    # length - prompt would count a conversation's later user turns too
    stats["answer"] = stats["loss"] + stats["lost_loss"] if answers_carry_loss else stats["length"] - stats["prompt"]
    for prefix, columns in labels.items():
        column = pa.chunked_array([c for s in columns for c in s.chunks], type=pa.string())
        names = stats[prefix + "names"] = sorted(pc.unique(column).to_pylist())
        stats[prefix + "code"] = pc.index_in(column, value_set=pa.array(names, pa.string())).to_numpy()
    return stats


def _chunk_stats(batch, cut: Cut, stop_ids) -> dict[str, Any]:
    labels = batch.column("labels").combine_chunks()
    bounds = labels.offsets.to_numpy().astype(np.int64)
    bounds -= bounds[0]
    stored = np.diff(bounds)
    flat = pc.list_flatten(labels).to_numpy()
    prompt, length, untruncated_loss = (batch.column(c).to_numpy().astype(np.int64) for c in (PROMPT, LENGTH, LOSS))
    keep = np.ones(len(flat), dtype=bool)  # which stored tokens the trainer keeps
    if cut.length is not None and stored.max(initial=0) > cut.length:
        position = np.arange(bounds[-1]) - np.repeat(bounds[:-1], stored)
        keep = position >= np.repeat(stored - cut.length, stored) if cut.keep_end else position < cut.length
    counts = np.zeros((2, len(flat) + 1), dtype=np.int64)  # running counts of loss and of stop tokens kept
    np.cumsum((flat != IGNORE) & keep, out=counts[0, 1:])
    np.cumsum(np.isin(flat, stop_ids) & keep, out=counts[1, 1:])
    loss, stop = counts[:, bounds[1:]] - counts[:, bounds[:-1]]
    return {"prompt": prompt, "length": length, "loss": loss, "stop": stop > 0,
            "tokens": stored if cut.length is None else np.minimum(stored, cut.length),
            "lost_loss": untruncated_loss - loss, "drift": batch.column(DRIFT).to_numpy(zero_copy_only=False)}


def trained_row(rows, index: int, cut: Cut) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one row as trained."""
    ids, labels = rows[index]["input_ids"], rows[index]["labels"]
    if cut.length is not None and len(ids) > cut.length:
        keep = slice(-cut.length, None) if cut.keep_end else slice(None, cut.length)
        ids, labels = ids[keep], labels[keep]
    return ids, labels


def percentiles(values) -> dict[str, int]:
    """p50, p90, p99 and max of `values` (0s when empty)."""
    points = np.percentile(values, (50, 90, 99, 100), method="nearest") if len(values) else (0, 0, 0, 0)
    return dict(zip(("p50", "p90", "p99", "max"), map(int, points), strict=True))


def mix_table(stats: dict[str, Any], codes: str, names: str, sources: list[str] | None = None
              ) -> dict[str, dict[str, Any]]:
    """Per name (entry, or source: in the data or `sources`): records (a source's `rows`), tokens (`trained`) and loss
    tokens as trained, their share of all loss tokens; per source also trainable and truncated rows, prompt and
    answer p50/max."""
    total, out = int(stats["loss"].sum()) or 1, {}
    for name in sorted(set(stats[names]) | set(sources or ())):
        mine = stats[codes] == (stats[names].index(name) if name in stats[names] else -1)
        loss = int(stats["loss"][mine].sum())
        mix = {"tokens": int(stats["trained"][mine].sum()), "loss_tokens": loss, "loss_share": loss / total}
        if sources is None:
            out[name] = {"records": int(np.count_nonzero(mine)), **mix}
            continue
        prompt, answer = percentiles(stats["prompt"][mine]), percentiles(stats["answer"][mine])
        out[name] = {"rows": int(np.count_nonzero(mine)), "trainable_rows": int((stats["loss"][mine] > 0).sum()),
                     "prompt_p50": prompt["p50"], "prompt_max": prompt["max"], "answer_p50": answer["p50"],
                     "answer_max": answer["max"], **mix,
                     "truncated": int((stats["tokens"][mine] < stats["length"][mine]).sum())}
    return out


def records_by_source(dataset) -> dict[str, int]:
    """{source: records} of a dataset with a `source` column, counted column-wise; {} for None."""
    if dataset is None:
        return {}
    # the one column: `[:]` on a selection (a weighted file) copies every column it takes (README, Performance, Scale)
    counts = dataset.select_columns(["source"]).with_format("arrow")[:].column("source").value_counts()
    return dict(sorted((c["values"].as_py(), c["counts"].as_py()) for c in counts))


def packing_line(lengths, args, max_length: int | None) -> tuple[str, float, float | None, int]:
    """(description, packing fill, padding fill or None, packed rows) of rows of these trained lengths: TRL's own
    `pack_dataset` packs a column of the lengths alone (null values: no token copied); padded batches are padded to
    their longest row, in a seeded random order like the trainer's sampler."""
    strategy, batch = args.packing_strategy, int(args.per_device_train_batch_size)
    packed_rows, efficiency = _pack(lengths, max_length, strategy) if max_length and len(lengths) else (0, 0.0)
    if args.packing:
        return (f"on ({strategy}): {packed_rows} rows of {max_length} tokens, {efficiency:.1%} filled with data",
                efficiency, None, packed_rows)
    hint = f"; packing: true would fill {efficiency:.1%} of {packed_rows} rows of {max_length}" if max_length else ""
    if args.padding_free:
        return f"off: padding-free batches of {batch} (one row each, no padding){hint}", efficiency, 1.0, packed_rows
    multiple = args.pad_to_multiple_of or 1
    shuffled = np.random.default_rng(args.seed).permutation(lengths)
    batches = np.pad(shuffled, (0, -len(shuffled) % batch)).reshape(-1, batch)  # the last one filled up with 0s
    longest = -(-batches.max(axis=1) // multiple) * multiple
    padded = int(np.repeat(longest, batch)[:len(shuffled)].sum())  # each row padded to its batch's longest
    padding = int(lengths.sum()) / padded if padded else 0.0
    return f"off: padded batches of {batch} are {padding:.1%} real tokens{hint}", efficiency, padding, packed_rows


def _pack(lengths, max_length: int, strategy: str) -> tuple[int, float]:
    """(packed rows, share of their tokens that are data) when TRL packs rows of these lengths."""
    from datasets import Dataset
    from datasets.table import InMemoryTable
    from trl.data_utils import pack_dataset
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    column = pa.LargeListArray.from_arrays(pa.array(offsets), pa.nulls(int(offsets[-1])))
    packed = pack_dataset(Dataset(InMemoryTable(pa.table({"input_ids": column}))), max_length, strategy,
                          {"desc": "Pre-flight: packing"})
    filled = pc.sum(pc.list_value_length(packed.data.column("input_ids"))).as_py() or 0
    return len(packed), filled / (len(packed) * max_length) if len(packed) else 0.0


def check_lengths(recipe: Recipe, tokenizer, data) -> None:
    """A notice when some training or eval records are longer than max_length (TRL truncates them, and silently drops
    those left without an answer token); RecipeError when all are; nothing where TRL does not truncate."""
    args, max_length, train = data.args, data.max_length, " + ".join(e.label for e in entries(recipe.data.path))
    if max_length and max_length > tokenizer.model_max_length:  # transformers' "unknown" is 10³⁰
        print(f"notice: training.max_length={max_length} is above the tokenizer's model_max_length="
              f"{tokenizer.model_max_length} (the longest input the model is made for); lower it unless the model "
              "takes longer inputs")
    evaluation = (" + ".join(e.label for e in entries(recipe.data.eval_path)) if recipe.data.eval_path
                  else f"{train} (eval split)")
    for which, origin in (("train", train), ("eval", evaluation)):
        rows = report_rows(data, tokenizer, which)
        packing = eval_packed(args, data.unsupported is not None) if which == "eval" else args.packing
        if rows is None or max_length is None or (packing and args.packing_strategy != "bfd"):  # others split rows
            continue
        table = rows.with_format("arrow")[:]  # once, not per column
        length, prompt = (table.column(name).to_numpy() for name in (LENGTH, PROMPT))
        cut, longest = length > max_length, int(length.max(initial=0))
        # TRL drops a row left with no label: with completion_only_loss: false every kept token has one
        answers_only = args.completion_only_loss is not False or bool(args.assistant_only_loss)
        dropped = cut & (prompt >= max_length) & (args.truncation_mode == "keep_start") & (not packing) & answers_only
        if {"entry", "number"} <= set(table.column_names):  # a record that data.path's weight repeats: counted once
            table = pa.table({"entry": table.column("entry"), "number": table.column("number"), "cut": cut,
                              "dropped": dropped}).group_by(["entry", "number"]).aggregate([("cut", "max"),
                                                                                            ("dropped", "max")])
            cut, dropped = (table.column(name).to_numpy(zero_copy_only=False) for name in ("cut_max", "dropped_max"))
        n, truncated, dropped = len(cut), int(cut.sum()), int(dropped.sum())
        if truncated == n:
            raise RecipeError(f"{origin}: all {n} records are longer than training.max_length={max_length} tokens "
                              f"(longest {longest}); raise training.max_length or shorten the records")
        if truncated:
            lost = f"; {dropped} of them lose their whole answer and are dropped" if dropped else ""
            print(f"notice: {origin}: {truncated} of {n} records are longer than training.max_length={max_length} "
                  f"tokens and are truncated (longest {longest}){lost}")


def report_rows(data: Prepared, tokenizer, which: str = "train"):
    """The rows the report reads: the prepared rows or, where TRL prepares the data itself, the records tokenized
    untruncated as `SFTTrainer._prepare_dataset` does, kept on `data` (the length notice and the report tokenize
    once): loss on the completion (`completion_only_loss`, default on) and assistant mask (`assistant_only_loss`)."""
    name, records = ("rows", data.records) if which == "train" else ("eval_rows", data.eval_records)
    args, completion_only = data.args, data.args.completion_only_loss is not False  # TRL: None means on here
    if getattr(data, name) is not None or records is None:
        return getattr(data, name)
    if not args.assistant_only_loss:  # the preparation's own batched tokenization, untruncated, in memory
        setattr(data, name, prepare_rows(records, tokenizer, None, num_proc=args.dataset_num_proc, cache=False,
                                         completion_only=completion_only, template_kwargs=data.template_kwargs))
        return getattr(data, name)
    # assistant_only_loss: the template's assistant mask, one row at a time (TRL's training template if needed)
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers
    from trl.data_utils import common_prefix_length
    try:
        template = None if has_generation_markers(tokenizer.chat_template) else get_training_chat_template(tokenizer)
    except ValueError:  # what SFTTrainer raises too, as a traceback, once the model is loaded
        raise RecipeError("training.assistant_only_loss needs a chat template with {% generation %} markers, and TRL "
                          "has no training version of this one; set data.chat_template to a template that marks "
                          "the assistant turns, or drop assistant_only_loss (the answers alone carry loss anyway)"
                          ) from None
    options = {"chat_template": template, "tools": None, "tokenize": True, "return_dict": True, **data.template_kwargs}

    def tokenize_row(example: dict[str, Any]) -> dict[str, Any]:
        prompt_ids = tokenizer.apply_chat_template(example["prompt"], add_generation_prompt=True, **options)
        full = tokenizer.apply_chat_template(example["prompt"] + example["completion"],
                                             return_assistant_tokens_mask=True, **options)
        ids = list(full["input_ids"])
        prompt_len = common_prefix_length(list(prompt_ids["input_ids"]), ids)
        labels = [token if mask and (n >= prompt_len or not completion_only) else -100
                  for n, (token, mask) in enumerate(zip(ids, full["assistant_masks"], strict=False))]
        return {"input_ids": ids, "labels": labels, LENGTH: len(ids), PROMPT: prompt_len,
                LOSS: sum(label != -100 for label in labels), DRIFT: False}

    rows = records.map(tokenize_row, num_proc=args.dataset_num_proc, remove_columns=["prompt", "completion"],
                       desc=f"Pre-flight: tokenizing {which} dataset")
    setattr(data, name, rows)
    return rows
