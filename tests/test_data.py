"""Records from every supported form become the same prompt/completion examples (bad ones: test_bad_input.py)."""

from __future__ import annotations

import json
import re

import pytest

from sft_lora.config import DataArgs, RecipeError, load_recipe
from sft_lora.data import load_datasets

from .conftest import SAMPLE, write_recipe

RECORDS = [
    {"input": "What is 2 plus 2?", "output": "2 plus 2 is 4.", "source": "arith_en"},
    {"input": "한국의 수도는 어디인가요?", "output": "한국의 수도는 서울입니다.", "source": "capital_ko"},
    {"input": "Translate to Korean: cat", "output": "고양이"},
    {"input": "What is 5 plus 1?", "output": "5 plus 1 is 6.", "source": "arith_en"},
]


def _write(tmp_path, form: str):
    if form == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in RECORDS) + "\n", encoding="utf-8")
    elif form == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
    elif form in ("jsonl.gz", "json.gz"):
        import gzip

        path = tmp_path / f"d.{form}"
        text = "\n".join(json.dumps(r) for r in RECORDS) if form == "jsonl.gz" else json.dumps(RECORDS)
        path.write_bytes(gzip.compress(text.encode()))
    else:
        from datasets import Dataset

        dataset = Dataset.from_list([{**r, "source": r.get("source")} for r in RECORDS])
        path = tmp_path / ("saved" if form == "save_to_disk" else f"d.{form}")
        {"save_to_disk": lambda: dataset.save_to_disk(str(path)), "parquet": lambda: dataset.to_parquet(str(path)),
         "csv": lambda: dataset.to_csv(str(path), index=False), "arrow": lambda: _write_arrow(dataset, path)}[form]()
    return path


def _write_arrow(dataset, path) -> None:
    import pyarrow as pa

    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, dataset.data.table.schema) as writer:
        writer.write_table(dataset.data.table)


@pytest.mark.parametrize("form", ["jsonl", "json", "save_to_disk", "jsonl.gz", "json.gz", "parquet", "csv", "arrow"])
def test_every_form_gives_the_same_chat_examples(tmp_path, form):
    args = DataArgs(path=str(_write(tmp_path, form)), system_prompt="Be brief.")
    train, evaluation = load_datasets(args)
    assert evaluation is None and len(train) == len(RECORDS)
    assert train[1]["prompt"] == [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "한국의 수도는 어디인가요?"}]
    assert train[1]["completion"] == [{"role": "assistant", "content": "한국의 수도는 서울입니다."}]
    assert train["source"] == ["arith_en", "capital_ko", "default", "arith_en"]


def test_alpaca_records_ask_the_instruction_then_its_input_and_an_empty_system_turn_is_none(tmp_path):
    """{instruction, input, output} trained on `input` alone (the instruction dropped, silently) or stopped on an empty
    input; an empty system turn, common in exports, stopped the run."""
    path = tmp_path / "d.jsonl"
    records = [{"instruction": "Translate into French.", "input": "I have 5 cats.", "output": "J'ai 5 chats."},
               {"instruction": "Name a colour.", "input": "", "output": "Red."},
               {"instruction": "Name a fruit.", "output": "Apple."},
               {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "Hi?"},
                             {"role": "assistant", "content": "Hi."}]}]
    path.write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    train, _ = load_datasets(DataArgs(path=str(path), system_prompt="Be brief."))
    assert [p[-1]["content"] for p in train["prompt"]] == [
        "Translate into French.\nI have 5 cats.", "Name a colour.", "Name a fruit.", "Hi?"]
    assert train["prompt"][3][0] == {"role": "system", "content": "Be brief."}  # as if the record had none
    path.write_text(json.dumps({"messages": [{"role": "system", "content": ""}]}))  # an IndexError in the first try
    with pytest.raises(RecipeError, match=re.escape(f"{path}:1: messages: no assistant turn; there is nothing to")):
        load_datasets(DataArgs(path=str(path)))
    path.write_text(json.dumps({"instruction": "And?", "input": "", "output": "Yes.", "history": [["Hi?", "Hi."]]}))
    with pytest.raises(RecipeError, match=re.escape(f"{path}:1: 'history' (earlier turns) is not read; write the "
                                                    "record as a conversation ('messages') instead")):
        load_datasets(DataArgs(path=str(path)))


