"""The default job end to end: per-source eval in summary.json and TensorBoard, the loss plot, the console table,
the manifest, the model card, chat on the output and the smoke check's verdict."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from sft_lora.card import model_card
from sft_lora.chat import main as chat_main
from sft_lora.chat import smoke_check
from sft_lora.config import RECIPE_FILE, load_recipe
from sft_lora.fingerprint import file_sha256
from sft_lora.outputs import MANIFEST_FILE, build_manifest
from sft_lora.run import main

from .conftest import ROOT, SAMPLE

pytestmark = pytest.mark.slow
CANARY = "sft-lora-canary-7f3a9c"  # an environment value that must never reach an output file


@pytest.fixture(scope="module")
def default_job(tmp_path_factory, tiny_model):
    """recipes/tiny.yaml as `make train` runs it (3 epochs, merge, smoke check; a process of its own, so Python's
    default warning filters apply), logging to TensorBoard. (recipe, summary, stdout, stderr)"""
    out = tmp_path_factory.mktemp("default_job")
    overrides = [f"model.name_or_path={tiny_model}", f"output.dir={out}/final_model",
                 f"output.checkpoint_dir={out}/ckpt", "training.report_to=tensorboard",
                 "training.dataloader_pin_memory=false", f"data.path={SAMPLE}"]
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml", overrides)
    done = subprocess.run([sys.executable, "-m", "sft_lora.run", str(ROOT / "recipes" / "tiny.yaml"), *overrides],
                          cwd=ROOT, env={**os.environ, "SFT_LORA_TEST_CANARY": CANARY}, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((recipe.adapters_dir / "summary.json").read_text(encoding="utf-8"))
    return recipe, summary, done.stdout, done.stderr


def test_per_source_eval_losses_are_in_summary_json_and_tensorboard(default_job):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe, summary, *_ = default_job
    saved = json.loads((recipe.adapters_dir / "summary.json").read_text(encoding="utf-8"))
    sources = sorted({json.loads(line)["source"] for line in SAMPLE.read_text(encoding="utf-8").splitlines()})
    assert sorted(saved["eval_by_source"]) == sorted(saved["records_by_source"]["eval"]) == sources
    for source, loss in saved["eval_by_source"].items():
        assert loss["after"] < loss["before"], source  # every source learned something
        assert saved["eval_history"][source][0] == [0, loss["before"]]
    assert saved["eval_loss_after"] < saved["eval_loss_before"]
    assert saved["eval_by_source"] == summary["eval_by_source"]

    events = EventAccumulator(str(recipe.checkpoint_dir / "runs"))
    events.Reload()
    tags = events.Tags()["scalars"]
    overall = [(e.step, e.value) for e in events.Scalars("eval/loss")]
    for source in sources:
        logged = [(e.step, e.value) for e in events.Scalars(f"eval/{source}_loss")]
        # every evaluation (before, each epoch, after) logged this source at the same steps as the overall loss
        assert [step for step, _ in logged] == [step for step, _ in overall]
        assert logged[0][1] == pytest.approx(saved["eval_by_source"][source]["before"], rel=1e-5)
        assert logged[-1][1] == pytest.approx(saved["eval_by_source"][source]["after"], rel=1e-5)
        assert f"eval/{source}_mean_token_accuracy" in tags
    # TRL's own eval metrics of a source do not overwrite the overall ones
    assert len(events.Scalars("eval/mean_token_accuracy")) == len(overall)


def test_loss_plot_is_a_real_plot(default_job):
    from PIL import Image

    recipe, summary, *_ = default_job
    assert summary["plot"] == str(recipe.adapters_dir / "loss.png")
    image = Image.open(summary["plot"]).convert("RGB")
    width, height = image.size
    assert width >= 600 and height >= 400
    pixels = list(image.get_flattened_data())
    ink = sum(1 for p in pixels if sum(p) < 600) / len(pixels)  # anything clearly darker than white
    assert 0.01 < ink < 0.5
    colours = {p for p in pixels if max(p) - min(p) > 80}  # saturated colours: the eval curves, not grey axes
    assert len(colours) > 20
    # the train curve (black) and the overall eval curve (matplotlib's tab:red) are drawn
    assert sum(1 for p in pixels if p == (0, 0, 0)) > 200
    assert sum(1 for p in pixels if abs(p[0] - 214) + abs(p[1] - 39) + abs(p[2] - 40) < 30) > 200


def test_source_names_in_any_script_plot_legibly_and_quietly(tmp_path):
    import warnings

    from matplotlib import font_manager

    from sft_lora.report import _legible, write_summary

    names = ["한국어", "ελληνικά", "arith_en"]  # README's own record template has a Korean source
    summary = {"train_losses": [(1, 3.0), (2, 2.5)], "title": "모델 lora",
               "eval_history": {"overall": [(0, 3.1), (2, 2.6)], **{n: [(0, 3.0), (2, 2.4)] for n in names}}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_summary(tmp_path, summary)
    assert not [w for w in caught if "Glyph" in str(w.message)] and (tmp_path / "loss.png").is_file()  # 4 before
    families, drawn = _legible(["eval 한국어", "eval ελληνικά"])
    assert drawn["eval ελληνικά"] == "eval ελληνικά" and families[0] == "DejaVu Sans"  # DejaVu draws Greek
    # Hangul: drawn by an installed font that holds it, else named by its escapes, never an empty box
    fonts = {f.name: f.fname for f in font_manager.fontManager.ttflist}
    held = any(0xD55C in font_manager.get_font(fonts[f]).get_charmap() for f in families if f in fonts)
    assert drawn["eval 한국어"] == ("eval 한국어" if held else "eval \\ud55c\\uad6d\\uc5b4")
    # the end-of-run table lines its values up in terminal columns (a Hangul character takes two)
    from sft_lora.report import summary_table
    from sft_lora.text import columns

    summary |= {"runtime_s": 1.0, "global_step": 2, "checkpoints": "c", "adapters": "a", "eval_loss_before": 3.1,
                "eval_loss_after": 2.6, "eval_by_source": {n: {"before": 3.0, "after": 2.4} for n in names}}
    lines = [line for line in summary_table(summary).splitlines() if "3.0000 -> 2.4000" in line]
    assert len(lines) == 3 and len({columns(line.split("3.0000")[0]) for line in lines}) == 1
    # epochs as a number, not ".2g" (100 epochs read "1e+02", 2.98 read "3", 10.5 read "10")
    for epochs, shown in ((100.0, "(100 epochs)"), (2.98, "(2.98 epochs)"), (10.5, "(10.5 epochs)"),
                          (1.0, "(1 epoch)"), (None, "(— epochs)")):
        assert shown in summary_table(summary | {"epochs": epochs})


def test_console_shows_the_preflight_report_and_the_summary_table(default_job):
    recipe, summary, console, _ = default_job
    assert console.index("pre-flight data report") < console.index("trained to step")
    assert "all checks passed" in console
    table = console[console.index("trained to step"):]
    assert f"steps:        {summary['global_step']} (3 epochs)" in table
    assert f"{summary['tokens']:,} in" in table and "tokens/s" in table and summary["tokens"] > 0
    first, last = summary["train_losses"][0][1], summary["train_losses"][-1][1]
    assert f"{first:.4f} (step 5) -> {last:.4f}" in table
    assert f"best {summary['best_eval_loss']:.4f} at step {summary['best_eval_step']}" in table
    assert f"adapters:     {recipe.adapters_dir}" in table and f"merged:       {recipe.merged_dir}" in table
    # what the library chose for the default job (the tiny model's activations fit: checkpointing stays off)
    assert summary["speed_settings"] == {"padding_free": True, "packing": False, "attention": "sdpa_documents",
                                         "activation_checkpointing": False}
    assert "settings:     padding-free batches, sdpa_documents attention, activation checkpointing off" in table
    for source, loss in summary["eval_by_source"].items():
        assert f"{source}:" in table and f"{loss['after']:.4f}" in table
    sample = summary["smoke"]["samples"][0]  # the smoke check shows one prompt and its answer
    assert f'  example:    {json.dumps(sample["question"], ensure_ascii=False)} -> ' \
           f'{json.dumps(sample["text"], ensure_ascii=False)}' in table


def test_the_console_is_quiet_and_each_evaluation_is_one_line(default_job):
    recipe, summary, stdout, stderr = default_job
    noise = [line for line in (stdout + stderr).splitlines()
             if re.search(r"FutureWarning|DeprecationWarning|UserWarning|Setting accelerator to", line)]
    assert not noise, noise
    assert "{'eval_" not in stdout  # Trainer's raw eval dicts are not printed ...
    assert "'train_runtime'" not in stdout  # ... nor its speed dict: the summary table says it (trained to step …)
    sources = sorted(summary["eval_by_source"])
    lines = [line for line in stdout.splitlines() if line.startswith("eval at step ")]
    # ... each evaluation is one line: before training, after each epoch (the evaluation after training repeats
    # the last one and is not printed again)
    assert [int(line.split()[3].rstrip(":")) for line in lines] == [s for s, _ in summary["eval_history"]["overall"]]
    assert lines[0] == f"eval at step 0: loss {summary['eval_loss_before']:.4f} (" + ", ".join(
        f"{s} {summary['eval_by_source'][s]['before']:.4f}" for s in sources) + ")"
    last = sorted(recipe.checkpoint_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    history = json.loads((last / "trainer_state.json").read_text(encoding="utf-8"))["log_history"]
    assert all(any(f"eval_{s}_loss" in entry for entry in history) for s in sources)  # the raw dicts are kept


def test_manifest_identifies_the_run_and_holds_no_secret(default_job):
    recipe, *_ = default_job
    text = (recipe.adapters_dir / MANIFEST_FILE).read_text(encoding="utf-8")
    manifest = json.loads(text)
    assert manifest["data_sha256"] == {str(SAMPLE): file_sha256(SAMPLE)}
    template = (recipe.adapters_dir / "chat_template.jinja").read_text(encoding="utf-8")
    assert manifest["chat_template_sha256"] == hashlib.sha256(template.encode()).hexdigest()
    assert manifest["seed"] == 42 and manifest["recipe"]["training"]["num_train_epochs"] == 3
    for name in ("torch", "transformers", "trl", "peft"):
        assert manifest["packages"][name] == metadata.version(name)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert manifest["git"]["commit"] == head.stdout.strip()
    assert manifest["hardware"]["cpu_count"] and "gpus" in manifest["hardware"]
    assert CANARY not in text


def test_secret_recipe_values_are_redacted_in_manifest_and_model_card(make_recipe, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    # load_recipe refuses a token in a recipe (tests/test_security.py); redaction is the second line of defence
    recipe = load_recipe(make_recipe(training={"eos_token": "</s>"}))
    recipe.given["training"]["hub_token"] = CANARY
    manifest = build_manifest(recipe, AutoTokenizer.from_pretrained(tiny_model))
    assert manifest["recipe"]["training"]["hub_token"] == "<redacted>"
    assert manifest["recipe"]["training"]["eos_token"] == "</s>"  # a vocabulary token, not a credential
    assert CANARY not in json.dumps(manifest)
    adapters = tmp_path / "x_adapters"
    adapters.mkdir()
    (adapters / RECIPE_FILE).write_text(recipe.to_yaml(), encoding="utf-8")
    card = model_card(adapters, "org/base-model", "original base weights")
    assert CANARY not in card and "hub_token: <redacted>" in card
    assert "base_model: org/base-model" in card.split("---")[1]  # a hub id goes into the card's metadata


def test_merged_model_has_a_model_card(default_job):
    recipe, summary, *_ = default_job
    card = (recipe.merged_dir / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n") and "library_name: transformers" in card.split("---")[1]
    assert str(recipe.model.name_or_path) in card
    for source, n in summary["records_by_source"]["train"].items():
        loss = summary["eval_by_source"][source]
        row = f"| {source} | {n} | {summary['records_by_source']['eval'][source]} | {loss['before']:.4f} | " \
              f"{loss['after']:.4f} |"
        assert row in card
    assert "AutoModelForCausalLM.from_pretrained" in card and "## Recipe" in card


def test_every_readme_the_run_leaves_is_a_model_card_and_every_file_is_readable(default_job, tmp_path, monkeypatch):
    from sft_lora.card import card_text
    from sft_lora.hub import base_license

    recipe, summary, *_ = default_job
    root = Path(recipe.output.dir).parent
    readmes = sorted(root.rglob("README.md"))
    checkpoints = sorted(recipe.checkpoint_dir.glob("checkpoint-*"))
    assert set(readmes) == {recipe.adapters_dir / "README.md", recipe.merged_dir / "README.md"} | {
        c / "README.md" for c in checkpoints}  # none left by TRL in the checkpoint root
    counts = summary["records_by_source"]
    for readme in readmes:
        card = readme.read_text(encoding="utf-8")
        assert "More Information Needed" not in card and "[None]" not in card, readme
        assert f"- base model: `{recipe.model.name_or_path}`" in card and "## Recipe" in card, readme
        assert "| source | train rows | eval rows |" in card, readme  # rows: weighted, as the pre-flight report's
        for source, n in counts["train"].items():
            assert f"| {source} | {n} | {counts['eval'][source]} | " in card, (readme, source)
    adapters_card = (recipe.adapters_dir / "README.md").read_text(encoding="utf-8")
    assert "library_name: peft" in adapters_card.split("---")[1] and "AutoPeftModelForCausalLM" in adapters_card
    last = checkpoints[-1]
    assert f"(checkpoint {last.name.split('-')[1]})" in (last / "README.md").read_text(encoding="utf-8")
    mask = os.umask(0)
    os.umask(mask)
    modes = {str(p): oct(p.stat().st_mode & 0o777) for p in root.rglob("*") if p.is_file()}
    assert set(modes.values()) == {oct(0o666 & ~mask)}, modes  # weights too (safetensors writes them 0600)
    # the license is taken from the base model's own card when it names one
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n", encoding="utf-8")
    assert base_license(str(base)) == {"license": "apache-2.0"} and base_license(str(tmp_path)) == {}
    card = card_text(str(base), {}, {}, "original base weights")
    assert "license: apache-2.0" in card.split("---")[1] and "license apache-2.0" in card
    # `license: other` (EXAONE's) keeps its name, and its link made absolute into the hub base's own repo
    (base / "README.md").write_text("---\nlicense: other\nlicense_name: exaone\nlicense_link: LICENSE\n---\n",
                                    encoding="utf-8")
    assert base_license(str(base)) == {"license": "other", "license_name": "exaone"}  # a local base: no repo to link
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda repo, name, **_: str(base / name))
    card = card_text("LGAI-EXAONE/EXAONE-4.0-1.2B", {}, {}, "original base weights")
    assert "license_name: exaone\nlicense_link: https://huggingface.co/LGAI-EXAONE/EXAONE-4.0-1.2B/blob/main/LICENSE" \
        in card.split("---")[1] and "license exaone" in card


def test_chat_prompt_answers_and_the_smoke_check_says_the_model_stops(default_job, capsys):
    recipe, summary, *_ = default_job
    smoke = summary["smoke"]
    assert smoke["ok"] is True and smoke["stopped"] == smoke["total"] == 3
    assert all(s["stopped"] and 0 < s["tokens"] < smoke["max_new_tokens"] and s["text"] for s in smoke["samples"])
    for directory in (recipe.merged_dir, recipe.adapters_dir):
        question = smoke["samples"][0]["question"]
        assert chat_main([str(directory), "--prompt", question]) == 0
        answer = capsys.readouterr().out.strip()
        assert answer and answer == smoke["samples"][0]["text"]  # greedy: the same answer the smoke check got
    assert chat_main([str(Path(recipe.output.dir)), "--prompt", "hi"]) == 2
    assert "neither an adapters directory" in capsys.readouterr().err



def test_chat_and_merge_refuse_bad_input_in_one_line(default_job, capsys, tmp_path, monkeypatch):
    import io
    import shutil

    import sft_lora.chat as chat
    from sft_lora.merge import main as merge_main

    recipe, *_ = default_job
    merged = shutil.copytree(recipe.merged_dir, tmp_path / "merged")
    # a template with no system role (Gemma's raises): a jinja2 traceback for --system before
    (merged / "chat_template.jinja").write_text("{% for m in messages %}{% if m.role == 'system' %}"
                                                "{{ raise_exception('System role not supported') }}{% endif %}"
                                                "{{ m.content }}{% endfor %}", encoding="utf-8")
    assert chat_main([str(merged), "--prompt", "hi", "--system", "Be brief."]) == 2
    assert capsys.readouterr().err.endswith("\nerror: the chat template refuses this conversation (System role not "
                                            "supported)\n")
    for bad in ("-1", "nan", "inf", "hot"):  # -1 and nan meant greedy, inf uniform noise, exit 0
        with pytest.raises(SystemExit) as exit_:
            chat_main([str(merged), "--prompt", "hi", "--temperature", bad])
        assert exit_.value.code == 2 and "expects a finite number >= 0" in capsys.readouterr().err
    # bytes that are not UTF-8 (argv and stdin keep them as surrogates): tokenizers' TypeError traceback before
    assert chat_main([str(merged), "--prompt", "abc \udcff def"]) == 0
    # Ctrl-C while the model answers: that answer stops, the chat goes on (a KeyboardInterrupt traceback before)
    answers = iter([KeyboardInterrupt, {"text": "ok", "stopped": True}])

    def generate(*args, **kwargs):
        answer = next(answers)
        if answer is KeyboardInterrupt:
            raise KeyboardInterrupt
        return answer

    monkeypatch.setattr(chat, "generate", generate)
    monkeypatch.setattr("sys.stdin", io.StringIO("first\nsecond \udcff\n/exit\n"))
    assert chat_main([str(recipe.merged_dir)]) == 0
    out, err = capsys.readouterr()
    assert "[answer interrupted; the message is dropped]" in out and "Traceback" not in err
    assert "bytes that are not UTF-8" in err
    # a saved recipe edited by hand: tracebacks (yaml's, AttributeError on a list) before
    adapters = shutil.copytree(recipe.adapters_dir, tmp_path / "x_adapters")
    for text, expected in (("model: [1, 2]\n", "not a recipe sft_lora saved (its sections must be mappings)"),
                           ("model: {a: 1\n", "not valid YAML")):
        (adapters / RECIPE_FILE).write_text(text, encoding="utf-8")
        assert chat_main([str(adapters), "--prompt", "hi"]) == 2 and expected in capsys.readouterr().err
        assert merge_main(["--adapter_model", str(adapters)]) == 2 and expected in capsys.readouterr().err


def test_smoke_check_flags_a_model_that_never_stops(tiny_model):
    # the untrained base model has never seen an answer end: greedy decoding runs to the limit
    prompts = [[{"role": "user", "content": "What is 3 plus 4?"}], [{"role": "user", "content": "한국의 수도는?"}]]
    result = smoke_check(tiny_model, prompts, max_new_tokens=16)
    assert result["ok"] is False and result["stopped"] == 0
    assert all(s["tokens"] == 16 for s in result["samples"]) and "ran to the limit" in result["verdict"]


def test_chat_answers_end_inside_the_models_context(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_lora.chat import generate
    from sft_lora.config import RecipeError

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)
    context = model.config.max_position_embeddings

    def prompt(words: int) -> tuple[list[dict[str, str]], int]:
        messages = [{"role": "user", "content": " plus" * words}]
        return messages, len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                           return_dict=True)["input_ids"])

    messages, length = prompt(1)
    messages, length = prompt(context - 10 - (length - 1))  # ten positions left: one word, one token
    assert length == context - 10
    answer = generate(model, tokenizer, messages, max_new_tokens=64)  # the untrained base never stops by itself
    assert answer["limit"] == answer["tokens"] == 10 and not answer["stopped"]  # ran past the context before
    messages = [{"role": "user", "content": " plus" * context}]
    with pytest.raises(RecipeError, match=r"the conversation is 1,\d{3} tokens, the model's context "
                       f"{context:,}; send a shorter message \\(or /reset the chat\\)"):
        generate(model, tokenizer, messages)
    # transformers' "Token indices sequence length is longer …" warning came first (it marks the tokenizer so)
    assert not tokenizer.deprecation_warnings.get("sequence-length-is-longer-than-the-specified-maximum")


def test_a_card_shows_no_loss_before_training_without_an_eval_at_step_0(make_recipe):
    from sft_lora.card import checkpoint_card

    # `eval_on_start: false`: the first eval is at step 4, after training began; it is not "eval loss before"
    recipe = load_recipe(make_recipe(data={"eval_split": 0.25}, training={"eval_on_start": False}))
    history = [{"step": 2, "loss": 5.0}, {"step": 4, "eval_loss": 4.5, "eval_a_loss": 4.25},
               {"step": 8, "eval_loss": 3.5, "eval_a_loss": 3.25}]
    card = checkpoint_card(recipe, {"train": {"a": 6}, "eval": {"a": 2}}, history, 8)
    assert "| a | 6 | 2 | — | 3.2500 |" in card and "| **all** | 6 | 2 | — | 3.5000 |" in card
    assert "| eval loss before | eval loss after |" in card
    # a checkpoint between evaluations (the default job's step 60, evaluated at 48): the last one's losses, said so
    card = checkpoint_card(recipe, {"train": {"a": 6}, "eval": {"a": 2}}, history, 10)
    assert "| eval loss before | eval loss at step 8 |" in card and "| a | 6 | 2 | — | 3.2500 |" in card
    card = checkpoint_card(recipe, {"train": {"a": 6}, "eval": {"a": 2}}, [{"step": 0, "eval_loss": 6.0,
                                                                           "eval_a_loss": 6.5}, *history], 8)
    assert "| a | 6 | 2 | 6.5000 | 3.2500 |" in card and "| **all** | 6 | 2 | 6.0000 | 3.5000 |" in card
    # a checkpoint saved before any eval since step 0 (the default job's steps 20 and 40): the step-0 loss was
    # shown as its "after" too, though it is the untrained model's
    card = checkpoint_card(recipe, {"train": {"a": 6}, "eval": {"a": 2}}, [{"step": 0, "eval_loss": 6.0,
                                                                           "eval_a_loss": 6.5}], 4)
    assert "| a | 6 | 2 | 6.5000 | — |" in card and "| **all** | 6 | 2 | 6.0000 | — |" in card
    # a source held out only has its row too (the rows left it out and did not add up to **all**), and the data
    # files are listed as files, not as a Python list
    recipe = load_recipe(make_recipe(), ['data.path=[{path: a.jsonl, source: x, weight: 0.5}, b.jsonl]',
                                         "data.eval_split=0", "data.eval_path=c.jsonl"])
    card = checkpoint_card(recipe, {"train": {"a": 6}, "eval": {"a": 2, "b": 3}}, [
        {"step": 8, "eval_loss": 3.5, "eval_a_loss": 3.25, "eval_b_loss": 3.75}], 8)
    assert "| a | 6 | 2 | — | 3.2500 |\n| b | 0 | 3 | — | 3.7500 |\n| **all** | 6 | 5 | — | 3.5000 |" in card
    assert "- data: `a.jsonl` × 0.5 (source x), `b.jsonl`\n" in card


def test_a_source_with_control_characters_keeps_the_card_table_and_the_console_table_whole(make_recipe):
    """A newline or `|` in a source broke the card's markdown table; ESC and a carriage return reached the console."""
    from sft_lora.card import checkpoint_card
    from sft_lora.report import summary_table

    names = ["a|b", "line1\nline2", "\x1b[31mRED\x1b[0m", "cr\rover"]
    recipe = load_recipe(make_recipe(data={"eval_split": 0.25}))
    card = checkpoint_card(recipe, {"train": dict.fromkeys(names, 6), "eval": dict.fromkeys(names, 2)}, [], 8)
    table = card[card.index("| source |"):card.index("| **all** |")].splitlines()
    assert len(table) == 2 + len(names) and all(re.fullmatch(r"\|( (?:[^|\\]|\\.)+ \|){5}", line) for line in table[2:])
    assert [line.split(" | ")[0] for line in table[2:]] == ["| \\x1b[31mRED\\x1b[0m", "| a\\|b", "| cr over",
                                                            "| line1 line2"]
    summary = {"global_step": 8, "runtime_s": 1.0, "train_losses": [], "eval_loss_after": 2.0,
               "eval_by_source": {name: {"after": 2.0} for name in names}, "checkpoints": "c", "adapters": "a",
               "summary_file": "s", "plot": None}
    text = summary_table(summary)
    assert all(c.isprintable() for line in text.split("\n") for c in line), text
    assert "  \\x1b[31mRED\\x1b[0m:" in text and "  line1 line2:" in text and "  cr over:" in text


