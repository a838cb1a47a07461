"""The bad-input catalogue: every kind fails with exit != 0, one line naming the file and line/record/key, and
nothing half-written. README.md lists the same kinds in a table.

Each case builds its bad input in the test's directory and runs the user's command (`sft_lora.run.main`,
`sft_lora.merge.main`, `make`, or a real child process); the test then checks the line and the directory.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from sft_lora import merge, run
from sft_lora.callbacks import CheckpointRecord
from sft_lora.config import RECIPE_FILE, load_recipe
from sft_lora.resume import RECORD, incomplete_reason

from .children import run as run_child
from .conftest import ROOT, write_recipe

GOOD = {"input": "What is 2 plus 2?", "output": "2 plus 2 is 4.", "source": "arith_en"}


@dataclass
class Env:
    tmp: Path
    model: Path
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture
    protected: dict[Path, dict[str, str]] = field(default_factory=dict)
    adapter: Path | None = None  # the merge cases' adapter

    def recipe(self, **sections) -> Path:
        return write_recipe(self.tmp, self.model, **sections)

    def data(self, name: str, content: str | bytes | list) -> Path:
        """A data file; a list is written as JSONL, one record per line."""
        path = self.tmp / name
        if isinstance(content, list):
            content = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in content)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return path

    def with_data(self, name: str, content: str | bytes | list, **data) -> Path:
        """A recipe reading a data file with `content`."""
        return self.recipe(data={"path": str(self.data(name, content)), "eval_split": None, **data})

    def cli(self, *argv: str | Path) -> tuple[int, str]:
        self.capsys.readouterr()
        code = run.main([str(a) for a in argv])
        return code, self.capsys.readouterr().err

    def merge(self, *argv: str | Path) -> tuple[int, str]:
        self.capsys.readouterr()
        code = merge.main([str(a) for a in argv])
        return code, self.capsys.readouterr().err

    def protect(self, path: Path) -> Path:
        """An input that must come out unchanged (an existing model, a checkpoint); may not exist yet."""
        self.protected[path] = _snapshot(path) if path.exists() else {}
        return path


_find = importlib.util.find_spec


def _snapshot(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _line(path: Path, text: str) -> int:
    """The line of a recipe file that holds `text`."""
    return next(n for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if text in line)


CASES: dict[str, Callable[[Env], tuple[int, str, list[str]]]] = {}


def case(name: str):
    def register(fn):
        CASES[name] = fn
        return fn
    return register


# --- data ---------------------------------------------------------------------------------------------------

@case("data: malformed JSONL line")
def _(env):
    path = env.tmp / "d.jsonl"
    return (*env.cli(env.with_data("d.jsonl", json.dumps(GOOD) + '\n{"input": "a", "output": \n')),
            [f"{path}:2: not valid JSON"])


@case("data: malformed JSON file")
def _(env):
    path = env.tmp / "d.json"
    return *env.cli(env.with_data("d.json", '[\n {"input": "a",\n  "output": }\n]')), [f"{path}:3: not valid JSON"]


@case("data: JSON that is not a list of records")
def _(env):
    path = env.tmp / "d.json"
    return (*env.cli(env.with_data("d.json", json.dumps(GOOD))),
            [f"{path}: a .json data file must hold a list of records, got dict"])


@case("data: record that is not an object")
def _(env):
    path = env.tmp / "d.jsonl"
    return (*env.cli(env.with_data("d.jsonl", [GOOD, ["a", "b"]])),
            [f"{path}:2: expected an object with 'input' and 'output', got list"])


@case("data: missing output")
def _(env):
    path = env.tmp / "d.jsonl"
    return (*env.cli(env.with_data("d.jsonl", [GOOD, GOOD, {"input": "a"}])),
            [f"{path}:3: missing 'output'", "data.input_field/output_field"])


@case("data: empty output")
def _(env):
    path = env.tmp / "d.json"
    return (*env.cli(env.with_data("d.json", json.dumps([GOOD, {"input": "a", "output": "  "}]))),
            [f"{path}: record 2: 'output' is empty"])


@case("data: empty input")
def _(env):  # accepted before: the answer learnt after an empty user turn, which a conversation refuses
    return (*env.cli(env.with_data("d.jsonl", [GOOD, {"input": " \n", "output": "b"}])),
            [f"{env.tmp / 'd.jsonl'}:2: 'input' is empty; write the question that the answer follows"])


@case("data: missing input")
def _(env):
    return *env.cli(env.with_data("d.jsonl", [{"output": "b"}])), [f"{env.tmp / 'd.jsonl'}:1: missing 'input'"]


@case("data: input not a string")
def _(env):
    return (*env.cli(env.with_data("d.jsonl", [{"input": 3, "output": "b"}])),
            [f"{env.tmp / 'd.jsonl'}:1: 'input' must be a string, got int"])


@case("data: output not a string")
def _(env):
    return (*env.cli(env.with_data("d.jsonl", [GOOD, {"input": "a", "output": ["b"]}])),
            [f"{env.tmp / 'd.jsonl'}:2: 'output' must be a string, got list"])


@case("data: source not a string")
def _(env):
    return (*env.cli(env.with_data("d.jsonl", [{**GOOD, "source": 7}])),
            [f"{env.tmp / 'd.jsonl'}:1: 'source' must be a string, got int"])


@case("data: empty file")
def _(env):
    return *env.cli(env.with_data("d.jsonl", "")), [f"{env.tmp / 'd.jsonl'}: no records; the data file is empty"]


@case("data: empty JSON list")
def _(env):
    return *env.cli(env.with_data("d.json", "[]")), [f"{env.tmp / 'd.json'}: no records"]


@case("data: invalid UTF-8")
def _(env):
    content = (json.dumps(GOOD) + "\n").encode() + b'{"input": "caf\xe9", "output": "b"}\n'
    return *env.cli(env.with_data("d.jsonl", content)), [f"{env.tmp / 'd.jsonl'}:2: not valid UTF-8"]


@case("data: every record longer than max_length")
def _(env):
    path = env.with_data("d.jsonl", [GOOD] * 3)
    return (*env.cli(path, "training.max_length=8"),
            [f"{env.tmp / 'd.jsonl'}: all 3 records are longer than training.max_length=8 tokens",
             "raise training.max_length"])


@case("data: every record bad, on_bad_record: skip")
def _(env):
    return (*env.cli(env.with_data("d.jsonl", [{"input": "a"}, {"input": "b", "output": ""}], on_bad_record="skip")),
            [f"{env.tmp / 'd.jsonl'}: all 2 records are bad (first: {env.tmp / 'd.jsonl'}:1: missing 'output'"])


@case("data: data file missing")
def _(env):
    return (*env.cli(env.recipe(data={"path": str(env.tmp / "nope.jsonl")})),
            [f"{env.tmp / 'nope.jsonl'}: data file not found; check data.path"])


@case("data: eval file missing")
def _(env):
    return (*env.cli(env.recipe(data={"eval_split": None, "eval_path": str(env.tmp / "eval.jsonl")})),
            [f"{env.tmp / 'eval.jsonl'}: data file not found; check data.eval_path"])


@case("data: unsupported data format")
def _(env):
    return (*env.cli(env.with_data("d.txt", "input,output\na,b\n")),
            [f"{env.tmp / 'd.txt'}: unsupported data format '.txt'; use .json, .jsonl (either gzipped), .parquet"])


@case("data: eval_split leaves no eval record")
def _(env):
    return (*env.cli(env.with_data("d.jsonl", [GOOD] * 4, eval_split=0.01)),
            [f"{env.tmp / 'd.jsonl'}: data.eval_split=0.01 leaves no eval record of 4"])


@case("data: a directory that is not a dataset")
def _(env):
    (env.tmp / "notes").mkdir()
    (env.tmp / "notes" / "a.txt").write_text("hello")
    return *env.cli(env.recipe(data={"path": str(env.tmp / "notes"), "eval_split": None})), [
        f"{env.tmp / 'notes'}: not a dataset directory (", "data.path takes .json, .jsonl (either gzipped), .parquet"]


@case("data: JSON nested 100,000 deep")
def _(env):
    deep = '{"input": ' + "[" * 100_000 + "]" * 100_000 + ', "output": "b"}\n'
    return *env.cli(env.with_data("d.jsonl", json.dumps(GOOD) + "\n" + deep)), [
        f"{env.tmp / 'd.jsonl'}:2: not valid JSON (nested too deeply)"]


@case("data: a lone UTF-16 surrogate")
def _(env):
    content = json.dumps(GOOD) + '\n{"input": "caf\\ud800", "output": "b"}\n'
    return *env.cli(env.with_data("d.jsonl", content)), [
        f"{env.tmp / 'd.jsonl'}:2: holds a lone UTF-16 surrogate ('\\ud800'), which is not text"]


@case("data: eval_split leaves no training record")
def _(env):
    return (*env.cli(env.with_data("d.jsonl", [GOOD] * 2, eval_split=0.9)),
            [f"{env.tmp / 'd.jsonl'}: data.eval_split=0.9 leaves no training record of 2; lower it"])


@case("recipe: max_length no machine can allocate")
def _(env):
    return *env.cli(env.recipe(), f"training.max_length={10**12}"), [
        "command line: training.max_length must be at most 1,048,576, got 1,000,000,000,000"]


@case("data: chat template file missing")
def _(env):
    return (*env.cli(env.recipe(data={"chat_template": str(env.tmp / "t.jinja")})),
            [f"{env.tmp / 't.jinja'}: chat template file not found; check data.chat_template"])


@case("data: a chat template that refuses a system turn")
def _(env):  # Gemma 1/2: raise_exception('System role not supported'), a jinja traceback from tokenizing (exit 1)
    template, path = env.tmp / "t.jinja", env.recipe(data={"chat_template": str(env.tmp / "t.jinja"),
                                                           "system_prompt": "Be brief."})
    for refusal in ("Conversation roles must alternate user/assistant/user/assistant/...", "System role not supported"):
        template.write_text("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('" + refusal +
                            "') }}{% endif %}{{ m['role'] + ': ' + m['content'] }}"
                            "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
                            "{% if add_generation_prompt %}assistant: {% endif %}", encoding="utf-8")
        if refusal.startswith("Conversation"):  # Mistral v0.1's words for it: records alternate, the system turn not
            code, said = env.cli(path, "--check")
            assert code == 2 and f"({refusal}); set data.fold_system_prompt: true" in said, said
    folded = env.cli(path, "data.fold_system_prompt=true", "--check")
    assert folded[0] == 0, folded[1]  # the fix it names works
    return *env.cli(path, "--check"), ["error: the chat template refuses a record (System role not supported); set "
                                       "data.fold_system_prompt: true, or set data.chat_template to a template that "
                                       "takes it"]


@case("data: the model's own chat template not valid jinja")
def _(env):  # said while tokenizing before, without naming the model
    model = Path(shutil.copytree(env.model, env.tmp / "broken"))
    config = json.loads((model / "tokenizer_config.json").read_text(encoding="utf-8"))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}}{% endfor %"  # an unclosed tag
    (model / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return *env.cli(env.recipe(model={"name_or_path": str(model), "build_tiny": False}), "--check"), [
        f"error: {model}: its chat template is not valid jinja (", "line 1); set data.chat_template to a template "
        "file that is"]


# --- recipe -------------------------------------------------------------------------------------------------

@case("recipe: file missing")
def _(env):
    return *env.cli(env.tmp / "nope.yaml"), [f"{env.tmp / 'nope.yaml'}: recipe file not found"]


@case("recipe: not a regular file")
def _(env):  # a pipe (`/dev/stdin`, `<(cat r.yaml)`) or a directory was "recipe file not found", though it exists
    return *env.cli(env.tmp), [f"{env.tmp}: not a regular file; save the recipe to a .yaml file"]


@case("recipe: invalid YAML")
def _(env):
    path = env.tmp / "r.yaml"
    path.write_text("model:\n  name_or_path: x\n  dtype: [float32\n")
    return *env.cli(path), [f"{path}:4: not valid YAML"]


@case("recipe: YAML with a Python tag")
def _(env):
    path, marker = env.tmp / "r.yaml", env.tmp / "pwned"
    path.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    code, err = env.cli(path)
    assert not marker.exists(), "safe_load must not construct Python objects"
    return code, err, [f"{path}:1: not valid YAML (the tag !!python/object/apply:os.system is not allowed"]


@case("recipe: key twice in a section")
def _(env):
    text = env.recipe(training=None).read_text()
    path = env.tmp / "r.yaml"
    path.write_text(text + "training:\n  learning_rate: 3.0e-3\n  learning_rate: 1.0e-3\n")
    n = len(text.splitlines())
    return *env.cli(path), [f"{path}:{n + 3}: not valid YAML (duplicate key 'learning_rate', first at line {n + 2}"]


@case("recipe: section twice")
def _(env):
    text = env.recipe(training=None).read_text()
    path = env.tmp / "r.yaml"
    path.write_text("training:\n  learning_rate: 3.0e-3\n" + text + "training:\n  max_steps: 2\n")
    n = len(text.splitlines())
    return *env.cli(path), [f"{path}:{n + 3}: not valid YAML (duplicate key 'training', first at line 1; keep one)"]


@case("recipe: aliases that expand without bound")
def _(env):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi", strict=True)]
    path = env.tmp / "r.yaml"
    path.write_text("\n".join(lines) + "\ntraining: {report_to: *i}\n")
    assert path.stat().st_size < 500  # 9⁹ = 387 M values once expanded
    start = time.perf_counter()
    code, err = env.cli(path)
    assert time.perf_counter() - start < 1
    return code, err, [f"{path}:6: not valid YAML (aliases expand to more than 100,000 values"]


@case("recipe: values nested hundreds of levels deep")
def _(env):
    path = env.tmp / "r.yaml"  # mappings and lists in turn: each later step that walks the values recursed
    path.write_text(env.recipe().read_text() + "wandb:\n  run_name: " + "{a: [" * 400 + "1" + "]}" * 400 + "\n")
    n = len(path.read_text().splitlines())
    return *env.cli(path), [f"{path}:{n}: not valid YAML (values nested more than 50 levels deep; a recipe is a few "
                            "levels deep)"]


@case("recipe: not UTF-8")
def _(env):
    path = env.tmp / "r.yaml"
    path.write_bytes(b"use_qlora: false\nwandb:\n  run_name: caf\xe9\n")
    return *env.cli(path), [f"{path}:3: not valid UTF-8; save the recipe as UTF-8"]


@case("recipe: override not valid YAML")
def _(env):
    return (*env.cli(env.recipe(), "lora.r=[1"),
            ["command line: 'lora.r=[1': not valid YAML (", "quote the value if it is text"])


@case("recipe: override with a YAML tag")
def _(env):
    return (*env.cli(env.recipe(), "lora.r=!!python/object/apply:os.system [ls]"),
            ["command line: 'lora.r=!!python/object/apply:os.system [ls]': not valid YAML (the tag "
             "!!python/object/apply:os.system is not allowed in a recipe"])


@case("recipe: NaN learning rate")
def _(env):
    path = env.recipe(training={"learning_rate": float("nan")})
    return *env.cli(path), [f"{path}:", "training.learning_rate must be a finite number, got nan"]


@case("recipe: infinite number")
def _(env):
    return *env.cli(env.recipe(), "training.learning_rate=.inf"), [
        "command line: training.learning_rate must be a finite number, got inf"]


@case("recipe: number past 64 bits")
def _(env):
    return *env.cli(env.recipe(), f"training.seed={2**64}"), [
        f"command line: training.seed must be a number within 64 bits, got {2**64}"]


@case("recipe: not a mapping")
def _(env):
    path = env.tmp / "r.yaml"
    path.write_text("- model\n- data\n")
    return *env.cli(path), [f"{path}: a recipe must be a mapping of sections"]


@case("recipe: unknown key")
def _(env):
    path = env.recipe(training={"learnig_rate": 1e-3})
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "learnig_rate" in text)
    return (*env.cli(path), [f"{path}:{line}: unknown key 'learnig_rate' in section 'training'; "
                             "did you mean 'learning_rate'?"])


@case("recipe: unknown section")
def _(env):
    path = env.recipe(trainig={"max_steps": 1})
    return *env.cli(path), [f"{path}:", "unknown section 'trainig'; did you mean 'training'?"]


@case("recipe: wrong type")
def _(env):
    path = env.recipe(training={"num_train_epochs": "three"})
    return *env.cli(path), [f"{path}:", "training.num_train_epochs expects float, got 'three'"]


@case("recipe: negative number")
def _(env):
    return (*env.cli(env.recipe(), "training.learning_rate=-1"),
            ["command line: training.learning_rate must be > 0, got -1"])


@case("recipe: zero where positive is needed")
def _(env):
    path = env.recipe(lora={"r": 0})
    return *env.cli(path), [f"{path}:", "lora.r must be > 0, got 0"]


@case("recipe: fraction out of range")
def _(env):
    path = env.recipe(data={"eval_split": 1.5})
    return *env.cli(path), [f"{path}:", "data.eval_split must be in [0, 1), got 1.5"]


@case("recipe: value not among the choices")
def _(env):
    path = env.recipe(model={"dtype": "bf16"})
    return *env.cli(path), [f"{path}:", "model.dtype must be one of auto, bfloat16, float16, float32, got 'bf16'"]


@case("recipe: a value the upstream class refuses")
def _(env):
    path = env.recipe(training={"lr_scheduler_type": "bogus"})
    return *env.cli(path), [f"{path}:", "training.lr_scheduler_type: bogus is not a valid SchedulerType, please select"]


@case("recipe: input_field is output_field")
def _(env):  # accepted before: each answer was its own question
    return *env.cli(env.recipe(), "data.output_field=input"), [
        "command line: data.input_field and data.output_field are both 'input'; name two different fields"]


@case("recipe: source_field is an input or output field")
def _(env):  # accepted before: every answer its own source, a per-source eval pass for each record
    return *env.cli(env.recipe(), "data.source_field=output"), [
        "command line: data.output_field and data.source_field are both 'output'; name two different fields"]


@case("recipe: QLoRA without 4-bit weights")
def _(env):  # transformers loaded the base in 4-bit anyway: --print-config said load_in_4bit: false, exit 0
    return *env.cli(env.recipe(use_qlora=True), "quantization.load_in_4bit=false"), [
        "command line: QLoRA trains on 4-bit weights: quantization.load_in_4bit must be true (merge and chat read "
        "4-bit bases; 8-bit is not supported); set use_qlora: false for plain LoRA"]


@case("recipe: an empty use_qlora")
def _(env):  # `use_qlora=` (an empty shell variable) trained QLoRA where the recipe said false
    return *env.cli(env.recipe(), "use_qlora="), ["command line: use_qlora must be true or false, got an empty value"]


@case("recipe: training.push_to_hub")
def _(env):  # Trainer pushed every checkpoint to a repo named after the checkpoint folder (a traceback offline)
    return *env.cli(env.recipe(), "training.push_to_hub=true"), [
        "command line: training.push_to_hub is set by output.push_to_hub (a repo id); move it there"]


@case("recipe: a list item of the wrong type")
def _(env):  # a TypeError in the pre-flight report: YAML reads [no] (a Norwegian source) as [False]
    return *env.cli(env.recipe(), "check.sources=[arith_en, no]"), [
        "command line: check.sources expects list[str], got ['arith_en', False] (YAML reads unquoted yes/no/on/off "
        "as booleans; quote it)"]


@case("recipe: unknown attention")
def _(env):  # failed when the model loaded, after the data was prepared
    return *env.cli(env.recipe(), "model.attn_implementation=sdpa_document"), [
        "command line: model.attn_implementation: unknown attention 'sdpa_document' (eager, sdpa, sdpa_documents, "
        "flash_attention_2, flex_attention …); did you mean 'sdpa_documents'?"]


@case("recipe: flex_attention on a CPU")
def _(env):  # a NotImplementedError at the first backward, after the start-of-run eval
    return *env.cli(env.recipe(), "model.attn_implementation=flex_attention"), [
        "command line: model.attn_implementation: flex_attention has no backward on a CPU; use sdpa_documents"]


@case("recipe: a device_map this machine lacks")
def _(env):  # failed when the model loaded
    return *env.cli(env.recipe(), "model.device_map=cuda:3"), [
        "command line: model.device_map: 'cuda:3' is no device of this machine; use auto (spread over all GPUs) or "
        "leave it unset"]


@case("model: a mistyped --base_model on a build_tiny recipe")
def _(env):  # the default recipe built a random tiny model at the mistyped path, trained and merged it, exit 0
    missing = env.tmp / "my-llama-8b-instrcut"
    return *env.cli(env.recipe(model={"build_tiny": True}), "--base_model", missing, "--check"), [
        f"command line --base_model: {missing}: model directory not found; the recipe's model.build_tiny builds a "
        "tiny model at its own path only (add model.build_tiny=true to build one here)"]


@case("recipe: a scheduler argument the scheduler does not take")
def _(env):  # a TypeError when training started, after the data was prepared and the model loaded
    return *env.cli(env.recipe(), "training.lr_scheduler_kwargs={min_lr: 1.0e-5}"), [
        "command line: training.lr_scheduler_type / lr_scheduler_kwargs: get_linear_schedule_with_warmup() got an "
        "unexpected keyword argument 'min_lr'"]


@case("recipe: an optimizer whose package is missing")
def _(env):  # an ImportError when training started
    return *env.cli(env.recipe(), "training.optim=galore_adamw"), [
        "command line: training.optim / optim_args: You need to install `galore_torch` in order to use GaLore"]


@case("recipe: skip_prepare_dataset")
def _(env):  # TRL trained on untokenized text: "No columns match" when training started
    return *env.cli(env.recipe(), "training.dataset_kwargs={skip_prepare_dataset: true}"), [
        "command line: training.dataset_kwargs: skip_prepare_dataset is sft_lora's to set (it prepares the data "
        "itself, once); remove it"]


@case("recipe: an override of one list item")
def _(env):  # blamed the recipe's line: "recipe.yaml:12: unknown key 'path[0].weight'"
    return *env.cli(env.recipe(), "data.path[0].weight=3"), [
        "command line: 'data.path[0].weight=3' is not an override; write section.key=value (a list whole: "
        "data.path=[a.jsonl, {path: b.jsonl, weight: 2}])"]


@case("recipe: a section emptied on the command line")
def _(env):  # blamed the recipe's line of the key the override had removed
    return *env.cli(env.recipe(), "model="), [
        "command line: model.name_or_path is required (a hub id or a local directory)"]


@case("data: a record in both forms")
def _(env):
    path = env.tmp / "d.jsonl"
    both = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "input": "a"}
    return (*env.cli(env.with_data("d.jsonl", [GOOD, both])),
            [f"{path}:2: has both 'messages' and 'input'; a record is one conversation or one {{input, output}} pair"])


@case("recipe: an unquoted on/off/yes/no where text is expected")
def _(env):
    path = env.recipe(data={"system_prompt": True})  # as YAML reads `system_prompt: On`
    return *env.cli(path), [f"{path}:", "data.system_prompt expects str | None, got True (YAML reads unquoted "
                            "yes/no/on/off as booleans; quote it)"]


@case("recipe: key owned by another section")
def _(env):
    path = env.recipe(training={"output_dir": "/tmp/x"})
    return *env.cli(path), [f"{path}:", "training.output_dir is set by output.checkpoint_dir; move it there"]


@case("recipe: unset environment variable")
def _(env):
    env.monkeypatch.delenv("SFT_LORA_NO_SUCH_DIR", raising=False)
    path = env.recipe(data={"path": "${SFT_LORA_NO_SUCH_DIR}/qa.jsonl"})
    return *env.cli(path), [f"{path}:", "data.path uses ${SFT_LORA_NO_SUCH_DIR} but SFT_LORA_NO_SUCH_DIR is not set"]


@case("recipe: a token in a value")
def _(env):
    token = "hf_" + "Q" * 34
    path = env.recipe(wandb={"run_name": f"run-{token}"})
    code, err = env.cli(path)
    assert token not in err, "the error must not repeat the secret"
    return code, err, [f"{path}:", "wandb.run_name looks like a secret (a Hugging Face token)"]


@case("recipe: a wandb key in a value")
def _(env):
    env.monkeypatch.delenv("WANDB_API_KEY", raising=False)
    key = "0123456789abcdef" * 2 + "01234567"
    path = env.recipe(wandb={"run_name": f"run-{key}"})
    code, err = env.cli(path)
    assert key not in err
    return code, err, [f"{path}:", "wandb.run_name looks like a secret (a wandb API key (40 hex digits))"]


@case("recipe: hub_token in training")
def _(env):
    path = env.recipe(training={"hub_token": "abc"})
    return *env.cli(path), [f"{path}:", "training.hub_token is set by the HF_TOKEN environment variable"]


@case("recipe: malformed override")
def _(env):
    return *env.cli(env.recipe(), "lora.r"), ["command line: 'lora.r' is not an override; write section.key=value"]


@case("paths: model.name leaves output.dir")
def _(env):
    code, err = env.cli(env.recipe(), "model.name=../../../escaped")
    assert not any(p.name == "escaped" for p in env.tmp.parents[2].iterdir())
    return code, err, ["command line: model.name gives the run directory name '../../../escaped', which would leave "
                       "output.dir; set model.name to a plain name"]


@case("paths: absolute model.name")
def _(env):
    return *env.cli(env.recipe(), f"model.name={env.tmp / 'elsewhere'}"), [
        "command line: model.name gives the run directory name '/", "which would leave output.dir"]


@case("paths: an output directory holds an input")
def _(env):
    adapters = env.tmp / "final_model" / "tiny-llama" / "1" / "lora_adapters"
    adapters.mkdir(parents=True)  # a previous run's, where the user keeps the data
    env.data("final_model/tiny-llama/1/lora_adapters/d.jsonl", [GOOD] * 8)
    data = env.protect(adapters) / "d.jsonl"
    return *env.cli(env.recipe(data={"path": str(data), "eval_split": None})), [
        f"{adapters}: is or holds data.path ({data}), which writing there would delete; set output.dir elsewhere"]


@case("paths: the base model is the run's own merged model")
def _(env):  # training on from a merge with output.merge off deleted its own base as "stale" (rc 0)
    merged = env.tmp / "final_model" / "tiny-llama" / "1" / "lora_merged"
    shutil.copytree(env.model, merged)
    env.protect(merged)
    return *env.cli(env.recipe(model={"name_or_path": str(merged), "name": "tiny-llama"})), [
        f"{merged}: is or holds model.name_or_path ({merged}), which writing there would delete; set output.dir "
        "elsewhere (or model.name)"]


@case("paths: an output inside a dataset directory")
def _(env):  # the directory is hashed whole: its checkpoints changed "the data", and --resume refused it
    from datasets import Dataset

    data = env.tmp / "ds"
    Dataset.from_list([GOOD] * 8).save_to_disk(str(data))
    env.protect(data)
    return *env.cli(env.recipe(data={"path": str(data), "eval_split": None}, output={
        "dir": str(data / "out"), "checkpoint_dir": str(data / "ck")})), [
        f"{data / 'out'}/tiny-llama/1/lora_merged: is inside data.path ({data}), a dataset directory whose content "
        "writing there would change; set output.dir elsewhere"]


@case("model: name_or_path empty")
def _(env):
    path = env.recipe(model={"name_or_path": ""})
    return *env.cli(path), [f"{path}:", "model.name_or_path is required"]


@case("data: assistant_only_loss on a template without generation markers")
def _(env):
    return (*env.cli(env.recipe(training={"assistant_only_loss": True})),
            ["training.assistant_only_loss needs a chat template with {% generation %} markers", "data.chat_template"])


@case("data: mask_history with the loss on every token")
def _(env):  # training.assistant_only_loss kept both answers' loss, silently
    path = env.recipe(data={"mask_history": True}, training={"completion_only_loss": False})
    return *env.cli(path), [f"{path}:", "data.mask_history puts the loss on the last answer only, but "
                            "training.completion_only_loss: false puts it on every token; remove one of them"]


@case("data: eos_token not in the vocabulary")
def _(env):  # the pre-flight report blamed the tokenizer's own EOS (`<unk> or </s>`) for carrying no loss
    return (*env.cli(env.recipe(training={"eos_token": "<|im_end|>"})),
            ["training.eos_token: '<|im_end|>' is not a token of this tokenizer; name the chat template's end-of-turn"])


@case("model: directory holds no model")
def _(env):
    return (*env.cli(env.recipe(model={"name_or_path": str(env.tmp)})),
            [f"{env.tmp}: not a model directory (no config.json); check model.name_or_path"])


@case("model: directory missing")
def _(env):
    missing = env.tmp / "no-model"
    return (*env.cli(env.recipe(model={"name_or_path": str(missing)})),
            [f"{missing}: model directory not found; check model.name_or_path"])


@case("model: weights only as a pickle")
def _(env):
    import torch
    from safetensors.torch import load_file

    pickled = env.tmp / "pickled-model"
    shutil.copytree(env.model, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    return (*env.cli(env.recipe(model={"name_or_path": str(pickled)})),
            [f"{pickled}: weights only as a pickle (pytorch_model.bin)", "convert them to safetensors"])


# --- environment and outputs ---------------------------------------------------------------------------------

@case("QLoRA where bitsandbytes cannot run")
def _(env):
    env.monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what an import failure looks like
    path = env.recipe(use_qlora=True)
    return *env.cli(path), [f"{path}:{_line(path, 'use_qlora:')}: use_qlora is true but bitsandbytes cannot run here",
                            "use_qlora: false"]


@case("accelerate config missing")
def _(env):
    missing = env.tmp / "accel.yaml"
    path = env.recipe(accelerate_config=str(missing))
    assert env.cli(path, "--print-config")[0] == 2  # said on loading, by --print-config and --check too
    return *env.cli(path), [f"{path}:1: accelerate_config: '{missing}' not found", "one of: cpu_ddp, fsdp, multi_gpu"]


@case("accelerate config not valid YAML")
def _(env):
    config = env.tmp / "accel.yaml"
    config.write_text("distributed_type: MULTI_GPU\nnum_processes: 2\nnum_processes: 4\n")
    path = env.recipe(accelerate_config=str(config))
    env.monkeypatch.setattr("os.execv", lambda *a: pytest.fail("launched with a config read leniently"))
    return *env.cli(path), [f"{config}:3: not valid YAML (duplicate key 'num_processes', first at line 2; keep one)"]


@case("wandb key in the environment malformed")
def _(env):
    env.monkeypatch.delenv("WANDB_MODE", raising=False)
    env.monkeypatch.setenv("WANDB_API_KEY", "not-a-key")
    code, err = env.cli(env.recipe(training={"report_to": "wandb"}, wandb={"mode": "online"}))
    assert "not-a-key" not in err
    return code, err, ["WANDB_API_KEY (environment): API key must have 40+ characters, has 5.",
                       "or set wandb.mode: offline"]


@case("wandb not installed")
def _(env):
    env.monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else _find(name))
    path = env.recipe(training={"report_to": "wandb"})
    return *env.cli(path), [f"{path}:{_line(path, 'report_to:')}: training.report_to includes wandb, which is not "
                            "installed"]  # the line of the key, as every recipe error names it


@case("output dir holds something else")
def _(env):
    path = env.recipe()
    adapters = load_recipe(path).adapters_dir
    adapters.mkdir(parents=True)
    (adapters / "notes.txt").write_text("mine")
    env.protect(adapters)
    return *env.cli(path), [f"{adapters}: exists and is no sft_lora output (no sft_lora_recipe.yaml), which this run "
                            "would replace; move it or set output.dir elsewhere"]


@case("output dir is a file")
def _(env):
    (env.tmp / "out").write_text("not a directory")
    return (*env.cli(env.recipe(output={"dir": str(env.tmp / "out")})),
            [f"{env.tmp / 'out'}: is a file", "set output.dir to a directory"])


@case("checkpoint dir is a file")
def _(env):
    (env.tmp / "ckpt").write_text("not a directory")
    return (*env.cli(env.recipe(output={"checkpoint_dir": str(env.tmp / "ckpt")})),
            [f"{env.tmp / 'ckpt'}: is a file", "set output.checkpoint_dir"])


@case("output dir read-only")
def _(env):
    # As root, permission bits do not stop a write; sysfs refuses new files even to root.
    return (*env.cli(env.recipe(output={"dir": "/sys/sft_lora_out"})),
            ["/sys: cannot write here (", "set output.dir to a writable directory"])


def _file_size_limit(limit: int) -> None:
    """Child setup: writes past `limit` bytes fail with EFBIG, as on a full disk (SIGXFSZ would kill instead)."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


