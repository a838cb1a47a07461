"""Records from every supported form become the same prompt/completion examples (bad ones: test_bad_input.py)."""

from __future__ import annotations

import json

import pytest

from sft_lora.config import DataArgs
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