def test_sources_that_would_share_an_eval_metric_are_refused(make_recipe, capsys):
    from datasets import Dataset

    from sft_lora.config import RecipeError
    from sft_lora.trainer import per_source_eval_sets

    recipe = load_recipe(make_recipe())
    evaluation = Dataset.from_dict({"source": ["x y", "x_y", "z", "x y"]})
    with pytest.raises(RecipeError, match="sources 'x y' and 'x_y' share the eval metric eval_x_y_loss"):
        per_source_eval_sets(recipe, evaluation)  # one loss logged for both, under one name (it was)
    sets = per_source_eval_sets(recipe, evaluation.select([0, 2, 3]))
    assert sorted(sets) == ["eval", "eval/x y", "eval/z"] and len(sets["eval/x y"]) == 2
    recipe = load_recipe(make_recipe(report={"eval_per_source": False}))
    assert per_source_eval_sets(recipe, evaluation) is evaluation
    # --check says it as the run does (it passed, then the run stopped after the report)
    records = make_recipe().parent / "clash.jsonl"
    records.write_text("".join(json.dumps({"input": f"q{n}", "output": "a", "source": ("web qa", "web_qa")[n % 2]})
                               + "\n" for n in range(8)))
    for flags in (["--check"], []):
        assert main([str(make_recipe(data={"path": str(records), "eval_split": 0.5})), *flags]) == 2
        assert "sources 'web qa' and 'web_qa' share the eval metric eval_web_qa_loss" in capsys.readouterr().err


