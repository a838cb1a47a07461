"""Every recipe key checked against the class that receives it: unknown keys (with a did-you-mean) and values of
the wrong type are reported under `section.key` before any upstream object is built or any model touched."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import inspect
import math
import os
import re
import types
import typing
from typing import Any

from .sections import CHECK_NAMES, OWN_SECTIONS


class KeyProblem(ValueError):
    """A wrong key or value; `config` adds the file and line of `dotted` and raises it as a RecipeError."""

    def __init__(self, dotted: str, message: str) -> None:
        self.dotted = dotted
        super().__init__(message)


# Values that must be > 0 (upstream classes accept some of these silently and fail hours later).
POSITIVE = {
    "training.learning_rate", "training.num_train_epochs", "training.per_device_train_batch_size",
    "training.per_device_eval_batch_size", "training.gradient_accumulation_steps", "training.max_length",
    "training.save_steps", "training.logging_steps", "training.eval_steps", "lora.r", "lora.lora_alpha",
    "report.smoke_max_new_tokens",
}
# Values with a fixed set of choices; upstream accepts some of these and fails only while loading the model.
CHOICES = {
    "model.dtype": ("auto", "bfloat16", "float16", "float32"), "data.on_bad_record": ("fail", "skip"),
    "output.merge_into": ("dequantized", "original"), "wandb.mode": ("auto", "online", "offline", "disabled"),
    "quantization.bnb_4bit_quant_type": ("nf4", "fp4"),
    "quantization.bnb_4bit_compute_dtype": ("bfloat16", "float16", "float32"),
    "quantization.bnb_4bit_quant_storage": ("uint8", "bfloat16", "float16", "float32"),
}
# Upper bounds: past them upstream allocates what no machine has (TRL's packing builds a max_length-sized tree; a
# LoRA rank past any model's hidden size only adds zeros).
MAXIMUM = {"training.max_length": 2**20, "lora.r": 2**16}
FRACTIONS = {"data.eval_split", "lora.lora_dropout", "training.warmup_ratio", "check.max_truncated_share"}  # [0, 1)

UPSTREAM_SECTIONS = ("lora", "quantization", "training")
# `training` keys that other sections own, and where to set them instead.
OWNED_ELSEWHERE = {
    "output_dir": "output.checkpoint_dir", "run_name": "wandb.run_name", "model_init_kwargs": "the model section",
    "trust_remote_code": "model.trust_remote_code", "chat_template_path": "data.chat_template",
    "resume_from_checkpoint": "the --resume flag", "hub_token": "the HF_TOKEN environment variable",
}


def upstream_class(section: str) -> type:
    """The upstream class a recipe section is handed to whole."""
    import importlib

    module, name = {"lora": ("peft", "LoraConfig"), "quantization": ("transformers", "BitsAndBytesConfig"),
                    "training": ("trl", "SFTConfig")}[section]
    return getattr(importlib.import_module(module), name)


@functools.cache  # type hints are resolved once per class, not per recipe (~1.4 ms for SFTConfig)
def class_fields(cls: type) -> dict[str, tuple[Any, Any]]:
    """name → (type hint, default) of the keyword arguments `cls` takes."""
    if dataclasses.is_dataclass(cls) and cls.__name__ != "BitsAndBytesConfig":  # its __init__ is hand-written
        hints = _hints(cls)
        return {f.name: (hints.get(f.name, Any), f.default) for f in dataclasses.fields(cls) if f.init}
    params = inspect.signature(cls.__init__).parameters
    return {n: (Any if p.annotation is inspect.Parameter.empty else p.annotation, p.default)
            for n, p in params.items() if n != "self" and p.kind is not p.VAR_KEYWORD}


def _hints(cls) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an upstream annotation we cannot resolve: fall back to the defaults' types
        return {}


def checked(given: dict[str, Any], fields: dict[str, tuple[Any, Any]], section: str) -> dict[str, Any]:
    """Reject unknown keys (with a suggestion) and values of the wrong type; return the values to use."""
    out = {}
    for key, value in given.items():
        dotted = f"{section}.{key}"
        if key not in fields:
            raise KeyProblem(dotted, f"unknown key '{key}' in section '{section}'{suggest(key, fields)}")
        hint, default = fields[key]
        value = _coerce(value, hint, default)
        if not _type_ok(value, hint, default):
            raise KeyProblem(dotted, f"{dotted} expects {_describe(hint, default)}, got {value!r}")
        out[key] = value
    return out


def sections_of(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """section → {key: value} with `${VAR}` expanded; unknown sections and keys another section owns rejected."""
    known = [*OWN_SECTIONS, *UPSTREAM_SECTIONS, "use_qlora", "accelerate_config"]
    for key in raw:
        if key not in known:
            raise KeyProblem(key, f"unknown section '{key}'{suggest(key, known)}")
    sections = {}
    for name in [*OWN_SECTIONS, *UPSTREAM_SECTIONS]:
        value = raw.get(name)
        if value is not None and not isinstance(value, dict):
            raise KeyProblem(name, f"section '{name}' must be a mapping of keys, got {value!r}")
        sections[name] = {k: expand_env(v, f"{name}.{k}") for k, v in (value or {}).items()}
    for key in sections["training"]:
        if key in OWNED_ELSEWHERE:
            raise KeyProblem(f"training.{key}", f"training.{key} is set by {OWNED_ELSEWHERE[key]}; move it there")
    return sections


def check_values(values: dict[str, dict[str, Any]]) -> None:
    for dotted in sorted(POSITIVE | FRACTIONS | set(CHOICES) | set(MAXIMUM)):
        section, key = dotted.split(".")
        value = values[section].get(key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if dotted in POSITIVE and number and value <= 0:
            raise KeyProblem(dotted, f"{dotted} must be > 0, got {value}")
        if dotted in MAXIMUM and number and value > MAXIMUM[dotted]:
            raise KeyProblem(dotted, f"{dotted} must be at most {MAXIMUM[dotted]:,}, got {value:,}")
        if dotted in FRACTIONS and number and not 0 <= value < 1:
            raise KeyProblem(dotted, f"{dotted} must be in [0, 1), got {value}")
        if dotted in CHOICES and value is not None and value not in CHOICES[dotted]:
            raise KeyProblem(dotted, f"{dotted} must be one of {', '.join(CHOICES[dotted])}, got {value!r}")


def expand_env(value: Any, dotted: str) -> Any:
    """Expand `${VAR}` and `${VAR:-default}` in a string value, so one recipe serves several machines."""
    def sub(match: re.Match) -> str:
        var, default = match.group(1), match.group(3)
        if var in os.environ:
            return os.environ[var]
        if default is not None:
            return default
        raise KeyProblem(dotted, f"{dotted} uses ${{{var}}} but {var} is not set; export it or write "
                         f"${{{var}:-default}}")

    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", sub, value) if isinstance(value, str) else value


def top_level(raw: dict[str, Any]) -> tuple[bool, str | None]:
    """(use_qlora, accelerate_config): QLoRA unless use_qlora is false (the seed's default)."""
    use_qlora = raw.get("use_qlora")
    if use_qlora is not None and not isinstance(use_qlora, bool):
        raise KeyProblem("use_qlora", f"use_qlora must be true or false, got {use_qlora!r}")
    if use_qlora is False and raw.get("quantization"):
        raise KeyProblem("quantization", "a quantization section needs QLoRA but use_qlora is false; remove one "
                         "of them")
    accelerate_config = raw.get("accelerate_config")
    if accelerate_config is not None and not isinstance(accelerate_config, str):
        raise KeyProblem("accelerate_config", "accelerate_config must be a name (zero3) or a file path")
    return use_qlora is not False, accelerate_config


def check_combinations(recipe) -> None:
    """Keys that are each fine but not together, and the required ones (on the built upstream objects)."""
    model, data = recipe.model, recipe.data
    if not model.name_or_path:
        raise KeyProblem("model", "model.name_or_path is required (a hub id or a local directory)")
    if not data.path:
        raise KeyProblem("data", "data.path is required (.json, .jsonl, a saved dataset dir or a hub id)")
    name = recipe.model_name  # a directory name in the output layout: it must stay inside output.dir
    if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        key = "model.name" if model.name else "model.name_or_path"
        raise KeyProblem(key, f"{key} gives the run directory name '{name}', which would leave output.dir; set "
                         "model.name to a plain name (no '/' or '..')")
    for name in recipe.check.ignore:
        if name not in CHECK_NAMES:
            raise KeyProblem("check.ignore", f"check.ignore: unknown check '{name}' (one of "
                             f"{', '.join(CHECK_NAMES)}){suggest(str(name), CHECK_NAMES)}")
    if recipe.report.smoke_prompts < 0:
        raise KeyProblem("report.smoke_prompts", f"report.smoke_prompts must be >= 0, got "
                         f"{recipe.report.smoke_prompts}")
    if data.eval_split and data.eval_path:
        raise KeyProblem("data.eval_path", "set data.eval_split or data.eval_path, not both")
    from .data import entries

    for key in [k for k in ("path", "eval_path") if getattr(data, k)]:
        try:
            entries(getattr(data, key), f"data.{key}")
        except ValueError as exc:
            raise KeyProblem(f"data.{key}", str(exc)) from None
    strategy = recipe.training.eval_strategy  # an IntervalStrategy: a str enum
    if strategy != "no" and not (data.eval_split or data.eval_path):
        raise KeyProblem("training.eval_strategy", f"training.eval_strategy={strategy.value} needs evaluation data; "
                         "set data.eval_split or data.eval_path")


def suggest(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _coerce(value: Any, hint: Any, default: Any) -> Any:
    """Undo two YAML 1.1 surprises: `1e-4` is read as a string (it wants `1.0e-4`), and `no`/`yes` as booleans
    (`eval_strategy: no`). Each is turned back where the field expects a float, or a string but no bool."""
    if isinstance(value, str) and (_accepts(hint, float) or type(default) is float):
        try:
            return float(value) if math.isfinite(float(value)) else value  # "nan", "inf": not a usable number
        except ValueError:
            return value
    if isinstance(value, bool) and (_accepts(hint, str) or type(default) is str) and not _accepts(hint, bool):
        return "yes" if value else "no"
    return value


def _accepts(hint: Any, kind: type) -> bool:
    if hint is kind:
        return True
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and kind in typing.get_args(hint)


def _type_ok(value: Any, hint: Any, default: Any) -> bool:
    if hint is Any or isinstance(hint, (str, typing.TypeVar)):
        if default is None or default is dataclasses.MISSING or default is inspect.Parameter.empty:
            return True
        hint = type(default)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h, dataclasses.MISSING) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin is not None:
        return isinstance(value, origin) if isinstance(origin, type) else True
    if hint is type(None):
        return value is None
    if hint in (bool, str, list, dict, tuple):
        return isinstance(value, hint)
    if hint in (int, float):
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, hint) or value in [m.value for m in hint]  # a list value is unhashable
    return True  # richer upstream types (torch.dtype, classes) are left to the upstream constructor


def _describe(hint: Any, default: Any) -> str:
    if hint is Any or isinstance(hint, str):
        return type(default).__name__
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
