"""Known-bad recipe × accelerate-config combinations fail before any model loads, each with its fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sft_lora.config import RecipeError, load_recipe
from sft_lora.launch import CONFIG_DIR, check_launch, check_process_group, read_config, resolve_config
from sft_lora.run import main


def shipped(name: str, **changes) -> dict:
    config = read_config(CONFIG_DIR / f"{name}.yaml")
    for key, value in changes.items():
        section, _, sub = key.partition("__")
        if sub:
            config[section][sub] = value
        else:
            config[key] = value
    return config


def _error(recipe, config) -> str:
    with pytest.raises(RecipeError) as info:
        check_launch(recipe, config, "cfg.yaml")
    assert "\n" not in str(info.value)
    return str(info.value)


def test_every_shipped_config_passes_with_a_matching_recipe(make_recipe):
    lora = load_recipe(make_recipe(training={"bf16": True}))
    qlora = load_recipe(make_recipe(use_qlora=True, quantization={"bnb_4bit_quant_storage": "bfloat16"},
                                    training={"bf16": True}))
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert names == ["cpu_ddp", "fsdp", "multi_gpu", "multi_node", "single_gpu", "zero2", "zero3", "zero3_offload"]
    for name in names:
        config = read_config(CONFIG_DIR / f"{name}.yaml")
        if name in ("single_gpu", "cpu_ddp"):
            config["mixed_precision"] = "bf16"
        check_launch(lora, config, name)
        check_launch(qlora, config, name)


@pytest.mark.parametrize("name", ["zero3", "zero3_offload", "fsdp"])
def test_qlora_with_sharded_weights_needs_quant_storage(make_recipe, name):
    recipe = load_recipe(make_recipe(use_qlora=True, training={"bf16": True}))
    assert "needs quantization.bnb_4bit_quant_storage: bfloat16" in _error(recipe, shipped(name))
    check_launch(recipe, shipped("zero2"), "zero2")  # stage 2 keeps whole weights: fine


@pytest.mark.parametrize("name", ["zero2", "zero3", "fsdp", "multi_gpu"])
def test_device_map_under_a_distributed_launch(make_recipe, name):
    recipe = load_recipe(make_recipe(model={"device_map": "auto"}, training={"bf16": True}))
    assert "model.device_map='auto' cannot be used under" in _error(recipe, shipped(name))


def test_mixed_precision_must_agree_with_the_recipe(make_recipe):
    fp32 = load_recipe(make_recipe(training={"bf16": False}))
    assert "asks mixed_precision bf16 but the recipe trains in fp32" in _error(fp32, shipped("zero2"))  # "in no"
    bf16 = load_recipe(make_recipe(training={"bf16": True}))
    bf16.training.use_cpu = False  # as on a GPU machine
    assert "set training.fp16: true" in _error(bf16, shipped("zero2", mixed_precision="fp16"))
    # on a machine without a GPU the fix is the config's, never bf16 in the recipe
    cpu = _error(load_recipe(make_recipe(training={"bf16": False, "use_cpu": True})), shipped("multi_gpu"))
    assert "trains in fp32 on the CPU" in cpu and "training.bf16" not in cpu
    assert 'set mixed_precision: "no" in the config, or use accelerate_config=cpu_ddp' in cpu


def test_deepspeed_batch_arithmetic(make_recipe, tmp_path):
    recipe = load_recipe(make_recipe(training={"bf16": True, "per_device_train_batch_size": 4,
                                               "gradient_accumulation_steps": 2}))
    config = shipped("zero2", deepspeed_config__gradient_accumulation_steps=4)
    assert "gradient_accumulation_steps=4 but the recipe gives 2" in _error(recipe, config)
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"train_batch_size": 32, "train_micro_batch_size_per_gpu": "auto"}))
    config = shipped("zero2", deepspeed_config__deepspeed_config_file=str(ds_json))
    assert "train_batch_size=32 but the recipe gives 64" in _error(recipe, config)  # 4 × 2 × 8 processes
    ds_json.write_text(json.dumps({"train_batch_size": 64}))
    check_launch(recipe, config, "ok")
    # values that are no number, a DeepSpeed file that is no JSON: one line, not int()'s or json's traceback
    ds_json.write_text("{not json")
    assert _error(recipe, config).startswith("cfg.yaml: not a valid accelerate config (Expecting property name")
    assert "not a valid accelerate config (invalid literal for int() with base 10: 'two')" in _error(
        recipe, shipped("zero2", num_processes="two"))
    assert "not a valid accelerate config" in _error(recipe, shipped("zero2", deepspeed_config__zero_stage="three"))


def test_fsdp_checkpointing_twice_and_fsdp1_lora(make_recipe):
    recipe = load_recipe(make_recipe(training={"bf16": True, "activation_checkpointing": True}))
    config = shipped("fsdp", fsdp_config__fsdp_activation_checkpointing=True)
    assert "set training.activation_checkpointing: false" in _error(recipe, config)
    recipe = load_recipe(make_recipe(training={"bf16": True}))
    config = shipped("fsdp", fsdp_config__fsdp_version=1, fsdp_config__fsdp_use_orig_params=False)
    assert "LoRA under FSDP1 needs fsdp_use_orig_params: true" in _error(recipe, config)


def test_multi_node_arithmetic(make_recipe):
    recipe = load_recipe(make_recipe(training={"bf16": True}))
    assert "not a multiple of num_machines 2" in _error(recipe, shipped("multi_node", num_processes=15))
    assert "machine_rank must be below num_machines 2" in _error(recipe, shipped("multi_node", machine_rank=2))


def test_processes_that_did_not_form_a_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RecipeError, match="started 2 processes but they formed a group of 1"):
        check_process_group(1)
    check_process_group(2)


def test_config_names_resolve_and_unknown_ones_fail(tmp_path):
    assert resolve_config("zero3") == CONFIG_DIR / "zero3.yaml"
    own = tmp_path / "mine.yaml"
    own.write_text(yaml.safe_dump({"distributed_type": "NO"}))
    assert resolve_config(str(own)) == own
    with pytest.raises(RecipeError, match="'zero9' not found; use an existing file or one of: cpu_ddp, fsdp"):
        resolve_config("zero9")


def test_a_bad_combination_fails_before_launching(make_recipe, capsys):
    path = make_recipe(use_qlora=True, accelerate_config="zero3", training={"bf16": True})
    assert main([str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "zero3.yaml: QLoRA under DeepSpeed ZeRO-3 needs" in err[0]
    # the run's own checks too, before launching: each rank said it, then the launcher's traceback, exit 1
    path = make_recipe(accelerate_config="cpu_ddp", data={"path": "nope.jsonl"})
    assert main([str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: nope.jsonl: data file not found (relative to the working directory, "
                   f"{Path.cwd()}); check data.path"]


def test_a_checkpoint_resumes_only_under_the_optimizer_state_form_it_was_saved_in(make_recipe, tmp_path,
                                                                                   monkeypatch):
    """A DeepSpeed checkpoint resumed under DDP: Trainer found no optimizer.pt and silently started a fresh optimizer
    and learning-rate schedule (the adapters 0.012 off an uninterrupted run, exit 0)."""
    from sft_lora.fingerprint import RECORD, check_fingerprint, fingerprint

    path, checkpoint = make_recipe(), tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    zero3 = {"WORLD_SIZE": "1", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    with monkeypatch.context() as env:
        for key, value in zero3.items():
            env.setenv(key, value)
        saved = fingerprint(load_recipe(path))
        assert saved["weights_view"]["optimizer_state"] == "DeepSpeed ZeRO-3"
    (checkpoint / RECORD).write_text(json.dumps(saved), encoding="utf-8")
    with pytest.raises(RecipeError, match=r"made from another launch \(optimizer_state: 'DeepSpeed ZeRO-3' -> "
                       r"'torch'\)"):
        check_fingerprint(checkpoint, load_recipe(path))
    # a record from before optimizer_state: DeepSpeed's own `latest` file says how it was saved
    del saved["weights_view"]["optimizer_state"]
    (checkpoint / RECORD).write_text(json.dumps(saved), encoding="utf-8")
    check_fingerprint(checkpoint, load_recipe(path))
    (checkpoint / "latest").write_text("global_step4", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"another launch \(optimizer_state: 'DeepSpeed' -> 'torch'\)"):
        check_fingerprint(checkpoint, load_recipe(path))


def test_resume_refusals_come_before_launching_and_once(make_recipe, tmp_path, capsys, monkeypatch):
    """--resume with nothing to resume, or a fresh start over another recipe's checkpoints, under an accelerate config:
    each rank printed the error, then torchrun's traceback, exit 1; a launched rank's error is said by rank 0 only."""
    import sys

    from sft_lora.run import _stopped, parse_args

    path = make_recipe(accelerate_config="cpu_ddp")
    missing = tmp_path / "nope"
    assert main([str(path), "--resume", str(missing)]) == 2
    out, err = capsys.readouterr()
    assert "launching:" not in out and err.splitlines() == [
        f"error: {missing}: checkpoint directory not found; check --resume"]
    assert main([str(path), "--resume"]) == 2  # resumed under the config's 2 processes: none to resume from
    assert "launching:" not in capsys.readouterr().out
    from sft_lora.fingerprint import RECORD, fingerprint

    checkpoint = (recipe := load_recipe(path)).checkpoint_dir / "checkpoint-2"  # one process's, as `make train` made
    checkpoint.mkdir(parents=True)
    (checkpoint / RECORD).write_text(json.dumps(fingerprint(recipe)), encoding="utf-8")
    assert main([str(path)]) == 2
    out, err = capsys.readouterr()
    assert "launching:" not in out and err.splitlines() == [
        f"error: {recipe.checkpoint_dir}: holds checkpoints of another run (checkpoint-2: made from another launch "
        "(world_size: 1 -> 2)), which this run would mix with its own; continue that run with --resume and its "
        "recipe and accelerate config, set output.checkpoint_dir, or remove them"]
    # a checkpoint of weights alone (save_only_model), refused once before launching, not by each launched process
    import sft_lora.resume

    weights_only = tmp_path / "checkpoint-4"
    weights_only.mkdir()
    (weights_only / RECORD).write_text(json.dumps({"files": {"adapter_model.safetensors": 8}}), encoding="utf-8")
    monkeypatch.setattr(sft_lora.resume, "select_checkpoint", lambda *args: str(weights_only))
    assert main([str(path), "--resume", str(weights_only)]) == 2
    out, err = capsys.readouterr()
    assert "launching:" not in out and err.splitlines() == [
        f"error: {weights_only}: saved with training.save_only_model (weights alone, no optimizer or schedule state), "
        "so a resume would not continue the run; train from the start, or pass --force-resume to go on with a fresh "
        "optimizer"]
    monkeypatch.undo()
    args = parse_args([str(path)])
    monkeypatch.setenv("RANK", "1")
    assert _stopped(RecipeError("x"), args, 2, "error: x") == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")  # launched by hand: its launch options are not sft_lora's to repeat
    stop = RecipeError("x")
    stop.training_started, stop.checkpoint = True, tmp_path / "checkpoint-16"
    _stopped(stop, args, 130, "interrupted")
    assert capsys.readouterr().err.splitlines() == ["interrupted", "to continue: accelerate launch <the same "
                                                    f"options> -m sft_lora.run {path} --resume {stop.checkpoint}"]
    monkeypatch.setenv("SFT_LORA_LAUNCHED", "1")  # relaunched by sft_lora: the plain command relaunches again
    _stopped(stop, args, 130, "interrupted")
    assert f"to continue: {sys.executable} -m sft_lora.run {path} --resume" in capsys.readouterr().err


def test_the_fsdp_config_on_a_cpu_says_it_trains_as_ddp(make_recipe, monkeypatch, capsys):
    """accelerate turns FSDP on for GPUs only: on a CPU the fsdp config silently trained plain DDP."""
    from sft_lora.launch import check_this_launch

    recipe = load_recipe(make_recipe())
    check_this_launch(recipe)
    assert "FSDP" not in capsys.readouterr().out
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # as `accelerate launch` sets it under the fsdp config
    check_this_launch(recipe)
    assert "notice: accelerate shards with FSDP on GPUs only; here the fsdp config trains as DDP" in \
        capsys.readouterr().out