def test_evaluating_per_source_does_not_change_the_trained_weights(tmp_path, tiny_model):
    """Each eval dataloader draws a seed from the global RNG; the extra per-source passes changed the dropout masks
    of every later step, so a reporting switch changed the adapters (with lora_dropout > 0)."""
    from safetensors.torch import load_file

    from sft_lora.run import train

    from .conftest import write_recipe

    adapters = {}
    for per_source in (True, False):
        (tmp_path / str(per_source)).mkdir()
        recipe = load_recipe(write_recipe(tmp_path / str(per_source), tiny_model, lora={"lora_dropout": 0.1},
                                          training={"max_steps": 3, "eval_strategy": "steps", "eval_steps": 1},
                                          report={"eval_per_source": per_source, "smoke_prompts": 0}))
        summary = train(recipe)
        assert bool(summary["eval_by_source"]) is per_source  # the switch did switch
        adapters[per_source] = load_file(recipe.adapters_dir / "adapter_model.safetensors")
    assert adapters[True].keys() == adapters[False].keys()
    assert all(torch.equal(adapters[True][k], adapters[False][k]) for k in adapters[True])


def test_the_cards_snippet_renders_the_prompt_as_trained(tiny_model):
    """The card's "Use" code asked with a bare user turn: no system prompt, none of data.chat_template_kwargs nor
    Qwen3's enable_thinking=False (another prompt than trained), and its generate() ignored training.eos_token."""
    from transformers import AutoTokenizer

    from sft_lora.card import card_text
    from sft_lora.data import opened
    from sft_lora.model import DEFAULT_CHAT_TEMPLATE
    from sft_lora.turns import template_kwargs

    template = "{% if enable_thinking is false %}[no think]{% endif %}{{ style }}" + DEFAULT_CHAT_TEMPLATE
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = template
    for fold in (False, True):
        data = {"system_prompt": "Answer briefly.", "fold_system_prompt": fold, "chat_template_kwargs": {"style": "S"}}
        card = card_text(str(tiny_model), {"data": data, "training": {"eos_token": "</s>"}}, {}, None, "", template)
        code = card.split("```python\n")[1].split("```")[0].splitlines()
        namespace = {"tokenizer": tokenizer}
        exec("\n".join(line for line in code if line.startswith(("messages =", "inputs ="))), namespace)
        trained = tokenizer.apply_chat_template(opened([{"role": "user", "content": "..."}], "Answer briefly.", fold),
                                                add_generation_prompt=True, **template_kwargs(template, {"style": "S"}))
        assert namespace["inputs"]["input_ids"][0].tolist() == trained["input_ids"]
        assert tokenizer.decode(trained["input_ids"]).startswith("[no think]S<|")
        assert "model.generate(**inputs, max_new_tokens=256, eos_token_id=tokenizer.eos_token_id)" in card