def test_csv_cells_are_text_as_written_and_a_saved_format_is_read_as_python(tmp_path):
    """pandas typed CSV cells (4, 7.0 for "007", null for "NA"), refused as not text or dropped; a dataset saved with
    a format (pandas, numpy, arrow) was read in that format (a TypeError)."""
    from datasets import Dataset

    (path := tmp_path / "d.csv").write_text('input,output,source\nWhat is 2+2?,4,NA\nBond?,007,\n', encoding="utf-8")
    train, _ = load_datasets(DataArgs(path=str(path)))
    assert [c[0]["content"] for c in train["completion"]] == ["4", "007"] and train["source"] == ["NA", "default"]
    for kind in ("pandas", "numpy", "arrow"):
        Dataset.from_list(RECORDS).with_format(kind).save_to_disk(str(saved := tmp_path / kind))
        assert load_datasets(DataArgs(path=str(saved)))[0]["prompt"][1][-1]["content"] == RECORDS[1]["input"]


def test_data_files_that_cannot_be_read_and_splits_that_select_nothing_are_one_line(tmp_path, tiny_model):
    import gzip
    import os

    from datasets import Dataset, DatasetDict

    path = tmp_path / "d.jsonl.gz"  # gzipped lines keep their numbers; a file cut short is said as such
    path.write_bytes(gzip.compress(b'{"input": "a", "output": "b"}\n{"input": "a"}\n'))
    with pytest.raises(RecipeError, match=re.escape(f"{path}:2: missing 'output'")):
        load_datasets(DataArgs(path=str(path)))
    path.write_bytes(gzip.compress(b'{"input": "a", "output": "b"}\n' * 100)[:-20])
    with pytest.raises(RecipeError, match=re.escape(f"{path}: cannot read the data file (") + ".*fix or replace"):
        load_datasets(DataArgs(path=str(path)))
    os.mkfifo(fifo := tmp_path / "piped.jsonl")  # `<(zcat d.jsonl.gz)`: was asked of the hub, after 5 retries
    with pytest.raises(RecipeError, match=re.escape(f"{fifo}: not a regular file; save the data to a file")):
        load_datasets(DataArgs(path=str(fifo)))
    # a split of one saved Dataset was ignored: the eval "split" read every training record
    Dataset.from_list(RECORDS[:2]).save_to_disk(str(saved := tmp_path / "saved"))
    with pytest.raises(RecipeError, match=re.escape(f"{saved}: a saved Dataset, not a DatasetDict, has no split")):
        load_datasets(DataArgs(path=str(saved), eval_path=[{"path": str(saved), "split": "test"}]))
    DatasetDict(train=Dataset.from_list(RECORDS)).save_to_disk(str(both := tmp_path / "dd"))
    for eval_path in ([{"path": str(saved), "split": "test"}], str(both / "train")):  # dd/train is dd's train split
        path = write_recipe(tmp_path, tiny_model, data={"path": str(saved if "split" in str(eval_path) else both),
                                                         "eval_split": None, "eval_path": eval_path})
        with pytest.raises(RecipeError, match="is training data too"):
            load_recipe(path)


def test_field_names_are_configurable_and_eval_comes_from_a_fraction_or_a_file(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"question {i}", "a": f"answer {i}"}) for i in range(20)))
    train, evaluation = load_datasets(DataArgs(path=str(path), input_field="q", output_field="a", eval_split=0.25))
    assert (len(train), len(evaluation)) == (15, 5)
    assert not set(train["completion"][i][0]["content"] for i in range(15)) & set(
        evaluation["completion"][i][0]["content"] for i in range(5))
    train, evaluation = load_datasets(DataArgs(path=str(path), input_field="q", output_field="a",
                                               eval_path=str(path)))
    assert (len(train), len(evaluation)) == (20, 20)


