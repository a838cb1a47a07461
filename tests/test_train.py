"""End to end on the tiny model: label masks, LoRA and QLoRA runs, seed layout, resume, merge parity."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch

from sft_lora.config import RECIPE_FILE, RecipeError, load_recipe
from sft_lora.data import load_datasets
from sft_lora.merge import merge_adapter
from sft_lora.model import DEFAULT_CHAT_TEMPLATE, load_tokenizer
from sft_lora.run import main, train
from sft_lora.trainer import build_trainer

from .conftest import SAMPLE, write_recipe

pytestmark = pytest.mark.slow


def test_labels_are_exactly_the_answer_and_its_end_of_turn_token(make_recipe):
    recipe = load_recipe(make_recipe(data={"system_prompt": "Answer briefly."}))
    tokenizer = load_tokenizer(recipe.model, recipe.data)
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    train_set, eval_set = load_datasets(recipe.data)
    trainer = build_trainer(recipe, tokenizer, train_set, eval_set)
    prepared = trainer.train_dataset
    assert len(prepared) == len(train_set)
    for example, row in zip(prepared, train_set, strict=True):
        answer = row["completion"][0]["content"]
        prompt_text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        # token by token: the prompt (system + user turn + assistant header) carries no label ...
        assert example["input_ids"] == prompt_ids + answer_ids
        assert example["labels"][: len(prompt_ids)] == [-100] * len(prompt_ids)
        # ... and every answer token plus the closing EOS carries its own id as label.
        assert example["labels"][len(prompt_ids):] == answer_ids
    first = prepared[0]
    labelled = [t for t, label in zip(first["input_ids"], first["labels"], strict=True) if label != -100]
    rendered = tokenizer.decode(labelled)
    assert rendered.endswith(tokenizer.eos_token)


def test_tokenizer_without_template_gets_the_default_and_a_recipe_template_wins(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(tiny_model)
    bare.chat_template = None
    bare.save_pretrained(tmp_path / "bare")
    (tmp_path / "bare" / "chat_template.jinja").unlink(missing_ok=True)
    recipe = load_recipe(write_recipe(tmp_path, tmp_path / "bare"))
    assert load_tokenizer(recipe.model, recipe.data).chat_template == DEFAULT_CHAT_TEMPLATE
    custom = tmp_path / "t.jinja"
    custom.write_text("{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}")
    recipe = load_recipe(write_recipe(tmp_path, tmp_path / "bare", data={"chat_template": str(custom)}))
    assert load_tokenizer(recipe.model, recipe.data).chat_template == custom.read_text()
    # a template that cannot serve: one line naming the file (jinja's or Arrow's traceback before)
    for text, says in [(b"{% for m in messages %}{{ m.content }", "does not render a question and its answer"),
                       (b"{{ raise_exception('no system role') }}", "(no system role); fix the template"),
                       (b"\xff\xfe{{ x }}", "not valid UTF-8"), (b"  \n", "the chat template is empty")]:
        custom.write_bytes(text)
        with pytest.raises(RecipeError, match=re.escape(f"{custom}: ") + ".*" + re.escape(says)):
            load_tokenizer(recipe.model, recipe.data)
    # a base tokenizer that adds its BOS (Llama, Gemma): the default template starts with it (it was never
    # rendered: rows are encoded without special tokens, so such a base model trained and chatted with no BOS)
    from tokenizers import Tokenizer, processors

    from sft_lora.prepare import prepare_datasets

    backend = Tokenizer.from_file(str(tmp_path / "bare" / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bare.bos_token_id)])
    backend.save(str(tmp_path / "bare" / "tokenizer.json"))
    recipe = load_recipe(write_recipe(tmp_path, tmp_path / "bare", data={"eval_split": 0}))
    tokenizer = load_tokenizer(recipe.model, recipe.data)
    assert tokenizer.chat_template == "{{ bos_token }}" + DEFAULT_CHAT_TEMPLATE
    rows = prepare_datasets(recipe.training, tokenizer, load_datasets(recipe.data)[0]).train["input_ids"]
    assert {ids[0] for ids in rows} == {bare.bos_token_id} and all(ids.count(bare.bos_token_id) == 1 for ids in rows)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model):
    """One 6-step LoRA run with checkpoints at steps 3 and 6, merged at the end."""
    directory = tmp_path_factory.mktemp("lora")
    recipe = load_recipe(write_recipe(directory, tiny_model, output={"merge": True}))
    return recipe, train(recipe)


def test_lora_run_writes_the_seed_layout(lora_run):
    recipe, summary = lora_run
    root = Path(recipe.output.dir)
    adapters, merged = root / "tiny-llama" / "1" / "lora_adapters", root / "tiny-llama" / "1" / "lora_merged"
    assert summary["global_step"] == 6 and summary["adapters"] == str(adapters)
    for name in ("adapter_model.safetensors", "adapter_config.json", "chat_template.jinja", RECIPE_FILE):
        assert (adapters / name).is_file(), name
    assert not list(adapters.glob("*.bin")), "no pickles in the output"
    assert load_recipe(adapters / RECIPE_FILE).to_yaml() == recipe.to_yaml()  # the saved recipe reproduces it
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "chat_template.jinja", "merge_info.json"):
        assert (merged / name).is_file(), name
    generation = json.loads((merged / "generation_config.json").read_text())
    eos = json.loads((adapters / "tokenizer_config.json").read_text())["eos_token"]
    from transformers import AutoTokenizer

    assert generation["eos_token_id"][0] == AutoTokenizer.from_pretrained(adapters).convert_tokens_to_ids(eos)
    assert sorted(p.name for p in recipe.checkpoint_dir.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert not list(root.rglob("*.tmp-*")), "no temporary directory left behind"


def _logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["What is 3 plus 4?", "한국의 수도는 어디인가요?"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.float()


def test_merged_lora_model_reproduces_the_adapter_model(lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe, summary = lora_run
    tokenizer = AutoTokenizer.from_pretrained(summary["adapters"])
    base = AutoModelForCausalLM.from_pretrained(recipe.model.name_or_path, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, summary["adapters"]).eval()
    merged = AutoModelForCausalLM.from_pretrained(summary["merged"], dtype=torch.float32).eval()
    base_only = AutoModelForCausalLM.from_pretrained(recipe.model.name_or_path, dtype=torch.float32).eval()
    expected = _logits(adapted, tokenizer)
    assert (expected - _logits(base_only, tokenizer)).abs().max() > 1e-2  # the adapter changed something
    assert (_logits(merged, tokenizer) - expected).abs().max() <= 1e-5
    info = json.loads((Path(summary["merged"]) / "merge_info.json").read_text())
    assert info["merged_into"] == "original base weights" and info["dtype"] == "float32"


def _files(directory: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_merged_checkpoint_is_out_of_reach_of_checkpoint_rotation(lora_run, tmp_path):
    import shutil

    from transformers.trainer_utils import sort_checkpoints

    recipe, _ = lora_run
    root = tmp_path / "lora"  # a copy: the module's run stays as it was
    shutil.copytree(recipe.checkpoint_dir, root)
    merged = merge_adapter(root / "checkpoint-3")
    assert merged == root / "merged-checkpoint-3" and (merged / "model.safetensors").is_file()
    # what Trainer's save_total_limit rotation may delete (`checkpoint-3_merged` was among them)
    assert sorted(Path(p).name for p in sort_checkpoints(str(root))) == ["checkpoint-3", "checkpoint-6"]


def test_merge_after_train_is_up_to_date_and_merges_again_when_the_adapters_change(lora_run, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    from sft_lora.merge import main as merge_main

    recipe, summary = lora_run
    merged = Path(summary["merged"])
    before = _files(merged)
    for _ in range(2):  # `make train && make merge && make merge`: each merge exits 0 and writes nothing
        assert merge_main(["--adapter_model", summary["adapters"]]) == 0
        assert "up to date" in capsys.readouterr().out
    assert _files(merged) == before
    # asking a plain LoRA adapter for the QLoRA merge target: said, and the same (original-weights) merge
    assert merge_main(["--adapter_model", summary["adapters"], "--merge_into", "dequantized"]) == 0
    out = capsys.readouterr().out
    assert "is a plain LoRA adapter (no 4-bit base to dequantize); merging into the original weights" in out
    assert "up to date" in out and _files(merged) == before
    # the same base named by a relative path is the same merge (refused as another base's before)
    base = Path(recipe.model.name_or_path)
    relative = os.path.relpath(base, Path.cwd())
    assert merge_main(["--adapter_model", summary["adapters"], "--base_model", relative]) == 0
    assert "up to date" in capsys.readouterr().out and _files(merged) == before
    copy = shutil.copytree(summary["adapters"], tmp_path / "x_adapters")
    assert merge_main(["--adapter_model", str(copy)]) == 0  # a fresh output: merged
    first = _files(tmp_path / "x_merged")
    weights = load_file(copy / "adapter_model.safetensors")
    save_file({k: v * 2 for k, v in weights.items()}, copy / "adapter_model.safetensors")
    assert merge_main(["--adapter_model", str(copy)]) == 0  # adapters newer than the merge: merged again
    assert "changed since it was merged; merging again" in capsys.readouterr().out
    again = _files(tmp_path / "x_merged")
    assert again["model.safetensors"][1] != first["model.safetensors"][1]
    assert merge_main(["--adapter_model", str(copy)]) == 0 and "up to date" in capsys.readouterr().out
    assert _files(tmp_path / "x_merged") == again
    # plain LoRA: --merge_into changes nothing, so the merge is up to date; another base is another merge, which
    # replaces this one only with --overwrite (it was "changed since it was merged; merging again")
    assert merge_main(["--adapter_model", str(copy), "--merge_into", "original"]) == 0
    assert "up to date" in capsys.readouterr().out
    other_base = shutil.copytree(recipe.model.name_or_path, tmp_path / "other-base")
    assert merge_main(["--adapter_model", str(copy), "--base_model", str(other_base)]) == 2
    assert "x_merged: already exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert _files(tmp_path / "x_merged") == again


def test_a_run_without_merging_removes_the_merge_of_the_adapters_it_replaced(make_recipe, tmp_path, capsys,
                                                                            monkeypatch):
    path = make_recipe(training={"max_steps": 2}, output={"merge": True}, report={"smoke_prompts": 0})
    assert main([str(path)]) == 0
    recipe = load_recipe(path)
    other = merge_adapter(recipe.adapters_dir, output_dir=tmp_path / "handoff")  # a merge elsewhere: left alone
    assert recipe.merged_dir.is_dir()
    capsys.readouterr()
    # new adapters (another seed), no merge: the old merged model beside them was kept, and chat loaded it
    assert main([str(path), "training.seed=7", "output.merge=false", f"output.checkpoint_dir={tmp_path / 'c2'}"]) == 0
    assert f"removed {recipe.merged_dir}: the merge of the adapters this run replaced" in capsys.readouterr().out
    assert not recipe.merged_dir.exists() and (recipe.adapters_dir / "adapter_model.safetensors").is_file()
    assert (other / "model.safetensors").is_file()
    # a merge the user then made of these adapters is up to date: a resume with nothing left keeps it (removed before)
    merge_adapter(recipe.adapters_dir, output_dir=recipe.merged_dir)
    assert main([str(path), "training.seed=7", "output.merge=false", f"output.checkpoint_dir={tmp_path / 'c2'}",
                 "--resume"]) == 0
    assert "nothing left to train" in (out := capsys.readouterr().out) and "removed" not in out
    assert (recipe.merged_dir / "model.safetensors").is_file()
    shutil.rmtree(recipe.merged_dir)
    # a merged directory that is a link to the user's copy: said, not deleted (an rmtree error after training before)
    recipe.merged_dir.symlink_to(other, target_is_directory=True)
    (other / "merge_info.json").write_text(json.dumps({"adapter": str(recipe.adapters_dir)}))
    assert main([str(path), "training.seed=8", "output.merge=false", f"output.checkpoint_dir={tmp_path / 'c3'}"]) == 0
    out = capsys.readouterr().out
    assert f"notice: {recipe.merged_dir} links to the merge of the adapters this run replaced" in out
    assert (other / "model.safetensors").is_file() and recipe.merged_dir.is_symlink()
    # a merge made by a relative path from another directory is this run's too (it was kept, stale, beside new adapters)
    recipe.merged_dir.unlink()
    here = Path.cwd()
    monkeypatch.chdir(recipe.run_dir)
    merge_adapter(Path(recipe.adapters_dir.name), output_dir=Path(recipe.merged_dir.name))
    monkeypatch.chdir(here)
    assert main([str(path), "training.seed=9", "output.merge=false", f"output.checkpoint_dir={tmp_path / 'c4'}"]) == 0
    assert f"removed {recipe.merged_dir}: the merge of the adapters this run replaced" in capsys.readouterr().out


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_during_a_merge_removes_the_unfinished_merge_in_one_line(lora_run, tmp_path, monkeypatch, capsys,
                                                                          signum):
    """Ctrl-C, a scheduler's SIGTERM or a closed terminal while the merged model is written: one line, exit 128 + the
    signal, and no half-written directory (SIGTERM and SIGHUP ended the process on the spot, leaving its GBs)."""
    from transformers import PreTrainedModel

    from sft_lora.merge import main as merge_main

    save = PreTrainedModel.save_pretrained

    def save_then_signal(self, *args, **kwargs):
        save(self, *args, **kwargs)
        os.kill(os.getpid(), signum)  # the handler runs here, as it would between two shards of a big model
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_signal)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    capsys.readouterr()
    assert merge_main(["--adapter_model", lora_run[1]["adapters"], "--output_dir", str(tmp_path / "m")]) == 128 + signum
    assert capsys.readouterr().err.endswith(f"\ninterrupted: {signal.Signals(signum).name}; nothing written (the "
                                            "unfinished merge is removed)\n")  # after the progress bars
    assert list(tmp_path.iterdir()) == [], "no merged or temporary directory"
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers, "the handlers are restored"


def test_a_run_whose_merge_fails_leaves_no_merge_of_the_adapters_it_replaced(make_recipe, tmp_path, capsys,
                                                                              monkeypatch):
    import sft_lora.merge
    from sft_lora.merge import adapter_sha256

    path = make_recipe(training={"max_steps": 2}, output={"merge": True}, report={"smoke_prompts": 0})
    assert main([str(path)]) == 0
    recipe = load_recipe(path)
    assert recipe.merged_dir.is_dir()
    merge = sft_lora.merge.merge_adapter

    def interrupted(*args, **kwargs):  # a scheduler's SIGTERM while merging (it ended the process on the spot)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(sft_lora.merge, "merge_adapter", interrupted)
    capsys.readouterr()
    assert main([str(path), "training.seed=7", f"output.checkpoint_dir={tmp_path / 'c2'}"]) == 143
    err = capsys.readouterr().err
    assert "interrupted: SIGTERM outside the training loop; finished outputs are kept, unfinished ones removed" in err
    assert f"output.checkpoint_dir={tmp_path / 'c2'} --resume" in err  # the command that continues
    assert not recipe.merged_dir.exists(), "the old merge stood beside the new adapters, and chat loaded it"
    monkeypatch.setattr(sft_lora.merge, "merge_adapter", merge)
    capsys.readouterr()
    assert main([str(path), "training.seed=7", f"output.checkpoint_dir={tmp_path / 'c2'}", "--resume"]) == 0
    info = json.loads((recipe.merged_dir / "merge_info.json").read_text())
    assert info["inputs"]["adapter_sha256"] == adapter_sha256(recipe.adapters_dir)  # the continue command merged


def test_output_directories_that_are_links_are_written_through_and_kept(make_recipe, tmp_path):
    # a link to a bigger disk: the run renamed the link aside, wrote a real directory in its place, then failed on
    # rmtree of the link ("could not write (Cannot call rmtree on a symbolic link); check free space")
    path = make_recipe(training={"max_steps": 2}, output={"merge": True}, report={"smoke_prompts": 0})
    recipe = load_recipe(path)
    for directory in (recipe.adapters_dir, recipe.merged_dir):
        target = tmp_path / "big" / directory.name
        target.mkdir(parents=True)
        directory.parent.mkdir(parents=True, exist_ok=True)
        directory.symlink_to(target, target_is_directory=True)
    for _ in range(2):  # into the links' empty targets, then over what the first run wrote there
        assert main([str(path)]) == 0
        for directory in (recipe.adapters_dir, recipe.merged_dir):
            assert directory.is_symlink() and (directory / RECIPE_FILE).is_file()
    assert (tmp_path / "big" / "lora_merged" / "model.safetensors").is_file()
    assert sorted(p.name for p in recipe.run_dir.iterdir()) == ["lora_adapters", "lora_merged"]


def test_a_second_run_into_the_same_checkpoints_stops_in_one_line_while_the_first_trains(make_recipe, tmp_path,
                                                                                          capsys, monkeypatch):
    import os
    import subprocess
    import sys

    from sft_lora.launch import exclusive

    from .conftest import ROOT

    path = make_recipe(training={"max_steps": 1}, report={"smoke_prompts": 0})
    recipe = load_recipe(path)
    with exclusive(recipe):  # as a run training now holds it (two at once mixed their checkpoints before)
        monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # another TMPDIR (a SLURM job's): the same lock
        assert main([str(path), "training.seed=2"]) == 2
        monkeypatch.undo()
        assert capsys.readouterr().err.strip() == (f"error: {recipe.checkpoint_dir}: another run is writing into it "
                                                   f"(process {os.getpid()}); wait for it to end, or set "
                                                   "output.checkpoint_dir elsewhere")
        assert not recipe.checkpoint_dir.exists()
        # its own checkpoints, the same outputs: the last to finish replaced the other's adapters before
        assert main([str(path), f"output.checkpoint_dir={tmp_path / 'elsewhere'}"]) == 2
        assert f"error: {recipe.run_dir}: another run is writing into it (process {os.getpid()}); wait for it to " \
            "end, or set output.dir elsewhere" in capsys.readouterr().err
        # under accelerate launch: one line before launching (each rank's line and the launcher's traceback before)
        launched = subprocess.run([sys.executable, "-m", "sft_lora.run", str(path), "accelerate_config=cpu_ddp"],
                                  capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert launched.returncode == 2 and launched.stderr.strip().splitlines() == [
            f"error: {recipe.checkpoint_dir}: another run is writing into it (process {os.getpid()}); wait for it to "
            "end, or set output.checkpoint_dir elsewhere"]
    assert main([str(path)]) == 0  # released when the run ends
    # no usable temp directory: the run trains, unguarded, and says so (not an error that stops every run)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "missing"))
    monkeypatch.setattr("os.access", lambda path, mode: path != "/tmp")  # /tmp read-only: the temp directory
    assert main([str(path)]) == 0
    assert "cannot create the run lock (No such file or directory); another run into" in capsys.readouterr().out


def test_chat_opens_with_the_system_prompt_as_trained(lora_run, tmp_path, capsys):
    import shutil

    import yaml

    from sft_lora.chat import main as chat_main

    _, summary = lora_run
    model = shutil.copytree(summary["merged"], tmp_path / "folded_merged")
    saved = yaml.safe_load((model / RECIPE_FILE).read_text())
    saved["data"].update(system_prompt="Be brief.", fold_system_prompt=True)  # a model trained on a template
    (model / RECIPE_FILE).write_text(yaml.safe_dump(saved))  # without a system role (Mistral v0.3)
    template = (model / "chat_template.jinja").read_text()
    (model / "chat_template.jinja").write_text("{% if messages[0]['role'] == 'system' %}{{ raise_exception("
                                               "'System role not supported') }}{% endif %}" + template)
    assert chat_main([str(model), "--prompt", "Hi?", "--max-new-tokens", "2"]) == 0  # a TemplateError before
    from sft_lora.data import opened

    assert opened([{"role": "user", "content": "Hi?"}], "Be brief.", True) == [
        {"role": "user", "content": "Be brief.\n\nHi?"}]  # as turns.chat folds it in training
    assert opened([{"role": "user", "content": "Hi?"}], "Be brief.", False)[0] == {"role": "system",
                                                                                  "content": "Be brief."}
    recipe, _ = lora_run  # a checkpoint chats with the system prompt it was trained with (none before)
    assert load_recipe(recipe.checkpoint_dir / "checkpoint-3" / RECIPE_FILE).to_yaml() == recipe.to_yaml()


def test_resume_continues_from_the_saved_step(lora_run, tmp_path):
    recipe, summary = lora_run
    checkpoint = recipe.checkpoint_dir / "checkpoint-3"
    out = tmp_path / "resumed"
    resumed = train(load_recipe(recipe.source, [f"output.dir={out}", f"output.checkpoint_dir={tmp_path}/ckpt",
                                                "output.merge=false"]), resume=str(checkpoint))
    assert resumed["resumed_from"] == str(checkpoint) and resumed["global_step"] == 6
    steps = [step for step, _ in resumed["train_losses"]]
    assert steps == list(range(1, 7))  # history up to step 3 came from the checkpoint, 4..6 were trained now
    # The continued run ends where the uninterrupted one did: same losses after the resume point, same adapter.
    uninterrupted = dict(summary["train_losses"])
    for step, loss in resumed["train_losses"][3:]:
        assert loss == pytest.approx(uninterrupted[step], rel=1e-4)
    from safetensors.torch import load_file

    a = load_file(Path(summary["adapters"]) / "adapter_model.safetensors")
    b = load_file(Path(resumed["adapters"]) / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # TRL counts the tokens of this session only: the card and table say since when (the card claimed all 6 steps
    # had trained the 3 steps' tokens)
    assert 0 < resumed["tokens"] < summary["tokens"] and resumed["resumed_at_step"] == 3
    card = (Path(resumed["adapters"]) / "README.md").read_text()
    assert f"- trained: 6 steps (resumed at step 3; {resumed['tokens']:,} tokens since)" in card
    assert f"- trained: 6 steps, {summary['tokens']:,} tokens" in (Path(summary["adapters"]) / "README.md").read_text()
    from sft_lora.report import summary_table

    assert f"tokens: {resumed['tokens']:,} since step 3 in " in " ".join(summary_table(resumed).split())


def test_resume_at_the_last_checkpoint_with_no_adapters_saves_them_and_trains_no_step_more(make_recipe, tmp_path,
                                                                                        capsys):
    import shutil

    small = tmp_path / "small.jsonl"  # 16 records, 4 steps an epoch: step 6 ends no epoch
    small.write_text("".join(SAMPLE.read_text(encoding="utf-8").splitlines(keepends=True)[:16]), encoding="utf-8")
    path = make_recipe(data={"path": str(small), "eval_split": 0.0}, report={"smoke_prompts": 0},
                       training={"max_steps": 6, "save_steps": 3})
    assert main([str(path)]) == 0
    recipe = load_recipe(path)
    trained = (recipe.adapters_dir / "adapter_model.safetensors").read_bytes()
    shutil.rmtree(recipe.output.dir)  # as a crash after the last checkpoint, before the adapters were written
    capsys.readouterr()
    assert main([str(path), "--resume"]) == 0
    out = capsys.readouterr().out  # Trainer alone trained a step 7 (and the next resume then refused it)
    assert "checkpoint-6 is this run's last step; saving its adapters" in out and "trained to step 6 " in out
    assert not (recipe.checkpoint_dir / "checkpoint-7").exists()
    assert (recipe.adapters_dir / "adapter_model.safetensors").read_bytes() == trained


def test_resume_auto_picks_the_last_checkpoint_and_errors_when_there_is_none(make_recipe, capsys):
    path = make_recipe(training={"max_steps": 3})
    assert main([str(path), "--resume"]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert main([str(path), "--force-resume"]) == 2  # resumes too (it trained from scratch, silently)
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert main([str(path)]) == 0
    assert main([str(path), "training.max_steps=4", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "checkpoint-3" in out and "trained to step 4" in out


def test_resume_a_finished_run_has_nothing_left_and_a_longer_run_continues_the_shorter_one(make_recipe, tmp_path,
                                                                                          capsys):
    small = tmp_path / "small.jsonl"  # 16 records, 4 steps an epoch: epoch counts stay cheap
    small.write_text("".join(SAMPLE.read_text(encoding="utf-8").splitlines(keepends=True)[:16]), encoding="utf-8")
    path = make_recipe(data={"path": str(small), "eval_split": 0.0}, report={"smoke_prompts": 1},
                       training={"max_steps": None, "save_steps": 2})
    assert main([str(path)]) == 0
    capsys.readouterr()
    before = _files(tmp_path)
    # report.*, logging and save cadence are neutral: with the same length there is nothing to do, and nothing written
    assert main([str(path), "--resume", "report.smoke_prompts=2", "training.logging_steps=3",
                 "training.save_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "nothing left to train" in out and "checkpoint-4" in out and "trained to step" not in out
    assert _files(tmp_path) == before
    # longer: the 1-epoch run's last checkpoint lives under .../1/lora; the 2-epoch run finds it and continues
    assert main([str(path), "--resume", "training.num_train_epochs=2", "training.logging_steps=1",
                 "training.save_steps=1"]) == 0
    out = capsys.readouterr().out
    assert f"resuming from {tmp_path / 'checkpoints/tiny-llama/1/lora/checkpoint-4'}: the last complete " in out
    assert "trained to step 8" in out and (tmp_path / "final_model/tiny-llama/2/lora_adapters").is_dir()
    # the recipe's cadence and the new length's schedule, not the checkpoint's: Trainer restores its cadence, and the
    # learning rate the 4-step schedule ended at (0), which step 5 would have trained at
    longer = tmp_path / "checkpoints/tiny-llama/2/lora"
    assert sorted(p.name for p in longer.glob("checkpoint-*")) == [f"checkpoint-{n}" for n in (5, 6, 7, 8)]
    history = json.loads((longer / "checkpoint-8/trainer_state.json").read_text())["log_history"]
    rates = {log["step"]: log["learning_rate"] for log in history if "loss" in log and log["step"] > 4}
    assert sorted(rates) == [5, 6, 7, 8]  # linear decay over 8 steps: step s trains at lr * (8 - (s - 1)) / 8
    assert rates[5] == pytest.approx(rates[6] * 4 / 3) == pytest.approx(rates[8] * 4) and rates[5] > 0
    # shorter: refused, nothing written (the 8-step weights were saved as a 6-step run's before; an epoch count
    # below every run's found the 2-epoch run's checkpoint-8)
    before = _files(tmp_path)
    assert main([str(path), "--resume", "training.num_train_epochs=2", "training.max_steps=6"]) == 2
    err = capsys.readouterr().err
    assert "the checkpoint resumed from is at step 8 of a 8-step run, past this run's last step (6); pass --resume " \
        "with an earlier checkpoint" in err and "to continue" not in err
    assert main([str(path), "--resume", "training.num_train_epochs=0.5"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'checkpoints/tiny-llama/0.5/lora'}: no checkpoint to resume from; " in err
    assert "epochs, whose checkpoints are past this run's end (resuming would save its weights as this run's)" in err
    assert _files(tmp_path) == before


def test_a_resumed_qlora_run_ends_with_the_uninterrupted_adapter_bit_for_bit(tmp_path, tiny_model):
    """TRL trains a QLoRA adapter in bfloat16; Trainer resumes it through PEFT's load_adapter, which upcast it to
    float32: the resumed run trained in another precision (adapters 2.6e-3 apart, saved as float32)."""
    from safetensors.torch import load_file

    recipe = load_recipe(write_recipe(tmp_path, tiny_model, use_qlora=True, data={"eval_split": None},
                                      training={"max_steps": 4, "save_steps": 2}, output={"merge": False}))
    whole = train(recipe)
    again = [f"output.dir={tmp_path / 'again'}", f"output.checkpoint_dir={tmp_path / 'again_checkpoints'}"]
    resumed = train(load_recipe(recipe.source, again), resume=str(recipe.checkpoint_dir / "checkpoint-2"))
    a, b = (load_file(Path(run["adapters"]) / "adapter_model.safetensors") for run in (whole, resumed))
    assert a.keys() == b.keys() and all(a[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)


def test_qlora_best_checkpoint_reloaded_at_the_end_is_saved_as_trained(tmp_path, tiny_model):
    """load_best_model_at_end reloads the best checkpoint through PEFT's load_adapter, which upcast the bfloat16 QLoRA
    adapter: the final adapters were saved as float32, twice the size of the checkpoint they came from."""
    from safetensors.torch import load_file

    recipe = load_recipe(write_recipe(tmp_path, tiny_model, use_qlora=True, output={"merge": False}, training={
        "max_steps": 4, "save_steps": 2, "eval_strategy": "steps", "eval_steps": 2, "load_best_model_at_end": True,
        "greater_is_better": True}))  # the best by eval_loss is then the earlier checkpoint, not the last step
    summary = train(recipe)
    state = json.loads((recipe.checkpoint_dir / "checkpoint-4" / "trainer_state.json").read_text())
    assert Path(state["best_model_checkpoint"]).name == "checkpoint-2"
    # the eval figures are the kept weights', logged once: evaluating them again added a second point at step 4
    logged = {log["step"]: log["eval_loss"] for log in state["log_history"] if "eval_loss" in log}
    assert summary["eval_history"]["overall"] == [[step, loss] for step, loss in logged.items()]
    assert summary["eval_loss_after"] == logged[2]
    best = load_file(Path(state["best_model_checkpoint"]) / "adapter_model.safetensors")
    final = load_file(Path(summary["adapters"]) / "adapter_model.safetensors")
    assert final.keys() == best.keys() and all(final[k].dtype == torch.bfloat16 for k in final)
    assert all(torch.equal(final[k], best[k]) for k in final)
    # said where the run is read: the table and card spoke of the last step only
    said = "checkpoint-2, the best by eval_loss (load_best_model_at_end)"
    assert summary["weights_of"] == said
    assert f"; the weights are {said}" in (Path(summary["adapters"]) / "README.md").read_text()
    # killed after its last checkpoint, before the adapters were saved: the resume trains nothing, and saved the last
    # step's weights while saying they were the best's
    shutil.rmtree(summary["adapters"])
    resumed = train(load_recipe(recipe.source), resume="auto")
    final = load_file(Path(resumed["adapters"]) / "adapter_model.safetensors")
    assert all(torch.equal(final[k], best[k]) for k in final) and resumed["weights_of"] == said


def test_a_metric_for_best_model_that_no_evaluation_logs_stops_before_training_in_one_line(make_recipe, capsys):
    """A misspelled training.metric_for_best_model: Trainer's KeyError traceback (43 metric names) at the first
    scheduled evaluation, a whole epoch of training later, with no checkpoint."""
    path = make_recipe(training={"metric_for_best_model": "eval_arith_enn_loss", "load_best_model_at_end": True,
                                 "save_strategy": "epoch", "num_train_epochs": 1}, report={"smoke_prompts": 0})
    assert main([str(path)]) == 2
    assert ("error: training.metric_for_best_model: 'eval_arith_enn_loss' is not a metric this run's evaluation "
            "logs; did you mean 'eval_arith_en_loss'?\n") in capsys.readouterr().err
    assert not list(load_recipe(path).checkpoint_dir.glob("checkpoint-*"))


def test_a_checkpoint_trained_on_another_template_than_the_run_renders_is_resumed_only_if_forced(tmp_path, tiny_model,
                                                                                                   monkeypatch, capsys):
    """sft_lora's default template gained a BOS (7912301): a run made before resumed on the new one with no word,
    its first steps on one prompt format and the rest on another (the fingerprint hashes template files only)."""
    import sft_lora.model

    bare = shutil.copytree(tiny_model, tmp_path / "bare")
    (bare / "chat_template.jinja").unlink()
    path = write_recipe(tmp_path, bare, training={"max_steps": 2, "save_steps": 2}, report={"smoke_prompts": 0})
    assert main([str(path)]) == 0
    monkeypatch.setattr(sft_lora.model, "DEFAULT_CHAT_TEMPLATE", "{{ bos_token }}" + DEFAULT_CHAT_TEMPLATE)
    capsys.readouterr()
    checkpoint = load_recipe(path).checkpoint_dir / "checkpoint-2"
    assert main([str(path), "training.max_steps=4", "--resume"]) == 2
    assert (f"error: {checkpoint}: trained on another chat template than this run renders (sft_lora's default "
            f"changed?); pass --force-resume to go on with this one, and data.chat_template set to a copy of "
            f"{checkpoint}/chat_template.jinja (outside the checkpoints) too") in capsys.readouterr().err
    copy = shutil.copy(checkpoint / "chat_template.jinja", tmp_path / "trained.jinja")
    assert main([str(path), "training.max_steps=4", "--resume", "--force-resume", f"data.chat_template={copy}"]) == 0
    assert "trained to step 4" in capsys.readouterr().out


def test_a_checkpoint_of_weights_alone_is_not_resumed_unless_forced(make_recipe, capsys):
    """save_only_model checkpoints hold no optimizer or schedule: the resume went on with a fresh optimizer, silently
    (a final eval loss 5.6951 where the uninterrupted run ends at 5.6685)."""
    path = make_recipe(training={"max_steps": 4, "save_steps": 2, "save_only_model": True},
                       report={"smoke_prompts": 0})
    assert main([str(path)]) == 0
    checkpoint = load_recipe(path).checkpoint_dir / "checkpoint-2"
    capsys.readouterr()
    assert main([str(path), "--resume", str(checkpoint)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {checkpoint}: saved with training.save_only_model (weights "
                                              "alone, no optimizer or schedule state), so a resume would not continue")
    assert main([str(path), "--resume"]) == 0  # the last step's: nothing left to train, said as such
    assert "nothing left to train" in capsys.readouterr().out
    assert main([str(path), "--resume", str(checkpoint), "--force-resume"]) == 0
    assert "resuming with a fresh optimizer (--force-resume)" in capsys.readouterr().out


def test_qlora_gradients_are_the_same_after_an_evaluation(tmp_path, tiny_model):
    """bitsandbytes repacked 4-bit weights for its AVX512-BF16 CPU kernel in an eval forward, and training forwards
    after it had no backward: the LoRA gradients changed by ~30 % after eval_on_start. (On a CPU without
    AVX512-BF16 there is no repacking, and this test cannot tell.)"""
    recipe = load_recipe(write_recipe(tmp_path, tiny_model, use_qlora=True, lora={"init_lora_weights": False},
                                      data={"eval_split": None}))
    tokenizer = load_tokenizer(recipe.model, recipe.data)
    model = build_trainer(recipe, tokenizer, load_datasets(recipe.data)[0]).model
    ids = torch.randint(5, 500, (1, 24))

    def gradients() -> list[torch.Tensor]:
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad.clone() for name, p in model.named_parameters() if "lora_A" in name]

    before = gradients()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert all(torch.equal(a, b) for a, b in zip(before, gradients(), strict=True))


def test_qlora_run_trains_4bit_and_merges_into_the_dequantized_base(tmp_path, tiny_model, monkeypatch, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # wandb as in the seed, with no key and no network: it must run offline, not crash.
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    recipe = load_recipe(write_recipe(tmp_path, tiny_model, use_qlora=True,
                                      training={"report_to": "wandb", "max_steps": 4, "save_steps": 4},
                                      output={"merge": True}))
    summary = train(recipe)
    adapters = Path(summary["adapters"])
    assert adapters.name == "qlora_adapters" and (adapters / "adapter_model.safetensors").is_file()
    assert list((tmp_path / "wandb").glob("offline-run-*")), "wandb ran offline"
    info = json.loads((Path(summary["merged"]) / "merge_info.json").read_text())
    assert info["merged_into"] == "dequantized 4-bit base"
    # a checkpoint carries the recipe too: it merges as its adapters do (into the original weights, in float32 before)
    checkpoint = merge_adapter(recipe.checkpoint_dir / "checkpoint-4")
    assert json.loads((checkpoint / "merge_info.json").read_text())["merged_into"] == "dequantized 4-bit base"
    card = (checkpoint / "README.md").read_text()  # it said neither which checkpoint nor how far it had trained
    assert ": merged QLoRA model (checkpoint 4) (sft_lora)" in card and "- trained: 4 steps" in card
    weights = [(d / "model.safetensors").read_bytes() for d in (checkpoint, Path(summary["merged"]))]
    assert weights[0] == weights[1]  # step 4 is the last: the same model

    tokenizer = AutoTokenizer.from_pretrained(adapters)
    quantized = AutoModelForCausalLM.from_pretrained(
        recipe.model.name_or_path, quantization_config=recipe.quantization)
    assert quantized.is_loaded_in_4bit
    trained = _logits(PeftModel.from_pretrained(quantized, adapters).eval(), tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(summary["merged"]).eval()
    original = merge_adapter(adapters, output_dir=tmp_path / "orig", merge_into="original")
    into_original = AutoModelForCausalLM.from_pretrained(original).eval()
    diff_dequantized = (_logits(merged, tokenizer) - trained).abs().max().item()
    diff_original = (_logits(into_original, tokenizer) - trained).abs().max().item()
    print(f"QLoRA merge logit diff: dequantized {diff_dequantized:.4f}, original {diff_original:.4f}")
    assert diff_dequantized < diff_original  # the dequantized base is what the adapter was trained against
    assert diff_dequantized < 0.1
    # the card's "Use" code loads the adapters on the 4-bit base they trained with (it loaded the full-precision one)
    code = (adapters / "README.md").read_text().split("```python\n")[1].split("```")[0]
    code = code.replace("<this directory>", str(adapters)).replace("max_new_tokens=256", "max_new_tokens=2")
    namespace: dict = {}
    exec(code, namespace)  # the card's own text, written by this run
    assert namespace["model"].is_loaded_in_4bit
    assert (_logits(namespace["model"].eval(), tokenizer) - trained).abs().max().item() == 0
    # a machine without bitsandbytes (a merge machine, often): one line each, not transformers' ImportError traceback
    import sys

    from sft_lora.chat import main as chat_main
    from sft_lora.merge import main as merge_main

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes raises ImportError
    capsys.readouterr()
    assert merge_main(["--adapter_model", str(adapters), "--output_dir", str(tmp_path / "m2")]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: {adapters}: QLoRA adapters merge into their "
                                                      "dequantized 4-bit base, but bitsandbytes cannot run here (")
    assert chat_main([str(adapters), "--prompt", "Hi?"]) == 2
    assert "or merge them with --merge_into original and chat with that" in capsys.readouterr().err
    assert merge_main(["--adapter_model", str(adapters), "--output_dir", str(tmp_path / "m3"),
                       "--merge_into", "original"]) == 0  # the way it names


def test_make_train_default_recipe_loads():
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml")
    assert recipe.model.build_tiny and recipe.data.path == "data/sample.jsonl"
    assert sum(1 for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()) >= 200


def test_adapters_of_a_relative_base_path_merge_and_chat_from_any_directory(tmp_path, tiny_model, monkeypatch, capsys):
    from sft_lora.chat import main as chat_main
    from sft_lora.merge import main as merge_main

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "base").symlink_to(tiny_model)
    monkeypatch.chdir(tmp_path)  # the recipe names the base relative to here, as recipes/tiny.yaml does
    path = write_recipe(tmp_path, Path("models/base"), data={"eval_split": 0.0}, report={"smoke_prompts": 0},
                        training={"max_steps": 1, "save_steps": 1})
    summary = train(load_recipe(path))
    adapters = Path(summary["adapters"])
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model.resolve())  # absolute: it names the same base anywhere
    monkeypatch.chdir(tmp_path.parent)
    assert merge_main(["--adapter_model", str(adapters), "--output_dir", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    # adapters of an older run, naming a base relative to a directory not the current one: one line, the fix
    (adapters / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "./models/base"}))
    capsys.readouterr()
    assert merge_main(["--adapter_model", str(adapters), "--output_dir", str(tmp_path / "merged2")]) == 2
    assert capsys.readouterr().err.strip() == "error: ./models/base: base model directory not found; pass --base_model"
    assert chat_main([str(adapters), "--prompt", "hi"]) == 2
    assert "./models/base: the adapter's base model directory is not found" in capsys.readouterr().err
