"""Security: no API key or token lands in an output (the secret scan: fake secrets planted in the environment and
the recipe, a run end to end — train with wandb offline, checkpoints, adapters, merge — and every file it wrote
searched for them); no remote code unless asked; no pickle loads; YAML without tags."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
from pathlib import Path

import pytest

from sft_lora.config import RecipeError, load_recipe
from sft_lora.run import main

from .children import run
from .conftest import ROOT, write_recipe

pytestmark = pytest.mark.slow

# Fake, but in each service's real format (so a scrubber keyed on formats would also be exercised).
SECRETS = {
    "WANDB_API_KEY": "f00dfacecafe" * 3 + "beef",
    "HF_TOKEN": "hf_FakeTokenForTheSecretScan0123456789",
    "HUGGING_FACE_HUB_TOKEN": "hf_AnotherFakeTokenForTheScan987654321",
    "OPENAI_API_KEY": "sk-proj-FakeOpenAIKeyForTheScan_0123456789",
    "ANTHROPIC_API_KEY": "sk-ant-api03-FakeAnthropicKeyForTheScan0123",
    "AWS_SECRET_ACCESS_KEY": "FakeAwsSecretAccessKeyForTheScan/0123+xyz",
    "GITHUB_TOKEN": "ghp_FakeGithubTokenForTheSecretScan0123456",
    "SFT_LORA_DB_PASSWORD": "correct-horse-battery-staple",
}
IN_RECIPE_COMMENT = "hf_TokenPastedIntoARecipeComment0123456789"


def test_a_recipe_cannot_carry_a_secret_and_does_not_echo_it(tmp_path, tiny_model, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", SECRETS["HF_TOKEN"])
    for value in ("${HF_TOKEN}", "prefix-" + SECRETS["OPENAI_API_KEY"], SECRETS["HF_TOKEN"]):
        path = write_recipe(tmp_path, tiny_model, wandb={"run_name": value})
        assert main([str(path)]) == 2
        err = capsys.readouterr().err
        assert "wandb.run_name looks like a secret" in err and "keep tokens in the environment" in err
        assert SECRETS["HF_TOKEN"] not in err and SECRETS["OPENAI_API_KEY"] not in err
    assert not (tmp_path / "final_model").exists() and not (tmp_path / "checkpoints").exists()


def test_an_error_line_never_echoes_a_token(make_recipe, monkeypatch, capsys):
    """Errors that echo a value or a key (a wrong type, an unknown key) redact what looks like a credential."""
    monkeypatch.setenv("SFT_LORA_DB_PASSWORD", SECRETS["SFT_LORA_DB_PASSWORD"])
    for override in (f"training.num_train_epochs={SECRETS['HF_TOKEN']}", f"lora.r={SECRETS['WANDB_API_KEY']}",
                     f"lora.{SECRETS['SFT_LORA_DB_PASSWORD']}=1"):
        assert main([str(make_recipe()), "--check", override]) == 2
        err = capsys.readouterr().err
        assert "<redacted>" in err and not any(secret in err for secret in SECRETS.values()), err


def test_a_40_hex_wandb_key_is_refused_in_any_value_but_a_commit_sha_is_not(tmp_path, tiny_model, monkeypatch):
    """The key is refused with no matching environment variable, anywhere in the recipe (a list item, a data entry);
    a revision and a hub cache snapshot path (both 40 hex digits) still load."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    key = SECRETS["WANDB_API_KEY"]
    for sections in ({"wandb": {"run_name": key}}, {"training": {"report_to": ["none", f"x-{key}"]}},
                     {"data": {"path": [{"path": str(ROOT / "data" / "sample.jsonl"), "source": f"-{key}"}]}}):
        with pytest.raises(RecipeError, match=r"looks like a secret \(a wandb API key \(40 hex digits\)\)"):
            load_recipe(write_recipe(tmp_path, tiny_model, **sections))
    snapshot = tmp_path / "hub" / "snapshots" / key
    snapshot.mkdir(parents=True)
    recipe = load_recipe(write_recipe(tmp_path, tiny_model, model={"revision": key, "name": "tiny"},
                                      data={"chat_template": str(snapshot / "t.jinja")}))
    assert recipe.model.revision == key
    # any other token, or a secret environment value, is refused in model.revision too (it went into every output)
    monkeypatch.setenv("HF_TOKEN", SECRETS["HF_TOKEN"])
    for revision, kind in ((SECRETS["HF_TOKEN"], "the value of $HF_TOKEN"), ("ghp_" + "a" * 36, "a GitHub token")):
        with pytest.raises(RecipeError, match=re.escape(f"model.revision looks like a secret ({kind})")):
            load_recipe(write_recipe(tmp_path, tiny_model, model={"revision": revision}))


