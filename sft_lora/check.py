"""Pre-flight data report: what the trainer will learn from, checked before the model is loaded.

The costly fine-tuning failures are silent: answers with no loss-carrying token, an end-of-turn token that is never
trained (so generation never stops), half the data cut at `max_length`. This module tokenizes the training set the
way TRL's `SFTTrainer` prepares it — conversational prompt/completion, loss on the completion only, then truncation
— but keeps the untruncated lengths, so it can say what truncation costs. `tests/test_check.py` proves that the rows
it computes equal `trainer.train_dataset` token for token. It runs on the tokenizer alone, so `--check` and a
failing check cost seconds, not a model load.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .config import Recipe, RecipeError
from .prepare import tokenize_conversations, unsupported

IGNORE = -100  # the label of a token that carries no loss
MARK = ("⟦", "⟧")  # brackets around the loss-carrying span in the rendered example


@dataclass
class Row:
    """One training record as the trainer sees it."""

    source: str
    question: str
    prompt_tokens: int
    """Tokens before the answer (the prompt as rendered by the chat template)."""
    length: int
    """Tokens of prompt + answer before truncation."""
    input_ids: list[int]
    """As trained: truncated at max_length like TRL does."""
    labels: list[int]
    """As trained; IGNORE where a token carries no loss."""
    untruncated_loss_tokens: int

    @property
    def loss_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


@dataclass
class Report:
    """The pre-flight numbers; `text()` prints them, `failures` are what stops the run."""

    rows: int
    eval_rows: int
    max_length: int | None
    records_by_source: dict[str, int]
    eval_records_by_source: dict[str, int]
    prompt_tokens: dict[str, int]
    answer_tokens: dict[str, int]
    tokens: int
    loss_tokens: int
    truncated_rows: int
    truncated_tokens: int
    truncated_loss_tokens: int
    truncation: str
    stop_tokens: list[str]
    rows_with_stop: int
    no_loss_rows: int
    packing: str
    packing_efficiency: float
    padding_efficiency: float | None
    packed_rows: int
    example: str
    example_source: str
    by_source: dict[str, dict[str, Any]]
    failures: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def loss_share(self) -> float:
        return self.loss_tokens / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        keys = ("rows", "eval_rows", "max_length", "records_by_source", "eval_records_by_source", "prompt_tokens",
                "answer_tokens", "tokens", "loss_tokens", "loss_share", "truncated_rows", "truncated_tokens",
                "truncated_loss_tokens", "truncation", "stop_tokens", "rows_with_stop", "no_loss_rows", "packing",
                "packing_efficiency", "padding_efficiency", "packed_rows", "by_source", "example", "warnings")
        out = {k: getattr(self, k) for k in keys}
        out["failures"] = [{"check": name, "message": message} for name, message in self.failures]
        return out

    def text(self, ignore: list[str] = ()) -> str:
        limit = f"max_length {self.max_length}" if self.max_length else "no max_length"
        lines = [f"pre-flight data report ({self.rows} training rows, {self.eval_rows} eval rows, {limit})",
                 f"  {'source':<16}{'train':>7}{'eval':>6}{'prompt p50/max':>16}{'answer p50/max':>16}"
                 f"{'loss tokens':>13}{'truncated':>11}"]
        for source, stats in self.by_source.items():
            prompt = f"{stats['prompt_p50']}/{stats['prompt_max']}"
            answer = f"{stats['answer_p50']}/{stats['answer_max']}"
            lines.append(f"  {_cut(source, 15):<16}{stats['rows']:>7}{self.eval_records_by_source.get(source, 0):>6}"
                         f"{prompt:>16}{answer:>16}{stats['loss_tokens']:>13,}{stats['truncated']:>11}")
        p, a = self.prompt_tokens, self.answer_tokens
        lines += [
            f"  prompt tokens   p50 {p['p50']}  p90 {p['p90']}  p99 {p['p99']}  max {p['max']}",
            f"  answer tokens   p50 {a['p50']}  p90 {a['p90']}  p99 {a['p99']}  max {a['max']}",
            f"  loss tokens     {self.loss_tokens:,} of {self.tokens:,} trained tokens ({self.loss_share:.1%}): "
            "the answers and their end-of-turn token",
            f"  truncated       {self.truncated_rows} of {self.rows} rows ({_share(self.truncated_rows, self.rows)}) "
            f"{self.truncation}, {self.truncated_tokens:,} tokens lost ({self.truncated_loss_tokens:,} of them "
            "loss-carrying)",
            f"  end of turn     {' or '.join(self.stop_tokens)} carries loss in {self.rows_with_stop} of {self.rows} "
            "rows",
            f"  packing         {self.packing}",
            f"  example         (source {self.example_source}; loss on {MARK[0]}…{MARK[1]})",
            *("    " + line for line in self.example.splitlines()),
        ]
        lines += [f"  warning: {w}" for w in self.warnings]
        for name, message in self.failures:
            lines.append(f"  {'IGNORED' if name in ignore else 'FAILED'} [{name}] {message}")
        if not self.failures:
            lines.append("  all checks passed (no_loss, eos, truncated, empty_source)")
        return "\n".join(lines)

    def enforce(self, ignore: list[str] = ()) -> None:
        """Raise one RecipeError line for the failures not in `ignore`."""
        failed = [(name, message) for name, message in self.failures if name not in ignore]
        if failed:
            name, message = failed[0]
            more = f" (+{len(failed) - 1} more failed check(s) above)" if len(failed) > 1 else ""
            raise RecipeError(f"pre-flight check failed [{name}]: {message}{more}; "
                              f"to train anyway set check.ignore=[{name}]")


def tokenize(dataset, tokenizer, training: dict[str, Any], name: str = "train"):
    """`dataset` (prompt/completion/source) → untruncated `input_ids`, `labels` and `prompt_tokens`, as TRL does.

    Mirrors `SFTTrainer._prepare_dataset` for conversational prompt/completion data: the completion starts where
    the tokenized prompt (with generation prompt) and prompt+completion diverge; loss on the completion
    (`completion_only_loss`, default on) and on the assistant mask (`assistant_only_loss`)."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers
    from trl.data_utils import common_prefix_length

    assistant_only = bool(training.get("assistant_only_loss", False))
    completion_only = training.get("completion_only_loss")
    completion_only = True if completion_only is None else bool(completion_only)  # TRL: on for prompt/completion
    desc = f"Pre-flight: tokenizing {name} dataset"
    if not assistant_only:  # the usual case: batched, the same tokenization as the preparation (prepare.py)
        def tokenize_batch(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
            out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "prompt_tokens": []}
            for ids, start, _ in tokenize_conversations(tokenizer, batch["prompt"], batch["completion"]):
                out["input_ids"].append(ids)
                out["labels"].append([IGNORE] * start + ids[start:] if completion_only else ids)
                out["prompt_tokens"].append(start)
            return out

        return dataset.map(tokenize_batch, batched=True, num_proc=training.get("dataset_num_proc"), desc=desc)
    # assistant_only_loss: the template's assistant mask, one row at a time (TRL's training template if needed)
    template = None if has_generation_markers(tokenizer.chat_template) else get_training_chat_template(tokenizer)

    def tokenize_row(example: dict[str, Any]) -> dict[str, Any]:
        kwargs = {"chat_template": template, "tools": None, "tokenize": True, "return_dict": True}
        prompt_ids = tokenizer.apply_chat_template(example["prompt"], add_generation_prompt=True, **kwargs)
        full = tokenizer.apply_chat_template(example["prompt"] + example["completion"],
                                             return_assistant_tokens_mask=True, **kwargs)
        ids = list(full["input_ids"])
        prompt_len = common_prefix_length(list(prompt_ids["input_ids"]), ids)
        masks = [full["assistant_masks"]]
        if completion_only:
            masks.append([0] * prompt_len + [1] * (len(ids) - prompt_len))
        labels = [token if all(bits) else IGNORE for token, *bits in zip(ids, *masks, strict=False)]
        return {"input_ids": ids, "labels": labels, "prompt_tokens": prompt_len}

    return dataset.map(tokenize_row, num_proc=training.get("dataset_num_proc"), desc=desc)


