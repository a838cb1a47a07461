"""Recipe loading: strict keys, types, defaults, overrides, seed flags, env expansion — no model is touched."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import yaml

from sft_lora.config import RecipeError, load_recipe
from sft_lora.run import main

from .conftest import ROOT


def test_tiny_recipe_resolves_with_seed_defaults():
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml")
    assert recipe.use_qlora is False and recipe.quantization is None
    assert recipe.lora.r == 16 and recipe.lora.lora_alpha == 32
    assert recipe.training.num_train_epochs == 3
    assert str(recipe.adapters_dir) == "final_model/tiny-llama/3/lora_adapters"
    assert str(recipe.merged_dir) == "final_model/tiny-llama/3/lora_merged"


def test_library_defaults_follow_the_seed(make_recipe):
    path = make_recipe(use_qlora=None, lora={"r": None, "lora_alpha": None},
                       training={"learning_rate": None, "num_train_epochs": None})
    default = load_recipe(path)
    assert default.use_qlora is True and default.method == "qlora"  # the seed's USE_QLORA=True
    assert default.training.learning_rate == 1e-4 and default.training.num_train_epochs == 3
    assert default.lora.r == 16 and default.lora.lora_alpha == 32
    bnb = default.quantization
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    assert str(bnb.bnb_4bit_compute_dtype) == "torch.bfloat16"
    lora = load_recipe(path, ["use_qlora=false"])
    assert lora.training.learning_rate == 5e-6 and lora.quantization is None


def _error(path, overrides=(), flags=None) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides), flags)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("section, key, suggestion", [
    ("lora", "lora_alpah", "lora_alpha"), ("data", "eval_splt", "eval_split"), ("model", "dtpye", "dtype"),
    ("quantization", "bnb_4bit_quant_typ", "bnb_4bit_quant_type"), ("output", "chekpoint_dir", "checkpoint_dir"),
])
def test_unknown_keys_in_every_section(make_recipe, section, key, suggestion):
    extra = {"use_qlora": True} if section == "quantization" else {}
    message = _error(make_recipe(**{section: {key: 1}}, **extra))
    assert f"unknown key '{key}' in section '{section}'" in message and f"'{suggestion}'" in message


@pytest.mark.parametrize("override, expected", [
    ("lora.r=8.5", "lora.r expects int, got 8.5"),
    ("model.trust_remote_code=yes please", "model.trust_remote_code expects bool"),
    ("lora.lora_dropout=2", "lora.lora_dropout must be in [0, 1), got 2"),
    ("quantization.bnb_4bit_quant_type=nf5", "must be one of nf4, fp4, got 'nf5'"),
    # the choices an upstream field's metadata declares (a traceback after data preparation, or deep in --check)
    ("training.packing_strategy=bogus", "training.packing_strategy must be one of bfd, bfd_split, wrapped, got 'bog"),
    ("training.truncation_mode=keep_ends", "must be one of keep_end, keep_start, got 'keep_ends'; did you mean 'ke"),
    ("training.loss_type=bogus", "command line: training.loss_type must be one of nll, dft, chunked_nll, got 'bogus'"),
    # a Literal's values, not "expects Literal"
    ("lora.bias=bogus", "command line: lora.bias expects 'none' | 'all' | 'lora_only', got 'bogus'"),
    ("lora.init_lora_weights=bogus", "lora.init_lora_weights expects bool | 'gaussian' | 'eva' | "),
    # upstream's own checks, blamed on the one key they name (the recipe file and section alone before)
    ("training.eval_strategy=sometimes", "command line: training.eval_strategy: sometimes is not a valid IntervalStr"),
    ("training.lr_scheduler_type=bogus", "command line: training.lr_scheduler_type: bogus is not a valid SchedulerT"),
    # transformers' own check, which Trainer runs only once the data is prepared; `none` inside a list is no integration
    ("training.report_to=foo", "command line: training.report_to: foo is not supported, only azure_ml,"),
    ("training.report_to=[none, tensorboard]", "command line: training.report_to: none is not supported"),
    # names apply_chat_template takes itself: a TypeError deep in data preparation before
    ("data.chat_template_kwargs={tokenize: true}", "data.chat_template_kwargs: 'tokenize' is set by sft_lora"),
    ("data.chat_template_kwargs={messages: []}", "data.chat_template_kwargs: 'messages' is set by sft_lora"),
    # an override's section the recipe file lacks: the command line is blamed, not the file
    ("trainig.max_steps=1", "command line: unknown section 'trainig'; did you mean 'training'?"),
    # an upstream message ending its first line mid-sentence, given whole on one line
    ("training.load_best_model_at_end=true", "command line: training.load_best_model_at_end: --load_best_model_at_end "
     "requires the save and eval strategy to match, except when --save_strategy=\"best\", but found - Evaluation "
     "strategy: IntervalStrategy.EPOCH - Save strategy: SaveStrategy.STEPS"),
    # accepted before, each a run unlike the one asked for: no training at all, a traceback after loading, fp32
    # training, a SIGTERM swallowed during the merge; removed keys with what says them now
    ("training.max_steps=0", "command line: training.max_steps must be > 0, got 0 (leave it unset, or -1, to train "),
    ("training.save_strategy=best", "training.save_strategy: best needs training.metric_for_best_model"),
    ("training.fp16=true", "command line: training.fp16 does nothing on a CPU (accelerate trains in fp32 there)"),
    ("training.enable_jit_checkpoint=true", "training.enable_jit_checkpoint: sft_lora saves a checkpoint on SIGTERM"),
    ("training.warmup_ratio=0.03", "unknown key 'warmup_ratio' in section 'training'; transformers 5 took it into "
     "warmup_steps, where a value below 1 is a ratio (warmup_steps: 0.03)"),
    ("training.group_by_length=true", "replaced it by train_sampling_strategy: group_by_length"),
])
def test_wrong_values_fail_with_one_line(make_recipe, override, expected):  # more: test_bad_input.py
    assert expected in _error(make_recipe(use_qlora=True), [override])


def test_an_upstream_check_names_the_recipe_line_of_the_key_it_names(make_recipe):
    path = make_recipe(use_qlora=True, training={"lr_scheduler_type": "bogus"})
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "lr_scheduler_type" in text)
    assert _error(path).startswith(f"{path}:{line}: training.lr_scheduler_type: bogus is not a valid SchedulerType")
    # two given keys named: the section is blamed, at its own line
    path = make_recipe(use_qlora=True, training={"load_best_model_at_end": True, "save_strategy": "steps"})
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("training:"))
    assert _error(path).startswith(f"{path}:{line}: training: --load_best_model_at_end requires")
    # ... unless both came from the command line; a value shared with a file key (report_to: none) is told apart by
    # the field's type the message names; a key inside a data entry is placed by its entry (the file blamed before)
    path = make_recipe()
    assert _error(path, ["lora.use_dora=true", "lora.lora_bias=true"]).startswith(
        "command line: lora: The argument lora_bias=True is not supported for DoRA")
    assert _error(path, ["training.optim=none"]).startswith(
        "command line: training.optim: none is not a valid OptimizerNames")
    assert _error(path, ['data.path=[{path: a.jsonl, source: "${NOPE_NOT_SET}"}]']).startswith(
        "command line: data.path.source uses ${NOPE_NOT_SET} but NOPE_NOT_SET is not set")


def test_an_accelerate_config_that_is_no_valid_yaml_fails_print_config_and_check_too(make_recipe, tmp_path, capsys):
    config = tmp_path / "accel.yaml"
    config.write_text("distributed_type: MULTI_GPU\nnum_processes: 2\nnum_processes: 4\n")
    for flag in ("--print-config", "--check"):  # both passed it before; only a run refused it
        assert main([str(make_recipe()), f"accelerate_config={config}", flag]) == 2
        assert capsys.readouterr().err.strip() == (f"error: {config}:3: not valid YAML (duplicate key 'num_processes', "
                                                   "first at line 2; keep one)")


def test_build_tiny_refuses_a_hub_id_it_would_shadow_with_a_random_model(make_recipe, tmp_path):
    path = make_recipe(model={"build_tiny": True})
    assert "reads as a hub id, but model.build_tiny builds a tiny random model" in _error(
        path, ["model.name_or_path=org/model"])
    assert load_recipe(path, [f"model.name_or_path={tmp_path / 'tiny'}"]).model.build_tiny  # a path: built there


def test_impossible_combinations(make_recipe):
    message = _error(make_recipe(use_qlora=False, quantization={"bnb_4bit_quant_type": "fp4"}))
    assert "quantization section needs QLoRA but use_qlora is false" in message
    # the command line made the clash: blamed there, not on the file's quantization line
    qlora = make_recipe(use_qlora=True, quantization={"bnb_4bit_quant_type": "fp4"})
    assert _error(qlora, ["use_qlora=false"]).startswith("command line: a quantization section needs QLoRA")
    assert _error(qlora, [], {"use_qlora": "false"}).startswith("command line --use_qlora: a quantization section")
    message = _error(make_recipe(data={"eval_split": 0.0}, training={"eval_strategy": "steps"}))
    assert "needs evaluation data" in message
    # save_strategy best saves on an improved evaluation: without one, no checkpoint at all (exit 0 before)
    assert "training.save_strategy: best saves only when an evaluation improves the metric" in _error(
        make_recipe(data={"eval_split": 0.0}), ["training.save_strategy=best", "training.metric_for_best_model=loss"])
    # fp16 where no GPU is visible, use_cpu: false or not: trained in fp32
    assert "training.fp16 does nothing on a CPU" in _error(make_recipe(), ["training.fp16=true",
                                                                           "training.use_cpu=false"])


def test_a_padding_free_the_recipe_sets_is_refused_where_it_cannot_apply_and_eval_steps_mean_steps(make_recipe):
    """padding_free: true with completion_only_loss: false trained padded batches, --print-config saying true; a lone
    eval_steps was ignored under sft_lora's eval_strategy default (epoch)."""
    assert _error(make_recipe(), ["training.padding_free=true", "training.completion_only_loss=false"]).startswith(
        "command line: training.padding_free needs sft_lora's data preparation, which does not apply with "
        "completion_only_loss=False")
    assert load_recipe(make_recipe(), ["training.eval_steps=2"]).training.eval_strategy == "steps"
    assert load_recipe(make_recipe()).training.eval_strategy == "epoch"


