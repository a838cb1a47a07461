"""The pre-flight report: its rows are what TRL trains, it passes good data and catches each failure on crafted data."""

from __future__ import annotations

import dataclasses
import json
import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from sft_lora.config import RecipeError, load_recipe
from sft_lora.data import load_datasets
from sft_lora.model import load_tokenizer
from sft_lora.preflight import MARK, preflight
from sft_lora.prepare import prepare_datasets
from sft_lora.rows import report_rows, row_stats, stop_token_ids, trained_row, trainer_cut
from sft_lora.run import main
from sft_lora.trainer import build_trainer

from .conftest import SAMPLE

SAMPLE_RECORDS = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]
LONG_QUESTION = "Please read this long preamble carefully. " * 20 + "What is 2 plus 2?"
NO_EOS_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                   "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _data(tmp_path, records: list[dict]) -> str:
    path = tmp_path / "crafted.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    return str(path)


def _report(recipe_path):
    recipe = load_recipe(recipe_path)
    tokenizer = load_tokenizer(recipe.model, recipe.data)
    train_set, eval_set = load_datasets(recipe.data, seed=recipe.training.seed)
    return recipe, preflight(recipe, tokenizer, prepare_datasets(recipe.training, tokenizer, train_set, eval_set))


@pytest.mark.parametrize("case", ["system prompt", "keep_start cut", "keep_end cut", "packing"])
def test_the_report_reads_the_rows_the_trainer_trains_on(make_recipe, tmp_path, case):
    # 60 sample records plus 2 whose prompt alone is longer than max_length: TRL drops those (no loss left).
    long = [{"input": LONG_QUESTION, "output": "4.", "source": "long"}] * 2
    data = {"path": _data(tmp_path, SAMPLE_RECORDS[:60] + long), "eval_split": None}
    training = {"max_length": 40}
    if case == "system prompt":
        data["system_prompt"] = "Answer briefly."
        training = {"max_length": 256}
    elif case == "keep_start cut":
        training = {"max_length": 17}
    elif case == "keep_end cut":  # sft_lora's preparation does not apply: TRL prepares, the report tokenizes as TRL
        training = {"max_length": 17, "truncation_mode": "keep_end"}
    else:
        training = {"max_length": 64, "packing": True}
    recipe = load_recipe(make_recipe(data=data, training=training))
    tokenizer = load_tokenizer(recipe.model, recipe.data)
    prepared = prepare_datasets(recipe.training, tokenizer, load_datasets(recipe.data)[0])
    report = preflight(recipe, tokenizer, prepared)  # prepared once: the report and the trainer read it
    trained = build_trainer(recipe, tokenizer, prepared).train_dataset
    rows, cut = report_rows(prepared, tokenizer), trainer_cut(prepared.args, prepared.max_length)
    assert len(rows) == report.rows == 62
    if case == "packing":
        assert report.packed_rows == len(trained) < len(rows)
        filled = sum(len(ids) for ids in trained["input_ids"]) / (len(trained) * 64)
        assert report.packing_efficiency == pytest.approx(filled)
        assert report.packing.startswith("on (bfd)")
        return
    if case != "keep_end cut":  # the trainer reads the Arrow file the report read, not a copy
        assert prepared.unsupported is None and trained.cache_files == rows.cache_files != []
    stats = row_stats(rows, cut, stop_token_ids(recipe, prepared.args, tokenizer))
    kept = [i for i in range(len(rows)) if stats["loss"][i]]  # TRL drops the rows truncation leaves with no loss
    assert len(kept) == len(trained) <= len(rows)
    assert [(*trained_row(rows, i, cut), rows[i]["source"]) for i in kept] == \
        [(p["input_ids"], p["labels"], p["source"]) for p in trained]
    # the report's figures are the trained rows' figures
    labels = trained["labels"]
    assert report.loss_tokens == sum(label != -100 for row in labels for label in row)
    assert report.no_loss_rows == len(rows) - len(trained)
    assert report.rows_with_stop == sum(tokenizer.eos_token_id in row for row in labels)
    assert report.tokens == sum(len(ids) for ids in trained["input_ids"])  # the dropped rows' counted too before
    assert sum(s["tokens"] for s in report.by_source.values()) == report.tokens
    if case != "system prompt":
        assert report.truncated_rows and any(stats["length"][i] > stats["tokens"][i] for i in kept), \
            "the case must actually truncate"
    if case == "keep_start cut":
        assert len(kept) == len(rows) - 2  # the two long prompts are dropped