@pytest.mark.parametrize("form", ["jsonl", "json"])
def test_an_unreadable_data_file_is_one_line_naming_it_and_its_key(tmp_path, monkeypatch, form):
    import pathlib

    path, opened = _write(tmp_path, form), pathlib.Path.open

    def refuse(self, *args, **kwargs):  # as chmod 000 does to anyone but root (the tests may run as root)
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return opened(self, *args, **kwargs)

    (tmp_path / "train").mkdir()
    readable = _write(tmp_path / "train", "json")
    monkeypatch.setattr(pathlib.Path, "open", refuse)
    with pytest.raises(RecipeError) as refused:
        load_datasets(DataArgs(path=str(readable), eval_path=str(path)))
    assert str(refused.value) == f"{path}: cannot read the data file (Permission denied); check data.eval_path"


def test_a_jsonl_file_is_read_in_chunks_with_the_same_result(tmp_path, monkeypatch, capsys):
    import sft_lora.data

    path = tmp_path / "d.jsonl"
    records = [{"input": f"question {i}", "output": f"answer {i}"} for i in range(10)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    whole = load_datasets(DataArgs(path=str(path)))[0]
    monkeypatch.setattr(sft_lora.data, "CHUNK", 3)  # 4 chunks
    chunked, again = (load_datasets(DataArgs(path=str(path)))[0] for _ in range(2))
    assert chunked.to_list() == whole.to_list()
    assert chunked._fingerprint == again._fingerprint  # the prepared-data cache key is stable
    assert "Reading" not in capsys.readouterr().err  # a quick read shows no progress bar …
    monkeypatch.setattr(sft_lora.data, "READ_BAR_DELAY", 0)
    load_datasets(DataArgs(path=str(path)))
    assert re.search(r"Reading \S*d\.jsonl: .*\b10 records", capsys.readouterr().err)  # … a long one counts records
    records[7] = {"input": "no answer"}
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    with pytest.raises(RecipeError, match="d.jsonl:8: missing 'output'"):  # numbered across chunks
        load_datasets(DataArgs(path=str(path)))
    skipped = load_datasets(DataArgs(path=str(path), on_bad_record="skip"))[0]  # skipped and counted across chunks
    assert len(skipped) == 9 and "no answer" not in {p[0]["content"] for p in skipped["prompt"]}
    path.write_text("\n".join(json.dumps({"input": "a"}) for _ in range(10)) + "\n", encoding="utf-8")
    with pytest.raises(RecipeError, match="d.jsonl: all 10 records are bad"):
        load_datasets(DataArgs(path=str(path), on_bad_record="skip"))


def _numbered(path, n: int, **extra):
    path.write_text("\n".join(json.dumps({"input": f"q{i}", "output": f"{path.stem}{i}", **extra})
                              for i in range(n)) + "\n", encoding="utf-8")
    return str(path)


def test_several_files_are_weighted_by_seed_and_split_per_entry(tmp_path):
    a, b = _numbered(tmp_path / "a.jsonl", 20), _numbered(tmp_path / "b.jsonl", 10, source="own")
    mix = [a, {"path": b, "source": "bee", "weight": 0.5}, {"path": a, "source": "again", "weight": 2.5}]
    train = load_datasets(DataArgs(path=mix), seed=1)[0]
    assert len(train) == 20 + 5 + 50  # weight 0.5 = half the records, 2.5 = each twice plus half once more
    assert train["source"].count("default") == 20 and train["source"].count("again") == 50
    assert train["source"].count("own") == 5  # a record's own source wins over the entry's
    assert train["entry"].count(b) == 5 and train["entry"].count(a) == 70
    halves = [sorted(load_datasets(DataArgs(path=mix), seed=s)[0]["completion"][20:25], key=str) for s in (1, 1, 2)]
    assert halves[0] == halves[1] != halves[2]  # deterministic by seed
    again = [c[0]["content"] for c in train["completion"][25:]]
    assert sorted(again[:40]) == sorted(2 * [f"a{i}" for i in range(20)]) and len(set(again[40:])) == 10
    train, evaluation = load_datasets(DataArgs(path=mix, eval_split=0.2), seed=1)
    assert len(evaluation) == 4 + 2 + 4  # each entry holds out its own 20 %, before weighting
    assert (evaluation["entry"].count(a), evaluation["entry"].count(b)) == (8, 2)
    assert len(train) == 16 + 4 + 40
    assert not {c[0]["content"] for c in evaluation["completion"][:4]} & {c[0]["content"] for c in
                                                                          train["completion"][:16]}
    # half a record held out is one record, as datasets splits it (0.05 of 10 was refused as "no eval record"
    # while 0.06 held out the same one); under half is refused
    assert [len(d) for d in load_datasets(DataArgs(path=b, eval_split=0.05))] == [9, 1]
    with pytest.raises(RecipeError, match=f"^{re.escape(b)}: data.eval_split=0.04 leaves no eval record of 10"):
        load_datasets(DataArgs(path=b, eval_split=0.04))
    train, evaluation = load_datasets(DataArgs(path=a, eval_path=[b, {"path": a, "weight": 0.25}]))
    assert (len(train), len(evaluation)) == (20, 15)
    # YAML 1.1 reads 1e1 as a string; a weight that would make more rows than memory holds (a 142 GiB numpy
    # allocation traceback before) is refused in one line
    assert len(load_datasets(DataArgs(path=[{"path": a, "weight": "1e1"}]))[0]) == 200
    with pytest.raises(RecipeError, match=f"^{re.escape(a)}: weight 1e\\+07 makes 200,000,000 rows of its 20 records"):
        load_datasets(DataArgs(path=[{"path": a, "weight": 1e7}]))


@pytest.mark.parametrize("value, message", [
    ([], "data.path is required"),
    (["a.jsonl", {"file": "b.jsonl"}], "data.path[1]: unknown key 'file' (path, source, weight, split)"),
    ([{"path": "a.jsonl", "weight": 0}], "data.path[0].weight must be a number > 0"),
    ([{"path": "a.jsonl", "weight": "nan"}], "data.path[0].weight must be a number > 0"),  # a traceback later before
    ([{"path": "a.jsonl", "source": 3}], "data.path[0].source must be a string"),
    ([3], "data.path[0]: an entry is a path or a mapping"),
    (["a.jsonl", {"path": "b.jsonl", "weight": float("inf")}], "data.path[1].weight must be a finite number, got inf"),
])
def test_a_malformed_data_entry_is_one_line_naming_it(tmp_path, value, message):
    from sft_lora.config import load_recipe

    from .conftest import write_recipe

    path = write_recipe(tmp_path, tmp_path / "model", data={"path": value, "eval_split": None})
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("  path:"))
    with pytest.raises(RecipeError, match=f"^{path}:{line}: {re.escape(message)}"):
        load_recipe(path)