def test_yaml_scientific_notation_without_dot_is_a_float(make_recipe):
    # YAML 1.1 reads 1e-4 as a string; the loader accepts it where the upstream field is a float.
    recipe = load_recipe(make_recipe(), ["training.learning_rate='1e-4'"])
    assert recipe.training.learning_rate == 1e-4


def test_overrides_and_seed_flags_change_the_resolved_recipe(make_recipe, capsys):
    path = make_recipe()
    recipe = load_recipe(path, ["lora.r=4", "training.max_steps=2", "data.system_prompt=Be brief."])
    assert recipe.lora.r == 4 and recipe.training.max_steps == 2
    assert recipe.data.system_prompt == "Be brief."
    flags = {"base_model": "/models/x", "dataset_path": "d.jsonl", "output_dir": "/out", "use_qlora": "True",
             "num_epochs": "5", "lora_r": "32", "lora_alpha": "64", "learning_rate": "2e-4",
             "checkpoint_path": "/ckpt"}
    recipe = load_recipe(path, ["lora.r=4"], flags)  # the seed flag wins over the dotted override
    assert capsys.readouterr().err == "notice: --lora_r wins over the override of lora.r\n"  # said (silent before)
    assert recipe.model.name_or_path == "/models/x" and recipe.data.path == "d.jsonl"
    assert recipe.output.dir == "/out" and recipe.output.checkpoint_dir == "/ckpt"
    assert recipe.use_qlora is True and recipe.method == "qlora"
    assert recipe.training.num_train_epochs == 5 and recipe.training.learning_rate == 2e-4
    assert recipe.lora.r == 32 and recipe.lora.lora_alpha == 64
    assert str(recipe.adapters_dir) == "/out/x/5/qlora_adapters"


