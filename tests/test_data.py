"""Records from every supported form become the same prompt/completion examples (bad ones: test_bad_input.py)."""

from __future__ import annotations

import json

import pytest

from sft_lora.config import DataArgs, RecipeError
from sft_lora.data import load_datasets

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
    else:
        from datasets import Dataset

        path = tmp_path / "saved"
        Dataset.from_list([{**r, "source": r.get("source")} for r in RECORDS]).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("form", ["jsonl", "json", "save_to_disk"])
def test_every_form_gives_the_same_chat_examples(tmp_path, form):
    args = DataArgs(path=str(_write(tmp_path, form)), system_prompt="Be brief.")
    train, evaluation = load_datasets(args)
    assert evaluation is None and len(train) == len(RECORDS)
    assert train[1]["prompt"] == [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "한국의 수도는 어디인가요?"}]
    assert train[1]["completion"] == [{"role": "assistant", "content": "한국의 수도는 서울입니다."}]
    assert train["source"] == ["arith_en", "capital_ko", "default", "arith_en"]


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


def test_a_jsonl_file_is_read_in_chunks_with_the_same_result(tmp_path, monkeypatch):
    import sft_lora.data

    path = tmp_path / "d.jsonl"
    records = [{"input": f"question {i}", "output": f"answer {i}"} for i in range(10)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    whole = load_datasets(DataArgs(path=str(path)))[0]
    monkeypatch.setattr(sft_lora.data, "CHUNK", 3)  # 4 chunks
    chunked, again = (load_datasets(DataArgs(path=str(path)))[0] for _ in range(2))
    assert chunked.to_list() == whole.to_list()
    assert chunked._fingerprint == again._fingerprint  # the prepared-data cache key is stable
    records[7] = {"input": "no answer"}
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    with pytest.raises(RecipeError, match="d.jsonl:8: missing 'output'"):  # numbered across chunks
        load_datasets(DataArgs(path=str(path)))
    skipped = load_datasets(DataArgs(path=str(path), on_bad_record="skip"))[0]  # skipped and counted across chunks
    assert len(skipped) == 9 and "no answer" not in {p[0]["content"] for p in skipped["prompt"]}
    path.write_text("\n".join(json.dumps({"input": "a"}) for _ in range(10)) + "\n", encoding="utf-8")
    with pytest.raises(RecipeError, match="d.jsonl: all 10 records are bad"):
        load_datasets(DataArgs(path=str(path), on_bad_record="skip"))
