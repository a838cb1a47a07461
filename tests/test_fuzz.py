"""Hostile input, fuzzed: seeded mutations of recipes (values, structure, raw YAML text and bytes), overrides and data
records, run in-process through the user's pre-flight commands (`--print-config`, `--check`) and the data reader.
Each case must end with exit 0, or exit 2 and exactly one `error:` line on stderr — never a traceback — write no
file outside the output roots (the prepared-data cache aside), echo nothing credential-shaped (the pool of values
holds tokens) and leave its inputs byte-identical.

`FUZZ_CASES` sets the number of cases (default 3,000: ~25 s on an idle 2-core machine), `FUZZ_SEED` the
seed; `make fuzz` runs 20,000.
A failure names its case number: rerun it alone with FUZZ_SEED=<seed> FUZZ_ONLY=<case>.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import time
from pathlib import Path

import pytest
import yaml

from sft_lora import run
from sft_lora.config import RecipeError, load_recipe
from sft_lora.data import load_datasets
from sft_lora.text import TOKEN_FORMATS, printable

from .conftest import FUZZ_SUMMARY, ROOT, write_recipe

CASES = int(os.environ.get("FUZZ_CASES", "3000"))
SEED = int(os.environ.get("FUZZ_SEED", "12"))
ONLY = os.environ.get("FUZZ_ONLY")
CHECK_EVERY = int(os.environ.get("FUZZ_CHECK_EVERY", "25"))  # 1 in 25 runs `--check` (~70 ms: it tokenizes)

KEYS = [
    "use_qlora", "accelerate_config", "model.name_or_path", "model.name", "model.dtype", "model.revision",
    "model.attn_implementation", "model.device_map", "model.trust_remote_code", "data.path", "data.eval_path",
    "data.eval_split", "data.input_field", "data.output_field", "data.source_field", "data.system_prompt",
    "data.fold_system_prompt", "data.chat_template", "data.on_bad_record", "data.split", "lora.r", "lora.lora_alpha",
    "lora.lora_dropout", "lora.target_modules", "lora.task_type", "training.learning_rate", "training.max_steps",
    "training.num_train_epochs", "training.max_length", "training.packing", "training.padding_free",
    "training.per_device_train_batch_size", "training.gradient_accumulation_steps", "training.seed",
    "training.eval_strategy", "training.report_to", "training.warmup_ratio", "training.lr_scheduler_type",
    "training.save_steps", "training.logging_steps", "training.bf16", "training.optim", "output.dir",
    "output.checkpoint_dir", "output.merge", "output.merge_into", "wandb.run_name", "wandb.mode", "wandb.project",
    "check.enabled", "check.ignore", "check.max_truncated_share", "check.sources", "report.smoke_prompts",
    "report.smoke_max_new_tokens", "quantization.bnb_4bit_quant_type", "training.output_dir", "training.hub_token",
    "trainig.max_steps", "lora.rr", "model", "data", "training", "lora.r.x",
]
VALUES = [
    None, "", " ", 0, 1, -1, 2, 7, 3.0e-3, -0.5, 0.5, 1.5, 1e308, -1e308, 2**31, 2**63, 2**64, -(2**70),
    float("nan"), float("inf"), float("-inf"), True, False, "yes", "no", "null", "nan", "inf", "1e-4", "1.0e-4",
    "abc", "auto", "none", "wandb", "float32", "bf16", "skip", "fail", "2024-01-01", "../../../escaped", "/abs/path",
    "..", ".", "a/b/c", "x.jsonl", "${SFT_LORA_FUZZ_UNSET}", "${SFT_LORA_FUZZ_UNSET:-3}", "${HOME}",
    "hf_" + "A" * 34, "sk-" + "b" * 30, "ghp_" + "C" * 36, "AKIA" + "D" * 16, "f00d" * 10, "run\nname",
    "tab\there", "\x00nul", "한국어", "\u202eltr", "é" * 300, "x" * 5000, [], [1, 2], ["none"], ["wandb", "none"],
    [[[]]], {}, {"a": 1}, {"path": "x.jsonl", "weight": 2}, [{"path": "x.jsonl"}, {"weight": float("nan")}],
]
OVERRIDE_VALUES = [
    "[1", "{a: 1, a: 2}", "!!binary aGk=", "!!python/object/apply:os.system [true]", "!foo 1", "&a [*a]",
    "*nope", ".nan", ".inf", "-.inf", "1e999", str(2**70), "'unterminated", '"\\ud800"', "- a\n- b", "a: b: c",
    "\t1", "~", "0x1F", "0o17", "1_000", "+1", "1:30", "=", "==", "[]", "{}", "%YAML 1.1", "---\n---", "? a",
]
TEXT_MUTATIONS = [
    "dup_key", "dup_section", "alias_bomb", "tag", "truncate", "flip_byte", "bom", "tab", "anchor_cycle",
    "merge_key", "deep", "not_utf8", "multi_doc", "empty", "binary",
]
GOOD = {"input": "What is 2 plus 2?", "output": "2 plus 2 is 4.", "source": "arith_en"}
RECORD_VALUES = [None, 1, -1, 2**70, 1.5, float("nan"), True, "", " ", "ok", [], ["a"], {}, {"a": "b"}, "x" * 3000,
                 "\ud800", "\udc00x", "😀", "\x00", "a\nb", "한국어"]


def _value(rng: random.Random):
    return rng.choice(VALUES)


def _mutated_recipe(rng: random.Random, base: dict) -> dict:
    recipe = json.loads(json.dumps(base))  # deep copy
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(KEYS)
        section, _, name = key.partition(".")
        kind = rng.random()
        if not name:
            recipe[section] = _value(rng) if kind < 0.5 else recipe.get(section)
            if kind > 0.8:
                recipe.pop(section, None)
        elif not isinstance(recipe.get(section), dict):
            recipe[section] = {name: _value(rng)}
        elif kind < 0.8:
            recipe[section][name] = _value(rng)
        else:
            recipe[section].pop(name, None)
    return recipe


def _mutated_text(rng: random.Random, text: str) -> bytes:
    kind = rng.choice(TEXT_MUTATIONS)
    lines = text.splitlines()
    if kind == "dup_key":
        n = rng.randrange(len(lines))
        lines.insert(n + 1, lines[n]) if lines[n].startswith("  ") else lines.append(lines[n])
    elif kind == "dup_section":
        lines += ["training:", "  max_steps: 2"]
    elif kind == "alias_bomb":
        depth = rng.randint(2, 12)
        lines = ['z0: &z0 ["l","l","l","l","l","l","l","l","l","l"]']
        lines += [f"z{i}: &z{i} [{', '.join([f'*z{i - 1}'] * 10)}]" for i in range(1, depth)] + text.splitlines()
        lines.append(f"wandb: {{run_name: *z{depth - 1}}}")
    elif kind == "tag":
        tag = rng.choice(["!!python/name:os.system", "!!binary", "!!set", "!!omap", "!custom", "!!timestamp",
                          "!!str", "!!float", "!!python/tuple"])
        n = rng.randrange(len(lines))
        head, sep, tail = lines[n].partition(": ")
        lines[n] = f"{head}: {tag} {tail}" if sep else lines[n]
    elif kind == "anchor_cycle":
        lines.append("lora: &c {r: *c}")
    elif kind == "merge_key":
        lines = ["base: &b {r: 4}"] + lines + ["lora: {<<: *b, lora_alpha: 8}"]
    elif kind == "deep":
        n = rng.choice([10, 500, 2000, 20000])
        lines.append("wandb: {run_name: " + "[" * n + "]" * n + "}")
    elif kind == "multi_doc":
        lines += ["---", "a: 1"]
    elif kind == "empty":
        lines = rng.choice([[], ["~"], ["---"], ["# only a comment"], ["[]"], ["42"], ["'text'"]])
    elif kind == "tab":
        n = rng.randrange(len(lines))
        lines[n] = "\t" + lines[n]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    if kind == "truncate":
        data = data[: rng.randrange(len(data))]
    elif kind == "flip_byte":
        n = rng.randrange(len(data))
        data = data[:n] + bytes([rng.randrange(256)]) + data[n + 1:]
    elif kind == "bom":
        data = b"\xef\xbb\xbf" + data
    elif kind == "not_utf8":
        data = data.replace(b"false", "fa\xe9lse".encode("latin-1"), 1)
    elif kind == "binary":
        data = bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
    return data


def _override(rng: random.Random) -> str:
    key = rng.choice(KEYS)
    if rng.random() < 0.5:
        value = rng.choice(OVERRIDE_VALUES)
    else:
        value = _value(rng)
        value = "" if value is None else value if isinstance(value, str) else json.dumps(value)
    return rng.choice([f"{key}={value}", f"{key}={value}", key, f"={value}", f"{key}.x={value}"])


def _conversation(rng: random.Random) -> dict:
    """A multi-turn record (OpenAI messages or ShareGPT), some turns mutated."""
    key, role, text = rng.choice([("messages", "role", "content"), ("conversations", "from", "value")])
    roles = ["system", "user", "assistant", "human", "gpt", "tool", "", None, 3]
    turns = [{role: ["user", "assistant"][i % 2] if key == "messages" else ["human", "gpt"][i % 2], text: f"t{i}"}
             for i in range(rng.randint(0, 6))]
    for turn in rng.sample(turns, k=min(len(turns), rng.randint(0, 2))):
        field = rng.choice([role, text, "extra"])
        turn[field] = rng.choice(roles) if field == role else rng.choice(RECORD_VALUES)
    return {key: turns if rng.random() > 0.1 else rng.choice(RECORD_VALUES)}


def _record(rng: random.Random):
    if rng.random() < 0.25:
        return _conversation(rng)
    record = dict(GOOD)
    for _ in range(rng.randint(0, 2)):
        field = rng.choice(["input", "output", "source", "extra"])
        if rng.random() < 0.2:
            record.pop(field, None)
        else:
            record[field] = rng.choice(RECORD_VALUES)
    return record if rng.random() > 0.05 else rng.choice([None, 1, "text", [record], []])


def _data_bytes(rng: random.Random, jsonl: bool) -> bytes:
    records = [_record(rng) if rng.random() < 0.3 else dict(GOOD, output=f"answer {i}.")
               for i in range(rng.randint(0, 12))]
    if not jsonl:
        body = json.dumps(records, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
        return body[: rng.randrange(len(body) + 1)] if rng.random() < 0.1 else body
    lines = [json.dumps(r, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass") for r in records]
    if lines and rng.random() < 0.3:
        n = rng.randrange(len(lines))
        lines[n] = rng.choice([lines[n][:-3], b"{not json", b'{"input": "caf\xe9", "output": "b"}', b"\xff\xfe",
                               b'{"input": ' + b"[" * 50_000 + b"]" * 50_000 + b', "output": "b"}', b"   ", b"\x00",
                               b'{"input": "\\ud800", "output": "b"}', b'{"input": "a", "input": "b", "output": "c"}',
                               b'{"input": "a", "output": "b"} trailing', b"[" * 200_000])
    return b"\n".join(lines) + (b"\n" if rng.random() < 0.9 else b"")


class Case:
    """One fuzz case's working directory: inputs written fresh, output roots below it."""

    def __init__(self, work: Path, model: Path) -> None:
        self.work, self.model = work, model
        self.inputs: dict[Path, str] = {}

    def write(self, name: str, data: bytes) -> Path:
        path = self.work / name
        path.write_bytes(data)
        self.inputs[path] = hashlib.sha256(data).hexdigest()
        return path