@case("disk full while checkpointing")
def _(env):
    path = env.recipe(data={"eval_split": None}, training={"max_steps": 2, "save_steps": 1})
    code, child = run_child([str(path)], env.tmp / "child", setup=functools.partial(_file_size_limit, 200_000))
    checkpoint = load_recipe(path).checkpoint_dir / "checkpoint-1"
    assert incomplete_reason(checkpoint) is not None, "the cut-short checkpoint must not look complete"
    assert "to continue" not in child.err()  # no complete checkpoint: --resume would fail (it was advised before)
    return code, child.err(), [f"{checkpoint}: could not save the checkpoint (File too large); free space or fix "
                               "permissions, then run again (no checkpoint is complete yet)"]


# --- resume -------------------------------------------------------------------------------------------------

def _checkpoint(env: Env, path: Path, step: int = 2, protect: bool = True, **overrides) -> Path:
    """A checkpoint with a completion record, as saved by a run of `path` (with `overrides`)."""
    recipe = load_recipe(path, [f"{k}={v}" for k, v in overrides.items()])
    checkpoint = recipe.checkpoint_dir / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (checkpoint / "adapter_model.safetensors").write_bytes(b"weights")
    state = SimpleNamespace(global_step=step, is_world_process_zero=True, log_history=[])
    CheckpointRecord(recipe).on_save(SimpleNamespace(output_dir=str(recipe.checkpoint_dir)), state, None)
    return env.protect(checkpoint) if protect else checkpoint