def test_an_input_field_that_is_the_output_field_is_refused_where_it_was_set(tmp_path):
    """Accepted before: every answer was its question, and the model learnt to repeat it."""
    path = write_recipe(tmp_path, tmp_path / "model", data={"output_field": "input"})
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "output_field:" in text)
    message = "data.input_field and data.output_field are both '{}'; name two different fields"
    with pytest.raises(RecipeError, match=f"^{re.escape(str(path))}:{line}: {re.escape(message.format('input'))}$"):
        load_recipe(path)
    for in_file, override in (("input_field", "data.output_field=q"), ("output_field", "data.input_field=q")):
        path = write_recipe(tmp_path, tmp_path / "model", data={in_file: "q"})  # the override makes the clash
        with pytest.raises(RecipeError, match=f"^command line: {re.escape(message.format('q'))}$"):
            load_recipe(path, [override])


def test_a_non_finite_number_names_its_entry_and_the_line_of_its_key(tmp_path):
    """`data.path=[{path: x, weight: .inf}]` blamed data.path, not the entry's weight; a nested one in the file was
    blamed on the section's line."""
    path = write_recipe(tmp_path, tmp_path / "model")
    with pytest.raises(RecipeError, match=r"^command line: data.path\[1\].weight must be a finite number, got nan$"):
        load_recipe(path, ["data.path=[a.jsonl, {path: b.jsonl, weight: .nan}]"])
    path = write_recipe(tmp_path, tmp_path / "model", training={"lr_scheduler_kwargs": {"min_lr": float("inf")}})
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "lr_scheduler_kwargs:" in text)
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(path))}:{line}: training.lr_scheduler_kwargs.min_lr must"):
        load_recipe(path)  # the file's line of the key that holds it, not the section's