def test_env_references_are_expanded(make_recipe, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", "/mnt/data")
    path = make_recipe(data={"path": "${DATA_ROOT}/qa.jsonl"}, output={"dir": "${OUT_ROOT:-/tmp/out}"})
    recipe = load_recipe(path)
    assert recipe.data.path == "/mnt/data/qa.jsonl" and recipe.output.dir == "/tmp/out"
    monkeypatch.delenv("DATA_ROOT")
    assert "data.path uses ${DATA_ROOT} but DATA_ROOT is not set" in _error(path)
    # as in the shell, an empty variable takes the default too (tiny.yaml's own ${SFT_LORA_TINY_DIR:-…} failed)
    monkeypatch.setenv("OUT_ROOT", "")
    monkeypatch.setenv("DATA_ROOT", "/mnt/data")
    assert load_recipe(path).output.dir == "/tmp/out"
    # a default may name another variable, used only where the default is (cut at the first `}` before: the set
    # ${DATA_ROOT} gave '/mnt/data/x}/qa.jsonl', and ${OUT_ROOT:-${HOME}} left '${HOME}' unexpanded)
    nested = ["data.path=${DATA_ROOT:-${NOPE_NOT_SET}/x}/qa.jsonl", "output.dir=${OUT_ROOT:-${DATA_ROOT:-/y}/out}"]
    assert (load_recipe(path, nested).data.path, load_recipe(path, nested).output.dir) == ("/mnt/data/qa.jsonl",
                                                                                           "/mnt/data/out")
    assert "data.path uses ${NOPE_NOT_SET} but NOPE_NOT_SET is not set" in _error(path, [
        "data.path=${OUT_ROOT:-${NOPE_NOT_SET}/x}"])
    # inside a list of data files and their mappings too (left as '${DATA_ROOT}/a.jsonl' before); a leading ~ in a
    # path key is the home directory (a literal ./~ directory before), not in free text
    monkeypatch.setenv("HOME", "/home/me")
    recipe = load_recipe(path, ['data.path=["${DATA_ROOT}/a.jsonl", {path: "~/b.jsonl", source: "~s"}]',
                                "output.dir=~/runs", "data.system_prompt=~/x", "data.eval_path=${DATA_ROOT}/e.jsonl",
                                "data.eval_split=0"])
    assert recipe.data.path == ["/mnt/data/a.jsonl", {"path": "/home/me/b.jsonl", "source": "~s"}]
    assert (recipe.output.dir, recipe.data.system_prompt) == ("/home/me/runs", "~/x")
    assert recipe.data.eval_path == "/mnt/data/e.jsonl"
    # in a list or mapping inside a mapping's value (left as the literal '${DATA_ROOT}' before)
    nested = load_recipe(path, ['data.chat_template_kwargs={dirs: ["${DATA_ROOT}", {at: "${DATA_ROOT}/t"}]}'])
    assert nested.data.chat_template_kwargs == {"dirs": ["/mnt/data", {"at": "/mnt/data/t"}]}


@pytest.mark.parametrize("override", ["data.system_prompt=# be brief", "data.system_prompt=be # brief",
                                      "lora.r=8 # rank"])
def test_an_override_with_a_yaml_comment_is_refused_not_cut(make_recipe, override):
    # YAML drops a comment: the run trained without the system prompt (or with "be") before
    assert _error(make_recipe(), [override]) == (f"command line: '{override}': YAML reads '#' there as the start of "
                                                 "a comment; quote the value if it is text")
    assert load_recipe(make_recipe(), ["data.system_prompt='# be brief'"]).data.system_prompt == "# be brief"
    # any other part YAML leaves out is named as such (a document end: `...`), not as a comment
    assert _error(make_recipe(), ["data.system_prompt=x\n..."]) == (
        "command line: 'data.system_prompt=x\\n...': YAML reads only 'x' of it; quote the value if it is text")


def test_upstream_objects_receive_the_sections(make_recipe):
    recipe = load_recipe(make_recipe(use_qlora=True, quantization={"bnb_4bit_quant_type": "fp4"}))
    lora, bnb, sft = recipe.lora, recipe.quantization, recipe.training
    assert lora.r == 8 and lora.target_modules == "all-linear"
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "fp4" and bnb.bnb_4bit_use_double_quant
    assert sft.max_steps == 6 and sft.output_dir == str(recipe.checkpoint_dir)
    assert sft.run_name == "tiny-llama_qlora" and sft.model_init_kwargs["dtype"] == "float32"


def test_print_config_prints_the_resolved_recipe(make_recipe, capsys):
    assert main([str(make_recipe()), "lora.r=4", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "r: 4" in out and "learning_rate: 0.003" in out and "eval_strategy: epoch" in out
    # the decisions this machine took are comments, not keys: a CPU run's saved recipe (use_cpu: true, bf16: false
    # as keys) trained on the CPU of a GPU machine that read it
    assert "# decided: use_cpu: True (" in out and "# decided: bf16: False (" in out
    saved = yaml.safe_load(out)["training"]
    assert not {"use_cpu", "bf16", "padding_free"} & set(saved) and saved["learning_rate"] == 0.003
    pinned = yaml.safe_load(load_recipe(make_recipe(training={"bf16": False}), ["lora.r=4"]).to_yaml())
    assert pinned["training"]["bf16"] is False and "use_cpu" not in pinned["training"]  # the recipe's own: kept


def test_cli_error_is_one_line_and_nonzero(make_recipe):
    path = make_recipe(training={"learnig_rate": 1e-3})
    done = subprocess.run([sys.executable, "-m", "sft_lora.run", str(path)], capture_output=True, text=True,
                          cwd=ROOT)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "did you mean 'learning_rate'" in lines[0]


def test_help_lists_recipe_keys(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for key in ("name_or_path", "eval_split", "checkpoint_dir", "merge_into", "--base_model", "--resume"):
        assert key in out
    # every own key with its docstring, a docstring of two lines too (left empty before)
    keys = [line.split()[0] for line in out.splitlines() if re.match(r"^  \w+ = ", line)]
    assert len(keys) > 30 and not [line for line in out.splitlines() if re.match(r"^  \w+ = .*  $", line)]
    assert "flex_attention on CUDA, sdpa_documents on CPU" in " ".join(out.split())


@pytest.mark.parametrize("sections, expected", [
    ({"data": {"path": "/nonexistent/qa.jsonl"}}, "/nonexistent/qa.jsonl: data file not found; check data.path"),
    ({"model": {"name_or_path": "/nonexistent/model"}}, "/nonexistent/model: model directory not found"),
    ({"training": {"max_steps": "many"}}, "training.max_steps expects int, got 'many'"),
])
def test_run_errors_exit_nonzero_with_one_line(make_recipe, capsys, sections, expected):
    assert main([str(make_recipe(**sections))]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and expected in err[0]


def test_exponent_numbers_in_a_mapping_of_keyword_arguments_are_numbers(make_recipe):
    # YAML 1.1 reads 1e-5 as a string; passed on untyped, it failed at the first step ('str' / 'float')
    # (a key the scheduler does not take is refused at load now: text that only looks like a number is shown in
    # another mapping, the chat template's variables)
    recipe = load_recipe(make_recipe(), ["training.lr_scheduler_type=cosine_with_min_lr",
                                         "training.lr_scheduler_kwargs={min_lr: 1e-5}",
                                         "data.chat_template_kwargs={name: 1e5x}"])
    assert recipe.training.lr_scheduler_kwargs == {"min_lr": 1e-5} and recipe.data.chat_template_kwargs == {
        "name": "1e5x"}


def test_yaml_no_is_read_as_the_string_no_where_a_string_is_expected(make_recipe):
    recipe = load_recipe(make_recipe(data={"eval_split": 0.0}), ["training.eval_strategy=no",
                                                                 "training.save_strategy=no"])
    assert recipe.training.eval_strategy == "no" and recipe.training.save_strategy == "no"
    assert load_recipe(make_recipe(), ["training.activation_checkpointing=no"]).training.activation_checkpointing \
        is False  # a real bool field keeps the bool
    # free text is not rewritten: `system_prompt: On` was trained as the system prompt "yes"
    for override in ("data.system_prompt=On", "data.path=no", "wandb.run_name=off"):
        assert "expects str" in (message := _error(make_recipe(), [override])) and "quote it" in message, override
    # YAML's null spellings, where a path or name is expected: `output.dir=~` meant the home directory
    for override in ("output.dir=~", "output.dir=", "model.name_or_path=null"):
        assert "expects str, got None (YAML reads an empty value, null or a bare ~ as nothing" in _error(
            make_recipe(), [override]), override


def test_values_no_machine_can_allocate_fail_at_load_and_the_bound_itself_loads(make_recipe):
    path = make_recipe()
    assert load_recipe(path, ["lora.r=65536", "training.max_length=1048576"]).lora.r == 65536
    for override, message in (("lora.r=65537", "lora.r must be at most 65,536, got 65,537"),
                              ("training.max_length=1048577", "training.max_length must be at most 1,048,576")):
        with pytest.raises(RecipeError, match=message):
            load_recipe(path, [override])


def test_the_attention_print_config_shows_can_be_named(make_recipe):
    # `--print-config` shows `attention: sdpa_documents` as decided; naming it failed when the model loaded ("not
    # supported"): sft_lora made it known to transformers only when it chose it. A fresh process: one registration
    # (by any earlier test) lasts the whole session.
    import subprocess
    import sys

    path = make_recipe()
    code = ("import sys; from transformers import AutoModelForCausalLM; from sft_lora.config import load_recipe; "
            "recipe = load_recipe(sys.argv[1], ['model.attn_implementation=sdpa_documents']); "
            "model = AutoModelForCausalLM.from_pretrained(recipe.model.name_or_path, "
            "attn_implementation=recipe.model.attn_implementation); print(model.config._attn_implementation)")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split()[-1] == "sdpa_documents", done.stderr[-2000:]


def test_wrapped_packing_is_not_made_padding_free(make_recipe, caplog):
    # TRL warns against padding-free rows with wrapped packing; sft_lora chose them for it, so its own choice drew
    # TRL's warning ("not recommended") on every such run
    from sft_lora.data import load_datasets
    from sft_lora.model import load_tokenizer
    from sft_lora.trainer import build_trainer

    recipe = load_recipe(make_recipe(training={"packing": True, "packing_strategy": "wrapped"}))
    assert recipe.training.padding_free is False and "wrapped packing" in recipe.decisions["padding_free"]
    build_trainer(recipe, load_tokenizer(recipe.model, recipe.data), *load_datasets(recipe.data))
    assert "padding_free=True` with the 'wrapped' packing" not in caplog.text
    assert load_recipe(make_recipe()).training.padding_free is True  # unpacked rows: padding-free, as before


def test_a_wandb_project_or_mode_the_recipe_names_wins_over_the_environment(make_recipe, monkeypatch, capsys):
    # WANDB_PROJECT / WANDB_MODE beat wandb.project / wandb.mode silently: the run logged to another project than
    # its saved recipe says; the environment still wins over the section's defaults
    from sft_lora.trainer import configure_wandb

    monkeypatch.setenv("WANDB_PROJECT", "someother")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    configure_wandb(load_recipe(make_recipe(training={"report_to": "wandb"})))
    assert os.environ["WANDB_PROJECT"] == "someother" and os.environ["WANDB_MODE"] == "disabled"
    path = make_recipe(training={"report_to": "wandb"}, wandb={"project": "myproj", "mode": "offline"})
    configure_wandb(load_recipe(path))
    assert os.environ["WANDB_PROJECT"] == "myproj" and os.environ["WANDB_MODE"] == "offline"
    assert f"notice: {path}:" in capsys.readouterr().out


def test_resume_before_the_recipe_takes_no_recipe_for_a_checkpoint():
    # `run --resume recipes/tiny.yaml` failed in argparse ("required: recipe, overrides"), and with an override after
    # it the recipe was taken for the checkpoint to resume from ("checkpoint directory not found")
    from sft_lora.run import parse_args

    recipe = str(ROOT / "recipes" / "tiny.yaml")
    for argv in (["--resume", recipe], [recipe, "--resume"]):
        args = parse_args(argv)
        assert (args.recipe, args.resume, args.overrides) == (recipe, "auto", [])
    args = parse_args(["--resume", "ck/checkpoint-2", recipe])
    assert (args.recipe, args.resume) == (recipe, "ck/checkpoint-2")  # a checkpoint directory: as before


def test_load_time_checks_refuse_no_legitimate_value_and_miss_none(make_recipe, monkeypatch, tmp_path, capsys):
    import torch

    # YAML has no tuples: lora.layer_replication's list of pairs was refused as "expects list[tuple[int, int]]"
    replicated = ["lora.layer_replication=[[0, 2], [1, 3]]"]
    assert load_recipe(make_recipe(output={"merge": False}), replicated).lora.layer_replication
    with pytest.raises(RecipeError, match="so a merged model cannot be saved; set output.merge: false"):
        load_recipe(make_recipe(output={"merge": True}), replicated)  # a traceback once the adapters were saved
    with pytest.raises(RecipeError, match="lora.layer_replication expects list"):
        load_recipe(make_recipe(), ["lora.layer_replication=[[0, x]]"])
    # TRL's own defaults of keys another section owns set nothing: refused as "move it there"
    assert load_recipe(make_recipe(training={"push_to_hub": False, "hub_model_id": None})).output.push_to_hub is None
    # hub_model_id alone pushed nothing: "move it there" (to output.push_to_hub) would start an upload
    with pytest.raises(RecipeError, match="training.hub_model_id pushes nothing without push_to_hub; drop it"):
        load_recipe(make_recipe(training={"hub_model_id": "me/x"}))
    # paged|flex_attention is flex_attention (no backward on a CPU)
    with pytest.raises(RecipeError, match="flex_attention has no backward on a CPU"):
        load_recipe(make_recipe(), ["model.attn_implementation=paged|flex_attention"])
    # a GPU index this machine lacks (cuda:3 with one GPU was accepted where a GPU is visible)
    from types import SimpleNamespace

    from sft_lora.decisions import check_model_keys
    from sft_lora.keys import KeyProblem

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # one GPU, as the check sees the machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    def on_gpu(device: str):
        return SimpleNamespace(training=SimpleNamespace(use_cpu=False),
                               model=SimpleNamespace(attn_implementation=None, device_map=device))
    for device in ("cuda:0", "cuda", "auto", "cpu", "mps"):
        check_model_keys(on_gpu(device))
    with pytest.raises(KeyProblem, match="'cuda:3' is no device of this machine"):
        check_model_keys(on_gpu("cuda:3"))
    monkeypatch.undo()
    # a mistyped --base_model on a build_tiny recipe under an accelerate config: refused before launching (rank 0
    # said it, then the other rank's gloo traceback, exit 1)
    path = make_recipe(model={"build_tiny": True})
    assert main([str(path), "accelerate_config=cpu_ddp", "--base_model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "model directory not found; the recipe's model.build_tiny builds" in err and "Traceback" not in err
    assert not (tmp_path / "nope").exists()
    # a base card naming several licenses: the list was written as one quoted string
    from sft_lora.card import card_text
    from sft_lora.hub import base_license

    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: [apache-2.0, mit]\n---\n", encoding="utf-8")
    assert base_license(str(base)) == {"license": ["apache-2.0", "mit"]}
    assert "license:\n- apache-2.0\n- mit" in card_text(str(base), {}, {}, "original base weights")