@case("fresh run over a run of another length")
def _(env):  # killed, the fresh 12-step run resumed from the old 8-step run's checkpoint-8 (another schedule)
    path = env.recipe()
    checkpoint = _checkpoint(env, path, step=8, **{"training.max_steps": 8})
    return (*env.cli(path), [f"{checkpoint.parent}: holds checkpoints of another run (checkpoint-8: made from a "
                             "run of another length (training.max_steps: 8 -> 6)), which this run would mix with its "
                             "own; continue that run with --resume"])


@case("resume: checkpoint directory missing")
def _(env):
    missing = env.tmp / "checkpoint-9"
    return *env.cli(env.recipe(), "--resume", missing), [f"{missing}: checkpoint directory not found"]


@case("resume: no checkpoint yet")
def _(env):
    path = env.recipe()
    return (*env.cli(path, "--resume"),
            [f"{load_recipe(path).checkpoint_dir}: no checkpoint to resume from", "train first"])


@case("resume: only incomplete checkpoints")
def _(env):
    path = env.recipe()
    checkpoint = _checkpoint(env, path, protect=False)
    (checkpoint / RECORD).unlink()  # the run died while saving it
    env.protect(checkpoint)
    return (*env.cli(path, "--resume"),
            [f"{load_recipe(path).checkpoint_dir}: 1 incomplete checkpoint(s) to resume from", "--force-resume"])