CHAT = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4."}]


def test_conversations_mix_with_single_turn_records_and_their_own_system_turn_wins(tmp_path):
    path = tmp_path / "mixed.jsonl"
    records = [{"messages": [{"role": "system", "content": "Own."}, *CHAT], "source": "chat"},
               {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]},
               {"input": "Q?", "output": "A."}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    train = load_datasets(DataArgs(path=str(path), system_prompt="Default."))[0]
    assert train[0]["prompt"] == [{"role": "system", "content": "Own."}, CHAT[0]]
    assert train[0]["completion"] == CHAT[1:] and train["source"] == ["chat", "default", "default"]
    assert train[1]["prompt"] == [{"role": "system", "content": "Default."}, CHAT[0]]
    assert train[1]["completion"] == [CHAT[1]] and train[2]["completion"] == [{"role": "assistant", "content": "A."}]
    last = load_datasets(DataArgs(path=str(path), mask_history=True, fold_system_prompt=True))[0]
    assert last[0]["prompt"] == [{"role": "user", "content": "Own.\n\nHi?"}, *CHAT[1:3]]  # folded, history as context
    assert last[0]["completion"] == [CHAT[3]]


def test_missing_or_empty_data_says_where_it_looked_and_what_is_wrong(tmp_path, monkeypatch):
    from sft_lora.config import load_recipe

    from .conftest import write_recipe

    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError, match=f"^qa.jsonl: data file not found \\(relative to the working directory, "
                       f"{re.escape(str(tmp_path))}\\); check data.path$"):
        load_datasets(DataArgs(path="qa.jsonl"))
    (tmp_path / "empty.json").write_bytes(b"")  # 0 bytes: as an empty .jsonl, not "not valid JSON (Expecting value)"
    with pytest.raises(RecipeError, match="^empty.json: no records; the data file is empty$"):
        load_datasets(DataArgs(path="empty.json"))
    path = write_recipe(tmp_path, tmp_path / "model")  # the file sets data.path; the command line empties it
    with pytest.raises(RecipeError, match=r"^command line: data.path is required"):
        load_recipe(path, ["data.path=[]"])


