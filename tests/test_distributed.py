"""Every shipped accelerate config, run for real on CPU (gloo) with 2 processes through `accelerate launch`.

Each config is adapted only where a CPU needs it (2 processes, no mixed precision; the multi-node one also gets a
loopback address). Every run is compared with one process on the same global batch: same losses step by step,
same adapter files with full tensors; ZeRO-2, ZeRO-3 and FSDP also resume from a mid checkpoint and merge.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sft_lora.config import load_recipe
from sft_lora.launch import CONFIG_DIR
from sft_lora.run import train

from .conftest import ROOT, write_recipe

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
STEPS, SAVE = 4, 2
# DeepSpeed JIT-compiles its CPU ops on first use (~100 s): left in torch's per-user cache (TORCH_EXTENSIONS_DIR,
# default ~/.cache/torch_extensions), where users' own runs find them, so a machine pays once, not once per clone.
ENV = {**os.environ, "WANDB_MODE": "disabled"}


def cpu_config(name: str, directory: Path, **changes) -> Path:
    """The shipped config `name`, adapted only where a 2-core CPU machine needs it."""
    config = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    config.update(num_processes=2, mixed_precision="no", **changes)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _recipe(directory: Path, tiny_model: Path, per_device: int) -> Path:
    return write_recipe(directory, tiny_model, data={"eval_split": 0.0},
                        training={"max_steps": STEPS, "save_steps": SAVE, "per_device_train_batch_size": per_device,
                                  "eval_strategy": "no"})


def _losses(checkpoints: Path) -> list[float]:
    state = json.loads((checkpoints / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return [log["loss"] for log in state["log_history"] if "loss" in log]


def _adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "adapter_model.safetensors")


def _launch(recipe: Path, config: Path, *extra: str, rank: int | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "sft_lora.run", str(recipe), f"accelerate_config={config}", *extra]
    env = dict(ENV)
    if rank is not None:  # one "machine" of a multi-node run: accelerate's own --machine_rank flag
        command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", str(config),
                   "--machine_rank", str(rank), "-m", "sft_lora.run", str(recipe), *extra]
        env["SFT_LORA_LAUNCHED"] = "1"
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run(recipe: Path, config: Path, *extra: str) -> str:
    process = _launch(recipe, config, *extra)
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model):
    """One process, global batch 4: the trajectory and adapter every launch must reproduce."""
    directory = tmp_path_factory.mktemp("single")
    recipe = load_recipe(_recipe(directory, tiny_model, per_device=4))
    summary = train(recipe)
    return {"losses": _losses(recipe.checkpoint_dir), "adapter": _adapter(Path(summary["adapters"])),
            "files": sorted(p.name for p in Path(summary["adapters"]).iterdir())}


def _assert_matches(reference: dict, recipe_path: Path, losses_tol: float = 1e-4) -> Path:
    recipe = load_recipe(recipe_path)
    assert _losses(recipe.checkpoint_dir) == pytest.approx(reference["losses"], rel=losses_tol)
    assert sorted(p.name for p in recipe.adapters_dir.iterdir()) == reference["files"]
    adapter = _adapter(recipe.adapters_dir)
    assert adapter.keys() == reference["adapter"].keys()
    for key, tensor in adapter.items():
        assert tensor.numel() > 0 and tensor.shape == reference["adapter"][key].shape, key  # full, not shards
        assert torch.allclose(tensor.float(), reference["adapter"][key].float(), atol=1e-4), key
    return recipe.adapters_dir


def test_single_gpu_config_is_one_process(reference, tmp_path, tiny_model):
    recipe = _recipe(tmp_path, tiny_model, per_device=4)
    out = _run(recipe, CONFIG_DIR / "single_gpu.yaml")
    assert "launching:" in out and "on 1 process\n" in out
    _assert_matches(reference, recipe)


def test_ddp_two_processes_match_one_process_on_the_same_global_batch(reference, tmp_path, tiny_model):
    recipe = _recipe(tmp_path, tiny_model, per_device=2)
    out = _run(recipe, CONFIG_DIR / "cpu_ddp.yaml")  # the shipped CPU config, as it is
    assert "on 2 processes" in out and re.search(r"replicas:\s+identical on all 2 processes", out)
    adapters = _assert_matches(reference, recipe)
    assert json.loads((adapters / "manifest.json").read_text())["hardware"]["world_size"] == 2
    assert json.loads((adapters / "summary.json").read_text())["world_size"] == 2


def test_a_recipe_naming_its_config_launched_by_hand_trains_once_under_that_launch(reference, tmp_path, tiny_model):
    # each rank launched again ("launching:" twice, port in use, the lock held by the other, two tracebacks)
    config = CONFIG_DIR / "cpu_ddp.yaml"
    recipe = _recipe(tmp_path, tiny_model, per_device=2)
    command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", str(config), "-m",
               "sft_lora.run", str(recipe), f"accelerate_config={config}"]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "launching:" not in done.stdout, (done.stdout + done.stderr)[-3000:]
    _assert_matches(reference, recipe)


def test_more_processes_asked_than_accelerate_started_is_one_line_and_exit_2(tmp_path, tiny_model):
    # without a GPU, `accelerate launch --num_processes 2` (and `--cpu --num_processes 2`) starts one process
    command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--num_processes", "2", "-m",
               "sft_lora.run", str(_recipe(tmp_path, tiny_model, per_device=2))]
    done = subprocess.run(command, cwd=ROOT, env={**ENV, "SFT_LORA_LAUNCHED": "1"}, capture_output=True, text=True,
                          timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    # the one process exits 2 with one line; `accelerate launch` then fails itself (exit 1, its own traceback)
    assert len(errors) == 1 and "returned non-zero exit status 2." in done.stderr, done.stderr[-2000:]
    assert done.returncode == 1
    assert "asked for several processes but started 1" in errors[0] and "accelerate_config=cpu_ddp" in errors[0]
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("name", ["zero2", "zero3", "fsdp"])
def test_sharded_configs_train_save_resume_and_merge(reference, tmp_path, tiny_model, name):
    config = cpu_config(name, tmp_path)
    recipe_path = _recipe(tmp_path, tiny_model, per_device=2)
    out = _run(recipe_path, config, "output.merge=true")
    assert "on 2 processes" in out
    adapters = _assert_matches(reference, recipe_path)
    assert (adapters.parent / "lora_merged" / "model.safetensors").is_file()

    # Checkpoints hold full adapter tensors too (not ZeRO-3/FSDP shards of them).
    checkpoint = load_recipe(recipe_path).checkpoint_dir / f"checkpoint-{SAVE}"
    for key, tensor in _adapter(checkpoint).items():
        assert tensor.shape == reference["adapter"][key].shape, key

    # Resume from the mid checkpoint into fresh outputs: the same adapter as the uninterrupted run.
    resumed_dir = tmp_path / "resumed"
    out = _run(recipe_path, config, "--resume", str(checkpoint), f"output.dir={resumed_dir}",
               f"output.checkpoint_dir={resumed_dir}/ckpt")
    assert f"resuming from {checkpoint}" in out or str(checkpoint) in out
    resumed = _adapter(resumed_dir / "tiny-llama" / "1" / "lora_adapters")
    for key, tensor in _adapter(adapters).items():
        assert torch.allclose(resumed[key], tensor, atol=1e-6), key


def test_zero3_with_cpu_offload(reference, tmp_path, tiny_model):
    recipe = _recipe(tmp_path, tiny_model, per_device=2)
    out = _run(recipe, cpu_config("zero3_offload", tmp_path))
    assert "on 2 processes" in out
    _assert_matches(reference, recipe)


def test_two_nodes_on_one_machine_agree(reference, tmp_path, tiny_model):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = cpu_config("multi_node", tmp_path, main_process_ip="127.0.0.1", main_process_port=port)
    recipe = _recipe(tmp_path, tiny_model, per_device=2)
    nodes = [_launch(recipe, config, rank=rank) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "on 2 processes" in outputs[0] and re.search(r"replicas:\s+identical on all 2 processes", outputs[0])
    _assert_matches(reference, recipe)
