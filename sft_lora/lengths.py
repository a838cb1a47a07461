"""Records longer than `training.max_length`: counted and reported before training, never silent.

TRL truncates such records while preparing the dataset and drops those left with no answer token, without a
word. Here they are counted first, with TRL's own tokenization (the chat template, prompt then prompt+answer):
a notice gives the count when some are truncated or dropped, and a `RecipeError` stops the run when every record
is — training on answers cut off (or absent) everywhere is never what was meant.
"""

from __future__ import annotations

from typing import Any

from .config import RecipeError
from .prepare import tokenize_conversations

CHUNK = 1000


def length_report(tokenizer, dataset, max_length: int, truncation_mode: str = "keep_start") -> dict[str, Any]:
    """{records, truncated, dropped, longest}: how many records exceed `max_length` tokens, and how many of those
    lose their whole answer (TRL drops them)."""
    truncated = dropped = longest = 0
    prompts, completions = dataset["prompt"], dataset["completion"]
    for start in range(0, len(prompts), CHUNK):
        chunk = range(start, min(start + CHUNK, len(prompts)))
        conversations = tokenize_conversations(tokenizer, [prompts[i] for i in chunk], [completions[i] for i in chunk])
        for ids, _, prompt_length in conversations:
            longest = max(longest, len(ids))
            if len(ids) > max_length:
                truncated += 1
                if truncation_mode == "keep_start" and prompt_length >= max_length:
                    dropped += 1
    return {"records": len(prompts), "truncated": truncated, "dropped": dropped, "longest": longest}


def check_lengths(tokenizer, dataset, args, origin: str) -> dict[str, Any] | None:
    """Print a one-line notice when some records of `dataset` (read from `origin`) exceed `args.max_length`
    (`args`: the run's SFTConfig); raise RecipeError when all do. Returns the report, or None when TRL does not
    truncate (no max_length, or packing, which splits sequences instead)."""
    max_length = args.max_length
    if dataset is None or max_length is None or args.packing:
        return None
    report = length_report(tokenizer, dataset, max_length, args.truncation_mode)
    n, cut = report["records"], report["truncated"]
    if cut == n:
        raise RecipeError(f"{origin}: all {n} records are longer than training.max_length={max_length} tokens "
                          f"(longest {report['longest']}); raise training.max_length or shorten the records")
    if cut:
        dropped = (f"; {report['dropped']} of them lose their whole answer and are dropped" if report["dropped"]
                   else "")
        print(f"notice: {origin}: {cut} of {n} records are longer than training.max_length={max_length} tokens "
              f"and are truncated (longest {report['longest']}){dropped}")
    return report


def check_dataset_lengths(recipe, tokenizer, train_set, eval_set) -> None:
    """`check_lengths` for the training and the evaluation records of a run."""
    args = recipe.build_sft_config()
    check_lengths(tokenizer, train_set, args, recipe.data.path)
    check_lengths(tokenizer, eval_set, args, recipe.data.eval_path or f"{recipe.data.path} (eval split)")