def test_no_secret_in_any_output_file(tmp_path, tiny_model):
    """Acceptance: the secret scan."""
    work = tmp_path / "work"
    work.mkdir()
    recipe = write_recipe(work, tiny_model, training={"max_steps": 4, "save_steps": 2, "report_to": "wandb"},
                          output={"merge": True}, wandb={"mode": "offline", "run_name": "secret-scan"})
    recipe.write_text(f"# hub token, pasted here by mistake: {IN_RECIPE_COMMENT}\n" + recipe.read_text())
    env = {**SECRETS, "WANDB_MODE": "offline", "WANDB_DIR": str(work / "wandb"), "HOME": str(work / "home"),
           "WANDB_CONFIG_DIR": str(work / "home" / ".config" / "wandb"), "WANDB_CACHE_DIR": str(work / "cache")}
    (work / "home").mkdir()
    code, child = run([str(recipe)], work / "run", env=env)  # stdout/stderr: work/run.out, work/run.err
    assert code == 0, child.err()[-3000:]

    files = [p for p in work.rglob("*") if p.is_file() and p != recipe]
    names = {p.name for p in files}
    # The scan covers what a run writes: logs, the checkpoint (pickled training args included), the adapters
    # with the saved recipe and model card, the merged model, wandb's offline run.
    for expected in ("run.out", "run.err", "training_args.bin", "trainer_state.json", "optimizer.pt",
                     "sft_lora_checkpoint.json", "adapter_model.safetensors", "sft_lora_recipe.yaml", "README.md",
                     "model.safetensors", "merge_info.json", "tokenizer.json"):
        assert expected in names, f"{expected} not written; the scan would not cover it"
    assert any("offline-run" in str(p) for p in files), "wandb wrote no offline run"
    needles = {name: value.encode() for name, value in {**SECRETS, "recipe comment": IN_RECIPE_COMMENT}.items()}
    found = [f"{name} in {p.relative_to(work)}" for p in files for name, needle in needles.items()
             if needle in p.read_bytes()]
    assert not found, found
    print(f"\nsecret scan: {len(needles)} secrets, {len(files)} files, "
          f"{sum(p.stat().st_size for p in files) // 1024} KiB, none found")
    assert os.environ.get("HF_TOKEN") != SECRETS["HF_TOKEN"], "the planted secrets stayed in the child"


def test_remote_code_only_when_the_recipe_says_so_and_weights_only_as_safetensors(make_recipe):
    default = load_recipe(make_recipe())
    assert default.model.trust_remote_code is False and default.training.trust_remote_code is False
    assert default.training.model_init_kwargs["use_safetensors"] is True
    assert load_recipe(make_recipe(model={"trust_remote_code": True})).training.trust_remote_code is True


def test_no_pickle_and_no_unsafe_yaml_in_the_package():
    for path in (ROOT / "sft_lora").glob("*.py"):
        source = path.read_text(encoding="utf-8")
        for unsafe in ("import pickle", "torch.load(", "yaml.load(", "yaml.unsafe_load", "yaml.Loader",
                       "yaml.FullLoader", "trust_remote_code=True"):
            assert unsafe not in source, f"{path.name}: {unsafe}"


def test_upstream_resume_unpickles_only_with_weights_only():
    """What `--resume` loads besides safetensors (optimizer.pt, scheduler.pt, rng_state.pth, scaler.pt) goes
    through torch.load(weights_only=True) in Trainer; training_args.bin is written, never read back. Checked in the
    installed source, so an upgrade that changes it fails here."""
    import peft.utils.save_and_load
    import transformers.trainer

    source = inspect.getsource(transformers.trainer)
    calls = [source[m.end():m.end() + 300] for m in re.finditer(r"torch\.load\(", source)]
    assert calls and all("weights_only=True" in call.split("\n\n")[0] for call in calls), calls
    assert not re.search(r"torch\.load\([^)]*TRAINING_ARGS_NAME", source)
    assert "weights_only=True" in inspect.getsource(peft.utils.save_and_load.torch_load)