def _call(argv: list[str]) -> tuple[int, str, str | None]:
    """(exit code, stderr, traceback text or None) of `python -m sft_lora.run argv`, in-process."""
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = run.main(argv)
    except BaseException as exc:  # a traceback the user would see
        import traceback

        return -1, err.getvalue(), "".join(traceback.format_exception(exc))[-2500:]
    return code, err.getvalue(), None


def _read(case: Case, data: Path, rng: random.Random) -> tuple[int, str, str | None]:
    """The data reader alone (what `--check` and training call first), with run.main's exit-code rule."""
    path = write_recipe(case.work, case.model, data={"path": str(data), "eval_split": rng.choice([0.0, 0.15, 0.5, 0.9]),
                                                      "on_bad_record": rng.choice(["fail", "skip"])})
    case.inputs[path] = hashlib.sha256(path.read_bytes()).hexdigest()
    recipe = load_recipe(path)
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            load_datasets(recipe.data, seed=SEED)
        except RecipeError as exc:
            return 2, f"error: {printable(str(exc))}\n", None
        except BaseException as exc:
            import traceback

            return -1, "", "".join(traceback.format_exception(exc))[-2500:]
    return 0, "", None


def _one(n: int, case: Case, base: dict) -> tuple[str, tuple[int, str, str | None]]:
    rng = random.Random(f"{SEED}-{n}")
    jsonl = rng.random() < 0.8
    data = case.write("d.jsonl" if jsonl else "d.json", _data_bytes(rng, jsonl) if rng.random() < 0.5 else
                      b"".join(json.dumps(dict(GOOD, output=f"a{i}.")).encode() + b"\n" for i in range(12)))
    mode = "check" if n % CHECK_EVERY == 0 else rng.choice(["print", "print", "read"])
    if mode == "read":
        return f"read {data.name}", _read(case, data, rng)
    recipe = _mutated_recipe(rng, {**base, "data": {**base["data"], "path": str(data)}}) if rng.random() < 0.6 \
        else json.loads(json.dumps({**base, "data": {**base["data"], "path": str(data)}}))
    text = yaml.safe_dump(recipe, allow_unicode=rng.random() < 0.5)
    path = case.write("recipe.yaml", _mutated_text(rng, text) if rng.random() < 0.35 else text.encode("utf-8"))
    overrides = [_override(rng) for _ in range(rng.choice([0, 0, 1, 2, 3]))]
    overrides = [o for o in overrides if not o.startswith("-")]  # argparse's own flags are out of scope
    flag = "--check" if mode == "check" else "--print-config"
    return f"{flag} {overrides!r}", _call([str(path), flag, *overrides])