def test_a_directory_named_like_a_data_file_is_refused_as_any_directory_of_files(tmp_path):
    """It was read by datasets' JSON builder as a hub dataset (no file:line for a bad record), where a directory of
    the same files under another name is refused."""
    for name in ("d.jsonl", "d.json", "notes"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.jsonl").write_text(json.dumps(RECORDS[0]) + "\n", encoding="utf-8")
        with pytest.raises(RecipeError, match=f"^{re.escape(str(tmp_path / name))}: not a dataset directory \\(.*"
                                              "; data.path takes .json, .jsonl \\(either gzipped\\), .parquet"):
            load_datasets(DataArgs(path=str(tmp_path / name)))


def test_an_upper_case_extension_is_the_same_format(tmp_path):
    """UP.JSONL and UP.JSON were refused as an unsupported format '.JSONL'."""
    (tmp_path / "UP.JSONL").write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    (tmp_path / "UP.Json").write_text(json.dumps(RECORDS), encoding="utf-8")
    expected = load_datasets(DataArgs(path=str(_write(tmp_path, "jsonl"))))[0]["completion"]
    for name in ("UP.JSONL", "UP.Json"):
        assert load_datasets(DataArgs(path=str(tmp_path / name)))[0]["completion"] == expected
    (tmp_path / "UP.JSONL").write_text(json.dumps(RECORDS[0]) + '\n{"input": "a"}\n', encoding="utf-8")
    with pytest.raises(RecipeError, match=f"^{re.escape(str(tmp_path / 'UP.JSONL'))}:2: missing 'output'"):
        load_datasets(DataArgs(path=str(tmp_path / "UP.JSONL")))


def test_a_hub_dataset_that_cannot_load_says_why(tmp_path):
    """The reason was hidden: 'could not load hub dataset (ConnectionError); check data.path and network'."""
    with pytest.raises(RecipeError, match="^org/no-such-data: could not load hub dataset \\(ConnectionError: Couldn't "
                       "reach 'org/no-such-data' on the Hub \\(OfflineModeIsEnabled\\)\\); check data.path, its split"):
        load_datasets(DataArgs(path="org/no-such-data"))  # offline in tests (conftest)


def test_a_saved_dataset_mixing_the_forms_reads_as_its_jsonl(tmp_path):
    """Arrow gives every row every column, null where a record had none: `messages: null` beside input/output is no
    conversation (every record of such a directory was "'messages' must be a non-empty list of turns" before)."""
    from datasets import load_dataset

    records = [{"messages": CHAT, "source": "chat"}, {"input": "Q?", "output": "A."},
               {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}]
    (tmp_path / "mixed.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    saved = load_dataset("json", data_files=str(tmp_path / "mixed.jsonl"), split="train")
    assert saved[1]["messages"] is None and saved[0]["input"] is None  # the nulls the reader meets
    saved.save_to_disk(str(tmp_path / "saved"))
    from_jsonl, from_saved = (load_datasets(DataArgs(path=str(tmp_path / n)))[0] for n in ("mixed.jsonl", "saved"))
    assert from_saved.to_dict() | {"entry": None} == from_jsonl.to_dict() | {"entry": None}
    assert from_saved["completion"][1] == [{"role": "assistant", "content": "A."}]


def test_an_entry_names_its_split_and_eval_data_that_is_training_data_is_refused(tmp_path):
    from datasets import Dataset, DatasetDict

    splits = {name: Dataset.from_list([{"input": f"{name} q{i}", "output": f"{name} a{i}"} for i in range(n)])
              for name, n in (("train", 6), ("test", 3))}
    DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    directory = str(tmp_path / "dd")
    train, evaluation = load_datasets(DataArgs(path=directory, eval_path=[{"path": directory, "split": "test"}]))
    assert (len(train), len(evaluation)) == (6, 3) and evaluation["completion"][0][0]["content"] == "test a0"
    with pytest.raises(RecipeError, match="dd: no split 'dev' \\(has train, test\\); set data.split or the entry's"):
        load_datasets(DataArgs(path=[{"path": directory, "split": "dev"}]))
    # the same directory and split for training and evaluation: it evaluated on the training records, silently
    recipe = write_recipe(tmp_path, tmp_path / "model", data={"path": directory, "eval_split": None,
                                                             "eval_path": directory})
    with pytest.raises(RecipeError, match=f"data.eval_path: {re.escape(directory)} \\(split 'train'\\) is "
                                          "training data too, and an eval loss on it says nothing of held-out"):
        load_recipe(recipe, ["model.build_tiny=true"])
    for same in ("data.eval_path=[b.jsonl, a.jsonl]", "data.eval_path=org/ds"):  # a file; a hub id
        with pytest.raises(RecipeError, match="is training data too"):
            load_recipe(recipe, ["data.path=[a.jsonl, org/ds]", same])
    load_recipe(recipe, ["model.build_tiny=true", f"data.eval_path=[{{path: {directory}, split: test}}]"])


@pytest.mark.parametrize("record, message", [
    ({"messages": CHAT, "output": "A."}, "has both 'messages' and 'output'; a record is one conversation or one "
     "{input, output} pair, keep one"),
    ({"messages": CHAT, "conversations": [], "input": None}, "has both 'messages' and 'conversations'"),
    ({"messages": CHAT[:3]}, "messages: no assistant turn ends the conversation"),
    ({"messages": [CHAT[1], CHAT[0]]}, "messages[0]: roles out of order (assistant where user belongs)"),
    ({"messages": [CHAT[0], CHAT[0]]}, "messages[1]: roles out of order (user where assistant belongs)"),
    ({"messages": [CHAT[0], {"role": "system", "content": "late"}]}, "messages[1]: roles out of order (system"),
    ({"messages": [CHAT[0], {"role": "assistant", "content": " "}]}, "messages[1]: the assistant turn is empty"),
    ({"messages": [CHAT[0], {"role": "tool", "content": "x"}]},
     "messages[1]: unknown role 'tool' (system, user, assistant)"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "x"}]},  # ShareGPT's names
     "conversations[1]: unknown role 'bot' (system, user, assistant, human, gpt)"),
    ({"messages": [CHAT[0], {"role": "x" * 1_000_000, "content": "x"}]},  # a 1 MB line before
     f"messages[1]: unknown role '{'x' * 39}…' (system, user, assistant)"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt"}]},
     'conversations[1] must be {"from": …, "value": "text"}'),
    ({"messages": []}, "'messages' must be a non-empty list of turns"),
    ({"messages": [CHAT[0], {**CHAT[1], "weight": 0}]},  # OpenAI's "no loss on this turn": it was trained on
     "messages[1]: 'weight': 0 is not supported (every assistant turn carries loss); remove the key"),
])
def test_a_bad_conversation_is_one_line_naming_file_and_line(tmp_path, record, message):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=f"^{re.escape(str(path))}:2: {re.escape(message)}"):
        load_datasets(DataArgs(path=str(path)))