def truncate(ids: list[int], labels: list[int], training: dict[str, Any]) -> tuple[list[int], list[int]]:
    """What TRL keeps of a row: `truncation_mode` at `max_length`; with packing, bfd cuts the end, others split."""
    max_length = training.get("max_length", 1024)
    if max_length is None or len(ids) <= max_length:
        return ids, labels
    if training.get("packing", False):
        if training.get("packing_strategy", "bfd") != "bfd":
            return ids, labels  # bfd_split and wrapped move the overflow into other rows; nothing is lost
        return ids[:max_length], labels[:max_length]
    keep = slice(-max_length, None) if training.get("truncation_mode", "keep_start") == "keep_end" else \
        slice(None, max_length)
    return ids[keep], labels[keep]


def trained_rows(recipe: Recipe, tokenizer, dataset, name: str = "train") -> list[Row]:
    """Every record of `dataset` as the trainer will train on it (rows TRL would drop are kept, with no loss)."""
    tokenized = tokenize(dataset, tokenizer, recipe.training, name)
    rows = []
    for example in tokenized:
        ids, labels = truncate(example["input_ids"], example["labels"], recipe.training)
        question = example["prompt"][-1]["content"] if example["prompt"] else ""
        rows.append(Row(source=example["source"], question=question, prompt_tokens=example["prompt_tokens"],
                        length=len(example["input_ids"]), input_ids=ids, labels=labels,
                        untruncated_loss_tokens=sum(label != IGNORE for label in example["labels"])))
    return rows