@case("resume: checkpoint from another recipe")
def _(env):
    path = env.recipe()
    checkpoint = _checkpoint(env, path, **{"lora.r": 4})
    return (*env.cli(path, "--resume"),
            [f"{checkpoint}: made from a different recipe (lora.r: 4 -> 8)", "or pass --force-resume"])


@case("fresh run over another recipe's checkpoints")
def _(env):
    path = env.recipe()
    checkpoint = _checkpoint(env, path, step=6, **{"lora.r": 4})  # protected: it must come out unchanged
    return (*env.cli(path), [f"{checkpoint.parent}: holds checkpoints of another run (checkpoint-6: made from a "
                             "different recipe (lora.r: 4 -> 8)), which this run would mix with its own",
                             "set output.checkpoint_dir"])


@case("data: a mistyped path beside a run's checkpoints")
def _(env):  # read as a hub id, it was blamed on the checkpoints: "made from different data (… hub:…)"
    path = env.recipe()
    _checkpoint(env, path, step=6)
    typo = str(env.tmp / "sampl.jsonl")
    return *env.cli(path, f"data.path={typo}"), [f"{typo}: data file not found; check data.path"]


@case("resume: checkpoint from other data")
def _(env):
    data = env.data("d.jsonl", [GOOD] * 20)
    path = env.recipe(data={"path": str(data), "eval_split": None})
    checkpoint = _checkpoint(env, path)
    data.write_text(data.read_text() + json.dumps(GOOD) + "\n")
    return *env.cli(path, "--resume"), [f"{checkpoint}: made from different data (sha256 "]


