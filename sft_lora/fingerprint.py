"""Fingerprint: what a checkpoint vouches for, recorded beside it: everything in the resolved recipe that shapes the
weights, and the content of every file the recipe points at (data, eval data, chat template, the base model's
tokenizer); and how a checkpoint's record differs from a recipe's (README, Reliability)."""

import dataclasses
import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from .config import Recipe, RecipeError
from .data import entries
from .launch import config_from_environment
from .text import say

RECORD = "sft_lora_checkpoint.json"
# The SFTConfig/LoraConfig fields that cannot change what a step computes, told apart by their family's name (so a
# new field of a family needs no change here): writing, logging, evaluating, the run's length (extending a run is
# the point of resuming), worker plumbing, activation checkpointing (it recomputes the same values).
NEUTRAL = re.compile(
    r"output_dir|run_name|project|report_to|disable_tqdm|push_to_hub|resume_from_checkpoint|peft_version"
    r"|(save|hub|logging|log|trackio)_\w+"  # writing, logging
    r"|(eval|do|per_device_eval|batch_eval|prediction|metric_for|greater_is|load_best|include)_\w+|\w+_full_eval"
    r"|max_steps|num_train_epochs"  # the run's length
    r"|dataloader_(num_workers|pin_memory|persistent_workers|prefetch_factor)|local_rank|ddp_(timeout|find_unused_parameters|bucket_cap_mb)"
    r"|(activation|gradient)_checkpointing\w*|activation_offloading|skip_memory_metrics|torch_empty_cache_steps"
    r"|use_cache|dataset_num_proc|dataset_text_field")  # same values computed; identical rows; text datasets only
NOT_WEIGHTS = {"data": ("path", "eval_path", "chat_template"), "model": ("name",)}  # paths: compared by content
# A local base model's files that decide the tokens and labels (its weights are too big to hash on every run).
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json",
                   "merges.txt")
LAUNCH_KEYS = ("world_size", "optimizer_state")  # set by the accelerate config, not the recipe
FILES = {"data.path": "different data", "data.eval_path": "different eval data",  # a record's file keys, as said
         "data.chat_template": "a different chat template",
         "model.tokenizer": "a different tokenizer or chat template in model.name_or_path"}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, or of every file under a directory (sorted by relative path)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return _sha256(str(path), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=16)