def stop_token_ids(recipe: Recipe, tokenizer) -> list[int]:
    """Tokens that end generation: the tokenizer's EOS (or training.eos_token, which TRL makes the EOS) and the
    base model's generation_config EOS ids (end-of-turn tokens such as <|eot_id|> or <|im_end|>)."""
    eos = recipe.training.get("eos_token") or tokenizer.eos_token
    ids = [tokenizer.convert_tokens_to_ids(eos)]
    try:
        from transformers import GenerationConfig

        config = GenerationConfig.from_pretrained(recipe.model.name_or_path, revision=recipe.model.revision)
        extra = config.eos_token_id
        ids += [extra] if isinstance(extra, int) else list(extra or [])
    except Exception:  # no generation_config.json (or no network): the tokenizer's EOS is what TRL trains
        pass
    return list(dict.fromkeys(i for i in ids if i is not None))


def preflight(recipe: Recipe, tokenizer, train_set, eval_set=None) -> Report:
    """Tokenize the training set like the trainer, measure it, and list the failed checks."""
    import numpy as np

    rows = trained_rows(recipe, tokenizer, train_set)
    training, check = recipe.training, recipe.check
    max_length = training.get("max_length", 1024)
    stop_ids = set(stop_token_ids(recipe, tokenizer))
    prompts = [r.prompt_tokens for r in rows]
    answers = [r.length - r.prompt_tokens for r in rows]

    def pct(values: list[int]) -> dict[str, int]:
        if not values:
            return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
        return {f"p{q}": int(np.percentile(values, q, method="nearest")) for q in (50, 90, 99)} | \
            {"max": int(max(values))}

    truncated = [r for r in rows if len(r.input_ids) < r.length]
    lost_answer = sum(r.untruncated_loss_tokens - r.loss_tokens for r in truncated)
    by_source: dict[str, dict[str, Any]] = {}
    for source in sorted({r.source for r in rows} | set(check.sources)):
        mine = [r for r in rows if r.source == source]
        p, a = [r.prompt_tokens for r in mine], [r.length - r.prompt_tokens for r in mine]
        by_source[source] = {
            "rows": len(mine), "trainable_rows": sum(r.loss_tokens > 0 for r in mine),
            "prompt_p50": pct(p)["p50"], "prompt_max": pct(p)["max"], "answer_p50": pct(a)["p50"],
            "answer_max": pct(a)["max"], "loss_tokens": sum(r.loss_tokens for r in mine),
            "truncated": sum(len(r.input_ids) < r.length for r in mine)}

    # padding-free needs sft_lora's preparation; where it does not apply, the trainer pads (trainer.py)
    padding_free = bool(training.get("padding_free")) and not unsupported(recipe.build_sft_config(), train_set)
    packing, efficiency, padding, packed_rows = _packing(rows, {**training, "padding_free": padding_free})
    example_row = next((r for r in rows if r.loss_tokens), rows[0])
    stop_names = [tokenizer.convert_ids_to_tokens(i) for i in sorted(stop_ids)]
    report = Report(
        rows=len(rows), eval_rows=len(eval_set) if eval_set is not None else 0, max_length=max_length,
        records_by_source=dict(sorted(Counter(r.source for r in rows).items())),
        eval_records_by_source=dict(sorted(Counter(eval_set["source"]).items())) if eval_set is not None else {},
        prompt_tokens=pct(prompts), answer_tokens=pct(answers), tokens=sum(len(r.input_ids) for r in rows),
        loss_tokens=sum(r.loss_tokens for r in rows), truncated_rows=len(truncated),
        truncated_tokens=sum(r.length - len(r.input_ids) for r in truncated), truncated_loss_tokens=lost_answer,
        truncation=_truncation_words(training), stop_tokens=stop_names,
        rows_with_stop=sum(any(label in stop_ids for label in r.labels) for r in rows),
        no_loss_rows=sum(r.loss_tokens == 0 for r in rows), packing=packing, packing_efficiency=efficiency,
        padding_efficiency=padding, packed_rows=packed_rows, example=render(tokenizer, example_row),
        example_source=example_row.source, by_source=by_source)
    _judge(report, rows, check.max_truncated_share, check.sources)
    return report