# --- merge --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model) -> Path:
    """An untrained LoRA adapter for the tiny model, saved as training saves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("adapter") / "tiny_lora_adapters"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


@case("merge: not an adapter directory")
def _(env):
    env.protect(env.tmp / "x_adapters").mkdir()
    return (*env.merge("--adapter_model", env.tmp / "x_adapters"),
            [f"{env.tmp / 'x_adapters'}: no adapter_config.json"])


@case("merge: adapter does not match the base")
def _(env):
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    other = env.tmp / "other-base"
    config = AutoConfig.from_pretrained(env.model)
    config.hidden_size, config.intermediate_size = 128, 256
    LlamaForCausalLM(config).save_pretrained(other)
    AutoTokenizer.from_pretrained(env.model).save_pretrained(other)
    adapter = env.protect(env.adapter)
    return (*env.merge("--adapter_model", adapter, "--base_model", other, "--output_dir", env.tmp / "merged"),
            [f"{adapter}: cannot merge into base '{other}' (size mismatch for", "check --base_model"])


@case("merge: a base that is no model")
def _(env):  # blamed on the adapter before: "… the adapter was trained on another base"
    adapter, base = env.protect(env.adapter), env.protect(env.tmp / "data")
    base.mkdir()
    return (*env.merge("--adapter_model", adapter, "--base_model", base, "--output_dir", env.tmp / "merged"),
            [f"{base}: cannot load the base model (", "check --base_model, the network or HF_TOKEN"])


@case("merge: output inside the adapter directory")
def _(env):  # accepted, then deleted with the adapters by the next run, silently
    adapter = env.protect(env.adapter)
    return (*env.merge("--adapter_model", adapter, "--output_dir", adapter / "handoff"),
            [f"{adapter / 'handoff'}: is inside the adapter directory {adapter}, which a run replaces whole"])


@case("merge: output exists, no --overwrite")
def _(env):
    existing = env.tmp / "merged"
    existing.mkdir()
    (existing / "model.safetensors").write_bytes(b"a good model")
    env.protect(existing)
    return (*env.merge("--adapter_model", env.protect(env.adapter), "--output_dir", existing),
            [f"{existing}: already exists; pass --overwrite to replace it"])


@case("merge: --overwrite onto the adapter directory")
def _(env):
    adapter = env.protect(env.adapter)
    return *env.merge("--adapter_model", adapter, "--output_dir", adapter, "--overwrite"), [
        f"{adapter}: is or holds the adapter ({adapter}), which writing there would delete; choose another "
        "--output_dir"]


@case("merge: --overwrite onto the adapter's parent")
def _(env):
    adapter = env.protect(env.adapter)
    return *env.merge("--adapter_model", adapter, "--output_dir", adapter.parent, "--overwrite"), [
        f"{adapter.parent}: is or holds the adapter ("]


@case("merge: --overwrite onto the base model")
def _(env):
    base = env.protect(env.model)
    return *env.merge("--adapter_model", env.protect(env.adapter), "--output_dir", base, "--overwrite"), [
        f"{base}: is or holds the base model ({base})"]


@case("merge: adapters trained with layer_replication")
def _(env):  # save_pretrained's "shared tensors" traceback once the merge was done
    adapter = shutil.copytree(env.adapter, env.tmp / "replicated_adapters")
    (adapter / RECIPE_FILE).write_text(yaml.safe_dump({"lora": {"layer_replication": [[0, 2], [1, 3]]}}),
                                       encoding="utf-8")
    env.protect(adapter)
    return *env.merge("--adapter_model", adapter), [
        f"{adapter}: trained with lora.layer_replication, which shares weights between layers, so a merged model "
        "cannot be saved; load the adapters with PEFT instead"]


@case("merge: output is a file")
def _(env):
    (env.tmp / "merged").write_text("a file")
    env.protect(env.tmp / "merged")
    return (*env.merge("--adapter_model", env.protect(env.adapter), "--output_dir", env.tmp / "merged"),
            [f"{env.tmp / 'merged'}: exists and is a file"])


@pytest.mark.parametrize("kind", list(CASES))
def test_bad_input_fails_in_one_line_and_writes_nothing(kind, tmp_path, tiny_model, monkeypatch, capsys, request):
    env = Env(tmp_path, tiny_model, monkeypatch, capsys)
    if "merge" in kind:
        env.adapter = request.getfixturevalue("adapter")
    code, stderr, expected = CASES[kind](env)
    assert code != 0
    assert "Traceback" not in stderr
    # (a progress bar may precede the line in a child's stderr: it ends with a carriage return, not a newline)
    errors = [line[line.find("error: "):] if "error: " in line else line
              for line in stderr.splitlines() if "error: " in line or line.startswith("Makefile:")]
    assert len(errors) == 1, stderr[-3000:]
    for text in expected:
        assert text in errors[0], errors[0]
    # Nothing half-written: no temporary or final directory, no checkpoint that looks complete, inputs unchanged.
    for path in tmp_path.rglob("*"):
        assert ".tmp-" not in path.name and not path.name.startswith(".sft_lora_probe"), path
        if path.is_dir() and path.name.endswith(("_adapters", "_merged")):
            assert path in env.protected, f"{path} written"
        if path.is_dir() and path.name.startswith("checkpoint-") and path not in env.protected:
            assert incomplete_reason(path) is not None, f"{path} looks complete"
    for path, snapshot in env.protected.items():
        assert _snapshot(path) == snapshot, f"{path} changed"


def test_the_catalogue_has_25_kinds_and_the_readme_lists_them():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(CASES) >= 25
    missing = [kind for kind in CASES if f"| {kind} |" not in readme]
    assert not missing, f"README bad-input table lacks: {missing}"


# --- handled, not failed: documented behaviours ---------------------------------------------------------------

def test_a_few_bad_records_fail_by_default_or_are_skipped_and_counted(tmp_path, capsys):
    from sft_lora.config import DataArgs
    from sft_lora.data import load_datasets

    lines = [json.dumps({"input": f"q{i}", "output": f"a{i}"}) for i in range(20)]
    lines[4], lines[11], lines[17] = '{"input": "q4"}', "{not json", '{"input": "q17", "output": ""}'
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(Exception, match=f"{path}:5: missing 'output'"):
        load_datasets(DataArgs(path=str(path)))
    train, _ = load_datasets(DataArgs(path=str(path), on_bad_record="skip"))
    assert len(train) == 17
    assert [m[0]["content"] for m in train["completion"]] == [f"a{i}" for i in range(20) if i not in (4, 11, 17)]
    out = capsys.readouterr().out
    assert f"notice: {path}: skipped 3 bad of 20 records (data.on_bad_record: skip); first: {path}:5:" in out


def test_records_longer_than_max_length_are_counted_and_match_what_trl_drops(tmp_path, tiny_model, capsys):
    from sft_lora.data import load_datasets
    from sft_lora.model import load_tokenizer
    from sft_lora.trainer import build_trainer

    records = [dict(GOOD, output=f"short answer {i}.") for i in range(12)]
    records[3]["output"] = records[7]["output"] = " ".join(["a long answer"] * 40)  # truncated, answer partly kept
    records[9]["input"] = " ".join(["a long question"] * 40)  # the prompt alone fills max_length: dropped
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    recipe = load_recipe(write_recipe(tmp_path, tiny_model, data={"path": str(path), "eval_split": None},
                                      training={"max_length": 48}))
    tokenizer = load_tokenizer(recipe.model, recipe.data)
    from sft_lora.prepare import prepare_datasets
    from sft_lora.rows import check_lengths

    data = prepare_datasets(recipe.training, tokenizer, load_datasets(recipe.data)[0])
    check_lengths(recipe, tokenizer, data)
    out = capsys.readouterr().out
    assert f"notice: {path}: 3 of 12 records are longer than training.max_length=48 tokens" in out
    assert "1 of them lose their whole answer and are dropped" in out
    trainer = build_trainer(recipe, tokenizer, data)
    assert len(trainer.train_dataset) == 12 - 1  # TRL dropped exactly the record counted as dropped
    assert max(len(ids) for ids in trainer.train_dataset["input_ids"]) == 48


def test_a_record_longer_than_the_model_is_cut_quietly_and_a_max_length_above_it_noticed(tmp_path, tiny_model,
                                                                                       capsys, monkeypatch):
    import logging

    from sft_lora.data import load_datasets
    from sft_lora.model import load_tokenizer
    from sft_lora.prepare import prepare_datasets
    from sft_lora.rows import check_lengths

    records = [dict(GOOD, output=f"short answer {i}.") for i in range(4)]
    records[1]["input"] = " ".join(["a long question"] * 600)  # longer than the tiny tokenizer's model_max_length
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.setenv("SFT_LORA_CACHE", str(tmp_path / "cache"))  # tokenized here, not read from a cache
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        for max_length, limit_noticed in ((48, False), (4096, True)):
            recipe = load_recipe(write_recipe(tmp_path, tiny_model, data={"path": str(path), "eval_split": None},
                                              training={"max_length": max_length}))
            tokenizer = load_tokenizer(recipe.model, recipe.data)
            data = prepare_datasets(recipe.training, tokenizer, load_datasets(recipe.data)[0])
            check_lengths(recipe, tokenizer, data)
            out = capsys.readouterr().out
            assert ("notice: training.max_length=4096 is above the tokenizer's model_max_length=1024" in out) \
                is limit_noticed
            assert max(data.rows["untruncated_length"]) > tokenizer.model_max_length == 1024 and warnings == []
            tokenizer(records[1]["input"])  # the same tokenizer, called as usual: it does warn (the capture works)
            assert len(warnings) == 1 and "indexing errors" in warnings.pop()
    finally:
        logging.getLogger("transformers").removeHandler(handler)


def test_tokenizer_without_pad_token_pads_with_eos_and_keeps_the_answers_eos_label(tmp_path, tiny_model, capsys):
    from transformers import AutoTokenizer

    from sft_lora.data import load_datasets
    from sft_lora.model import load_tokenizer
    from sft_lora.trainer import build_trainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "nopad")
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(tiny_model / name, tmp_path / "nopad" / name)
    # padded batches (padding-free, the default, has no padding at all)
    recipe = load_recipe(write_recipe(tmp_path, tmp_path / "nopad", training={"padding_free": False}))
    tokenizer = load_tokenizer(recipe.model, recipe.data)
    assert f"notice: {tmp_path / 'nopad'}: the tokenizer has no pad token; padding with EOS" in capsys.readouterr().out
    assert tokenizer.pad_token == tokenizer.eos_token
    train_set, eval_set = load_datasets(recipe.data)
    trainer = build_trainer(recipe, tokenizer, train_set, eval_set)
    examples = [trainer.train_dataset[i] for i in range(8)]
    batch = trainer.data_collator([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
    eos = tokenizer.eos_token_id
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        assert batch["labels"][row, n - 1] == eos, "the answer's own EOS keeps its label"
        assert (batch["labels"][row, n:] == -100).all(), "padding (also EOS) carries no loss"
        assert (batch["input_ids"][row, n:] == eos).all()


def test_a_wandb_error_at_the_first_step_is_one_line(monkeypatch):
    """wandb.init runs at the first step: a key the server refuses fails in the message's first line."""
    from contextlib import nullcontext

    from sft_lora import callbacks
    from sft_lora.config import RecipeError

    refused = type("CommError", (Exception,), {"__module__": "wandb.errors"})

    def train(**_):
        raise refused("permission denied: invalid API key\nresponse body: {...}")

    trainer = SimpleNamespace(train=train, callback_handler=SimpleNamespace(callbacks=[]))
    monkeypatch.setattr(callbacks, "interruptible", lambda trainer: nullcontext())
    with pytest.raises(RecipeError) as info:
        run._fit(trainer, None, None, {"resumed_from": None}, False)
    assert str(info.value) == ("wandb: permission denied: invalid API key; check WANDB_API_KEY (or `wandb login`) "
                               "or set wandb.mode: offline")