def test_a_turn_weight_of_1_or_null_is_the_turn_itself(tmp_path):
    """OpenAI's `weight: 1` trains the turn, as sft_lora does every assistant turn; null: a column other rows fill."""
    path = tmp_path / "chat.jsonl"
    weighted = [CHAT[0], {**CHAT[1], "weight": 1}, {**CHAT[2], "weight": None}, CHAT[3]]
    path.write_text(json.dumps({"messages": weighted}) + "\n" + json.dumps({"messages": CHAT}) + "\n")
    train = load_datasets(DataArgs(path=str(path)))[0]
    assert train[0]["prompt"] == train[1]["prompt"] and train[0]["completion"] == train[1]["completion"] == CHAT[1:]


def test_multi_turn_and_source_counts_read_only_the_selected_records():
    """Both read one column of a selection (a weighted file) without copying the others; figures per selected row."""
    from datasets import Dataset

    from sft_lora.rows import records_by_source
    from sft_lora.turns import multi_turn

    one = [{"role": "assistant", "content": "a"}]
    two = one + [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]
    records = Dataset.from_dict({"prompt": [[{"role": "user", "content": "q"}]] * 3, "completion": [one, two, one],
                                 "source": ["x", "y", "x"]})
    assert multi_turn(records) and not multi_turn(records.select([0, 2, 2]))
    assert records_by_source(records.select([0, 2, 2, 1])) == {"x": 3, "y": 1}
    assert records_by_source(records.select([1])) == {"y": 1}


def test_the_tiny_model_learns_its_tokenizer_from_any_data_format_and_field_names(tmp_path):
    """`model.build_tiny` with a .json array, a save_to_disk directory or other field names: the same texts as the
    .jsonl (an AttributeError traceback on .json, 'Is a directory' on a directory before)."""
    from datasets import Dataset

    from sft_lora.model import build_tiny_model

    records = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()][:60]
    (tmp_path / "d.json").write_text(json.dumps(records), encoding="utf-8")
    Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    renamed = tmp_path / "q.jsonl"
    renamed.write_text("".join(json.dumps({"q": r["input"], "a": r["output"]}) + "\n" for r in records))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    built = {name: build_tiny_model(tmp_path / name, tmp_path / data, hidden_size=32, layers=1, **extra)
             for name, data, extra in [("jsonl", "d.jsonl", {}), ("json", "d.json", {}), ("saved", "saved", {}),
                                       ("q", "q.jsonl", {"fields": DataArgs(input_field="q", output_field="a")})]}
    vocab = {name: json.loads((path / "tokenizer.json").read_text())["model"]["vocab"] for name, path in built.items()}
    assert len(vocab["jsonl"]) > 500 and vocab["json"] == vocab["saved"] == vocab["q"] == vocab["jsonl"]


def test_a_conversation_is_labelled_the_same_whatever_its_batch_holds(tiny_model):
    """A conversation holding a private-use character that stands for a `{% generation %}` marker sent its whole
    batch the other way, whose labels differ where the generation prompt and the marked block do (Qwen3's think
    block): the same conversation's labels changed with the other records of its 1,000-record batch."""
    from transformers import AutoTokenizer

    from sft_lora.turns import OPEN, tokenize_turns

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m.role }}|>\n{% if m.role == 'assistant' %}{% generation %}Answer: "
        "{{ m.content }}{{ eos_token }}{% endgeneration %}{% else %}{{ m.content }}{{ eos_token }}{% endif %}\n"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>\nAnswer: {% endif %}")
    conversation = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "Bye?"}, {"role": "assistant", "content": "Bye."}]
    odd = [{"role": "user", "content": "Logo?"}, {"role": "assistant", "content": f"It is {OPEN}."}]
    alone = tokenize_turns(tokenizer, [conversation], {})
    assert tokenize_turns(tokenizer, [conversation, odd], {})[0] == alone[0]
    assert tokenize_turns(tokenizer, [odd, conversation], {})[1] == alone[0]