def _judge(report: Report, rows: list[Row], max_truncated_share: float, sources: list[str]) -> None:
    """Fill `report.failures` (and warnings) from the numbers."""
    no_loss = [r for r in rows if r.loss_tokens == 0]
    if no_loss:
        first = no_loss[0]
        why = ("its prompt fills training.max_length" if len(first.input_ids) < first.length else
               "the chat template renders no answer tokens after the prompt")
        report.failures.append(("no_loss", f"{len(no_loss)} of {len(rows)} training records carry no loss-carrying "
                                f"token (first: source '{first.source}', question '{_cut(first.question, 40)}': "
                                f"{why}); TRL would drop or waste them"))
    if rows and not report.rows_with_stop:
        report.failures.append(("eos", f"the end-of-turn token ({' or '.join(report.stop_tokens)}) carries loss in "
                                "no training row, so the model never learns to stop; use a chat template that closes "
                                "the assistant turn with it, or set training.eos_token"))
    share = report.truncated_rows / report.rows if report.rows else 0.0
    if share > max_truncated_share:
        report.failures.append(("truncated", f"{report.truncated_rows} of {report.rows} training rows "
                                f"({share:.1%}) are cut at training.max_length={report.max_length}, above "
                                f"check.max_truncated_share={max_truncated_share:g}; raise training.max_length "
                                "or shorten the records"))
    for source, stats in report.by_source.items():
        if stats["trainable_rows"] == 0:
            what = "has no record" if not stats["rows"] else f"has {stats['rows']} records but none carries loss"
            report.failures.append(("empty_source", f"source '{source}' {what}; check the data or check.sources"))
    for source in report.records_by_source:
        if report.eval_rows and not report.eval_records_by_source.get(source):
            report.warnings.append(f"source '{source}' has no eval record, so it gets no eval loss of its own")
    if rows and 0 < report.rows_with_stop < len(rows):
        report.warnings.append(f"{len(rows) - report.rows_with_stop} rows lose their end-of-turn token to "
                               "truncation")


