"""Pre-flight checks before the model is loaded: the data report (what the trainer will learn from: answers with no
loss, an end-of-turn token never trained, rows cut at max_length) from the prepared rows, and the LoRA targets."""

import itertools
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from . import rows as figures
from .config import Recipe, RecipeError
from .launch import launched_processes
from .prepare import Prepared
from .records import locate
from .sections import CHECK_NAMES
from .text import printable, shortened, table, table_names

MARK = ("⟦", "⟧")  # brackets around the loss-carrying span in the rendered example
SOURCE_COLUMNS = (("source", 16), ("train", 7), ("eval", 6), ("prompt p50/max", 16), ("answer p50/max", 16),
                  ("tokens", 11), ("loss tokens", 13), ("share", 7), ("truncated", 11))  # (title, least width)
ENTRY_COLUMNS = (("data entry", 36), ("records", 9), ("tokens", 11), ("loss tokens", 13), ("share", 8))


@dataclass
class Report:
    """The pre-flight numbers; `text()` prints them, `failures` are what stops the run."""

    rows: int
    eval_rows: int
    max_length: int | None
    records_by_source: dict[str, int]
    eval_records_by_source: dict[str, int]
    evaluated_by_source: dict[str, int]  # the eval rows evaluated: those truncation leaves with a label
    prompt_tokens: dict[str, int]
    answer_tokens: dict[str, int]
    tokens: int
    loss_tokens: int
    loss_on: str
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
    by_entry: dict[str, dict[str, Any]]
    failures: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def loss_share(self) -> float:
        return self.loss_tokens / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("example_source", "failures")},
                "loss_share": self.loss_share,
                "failures": [{"check": name, "message": message} for name, message in self.failures]}

    def text(self, ignore: list[str] = ()) -> str:
        limit = f"max_length {self.max_length}" if self.max_length else "no max_length"
        truncated = f"{self.truncated_rows / self.rows:.1%}" if self.rows else "0%"
        lines = [f"pre-flight data report ({self.rows} training rows, {self.eval_rows} eval rows, {limit})"]
        name = table_names([*self.by_source, *self.eval_records_by_source, *self.by_entry])
        lines += table(SOURCE_COLUMNS, [
            [name[source], str(stats["rows"]), str(self.eval_records_by_source.get(source, 0)),
             *(f"{stats[what + '_p50']}/{stats[what + '_max']}" for what in ("prompt", "answer")),
             f"{stats['tokens']:,}", f"{stats['loss_tokens']:,}", f"{stats['loss_share']:.1%}", str(stats["truncated"])]
            for source, stats in self.by_source.items()] + [  # sources held out only: counted, never trained
            [name[source], "0", str(n), "—", "—", "—", "—", "—", "—"]
            for source, n in self.eval_records_by_source.items() if source not in self.by_source])
        if len(self.by_entry) > 1:  # the per-file mix
            lines += table(ENTRY_COLUMNS, [
                [name[entry], str(s["records"]), f"{s['tokens']:,}",
                 f"{s['loss_tokens']:,}", f"{s['loss_share']:.1%}"] for entry, s in self.by_entry.items()])
        p, a = self.prompt_tokens, self.answer_tokens
        lines += [
            f"  prompt tokens   p50 {p['p50']}  p90 {p['p90']}  p99 {p['p99']}  max {p['max']}",
            f"  answer tokens   p50 {a['p50']}  p90 {a['p90']}  p99 {a['p99']}  max {a['max']}",
            f"  loss tokens     {self.loss_tokens:,} of {self.tokens:,} trained tokens ({self.loss_share:.1%}): "
            f"{self.loss_on}",
            f"  truncated       {self.truncated_rows} of {self.rows} rows ({truncated}) "
            f"{self.truncation}, {self.truncated_tokens:,} tokens lost ({self.truncated_loss_tokens:,} of them "
            "loss-carrying)",
            f"  end of turn     {' or '.join(self.stop_tokens)} carries loss in {self.rows_with_stop} of {self.rows} "
            "rows",
            f"  packing         {self.packing}",
            f"  example         (source {shortened(self.example_source, 60)}; loss on {MARK[0]}…{MARK[1]})",
            *("    " + line for line in self.example.split("\n")),  # a \r in the data is shown, not obeyed
        ]
        lines += [f"  warning: {w}" for w in self.warnings]
        lines += [f"  {'IGNORED' if name in ignore else 'FAILED'} [{name}] {text}" for name, text in self.failures]
        if not self.failures:
            lines.append(f"  all checks passed ({', '.join(CHECK_NAMES)})")
        return "\n".join(map(printable, lines))  # data (a source, a record) shows its control characters escaped

    def enforce(self, ignore: list[str] = ()) -> None:
        """Raise one RecipeError line for the failures not in `ignore`."""
        if failed := [(name, message) for name, message in self.failures if name not in ignore]:
            name, message = failed[0]
            more = f" (+{len(failed) - 1} more failed check(s) above)" if len(failed) > 1 else ""
            names = ", ".join(dict.fromkeys([*ignore, *(name for name, _ in failed)]))  # one setting that passes
            raise RecipeError(f"pre-flight check failed [{name}]: {message}{more}; "
                              f"to train anyway set check.ignore=[{names}]")