def _problem(case: Case, code: int, stderr: str, traceback: str | None) -> str | None:
    """What is wrong with a case's outcome, or None."""
    lines = stderr.splitlines()
    if traceback or code not in (0, 2):
        return f"exit {code}, traceback:\n{traceback}"
    if code == 2 and (len(lines) != 1 or not lines[0].startswith("error: ")):
        return f"exit 2 with {len(lines)} stderr lines:\n{stderr[-2000:]}"
    if any(pattern.search(stderr) for pattern in TOKEN_FORMATS.values()):
        return f"a credential-shaped value echoed on stderr: {stderr[-2000:]}"
    changed = [str(p) for p, digest in case.inputs.items() if hashlib.sha256(p.read_bytes()).hexdigest() != digest]
    roots = (case.work / "final_model", case.work / "checkpoints")
    stray = [str(p) for p in _tree(case.work) - set(case.inputs) if not any(r in p.parents for r in roots)]
    return f"inputs changed {changed}, files outside the output roots {stray}" if changed or stray else None


def _tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_fuzz_recipes_overrides_and_data(tmp_path, tiny_model, request, monkeypatch):
    import datasets

    monkeypatch.delenv("SFT_LORA_FUZZ_UNSET", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    datasets.disable_progress_bars()  # a bar is not an error line; exit 2 must leave exactly one line
    request.addfinalizer(datasets.enable_progress_bars)
    base = yaml.safe_load(write_recipe(tmp_path, tiny_model, data={"eval_split": 0.15}).read_text())
    model_files = {p: p.read_bytes() for p in tiny_model.rglob("*") if p.is_file()}
    repo_before = set(os.listdir(ROOT))
    counts = {0: 0, 2: 0}
    failures: list[str] = []
    start = time.perf_counter()
    numbers = [int(ONLY)] if ONLY else range(CASES)
    for n in numbers:
        work = tmp_path / f"case{n % 2}"  # reused: each case rewrites its inputs
        case = Case(work, tiny_model)
        work.mkdir(exist_ok=True)
        for stale in sorted(_tree(work), reverse=True):
            stale.unlink() if stale.is_file() or stale.is_symlink() else stale.rmdir()
        what, (code, stderr, traceback) = _one(n, case, base)
        if problem := _problem(case, code, stderr, traceback):
            failures.append(f"case {n} ({what}): {problem}")
        else:
            counts[code] += 1
        if len(failures) >= 5:
            break
    elapsed = time.perf_counter() - start
    assert {p: p.read_bytes() for p in tiny_model.rglob("*") if p.is_file()} == model_files, "the base model changed"
    assert set(os.listdir(ROOT)) == repo_before, "a file was written into the repository"
    summary = (f"fuzz: {sum(counts.values()) + len(failures)} cases (seed {SEED}) in {elapsed:.0f} s: {counts[0]} "
               f"exit 0, {counts[2]} exit 2 with one line, {len(failures)} failed")
    request.config.stash[FUZZ_SUMMARY] = summary
    print("\n" + summary)
    assert not failures, summary + "\n\n" + "\n\n".join(failures)
    assert ONLY or counts[0] > CASES // 20 and counts[2] > CASES // 4, summary  # both outcomes well exercised


# What the fuzzer found, each once a traceback: a tag on a value it cannot type, an override below a key that is not
# a section, a list where upstream wants an enum, a path name longer than the file system allows.
FOUND = [(["--print-config", "training.learning_rate=!!float false"], "not valid YAML (could not convert string"),
         (["--print-config", "use_qlora.x=1"], "command line: use_qlora is not a section"),
         (["--print-config", "training.lr_scheduler_type=[1]"], "training.lr_scheduler_type expects"),
         (["--check", f"data.path={'é' * 300}.jsonl"], "File name too long")]


@pytest.mark.parametrize(("argv", "expected"), FOUND)
def test_what_the_fuzzer_found_is_one_line(argv, expected, tmp_path, tiny_model):
    code, stderr, traceback = _call([str(write_recipe(tmp_path, tiny_model)), *argv])
    assert traceback is None and code == 2 and len(stderr.splitlines()) == 1, stderr or traceback
    assert expected in stderr, stderr