def _sha256(root: str, stats: tuple[tuple[str, int, int], ...]) -> str:
    """Hashed once per process for unchanged files (size and mtime): a run reads its data's hash three times."""
    digest = hashlib.sha256()
    for name, _, _ in stats:
        if Path(root).is_dir():
            digest.update(str(Path(name).relative_to(root)).encode())
        with open(name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def named_or_hashed(path: str) -> str:
    return file_sha256(path) if Path(path).exists() else f"hub:{path}"  # a hub id is named, not hashed


def recipe_sha256(recipe: Recipe) -> str:
    return hashlib.sha256(recipe.to_yaml().encode()).hexdigest()


def weights_view(recipe: Recipe) -> dict[str, Any]:
    """Flat `section.key` → value of everything in the resolved recipe that shapes the trained weights, upstream
    defaults included (a changed default is noticed too); `output`, `wandb`, `check` and `report` do not."""
    sections = {"model": dataclasses.asdict(recipe.model), "data": dataclasses.asdict(recipe.data),
                "lora": recipe.lora.to_dict(), "training": {**recipe.training.to_dict(), **{  # to_dict hides
                    k: getattr(recipe.training, k) for k in ("eos_token", "pad_token")}},  # them as "<EOS_TOKEN>"
                "quantization": recipe.quantization.to_dict() if recipe.quantization is not None else {}}
    # the launch: its processes make the global batch with the per-device batch (a step's data, the steps an epoch);
    # the form it saves the optimizer in (resumed under another, Trainer silently starts a fresh optimizer)
    launch = config_from_environment()
    flat: dict[str, Any] = {"use_qlora": recipe.use_qlora, "world_size": launch["num_processes"],
                            "optimizer_state": optimizer_state(launch)}
    for section, values in sections.items():
        flat.update({f"{section}.{key}": value for key, value in values.items() if key not in
                     NOT_WEIGHTS.get(section, ()) and not _neutral(f"{section}.{key}")})
    return json.loads(json.dumps(flat, sort_keys=True, default=lambda value: sorted(value, key=str)  # as a record
                                 if isinstance(value, (set, frozenset)) else str(value).removeprefix("torch.")))


def _neutral(dotted: str) -> bool:
    section, _, key = dotted.partition(".")
    return section in ("training", "lora") and bool(NEUTRAL.fullmatch(key))


def optimizer_state(launch: dict[str, Any]) -> str:
    """How a launch (an accelerate config) saves the optimizer: DeepSpeed's partitions, FSDP's shards, torch's file."""
    kind = str(launch.get("distributed_type", "NO")).upper()
    stage = (launch.get("deepspeed_config") or {}).get("zero_stage", 0)
    return f"DeepSpeed ZeRO-{stage}" if kind == "DEEPSPEED" else "FSDP" if kind == "FSDP" else "torch"


def _tokenizer_sha256(name_or_path: str) -> str | None:
    """sha256 of a local base model's `TOKENIZER_FILES`; None for a hub id (model.revision names it)."""
    files = [Path(name_or_path) / name for name in TOKENIZER_FILES]
    return hashlib.sha256("".join(f"{f.name}:{file_sha256(f)}\n" for f in files if f.is_file()).encode()
                          ).hexdigest() if Path(name_or_path).is_dir() else None


def fingerprint(recipe: Recipe) -> dict[str, Any]:
    """What a checkpoint records about the run that made it: the weights' view, the sha256 of every file the recipe
    points at (a list of data entries: its entries' hashes joined, with any weight or source), and the length."""
    files = {f"data.{key}": "+".join(named_or_hashed(e.path) + ("" if (e.weight, e.source) == (1, None)
                                                                 else f"*{e.weight:g}@{e.source}")
                                     + (f"/{e.split}" if e.split else "") for e in entries(getattr(recipe.data, key)))
             for key in ("path", "eval_path") if getattr(recipe.data, key)}
    if recipe.data.chat_template:
        files["data.chat_template"] = named_or_hashed(recipe.data.chat_template)
    if tokenizer := _tokenizer_sha256(recipe.model.name_or_path):
        files["model.tokenizer"] = tokenizer
    return {"recipe_sha256": recipe_sha256(recipe), "files_sha256": files, "weights_view": weights_view(recipe),
            "length": run_length(recipe)}


def run_length(recipe: Recipe) -> dict[str, Any]:
    """How long the recipe trains, as a checkpoint records it (resuming may change it: not in the weights' view)."""
    return {"max_steps": recipe.training.max_steps, "num_train_epochs": recipe.training.num_train_epochs}


def check_fingerprint(checkpoint: Path, recipe: Recipe, force: bool = False) -> None:
    """Refuse (RecipeError) a checkpoint whose recorded recipe or data differs from `recipe`'s, unless `force`."""
    if problems := fingerprint_problems(checkpoint, recipe):
        message = f"{checkpoint}: made from {' and '.join(problems)}"
        launch = " (and accelerate config: processes, DeepSpeed/FSDP)" if "another launch" in message else ""
        if not force:
            raise RecipeError(f"{message}; resume with the recipe{launch} and data it was made from, or pass "
                              "--force-resume")
        say(f"notice: {message}; resuming anyway (--force-resume)")


def fingerprint_problems(checkpoint: Path, recipe: Recipe) -> list[str]:
    """How the recorded recipe and data differ from `recipe`'s ([] when they match or none is recorded)."""
    if not (checkpoint / RECORD).is_file():
        return []  # only reachable with force: nothing recorded to compare
    saved, now = json.loads((checkpoint / RECORD).read_text(encoding="utf-8")), fingerprint(recipe)
    problems = []
    old, new = {"world_size": 1, **saved.get("weights_view", {})}, now["weights_view"]  # records before world_size
    old = {k: v for k, v in old.items() if not _neutral(k)}  # a key found neutral since (ddp_*): no difference
    if "optimizer_state" not in old:  # records before it: a DeepSpeed checkpoint says so itself (`latest`)
        deepspeed = (checkpoint / "latest").is_file()
        old["optimizer_state"] = new["optimizer_state"] if deepspeed == new["optimizer_state"].startswith(
            "DeepSpeed") else "DeepSpeed" if deepspeed else "torch"
    # records before the *_token fields were kept hold to_dict's placeholder (`<EOS_TOKEN>`): nothing to compare
    hidden = {k for k, v in old.items() if v == f"<{k.rpartition('.')[2].upper()}>"}
    changed = sorted(k for k in (set(old) | set(new)) - hidden if old.get(k, "<unset>") != new.get(k, "<unset>"))
    for what, keys in (("a different recipe", [k for k in changed if k not in LAUNCH_KEYS]),
                       ("another launch", [k for k in changed if k in LAUNCH_KEYS])):
        shown = ", ".join(_change(k, old.get(k, "<unset>"), new.get(k, "<unset>")) for k in keys[:3])
        if keys:
            problems.append(f"{what} ({shown}{f' and {len(keys) - 3} more' if len(keys) > 3 else ''})")
    unset = [k for k in changed if k not in LAUNCH_KEYS]
    if unset and not set(unset) & set(recipe.where):  # an upstream default or sft_lora's own choice changed since
        pins = [f"{k}={json.dumps(old[k])}" for k in unset if isinstance(old.get(k), (bool, int, float, str))]
        problems[0] += (f"; the recipe sets none of these: a default or sft_lora's own choice changed since (an "
                        f"upgrade?){'; to continue as it was trained, set ' + ' '.join(pins) if pins else ''}")
    old_files, new_files = saved.get("files_sha256", {}), now["files_sha256"]
    for key, what in FILES.items():  # the base model's: not in records made before it was hashed
        if old_files.get(key) != new_files.get(key) and (key != "model.tokenizer" or key in old_files):
            problems.append(f"{what} (sha256 {old_files.get(key, 'none')[:12]} then, "
                            f"{new_files.get(key, 'none')[:12]} now)")
    return problems


def _change(key: str, then: Any, now: Any) -> str:
    """`key: then -> now`; of two mappings only the entries that differ (a whole one cut at 40 characters hid them)."""
    if isinstance(then, dict) and isinstance(now, dict):
        return ", ".join(_change(f"{key}.{k}", then.get(k, "<unset>"), now.get(k, "<unset>")) for k in
                         sorted(set(then) | set(now), key=str) if then.get(k, "<unset>") != now.get(k, "<unset>"))
    return f"{key}: {_short(then)} -> {_short(now)}"


def _short(value: Any) -> str:
    return text if len(text := repr(value)) <= 40 else text[:37] + "..."