def test_a_template_that_moves_an_earlier_turn_gives_no_negative_figure(make_recipe, tmp_path):
    # the system text moves into the last user turn once that turn is there: the first answer's span cannot be
    # found in the whole (its end fell before its start, and the report showed answers of -11 tokens)
    template = tmp_path / "moving.jinja"
    template.write_text(
        "{% for m in messages %}{% if not loop.first %}\n{% endif %}{% if m.role == 'system' %}"
        "{% elif m.role == 'user' and loop.index0 >= messages|length - 2 %}<|user|>\n{{ messages[0].content }}\n\n"
        "{{ m.content }}{{ eos_token }}{% else %}<|{{ m.role }}|>\n{{ m.content }}{{ eos_token }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}\n<|assistant|>\n{% endif %}", encoding="utf-8")
    turns = [("system", "Keep a running total."), ("user", "What is 1 plus 1?"), ("assistant", "1 plus 1 is 2."),
             ("user", "And plus 2?"), ("assistant", "2 plus 2 is 4.")]
    records = [{"messages": [{"role": r, "content": c} for r, c in turns]}] * 4
    _, report = _report(make_recipe(data={"path": _data(tmp_path, records), "chat_template": str(template),
                                          "eval_split": None}, check={"ignore": ["template"]}))
    assert [name for name, _ in report.failures] == ["template"]
    figures = [report.truncated_loss_tokens, report.truncated_tokens, *report.answer_tokens.values(),
               *(v for stats in report.by_source.values() for v in stats.values() if not isinstance(v, str))]
    assert min(figures) >= 0 and report.loss_tokens > 0


def test_the_length_notice_counts_records_once_however_often_a_weight_repeats_them(make_recipe, capsys):
    notices = []
    for weight in (1, 3):  # 224 records; weight 3: 672 rows, the notice said "… of 672 records"
        path = make_recipe(data={"path": [{"path": str(SAMPLE), "weight": weight}], "eval_split": None})
        assert main([str(path), "training.max_length=18", "check.ignore=[truncated, no_loss]", "--check"]) == 0
        notices.append(re.search(r"notice: .*: (\d+ of \d+) records are longer", capsys.readouterr().out)[1])
    assert notices[0] == notices[1] and notices[0].endswith(" of 224")