def _packing(rows: list[Row], training: dict[str, Any]) -> tuple[str, float, float | None, int]:
    """(description, packing fill, padding fill or None, packed rows): the share of real tokens in what is fed.

    With packing on, TRL's own `pack_dataset` packs the rows; with it off, padding-free batches (the default) have
    no padding, and padded ones are padded to their longest row, simulated in a seeded random order like the
    trainer's sampler."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    max_length = training.get("max_length", 1024)
    strategy = training.get("packing_strategy", "bfd")
    tokens = sum(len(r.input_ids) for r in rows)
    packed_rows, efficiency = 0, 0.0
    if max_length and rows:
        packed = pack_dataset(Dataset.from_dict({"input_ids": [r.input_ids for r in rows]}), max_length, strategy,
                              {"desc": "Pre-flight: packing"})
        packed_rows = len(packed)
        efficiency = sum(len(ids) for ids in packed["input_ids"]) / (packed_rows * max_length)
    if training.get("packing", False):
        return (f"on ({strategy}): {packed_rows} rows of {max_length} tokens, {efficiency:.1%} filled with data",
                efficiency, None, packed_rows)
    batch = int(training.get("per_device_train_batch_size", 8))
    hint = f"; packing: true would fill {efficiency:.1%} of {packed_rows} rows of {max_length}" if max_length else ""
    if training.get("padding_free", False):
        return f"off: padding-free batches of {batch} (one row each, no padding){hint}", efficiency, 1.0, packed_rows
    multiple = training.get("pad_to_multiple_of") or 1
    lengths = [len(r.input_ids) for r in rows]
    random.Random(training.get("seed", 42)).shuffle(lengths)
    padded = 0
    for start in range(0, len(lengths), batch):
        longest = max(lengths[start:start + batch])
        padded += -(-longest // multiple) * multiple * len(lengths[start:start + batch])
    padding = tokens / padded if padded else 0.0
    return f"off: padded batches of {batch} are {padding:.1%} real tokens{hint}", efficiency, padding, packed_rows


def _truncation_words(training: dict[str, Any]) -> str:
    max_length = training.get("max_length", 1024)
    if max_length is None:
        return "(no max_length)"
    if training.get("packing", False):
        return f"at {max_length} (packing {training.get('packing_strategy', 'bfd')})"
    return f"at {max_length} ({training.get('truncation_mode', 'keep_start')})"


def render(tokenizer, row: Row) -> str:
    """The row's text as trained, with the loss-carrying spans in brackets."""
    parts, start = [], 0
    for end in range(1, len(row.input_ids) + 1):
        if end == len(row.input_ids) or (row.labels[end] != IGNORE) != (row.labels[start] != IGNORE):
            text = tokenizer.decode(row.input_ids[start:end], skip_special_tokens=False)
            parts.append(f"{MARK[0]}{text}{MARK[1]}" if row.labels[start] != IGNORE else text)
            start = end
    return "".join(parts)


def _cut(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "0%"


def run_check(recipe: Recipe, tokenizer, train_set, eval_set=None, *, main_process: bool = True) -> Report:
    """The report, printed on the main process; raises RecipeError on a failed check not in `check.ignore`.

    Every rank computes the verdict itself (the data is the same), so all ranks stop together with no collective."""
    report = preflight(recipe, tokenizer, train_set, eval_set)
    if main_process:
        print(report.text(recipe.check.ignore), flush=True)
    report.enforce(recipe.check.ignore)
    return report