def test_chat_never_unpickles_model_weights(tiny_model, tmp_path):
    """`python -m sft_lora.chat DIR` on a model whose weights are only a pickle refuses it, as training does."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from sft_lora.chat import load

    pickled = tmp_path / "pickled-model"
    shutil.copytree(tiny_model, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(RecipeError, match="cannot load the model"):
        load(pickled)


def test_chat_error_line_escapes_control_characters(tmp_path, capsys):
    """chat's error line is one printable line, like run's and merge's: a path with a newline or an escape sequence
    cannot forge a second line or move the terminal's cursor."""
    from sft_lora.chat import main as chat_main

    odd = tmp_path / "a\nerror: forged\x1b[2J"
    odd.mkdir()
    assert chat_main([str(odd)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "\x1b" not in err and "\\x1b" in err


class _RunsCode:  # a pickle that, when loaded, would write a file
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_a_model_directory_runs_its_code_only_when_the_command_line_says_so(make_recipe, tmp_path, capsys):
    """Merge and chat took trust_remote_code from the recipe saved in the directory, which whoever shared it
    writes: a downloaded adapter ran its base's code. An adapter_model.bin (a pickle) was loaded by PEFT; a checkpoint
    file that is more than tensors stopped --resume with torch's traceback advising weights_only=False."""
    import json
    import shutil

    import torch
    import yaml
    from safetensors.torch import load_file

    from sft_lora.chat import load
    from sft_lora.config import RECIPE_FILE
    from sft_lora.fingerprint import RECORD
    from sft_lora.merge import main as merge_main
    from sft_lora.run import main as run_main

    path = make_recipe(training={"max_steps": 2, "save_steps": 1}, data={"eval_split": None})
    assert run_main([str(path)]) == 0
    adapters = sorted((tmp_path / "final_model").rglob("lora_adapters"))[0]
    shared = shutil.copytree(adapters, tmp_path / "shared_adapters")
    saved = yaml.safe_load((shared / RECIPE_FILE).read_text(encoding="utf-8"))
    saved["model"]["trust_remote_code"] = True
    (shared / RECIPE_FILE).write_text(yaml.safe_dump(saved), encoding="utf-8")
    capsys.readouterr()
    assert merge_main(["--adapter_model", str(shared)]) == 2
    assert "model.trust_remote_code: true, so loading it runs code that ships with the model; pass " \
           "--trust_remote_code if you trust that code" in capsys.readouterr().err
    with pytest.raises(RecipeError, match="pass --trust-remote-code if you trust that code"):
        load(shared)
    assert merge_main(["--adapter_model", str(shared), "--trust_remote_code"]) == 0  # asked: as before
    pickled = shutil.copytree(adapters, tmp_path / "pickled_adapters")
    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    assert merge_main(["--adapter_model", str(pickled)]) == 2
    assert "no adapter_model.safetensors (an adapter_model.bin is a pickle" in capsys.readouterr().err
    # a tampered optimizer state, its size recorded as the checkpoint's record expects
    checkpoint = sorted((tmp_path / "checkpoints").rglob("checkpoint-1"))[0]
    marker = tmp_path / "ran"
    torch.save({"state": _RunsCode(marker)}, checkpoint / "optimizer.pt")
    record = json.loads((checkpoint / RECORD).read_text(encoding="utf-8"))
    record["files"]["optimizer.pt"] = (checkpoint / "optimizer.pt").stat().st_size
    (checkpoint / RECORD).write_text(json.dumps(record), encoding="utf-8")
    assert run_main([str(path), "training.max_steps=3", "--resume", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert f"error: {checkpoint}: a file of this checkpoint holds more than tensors, which may run code" in err
    assert "Traceback" not in err and not marker.exists()


def test_secrets_checks_see_mapping_keys_and_not_author_names_and_no_launch_writes_the_environment(
        make_recipe, monkeypatch, tmp_path):
    import yaml

    from sft_lora.launch import check_launch

    # a token pasted as a mapping's key was saved in the recipe copies, cards and manifest
    with pytest.raises(RecipeError, match=r"chat_template_kwargs.hf_\w+ looks like a secret \(a Hugging Face token"):
        load_recipe(make_recipe(), ['data.chat_template_kwargs={"hf_PastedAsAMappingKey0123456789abcdefg": 1}'])
    # GIT_AUTHOR_NAME is no secret ("auth"): a path or run name holding the user's name was refused and redacted
    monkeypatch.setenv("GIT_AUTHOR_NAME", "minjunkim")
    assert load_recipe(make_recipe(), ["wandb.run_name=minjunkim-exp1"]).wandb.run_name == "minjunkim-exp1"
    # a multi-machine DeepSpeed launch other than `standard` makes accelerate append the environment to
    # ./.deepspeed_env (a file this repository once tracked)
    config = yaml.safe_load((ROOT / "accelerate_configs" / "multi_node.yaml").read_text(encoding="utf-8"))
    config["mixed_precision"] = "no"  # this machine has no GPU
    check_launch(load_recipe(make_recipe()), config, "multi_node.yaml")  # standard: accepted
    del config["deepspeed_config"]["deepspeed_multinode_launcher"]
    with pytest.raises(RecipeError, match=r"the pdsh launcher makes accelerate write the whole environment"):
        check_launch(load_recipe(make_recipe()), config, "multi_node.yaml")
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", ".deepspeed_env"], capture_output=True, text=True)
    assert tracked.stdout == "" and ".deepspeed_env" in (ROOT / ".gitignore").read_text(encoding="utf-8").split()


def test_a_tokenizer_shipping_code_is_refused_with_the_key_that_allows_it(tiny_model, tmp_path, capsys):
    # the line said "check model.name_or_path, the network or HF_TOKEN", never the key that allows the code
    import json
    import shutil

    base = shutil.copytree(tiny_model, tmp_path / "custom")
    marker = tmp_path / "ran"
    (base / "tokenization_custom.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nfrom transformers import PreTrainedTokenizerFast as CustomTokenizer\n")
    config = json.loads((base / "tokenizer_config.json").read_text(encoding="utf-8"))
    config |= {"tokenizer_class": "CustomTokenizer", "auto_map": {"AutoTokenizer": [None, "tokenization_custom."
                                                                                          "CustomTokenizer"]}}
    (base / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    path = write_recipe(tmp_path, base)
    assert main([str(path), "--check"]) == 2
    assert capsys.readouterr().err.rstrip().endswith("set model.trust_remote_code: true if you trust the code it "
                                                     "ships") and not marker.exists()