def test_packing_cuts_are_noticed_and_eval_rows_left_without_a_label_are_not_evaluated(make_recipe, tmp_path,
                                                                                       capsys):
    # TRL's bfd packing cuts each record at max_length: the length notice skipped packing, and an eval row whose
    # answer the cut removes was kept (a source of such rows alone evaluated to a loss of 0.0)
    long = [{"input": LONG_QUESTION, "output": "4.", "source": "long"}] * 2
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_text("".join(json.dumps(r) + "\n" for r in SAMPLE_RECORDS[60:66] + long), encoding="utf-8")
    path = make_recipe(data={"path": _data(tmp_path, SAMPLE_RECORDS[:60] + long), "eval_split": None,
                             "eval_path": str(evaluation)}, training={"max_length": 64, "packing": True},
                       check={"ignore": ["no_loss", "truncated", "empty_source"]})
    assert main([str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "2 of 62 records are longer than training.max_length=64 tokens and are truncated" in out
    assert "2 of 8 records are longer than training.max_length=64 tokens and are truncated" in out
    assert "source 'long': 2 of 2 eval records lose their whole answer to training.max_length and are not " \
           "evaluated" in out
    recipe = load_recipe(path)
    tokenizer = load_tokenizer(recipe.model, recipe.data)
    prepared = prepare_datasets(recipe.training, tokenizer, *load_datasets(recipe.data))
    assert len(prepared.eval) == 6 and "long" not in prepared.eval["source"]
    assert len(prepared.train) == 62  # training packs them all, as TRL does


@pytest.mark.parametrize("training", [{"truncation_mode": "keep_end"}, {"completion_only_loss": False}])
def test_template_variables_reach_the_rows_where_trl_prepares_them(make_recipe, tmp_path, training):
    # where TRL prepares the data (keep_end, loss on every token), data.chat_template_kwargs were left out: Qwen3's
    # enable_thinking: false trained a prompt chat and the smoke check never render
    template = tmp_path / "marked.jinja"
    template.write_text("{% for m in messages %}<|{{ m.role }}|>{{ marker }}\n{{ m.content }}{{ eos_token }}\n"
                        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{{ marker }}\n{% endif %}",
                        encoding="utf-8")
    recipe = load_recipe(make_recipe(data={"chat_template": str(template), "chat_template_kwargs": {"marker": "@@"}},
                                     training=training))
    tokenizer = load_tokenizer(recipe.model, recipe.data)
    kwargs = {"marker": "@@"}
    prepared = prepare_datasets(recipe.training, tokenizer, *load_datasets(recipe.data), template_kwargs=kwargs)
    assert prepared.unsupported  # TRL prepares these
    trained = build_trainer(recipe, tokenizer, prepared).train_dataset
    assert all(tokenizer.decode(ids).count("@@") == 2 for ids in trained["input_ids"][:5])
    assert "@@" in preflight(recipe, tokenizer, prepared).example


def test_good_data_passes_and_the_report_adds_up(make_recipe):
    recipe, report = _report(make_recipe())
    assert report.failures == []
    assert sum(report.records_by_source.values()) == report.rows == 190
    assert sum(report.eval_records_by_source.values()) == report.eval_rows == 34
    assert report.records_by_source.keys() == {r["source"] for r in SAMPLE_RECORDS}
    assert report.rows_with_stop == report.rows and report.stop_tokens == ["</s>"]
    assert report.truncated_rows == report.truncated_tokens == 0
    assert 0 < report.loss_tokens < report.tokens
    assert report.loss_tokens == sum(s["loss_tokens"] for s in report.by_source.values())
    assert report.prompt_tokens["p50"] <= report.prompt_tokens["p90"] <= report.prompt_tokens["max"]
    assert 0 < report.padding_efficiency <= 1 and 0 < report.packing_efficiency <= 1
    # the example: the prompt is unmarked and the marked span is the answer and its EOS
    prompt, _, marked = report.example.partition(MARK[0])
    assert "<|user|>" in prompt and marked.endswith("</s>" + MARK[1]) and "<|user|>" not in marked
    text = report.text()
    assert "all checks passed" in text and "FAILED" not in text
    for source, n in report.records_by_source.items():
        assert any(line.split()[:2] == [source, str(n)] for line in text.splitlines())


def test_the_report_says_every_token_carries_loss_without_completion_only_loss(make_recipe):
    _, report = _report(make_recipe(training={"completion_only_loss": False}))
    assert report.loss_tokens == report.tokens and report.failures == []
    assert "(100.0%): every token (training.completion_only_loss: false)" in report.text()


def test_answer_tokens_of_conversations_count_the_answers_alone(make_recipe):
    from .conftest import ROOT

    recipe, report = _report(make_recipe(data={"path": str(ROOT / "data" / "chat.jsonl"), "eval_split": None}))
    rows = report_rows(prepare_datasets(recipe.training, load_tokenizer(recipe.model, recipe.data),
                                        load_datasets(recipe.data)[0]), None)
    answers = sorted(sum(label != -100 for label in row["labels"]) for row in rows)  # no row is truncated here
    assert report.truncated_rows == 0 and report.answer_tokens["max"] == answers[-1]
    assert max(len(r["input_ids"]) - r["prompt_length"] for r in rows) > answers[-1]  # what it counted before
    for source, stats in report.by_source.items():  # the table's answer column: p50/max of the answers alone
        mine = sorted(sum(label != -100 for label in r["labels"]) for r in rows if r["source"] == source)
        assert (stats["answer_p50"], stats["answer_max"]) == (int(np.percentile(mine, 50, method="nearest")), mine[-1])


def test_the_report_shows_the_mix_per_entry_and_per_source(make_recipe, tmp_path):
    first, second = _data(tmp_path, SAMPLE_RECORDS[:40]), str(tmp_path / "second.jsonl")
    (tmp_path / "second.jsonl").write_text("\n".join(json.dumps({"input": r["input"], "output": r["output"]})
                                                     for r in SAMPLE_RECORDS[40:60]) + "\n", encoding="utf-8")
    path = [first, {"path": second, "source": "extra", "weight": 1.5}]
    recipe, report = _report(make_recipe(data={"path": path, "eval_split": None}))
    rows = report_rows(prepare_datasets(recipe.training, load_tokenizer(recipe.model, recipe.data),
                                        load_datasets(recipe.data)[0]), None)
    assert {e: s["records"] for e, s in report.by_entry.items()} == {first: 40, second: 30}
    assert report.by_source["extra"]["rows"] == 30
    for table, column in ((report.by_entry, "entry"), (report.by_source, "source")):
        for name, s in table.items():  # tokens and loss tokens of the rows the trainer gets, and their share
            mine = [r for r in rows if r[column] == name]
            assert s["tokens"] == sum(len(r["input_ids"]) for r in mine)
            assert s["loss_tokens"] == sum(label != -100 for r in mine for label in r["labels"])
            assert s["loss_share"] == pytest.approx(s["loss_tokens"] / report.loss_tokens)
    text = report.text()
    assert any(line.split()[0].endswith("/second.jsonl") and line.split()[1] == "30" for line in text.splitlines())
    # a million records: counts of 100 M tokens and more keep their columns apart (they ran together)
    big = {"rows": 1_000_000, "prompt_p50": 102, "prompt_max": 578, "answer_p50": 92, "answer_max": 2190,
           "tokens": 247_245_205, "loss_tokens": 1_118_533_808, "loss_share": 1.0, "truncated": 849}
    entry = {"records": 12_345_678, "tokens": 9_876_543_210, "loss_tokens": 1_234_567_890, "loss_share": 0.5}
    wide = dataclasses.replace(report, by_source={"extra": big}, by_entry={first: entry, second: entry}).text()
    assert ["extra", "1000000", str(report.eval_records_by_source.get("extra", 0)), "102/578", "92/2190",
            "247,245,205", "1,118,533,808", "100.0%", "849"] in [line.split() for line in wide.splitlines()]
    assert [second[:16] + "…" + second[-17:], "12345678", "9,876,543,210", "1,234,567,890", "50.0%"] in [
        line.split() for line in wide.splitlines()]  # cut in the middle: the start and the file name stay
    # a source held out only (data.eval_path): in the table with its eval records, though never trained
    held_out = dataclasses.replace(report, eval_records_by_source={"extra": 3, "exam": 5}).text().splitlines()
    assert ["exam", "0", "5", "—", "—", "—", "—", "—", "—"] in [line.split() for line in held_out]


def test_source_names_stay_whole_and_aligned_in_any_script(make_recipe):
    from sft_lora.text import columns

    _, report = _report(make_recipe())
    stats = next(iter(report.by_source.values()))
    names = ["한국어", "wikipedia_ko_2023", "wikipedia_ko_2024", "x" * 40 + "_a", "y" * 40 + "_b",
             unicodedata.normalize("NFD", "나무위키")]  # decomposed Hangul: 2 columns a syllable, as composed
    lines = dataclasses.replace(report, by_source=dict.fromkeys(names, stats)).text().splitlines()
    table = lines[1:2 + len(names)]
    assert len({columns(line) for line in table}) == 1  # every row as wide as the header: the columns line up
    cells = [line.split()[0] for line in table[1:]]  # names were cut to 15 characters: 'wikipedia_ko_2…' twice
    assert cells[:3] == names[:3] and len(set(cells)) == len(names) and columns(cells[3]) == 34
    assert columns("한국어") == 6 and columns(names[-1]) == 8
    # names a middle cut would show alike are shown whole
    alike = ["wikipedia_ko_2023_dump_articles_v2_train", "wikipedia_ko_2024_dump_articles_v2_train"]
    lines = dataclasses.replace(report, by_source=dict.fromkeys(alike, stats)).text().splitlines()
    assert [line.split()[0] for line in lines[2:4]] == alike


def test_eval_records_truncation_leaves_without_an_answer_are_said_not_evaluated(make_recipe, tmp_path):
    held_out = [{"input": LONG_QUESTION, "output": "4.", "source": "longsrc"}] * 3 + SAMPLE_RECORDS[:4]
    eval_path = tmp_path / "held_out.jsonl"
    eval_path.write_text("".join(json.dumps(r) + "\n" for r in held_out), encoding="utf-8")
    data = {"path": _data(tmp_path, SAMPLE_RECORDS[:60]), "eval_split": None, "eval_path": str(eval_path)}
    _, report = _report(make_recipe(data=data, training={"max_length": 64}))
    assert report.eval_records_by_source["longsrc"] == 3 and "longsrc" not in report.evaluated_by_source
    assert ("source 'longsrc': 3 of 3 eval records lose their whole answer to training.max_length and are not "
            "evaluated, so it gets no eval loss of its own") in report.warnings


def test_the_padding_line_follows_what_the_trainer_feeds(make_recipe):
    # True is the library default (None: unset); keep_end truncation is left to TRL's own preparation, which pads (a
    # padding_free: true the recipe sets there is refused at load: test_config)
    for padding_free, truncation in ((True, "keep_start"), (False, "keep_start"), (None, "keep_end")):
        recipe, report = _report(make_recipe(data={"eval_split": 0}, training={
            "padding_free": padding_free, "truncation_mode": truncation}))
        batch = next(iter(build_trainer(recipe, load_tokenizer(recipe.model, recipe.data),
                                        load_datasets(recipe.data)[0]).get_train_dataloader()))
        if padding_free:
            assert report.packing.startswith("off: padding-free batches of 4 (one row each, no padding)")
            assert report.padding_efficiency == 1.0 and batch["input_ids"].shape[0] == 1
        else:
            assert report.packing.startswith("off: padded batches of 4 are ")
            assert report.padding_efficiency < 1.0 and int(batch["attention_mask"].sum()) < batch["input_ids"].numel()


def test_a_record_with_no_loss_carrying_token_fails(make_recipe, tmp_path):
    records = SAMPLE_RECORDS[:30] + [{"input": LONG_QUESTION, "output": "4.", "source": "arith_en"}] + SAMPLE_RECORDS[
        30:60]
    path = _data(tmp_path, records)
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    Path(path).write_text("\n".join([*lines[:10], "", *lines[10:]]) + "\n", encoding="utf-8")  # a blank line
    data = {"path": path, "eval_split": 0.1}  # shuffled: the failure names the record by its file line, not its row
    _, report = _report(make_recipe(data=data, training={"max_length": 64}))
    assert [name for name, _ in report.failures] == ["no_loss"]
    assert report.no_loss_rows == 1
    assert "1 of" in report.failures[0][1] and "prompt fills training.max_length" in report.failures[0][1]
    assert f"(first: {path}:32, source 'arith_en', question '{LONG_QUESTION[:20]}" in report.failures[0][1]
    Path(path).with_suffix(".json").write_text(json.dumps(records), encoding="utf-8")  # a .json: its record number
    _, report = _report(make_recipe(data={**data, "path": str(Path(path).with_suffix(".json"))},
                                    training={"max_length": 64}))
    assert f"(first: {Path(path).with_suffix('.json')}: record 31, source 'arith_en'" in report.failures[0][1]
    with pytest.raises(RecipeError, match=r"pre-flight check failed \[no_loss\].*check.ignore=\[no_loss\]"):
        report.enforce()


def test_an_end_of_turn_token_never_trained_fails_unless_ignored(make_recipe, tmp_path):
    template = tmp_path / "no_eos.jinja"
    template.write_text(NO_EOS_TEMPLATE, encoding="utf-8")
    recipe, report = _report(make_recipe(data={"chat_template": str(template)}))
    assert [name for name, _ in report.failures] == ["eos"]
    assert report.rows_with_stop == 0 and report.loss_tokens > 0
    with pytest.raises(RecipeError, match=r"\[eos\]: the end-of-turn token \(</s>\) carries loss in no"):
        report.enforce(recipe.check.ignore)
    report.enforce(["eos"])  # overridden: a warning, not a failure
    assert "IGNORED [eos]" in report.text(["eos"])


def test_conversations_whose_template_trains_no_end_of_turn_fail_as_such_not_as_truncation(make_recipe, tmp_path):
    """Marked answers ({% generation %}) without the EOS after them: one-turn rows (labelled by prefix) trained it,
    conversations (labelled by the markers) did not, and the report said they lost it "to truncation"."""
    template = tmp_path / "marked.jinja"
    template.write_text("{% for m in messages %}<|{{ m['role'] }}|>\n{% if m['role'] == 'assistant' %}{% generation %}"
                        "{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{{ eos_token }}"
                        "\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}", encoding="utf-8")
    chats = [json.loads(line) for line in (SAMPLE.parent / "chat.jsonl").read_text(encoding="utf-8").splitlines()]
    path = _data(tmp_path, SAMPLE_RECORDS[:40] + chats[:10])
    _, report = _report(make_recipe(data={"path": path, "chat_template": str(template), "eval_split": None}))
    assert [name for name, _ in report.failures] == ["eos"] and report.truncated_rows == 0
    assert "(</s>) carries loss in no turn of 10 of 50 training rows that nothing cuts (first: " in (
        report.failures[0][1])
    assert not any("truncation" in warning for warning in report.warnings), report.warnings
    # a row whose answer renders as nothing is [no_loss]'s alone (TRL drops it), not [eos]'s too: ignored, it passes
    template.write_text("{%- for m in messages %}{%- if not loop.first %}{{ '\\n' }}{% endif %}{%- if m['role'] == "
                        "'assistant' and 'Oslo' in m['content'] %}{{ '<|assistant|>\\n' }}{%- else %}{{ '<|' + "
                        "m['role'] + '|>\\n' + m['content'] + eos_token }}{%- endif %}{%- endfor %}{%- if "
                        "add_generation_prompt %}{{ '\\n<|assistant|>\\n' }}{% endif %}", encoding="utf-8")
    oslo = [r for r in SAMPLE_RECORDS if "Oslo" in r["output"]][:1]
    _, report = _report(make_recipe(data={"path": _data(tmp_path, SAMPLE_RECORDS[:40] + oslo), "eval_split": None,
                                          "chat_template": str(template)}))
    assert [name for name, _ in report.failures] == ["no_loss"]


def test_too_many_truncated_rows_fail_at_the_configured_share(make_recipe):
    recipe, report = _report(make_recipe(training={"max_length": 18}))
    share = report.truncated_rows / report.rows
    assert 0.05 < share < 1 and report.truncated_tokens >= report.truncated_rows
    assert report.truncated_loss_tokens == report.truncated_tokens  # keep_start cuts the answers' ends
    assert [name for name, _ in report.failures] == ["truncated"]
    assert any("lose their end-of-turn token" in w for w in report.warnings)
    # the threshold is the recipe's: above the measured share, the same data passes
    relaxed_share = {"max_truncated_share": round(share, 2) + 0.01}
    _, relaxed = _report(make_recipe(training={"max_length": 18}, check=relaxed_share))
    assert relaxed.failures == []


def test_an_empty_source_fails(make_recipe, tmp_path):
    # a source whose every record is too long to train on, with the per-record check switched off ...
    records = SAMPLE_RECORDS[:60] + [{"input": LONG_QUESTION, "output": "4.", "source": "long"}] * 2
    data = {"path": _data(tmp_path, records), "eval_split": None}
    _, report = _report(make_recipe(data=data, training={"max_length": 64}, check={"ignore": ["no_loss"]}))
    assert ("empty_source", "source 'long' has 2 records but none carries loss; check the data or check.sources") \
        in report.failures
    # ... and a source the recipe expects that the data does not hold
    _, report = _report(make_recipe(check={"sources": ["arith_en", "capital_fr"]}))
    assert report.failures == [("empty_source", "source 'capital_fr' has no training record; check the data or "
                                "check.sources")]
    # one held out only: said, not "no record" beside a table row counting its eval records
    eval_only = tmp_path / "eval.jsonl"
    eval_only.write_text(json.dumps({"input": "Bonjour?", "output": "Bonjour.", "source": "fr"}) + "\n")
    _, report = _report(make_recipe(data={"eval_split": 0, "eval_path": str(eval_only)}, check={"sources": ["fr"]}))
    assert report.failures == [("empty_source", "source 'fr' has no training record (1 eval records); check the "
                                "data or check.sources")]


def test_check_flag_prints_the_report_and_fails_with_one_line(make_recipe, tmp_path, capsys):
    assert main([str(make_recipe()), "--check"]) == 0
    out = capsys.readouterr().out
    assert "pre-flight data report (190 training rows" in out and "all checks passed" in out
    template = tmp_path / "no_eos.jinja"
    template.write_text(NO_EOS_TEMPLATE, encoding="utf-8")
    path = make_recipe(data={"chat_template": str(template)})
    assert main([str(path), "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # progress bars, then the one error line
    assert [line for line in err if "error" in line] == err[-1:]
    assert err[-1].startswith("error: pre-flight check failed [eos]")
    # a training run stops at the same check, before any model is loaded or checkpoint written
    assert main([str(path)]) == 2
    assert "pre-flight check failed [eos]" in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()
    assert main([str(path), "check.ignore=[eos]", "--check"]) == 0
    assert main([str(path), "check.ignore=[eso]", "--check"]) == 2
    assert "unknown check 'eso'" in capsys.readouterr().err
    # a LoRA target the model lacks, as a run refuses it, blamed where it was set (the recipe file before)
    assert main([str(make_recipe()), "lora.target_modules=[nonexistent]", "--check"]) == 2
    assert "error: command line: lora.target_modules: 'nonexistent' matches no module of " in capsys.readouterr().err
    # the length notice and error come as in a run (--check passed where the run then stopped before)
    assert main([str(make_recipe()), "training.max_length=8", "check.ignore=[truncated]", "--check"]) == 2
    assert "records are longer than training.max_length=8 tokens (longest" in capsys.readouterr().err
    assert main([str(make_recipe()), "training.max_length=18", "check.ignore=[truncated, no_loss]", "--check"]) == 0
    assert re.search(r"notice: .*: \d+ of 190 records are longer than training.max_length=18", capsys.readouterr().out)
    # several failed: the fix names them all (the first alone before: following it failed on the next), beside
    # what check.ignore already held
    assert main([str(make_recipe()), "training.max_length=18", "check.sources=[capital_fr]", "check.ignore=[eos]",
                 "--check"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "(+1 more failed check(s) above); to train anyway set check.ignore=[eos, truncated, empty_source]")



def test_control_characters_of_the_data_reach_the_terminal_escaped(make_recipe, tmp_path):
    """A source or answer holding ESC, a carriage return, a tab, a newline or `|` was printed raw: the terminal
    obeyed it (red text, a line overwritten) and the table lost its alignment."""
    from sft_lora.text import columns

    hostile = ["\x1b[31mRED\x1b[0m", "line1\nline2", "cr\rover", "tab\there", "pipe|name"]
    records = [*SAMPLE_RECORDS[:40], *({"input": "q", "output": "a", "source": s} for s in hostile),
               {"input": "q?", "output": "a long answer \x1b[2J with \r a carriage return " * 3, "source": hostile[1]}]
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_text(json.dumps(SAMPLE_RECORDS[0]) + "\n", encoding="utf-8")
    recipe = make_recipe(data={"path": _data(tmp_path, records), "eval_split": 0, "eval_path": str(evaluation)})
    text = _report(recipe)[1].text()
    assert all(c.isprintable() for line in text.split("\n") for c in line), repr(text)
    lines = text.split("\n")
    table = lines[1:lines.index(next(line for line in lines if line.startswith("  prompt tokens")))]
    assert len(table) == 1 + len({*hostile, *(r.get("source", "default") for r in SAMPLE_RECORDS[:40])})
    assert len({columns(line) for line in table}) == 1  # aligned: every row as wide as the header
    assert "  \\x1b[31mRED\\x1b[0m " in text and "  cr over " in text and "  tab here " in text
    assert "  example         (source line1 line2; " in text and "\\x1b[2J with \\r a carriage" in text
    assert "  warning: source 'line1\\nline2' has no eval record" in text  # a warning names it escaped


def test_the_length_notice_and_the_eval_rows_are_those_trained_and_evaluated(make_recipe, tmp_path, capsys):
    from datasets import Dataset, DatasetDict

    # eval_packing without packing: TRL packs (so cuts) eval rows only in its own preparation, which sft_lora skips
    # then; the eval rows were prepared uncut (past max_length) and evaluated so, the eval loss on other tokens
    held_out = [{"input": "What is 2 plus 2?", "output": LONG_QUESTION, "source": "long"}, *SAMPLE_RECORDS[:4]]
    data = {"path": _data(tmp_path, SAMPLE_RECORDS[:40]), "eval_split": None,
            "eval_path": str(tmp_path / "held_out.jsonl")}
    Path(data["eval_path"]).write_text("".join(json.dumps(r) + "\n" for r in held_out), encoding="utf-8")
    evals = []
    for eval_packing in (False, True):
        recipe = load_recipe(make_recipe(data=data, training={"max_length": 64, "eval_packing": eval_packing}))
        tokenizer = load_tokenizer(recipe.model, recipe.data)
        evals.append(prepare_datasets(recipe.training, tokenizer, *load_datasets(recipe.data)).eval["input_ids"])
    assert evals[1] == evals[0] and max(map(len, evals[1])) == 64
    # completion_only_loss: false trains a row cut inside its prompt (every kept token carries loss): the notice said
    # such rows "lose their whole answer and are dropped"
    long = [{"input": LONG_QUESTION, "output": "4.", "source": "long"}] * 3
    path = make_recipe(data={"path": _data(tmp_path, SAMPLE_RECORDS[:20] + long), "eval_split": None},
                       training={"max_length": 64, "completion_only_loss": False}, check={"ignore": ["truncated"]})
    assert main([str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "3 of 23 records are longer than training.max_length=64 tokens and are truncated" in out
    assert "dropped" not in out
    # two splits of one saved dataset are two entries: they were counted as one ("all 6 records are longer", exit 2)
    short = SAMPLE_RECORDS[:6]
    DatasetDict({"train": Dataset.from_list([{**r, "input": LONG_QUESTION} for r in short]),
                 "extra": Dataset.from_list(short)}).save_to_disk(tmp_path / "dd")
    path = make_recipe(data={"path": [{"path": str(tmp_path / "dd"), "split": s} for s in ("train", "extra")],
                             "eval_split": None}, training={"max_length": 64})
    assert main([str(path), "--check", "check.ignore=[truncated, no_loss]"]) == 0
    out = capsys.readouterr().out
    dd = tmp_path / "dd"
    assert f"notice: {dd}[train] + {dd}[extra]: 6 of 12 records are longer than training.max_length=64 tokens" in out
    assert "dd[train]          6" in out and "dd[extra]          6" in out  # the report's mix per entry


def test_a_special_tokens_text_in_a_message_fails_naming_the_record(make_recipe, tmp_path, capsys):
    """`</s>` written in an answer (an HTML strike-through) was tokenized as the EOS token, with a label, in the middle
    of the answer: the model learnt to stop there, and every check passed."""
    records = [*SAMPLE_RECORDS[:20], {"input": "How do I strike text through in HTML?", "source": "html",
                                      "output": "Wrap it in <s>old</s> and the browser draws a line through it."},
               *SAMPLE_RECORDS[20:40], {"input": "Which token ends a turn?", "output": "It is </s>.", "source": "x"}]
    path = _data(tmp_path, records)
    recipe = make_recipe(data={"path": path, "eval_split": 0})
    assert main([str(recipe), "--check"]) == 2
    assert (f"error: pre-flight check failed [special_text]: 2 of 42 training records hold a special token's text "
            f"(first: {path}:21, source 'html', question 'How do I strike text through in HTML?', in its assistant "
            "turn: '<s>'), which is tokenized as the token itself") in capsys.readouterr().err
    assert main([str(recipe), "--check", "check.ignore=[special_text]"]) == 0
    assert "IGNORED [special_text]" in capsys.readouterr().out
    # training.eos_token naming an added token that is not flagged special: in an answer it ends the turn as well
    from transformers import AutoTokenizer

    model = Path(make_recipe()).parent / "model-end"
    tokenizer = AutoTokenizer.from_pretrained(load_recipe(recipe).model.name_or_path)
    tokenizer.add_tokens(["<|end|>"])  # special=False
    tokenizer.save_pretrained(model)
    records = [*SAMPLE_RECORDS[:20], {"input": "How does a turn end?", "output": "With <|end|>.", "source": "x"}]
    path = _data(tmp_path, records)
    assert main([str(make_recipe(model={"name_or_path": str(model)}, data={"path": path, "eval_split": 0},
                                 training={"eos_token": "<|end|>"})), "--check"]) == 2
    assert (f"[special_text]: 1 of 21 training records hold a special token's text (first: {path}:21, source 'x', "
            "question 'How does a turn end?', in its assistant turn: '<|end|>')") in capsys.readouterr().err


def test_eval_rows_that_dataloader_drop_last_skips_are_said_as_trainer_skips_them(make_recipe):
    """training.dataloader_drop_last drops the last partial batch of every eval set too: the eval loss read fewer rows
    and a source smaller than a batch lost its eval loss, without a word."""
    recipe, report = _report(make_recipe(training={"dataloader_drop_last": True, "per_device_eval_batch_size": 8}))
    tokenizer = load_tokenizer(recipe.model, recipe.data)
    trainer = build_trainer(recipe, tokenizer, *load_datasets(recipe.data, seed=recipe.training.seed))
    read = {key: len(trainer.get_eval_dataloader(key)) * 8 for key in trainer.eval_dataset}  # batches Trainer runs
    sizes = {key: len(rows) for key, rows in trainer.eval_dataset.items()}
    assert any(read[key] < sizes[key] for key in sizes) and read["eval"] < sizes["eval"]
    lost = [f"'{key.removeprefix('eval/')}' {read[key]} of {sizes[key]}" for key in sizes if read[key] < sizes[key]
            and key != "eval"]
    assert (f"warning: training.dataloader_drop_last drops the last partial eval batch too (of 8 rows): the eval loss "
            f"reads {read['eval']} of {sizes['eval']} rows; per source {', '.join(lost)} (0: no eval loss of its own)"
            in report.text())
    _, report = _report(make_recipe(training={"per_device_eval_batch_size": 8}))
    assert "dataloader_drop_last" not in report.text()