def preflight(recipe: Recipe, tokenizer, data: Prepared) -> Report:
    """Measure the training rows as the trainer will train them, and list the failed checks."""
    args, rows = data.args, figures.report_rows(data, tokenizer)
    cut = figures.trainer_cut(args, data.max_length)
    stop_ids = figures.stop_token_ids(recipe, args, tokenizer)
    answers_carry_loss = args.completion_only_loss is not False or bool(args.assistant_only_loss)
    stats = figures.row_stats(rows, cut, stop_ids, answers_carry_loss)
    kept = stats["loss"] > 0 if not args.packing else np.ones(len(rows), bool)  # TRL drops rows left with no loss
    stats["trained"] = np.where(kept, stats["tokens"], 0)
    packing, efficiency, padding, packed_rows = figures.packing_line(stats["tokens"][kept], args, data.max_length)
    example = int(stats["loss"].argmax()) if stats["loss"].any() else 0
    how = f"packing {args.packing_strategy}" if args.packing else args.truncation_mode
    report = Report(
        rows=len(rows), eval_rows=len(data.eval_records) if data.eval_records is not None else 0,
        max_length=data.max_length, records_by_source=data.records_by_source["train"],
        eval_records_by_source=data.records_by_source["eval"], evaluated_by_source=figures.records_by_source(data.eval),
        prompt_tokens=figures.percentiles(stats["prompt"]),
        answer_tokens=figures.percentiles(stats["answer"]), tokens=int(stats["trained"].sum()),
        loss_on="the answers and their end-of-turn token" if answers_carry_loss else
        "every token (training.completion_only_loss: false)",
        loss_tokens=int(stats["loss"].sum()), truncated_rows=int((stats["tokens"] < stats["length"]).sum()),
        truncated_tokens=int((stats["length"] - stats["tokens"]).sum()),
        truncated_loss_tokens=int(stats["lost_loss"].sum()),
        truncation="(no max_length)" if data.max_length is None else f"at {data.max_length} ({how})",
        stop_tokens=[tokenizer.convert_ids_to_tokens(i) for i in sorted(stop_ids)],
        rows_with_stop=int(stats["stop"].sum()), no_loss_rows=int((stats["loss"] == 0).sum()), packing=packing,
        packing_efficiency=efficiency, padding_efficiency=padding, packed_rows=packed_rows,
        example=render(tokenizer, *figures.trained_row(rows, example, cut)),
        example_source=stats["names"][stats["code"][example]],
        by_source=figures.mix_table(stats, "code", "names", recipe.check.sources),
        by_entry=figures.mix_table(stats, "entry_code", "entry_names"))
    _judge(report, stats, data.records, recipe.check.max_truncated_share, data.special_text)
    if args.dataloader_drop_last and data.eval is not None:
        _dropped_eval_rows(report, args.per_device_eval_batch_size * launched_processes())
    return report


def _dropped_eval_rows(report: Report, batch: int) -> None:
    """Trainer drops each eval set's last partial batch too under dataloader_drop_last: said, as the rows it skips."""
    evaluated = sum(report.evaluated_by_source.values())
    lost = [f"'{s}' {n - n % batch} of {n}" for s, n in report.evaluated_by_source.items() if n % batch]
    if lost or evaluated % batch:
        report.warnings.append(f"training.dataloader_drop_last drops the last partial eval batch too (of {batch} "
                               f"rows): the eval loss reads {evaluated - evaluated % batch} of {evaluated} rows"
                               + (f"; per source {', '.join(lost)} (0: no eval loss of its own)" if lost else "")
                               + "; set per_device_eval_batch_size: 1 to evaluate every row")


def _judge_sources(report: Report) -> None:
    """A source with nothing to train on fails; one without eval records, or whose answers truncation removes, warns."""
    for source, source_stats in report.by_source.items():
        if source_stats["trainable_rows"] == 0:
            held_out = report.eval_records_by_source.get(source)
            what = (f"has no training record{f' ({held_out} eval records)' if held_out else ''}"
                    if not source_stats["rows"] else f"has {source_stats['rows']} records but none carries loss")
            report.failures.append(("empty_source", f"source '{source}' {what}; check the data or check.sources"))
    for source in report.records_by_source:
        if report.eval_rows and not report.eval_records_by_source.get(source):
            report.warnings.append(f"source '{source}' has no eval record, so it gets no eval loss of its own")
    for source, n in report.eval_records_by_source.items():  # as TRL drops training rows, Trainer skips these
        if (lost := n - report.evaluated_by_source.get(source, 0)) > 0:
            report.warnings.append(f"source '{source}': {lost} of {n} eval records lose their whole answer to "
                                   f"training.max_length and are not evaluated" + (
                                       ", so it gets no eval loss of its own" if lost == n else ""))