def test_output_into_a_closed_pipe_ends_quietly_as_sigpipe():
    """`--print-config | head -1` where the reader has gone: exit 128 + SIGPIPE, no 'error: Broken pipe' line."""
    import signal
    import subprocess

    read, write = os.pipe()
    os.close(read)  # the reader is gone before a byte is written
    try:
        done = subprocess.run([sys.executable, "-m", "sft_lora.run", str(ROOT / "recipes/tiny.yaml"), "--print-config"],
                              stdout=write, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 128 + signal.SIGPIPE and done.stderr == "", done.stderr[-2000:]


def test_chat_refuses_a_length_limit_below_one(capsys):
    from sft_lora.chat import main as chat_main

    for value in ("0", "-5", "many"):
        with pytest.raises(SystemExit) as info:
            chat_main(["somewhere", "--prompt", "hi", "--max-new-tokens", value])
        assert info.value.code == 2
        assert f"--max-new-tokens: expects a whole number of at least 1, got '{value}'" in capsys.readouterr().err


def test_make_targets_take_paths_with_spaces_and_hangul(tmp_path):
    """`make merge ADAPTER="/tmp/공 간/…"` stopped with 'unrecognized arguments': the Makefile passed paths unquoted."""
    import subprocess

    folder = tmp_path / "공 간"
    folder.mkdir()
    shutil.copy(ROOT / "recipes" / "tiny.yaml", recipe := folder / "tiny.yaml")
    done = subprocess.run(["make", "-s", "-o", ".venv/.installed", "print-config", f"RECIPE={recipe}",
                           "ACCEL=cpu_ddp"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "accelerate_config: cpu_ddp" in done.stdout


def test_make_resume_keeps_the_overrides_before_a_checkpoint_named_in_args(tmp_path):
    """`make resume ARGS="key=value --resume DIR"` ran `--resume key=value --resume DIR`: the override was taken as
    --resume's value, then dropped by the second --resume (training.num_train_epochs=2 resumed a 3-epoch run)."""
    import subprocess

    recipe = write_recipe(tmp_path, tmp_path / "no-model")
    done = subprocess.run(["make", "-s", "-o", ".venv/.installed", "resume", f"RECIPE={recipe}",
                           f"ARGS=model.dtype=float64x --resume {tmp_path / 'nope'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0 and "model.dtype" in done.stderr and "float64x" in done.stderr, done.stderr[-2000:]
    assert "checkpoint directory not found" not in done.stderr