def test_a_prompt_end_that_merges_with_the_answer_is_said_as_trl_says_it(tiny_model, caplog):
    """The generation prompt's last token merging with the answer's first (a `\\n\\n` token and an answer starting
    with a newline) moves where the loss starts; TRL warns of it, and sft_lora's preparation said nothing."""
    from transformers import AutoTokenizer

    from sft_lora.turns import tokenize_conversations

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = (  # the generation prompt ends in "t": an answer "ake" renders "take"
        "{% for m in messages %}<|{{ m.role }}|>\n{% if m.role == 'assistant' %}t{% endif %}{{ m.content }}"
        "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\nt{% endif %}")
    prompt = [[{"role": "user", "content": "Hi?"}]]
    plain = tokenize_conversations(tokenizer, prompt, [[{"role": "assistant", "content": " ok."}]], {})
    assert not [r for r in caplog.records if "merges" in r.getMessage()]
    ids, spans, drift = tokenize_conversations(tokenizer, prompt, [[{"role": "assistant", "content": "ake."}]], {})[0]
    assert not drift and not plain[0][2]
    prompt_ids = tokenizer(tokenizer.apply_chat_template(prompt[0], tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"]
    assert spans[0][0] < len(prompt_ids) and ids[:spans[0][0]] == prompt_ids[:spans[0][0]]  # TRL's start
    warned = [r.getMessage() for r in caplog.records if "merges" in r.getMessage()]
    assert len(warned) == 1 and "'t'" in warned[0] and "as in TRL" in warned[0]


def test_a_template_file_with_a_byte_order_mark_and_a_tokenizer_without_eos(tmp_path, tiny_model, capsys):
    """A template saved by a Windows editor (UTF-8 with a BOM) trained the BOM before every row's first token (and
    saved it into the adapters' template); a tokenizer without an EOS token was refused with "set training.eos_token",
    and setting it gave the same refusal (checked before the recipe's EOS was taken)."""
    import shutil

    from sft_lora.model import DEFAULT_CHAT_TEMPLATE, load_tokenizer

    template = tmp_path / "t.jinja"
    template.write_text(DEFAULT_CHAT_TEMPLATE, encoding="utf-8-sig")
    recipe = load_recipe(write_recipe(tmp_path, tiny_model, data={"chat_template": str(template)}))
    assert load_tokenizer(recipe.model, recipe.data).chat_template == DEFAULT_CHAT_TEMPLATE
    model = shutil.copytree(tiny_model, tmp_path / "no-eos")
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": None}))
    recipe = load_recipe(write_recipe(tmp_path, model))
    with pytest.raises(RecipeError, match=f"^{re.escape(str(model))}: the tokenizer has no EOS token; set training."):
        load_tokenizer(recipe.model, recipe.data)
    from sft_lora.run import main

    assert main([str(write_recipe(tmp_path, model, training={"eos_token": "</s>"})), "--check"]) == 0
    assert "all checks passed" in capsys.readouterr().out
    # a template of the recipe's that renders eos_token was tried before the recipe's EOS was set: refused as broken
    assert main([str(write_recipe(tmp_path, model, training={"eos_token": "</s>"},
                                  data={"chat_template": str(template)})), "--check"]) == 0
    # the model's own chat_template.jinja saved with a BOM: the BOM was trained before every row too
    (model / "chat_template.jinja").write_text(DEFAULT_CHAT_TEMPLATE, encoding="utf-8-sig")
    recipe = load_recipe(write_recipe(tmp_path, model, training={"eos_token": "</s>"}))
    assert load_tokenizer(recipe.model, recipe.data, "</s>").chat_template == DEFAULT_CHAT_TEMPLATE