def _judge(report: Report, stats: dict[str, Any], records, max_truncated_share: float, special) -> None:
    """Fill `report.failures` (and warnings) from the numbers."""
    def record(index: int) -> str:
        row = records[index]
        question = row["prompt"][-1]["content"] if row["prompt"] else ""
        where = locate(row["entry"], row["number"]) if "number" in row else f"training record {index + 1}"
        return f"{where}, source '{row['source']}', question '{shortened(question, 40)}'"

    drift = np.flatnonzero(stats["drift"])
    if len(drift):  # the model would train on a context it never sees at inference
        report.failures.append(("template", f"{len(drift)} of {report.rows} training records render differently "
                                f"once the answer follows (first: {record(int(drift[0]))}): the chat template drops, "
                                "moves or rewrites an earlier turn, so the rendered prompt is not a prefix of prompt + "
                                "answer; set data.fold_system_prompt: true (a template without a system role), "
                                "data.chat_template_kwargs: {enable_thinking: true} (answers holding <think> blocks), "
                                "data.mask_history: true (a template that rewrites earlier answers: the last one "
                                "alone trained), or a data.chat_template that renders earlier turns the same way"))
    no_loss = np.flatnonzero(stats["loss"] == 0)
    if len(no_loss):
        first = int(no_loss[0])
        why = ("its prompt fills training.max_length" if stats["tokens"][first] < stats["length"][first] else
               "the chat template renders no answer tokens after the prompt")
        report.failures.append(("no_loss", f"{len(no_loss)} of {report.rows} training records carry no "
                                f"loss-carrying token (first: {record(first)}: {why}); TRL would drop or waste them"))
    stop, unstopped, cut = " or ".join(report.stop_tokens), ~stats["stop"], stats["tokens"] < stats["length"]
    if report.rows and not report.rows_with_stop:
        report.failures.append(("eos", f"the end-of-turn token ({stop}) carries loss in no training row, so the model "
                                "never learns to stop; use a chat template that closes the assistant turn with it, or "
                                "set training.eos_token"))
    # multi-turn rows of a template marking answers without it; a row with no loss at all is [no_loss]'s (TRL drops it)
    elif len(uncut := np.flatnonzero(unstopped & ~cut & (stats["loss"] > 0))):
        report.failures.append(("eos", f"the end-of-turn token ({stop}) carries loss in no turn of {len(uncut)} of "
                                f"{report.rows} training rows that nothing cuts (first: {record(int(uncut[0]))}), so "
                                "the model learns to stop from the others only; use a chat template whose assistant "
                                "turns (its {% generation %} blocks) close with it, or set training.eos_token"))
    share = report.truncated_rows / report.rows if report.rows else 0.0
    if share > max_truncated_share:
        report.failures.append(("truncated", f"{report.truncated_rows} of {report.rows} training rows "
                                f"({share:.1%}) are cut at training.max_length={report.max_length}, above "
                                f"check.max_truncated_share={max_truncated_share:g}; raise training.max_length "
                                "or shorten the records"))
    if special[0]:
        report.failures.append(("special_text", f"{special[0]} of {report.rows} training records hold a special "
                                f"token's text (first: {record(special[1])}, {special[2]}), which is tokenized as "
                                "the token itself: an end-of-turn token inside an answer teaches the model to stop "
                                "there; rewrite those texts"))
    _judge_sources(report)
    if report.rows_with_stop and (lost := int((unstopped & cut).sum())):
        report.warnings.append(f"{lost} rows lose their end-of-turn token to truncation")


def render(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """A row's text as trained, with the loss-carrying spans in brackets."""
    runs = itertools.groupby(zip(input_ids, labels, strict=True), key=lambda pair: pair[1] != figures.IGNORE)
    texts = ((loss, tokenizer.decode([token for token, _ in run], skip_special_tokens=False)) for loss, run in runs)
    return "".join(f"{MARK[0]}{text}{MARK[1]}" if loss else text for loss, text in texts)


def run_check(recipe: Recipe, tokenizer, data: Prepared, *, main_process: bool = True) -> Report:
    """The report, printed on the main process; RecipeError on a failed check not in `check.ignore`: every rank
    judges the same data itself, so all ranks stop together with no collective."""
    from .trainer import check_source_metrics

    if recipe.report.eval_per_source:  # as the trainer will: a run that --check passed stopped here
        check_source_metrics(data.records_by_source["eval"])
    report = preflight(recipe, tokenizer, data)
    if main_process:
        print(report.text(recipe.check.ignore), flush=True)
    report.enforce(recipe.check.ignore)
    return report
