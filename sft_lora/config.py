"""Recipe → validated config: read YAML, apply overrides, reject mistakes, build the upstream config objects.

A recipe has the project's own sections (`model`, `data`, `output`, `wandb`, described by the dataclasses below)
and three sections handed whole to upstream classes: `lora` → `peft.LoraConfig`, `quantization` →
`transformers.BitsAndBytesConfig`, `training` → `trl.SFTConfig`. Every key is checked against its class before
any model or data is touched, so a typo fails in the recipe's own words, with a did-you-mean.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import inspect
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

RECIPE_FILE = "sft_lora_recipe.yaml"  # the resolved recipe, saved beside the adapters; merge reads it


class RecipeError(ValueError):
    """A mistake the user can fix in the recipe or on the command line; printed as one line."""


def first_line(exc: BaseException) -> str:
    """The first line of an upstream exception's message (its type when empty), for a one-line RecipeError."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass
class ModelArgs:
    name_or_path: str = ""
    """Hub id or local directory of the base model."""
    name: str | None = None
    """Name used in the output layout and the wandb run name; defaults to the last part of `name_or_path`."""
    dtype: str = "auto"
    """Weights dtype: auto, bfloat16, float16 or float32."""
    attn_implementation: str | None = None
    """sdpa, eager, flash_attention_2 …; None: sdpa, attending per document on padding-free batches."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint. Only for models you trust."""
    device_map: str | None = None
    """Single process only: `auto` spreads a model too big for one GPU over all GPUs (naive pipeline)."""
    build_tiny: bool = False
    """Build a tiny random Llama + tokenizer at `name_or_path` if it is missing (default job and tests)."""


@dataclass
class DataArgs:
    path: str = ""
    """A .json array, a .jsonl file, a `save_to_disk` directory, or a hub dataset id."""
    input_field: str = "input"
    """Record field holding the user's question."""
    output_field: str = "output"
    """Record field holding the answer the model learns to give."""
    source_field: str = "source"
    """Optional record field naming where the record came from."""
    system_prompt: str | None = None
    """Optional system turn put before every question."""
    fold_system_prompt: bool = False
    """Put system_prompt atop the user turn (blank line between): for chat templates without a usable system role."""
    split: str = "train"
    """Split to read from a hub dataset or a DatasetDict directory."""
    eval_split: float = 0.0
    """Fraction of records held out for evaluation (0 = none)."""
    eval_path: str | None = None
    """A second data file used for evaluation instead of `eval_split`."""
    chat_template: str | None = None
    """A .jinja file replacing the tokenizer's chat template."""
    on_bad_record: str = "fail"
    """A record that is not valid (bad JSON/UTF-8, missing or empty field): fail the run, or skip it and count it."""


@dataclass
class OutputArgs:
    dir: str = "final_model"
    """Root of `{dir}/{model_name}/{num_epochs}/{lora|qlora}_adapters` and `…_merged`."""
    checkpoint_dir: str = "checkpoints"
    """Root of the training checkpoints: `{checkpoint_dir}/{model_name}/{num_epochs}/{lora|qlora}`."""
    merge: bool = True
    """Merge the adapters into the base model when training ends."""
    merge_into: str = "dequantized"
    """QLoRA only: merge into the `dequantized` 4-bit base (what was trained against) or the `original` weights."""


@dataclass
class WandbArgs:
    project: str = "RAPA"
    """wandb project (the seed's)."""
    run_name: str | None = None
    """Defaults to `{model_name}_{lora|qlora}`."""
    mode: str = "auto"
    """auto (online with an API key, else offline), online, offline or disabled."""


CHECK_NAMES = ("no_loss", "eos", "truncated", "empty_source")  # the pre-flight failures `check.ignore` can name


@dataclass
class CheckArgs:
    enabled: bool = True
    """Print the pre-flight data report at the start of every run, and stop the run when a check fails."""
    ignore: list[str] = field(default_factory=list)
    """Failed checks to report as warnings instead of stopping the run: no_loss, eos, truncated, empty_source."""
    max_truncated_share: float = 0.05
    """Fail (truncated) when more than this share of training rows is cut at training.max_length."""
    sources: list[str] = field(default_factory=list)
    """Sources the training data must hold; one with no trainable record fails the run (empty_source)."""


@dataclass
class ReportArgs:
    eval_per_source: bool = True
    """Also evaluate each `source` on its own (eval_<source>_loss); one more pass over the eval set per eval."""
    smoke_prompts: int = 3
    """Held-out inputs the trained model answers at the end, to check that generation stops by itself (0 = skip)."""
    smoke_max_new_tokens: int = 128
    """Length limit of the smoke check: an answer still going at this many tokens did not stop."""


OWN_SECTIONS: dict[str, type] = {"model": ModelArgs, "data": DataArgs, "output": OutputArgs, "wandb": WandbArgs,
                                 "check": CheckArgs, "report": ReportArgs}
UPSTREAM_SECTIONS = ("lora", "quantization", "training")
TOP_LEVEL = {"use_qlora": bool, "accelerate_config": str}
# `training` keys that other sections own, and where to set them instead.
OWNED_ELSEWHERE = {
    "output_dir": "output.checkpoint_dir", "run_name": "wandb.run_name", "model_init_kwargs": "the model section",
    "trust_remote_code": "model.trust_remote_code", "chat_template_path": "data.chat_template",
    "resume_from_checkpoint": "the --resume flag", "hub_token": "the HF_TOKEN environment variable",
}
# Values that must be > 0 (upstream classes accept some of these silently and fail hours later).
POSITIVE = {
    "training.learning_rate", "training.num_train_epochs", "training.per_device_train_batch_size",
    "training.per_device_eval_batch_size", "training.gradient_accumulation_steps", "training.max_length",
    "training.save_steps", "training.logging_steps", "training.eval_steps", "lora.r", "lora.lora_alpha",
    "report.smoke_max_new_tokens",
}
# Values with a fixed set of choices; upstream accepts some of these and fails only while loading the model.
CHOICES = {
    "model.dtype": ("auto", "bfloat16", "float16", "float32"),
    "data.on_bad_record": ("fail", "skip"),
    "output.merge_into": ("dequantized", "original"),
    "wandb.mode": ("auto", "online", "offline", "disabled"),
    "quantization.bnb_4bit_quant_type": ("nf4", "fp4"),
    "quantization.bnb_4bit_compute_dtype": ("bfloat16", "float16", "float32"),
    "quantization.bnb_4bit_quant_storage": ("uint8", "bfloat16", "float16", "float32"),
}
FRACTIONS = {"data.eval_split", "lora.lora_dropout", "training.warmup_ratio", "check.max_truncated_share"}  # [0, 1)
# The seed's command-line flags (README.ko) and the recipe key each one sets.
SEED_FLAGS = {
    "base_model": "model.name_or_path", "dataset_path": "data.path", "output_dir": "output.dir",
    "checkpoint_path": "output.checkpoint_dir", "use_qlora": "use_qlora", "num_epochs": "training.num_train_epochs",
    "lora_r": "lora.r", "lora_alpha": "lora.lora_alpha", "learning_rate": "training.learning_rate",
}
QLORA_DEFAULTS = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                  "bnb_4bit_compute_dtype": "bfloat16"}
LORA_DEFAULTS = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear",
                 "task_type": "CAUSAL_LM"}
# Speed defaults, each measured side by side with plain TRL (`make bench`, README, Performance). Padding-free
# batches (one row, no padding, attention per document: sft_lora/attention.py) with the same examples per step as
# padded ones, so losses match plain TRL step by step; the tiny CPU job runs 3.1x plain TRL's tokens/s with
# them (5,054 vs 1,646 real tokens/s, medians of 3). Activation checkpointing is decided in trainer.py (only
# where memory needs it).
SPEED_DEFAULTS = {"padding_free": True}


@dataclass
class Recipe:
    """A loaded, validated recipe. `lora`, `quantization` and `training` hold the keyword arguments of the
    upstream classes, defaults filled in; `build_*` turn them into the objects."""

    source: str
    use_qlora: bool
    accelerate_config: str | None
    model: ModelArgs
    data: DataArgs
    output: OutputArgs
    wandb: WandbArgs
    check: CheckArgs
    report: ReportArgs
    lora: dict[str, Any]
    quantization: dict[str, Any] | None
    training: dict[str, Any]
    raw: dict[str, Any] = field(repr=False)

    @property
    def method(self) -> str:
        return "qlora" if self.use_qlora else "lora"

    @property
    def model_name(self) -> str:
        return self.model.name or Path(self.model.name_or_path.rstrip("/")).name

    @property
    def run_dir(self) -> Path:
        epochs = self.training["num_train_epochs"]
        epochs = int(epochs) if float(epochs).is_integer() else epochs
        return Path(self.output.dir) / self.model_name / str(epochs)

    @property
    def adapters_dir(self) -> Path:
        return self.run_dir / f"{self.method}_adapters"

    @property
    def merged_dir(self) -> Path:
        return self.run_dir / f"{self.method}_merged"

    def to_yaml(self) -> str:
        """The fully resolved recipe, as a recipe file that reproduces this run."""
        out: dict[str, Any] = {"use_qlora": self.use_qlora, "accelerate_config": self.accelerate_config}
        for name in OWN_SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        out["lora"] = self.lora
        if self.quantization is not None:
            out["quantization"] = self.quantization
        out["training"] = self.training
        return yaml.safe_dump(out, sort_keys=False, allow_unicode=True)

    def build_lora_config(self):  # -> peft.LoraConfig
        from peft import LoraConfig

        return _construct(LoraConfig, self.lora, "lora", self.source)

    def build_bnb_config(self):  # -> transformers.BitsAndBytesConfig | None
        from transformers import BitsAndBytesConfig

        return None if self.quantization is None else _construct(
            BitsAndBytesConfig, self.quantization, "quantization", self.source)

    def build_sft_config(self):  # -> trl.SFTConfig
        from trl import SFTConfig

        kwargs = dict(self.training, output_dir=str(self.checkpoint_dir), run_name=self.run_name,
                      trust_remote_code=self.model.trust_remote_code, model_init_kwargs=self.model_init_kwargs)
        return _construct(SFTConfig, kwargs, "training", self.source)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.output.checkpoint_dir) / self.model_name / self.run_dir.name / self.method

    @property
    def run_name(self) -> str:
        return self.wandb.run_name or f"{self.model_name}_{self.method}"

    @property
    def model_init_kwargs(self) -> dict[str, Any]:
        kwargs = {"dtype": self.model.dtype, "revision": self.model.revision, "device_map": self.model.device_map,
                  "attn_implementation": self.model.attn_implementation,
                  "use_safetensors": True}  # never unpickle model weights (guards.check_model_weights)
        return {k: v for k, v in kwargs.items() if v is not None}


def _construct(cls, kwargs: dict[str, Any], section: str, source: str):
    """Build an upstream object; its own validation errors are reported under the recipe's section."""
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        message = first_line(exc)
        raise RecipeError(f"{source}: {section}: {message}") from None


def load_recipe(path: str | Path, overrides: list[str] = (), flags: dict[str, Any] | None = None) -> Recipe:
    """Read a recipe file, apply `section.key=value` overrides then seed flags (command line wins), validate.

    Raises RecipeError with the file, line, section and key for every mistake a user can make."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found; pass a path such as recipes/tiny.yaml")
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections (model, data, lora, training …)")
    lines = _key_lines(text)
    where = {key: f"{path}:{line}" for key, line in lines.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"command line: '{item}' is not an override; write section.key=value")
        _set(raw, key, yaml.safe_load(value) if value else None)
        where[key] = "command line"
    for flag, value in (flags or {}).items():
        if value is not None:
            _set(raw, SEED_FLAGS[flag], yaml.safe_load(value) if isinstance(value, str) else value)
            where[SEED_FLAGS[flag]] = f"command line --{flag}"
    return _validate(raw, str(path), where)


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    section, _, key = dotted.partition(".")
    if not key:
        raw[section] = value
    else:
        if not isinstance(raw.get(section) or {}, dict):
            raise RecipeError(f"command line: {section} is not a section, cannot set {dotted}")
        raw.setdefault(section, {})
        if raw[section] is None:
            raw[section] = {}
        raw[section][key] = value


def _key_lines(text: str) -> dict[str, int]:
    """Line number (1-based) of every `section` and `section.key` in the YAML text."""
    lines: dict[str, int] = {}
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if isinstance(root, yaml.MappingNode):
        for knode, vnode in root.value:
            lines[knode.value] = knode.start_mark.line + 1
            if isinstance(vnode, yaml.MappingNode):
                for k2, _ in vnode.value:
                    lines[f"{knode.value}.{k2.value}"] = k2.start_mark.line + 1
    return lines


def _upstream_fields(section: str) -> dict[str, tuple[Any, Any]]:
    """name → (type hint, default) of the upstream class behind a section."""
    if section == "lora":
        from peft import LoraConfig as cls
    elif section == "quantization":
        from transformers import BitsAndBytesConfig as cls
    else:
        from trl import SFTConfig as cls
    if section != "quantization":  # BitsAndBytesConfig is a dataclass in name only: its __init__ is hand-written
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


def _validate(raw: dict[str, Any], source: str, where: dict[str, str]) -> Recipe:
    def loc(key: str) -> str:
        return where.get(key) or where.get(key.split(".")[0]) or source

    known = set(OWN_SECTIONS) | set(UPSTREAM_SECTIONS) | set(TOP_LEVEL)
    for key in raw:
        if key not in known:
            raise RecipeError(f"{loc(key)}: unknown section '{key}'{_suggest(key, known)}")
    sections: dict[str, dict[str, Any]] = {}
    for name in [*OWN_SECTIONS, *UPSTREAM_SECTIONS]:
        value = raw.get(name)
        if value is not None and not isinstance(value, dict):
            raise RecipeError(f"{loc(name)}: section '{name}' must be a mapping of keys, got {value!r}")
        sections[name] = dict(_expand_env(value or {}, name, loc))

    # The project's own sections: every key is a dataclass field of the right type.
    own = {}
    for name, cls in OWN_SECTIONS.items():
        hints = _hints(cls)
        fields = {f.name: (hints[f.name], f.default) for f in dataclasses.fields(cls)}
        own[name] = cls(**_checked(sections[name], fields, name, loc))

    use_qlora = raw.get("use_qlora")
    if use_qlora is not None and not isinstance(use_qlora, bool):
        raise RecipeError(f"{loc('use_qlora')}: use_qlora must be true or false, got {use_qlora!r}")
    has_quant = bool(raw.get("quantization"))
    if use_qlora is False and has_quant:
        raise RecipeError(f"{loc('quantization')}: a quantization section needs QLoRA but use_qlora is false; "
                          "remove one of them")
    use_qlora = True if use_qlora is None else use_qlora  # the seed's default
    accelerate_config = raw.get("accelerate_config")
    if accelerate_config is not None and not isinstance(accelerate_config, str):
        raise RecipeError(f"{loc('accelerate_config')}: accelerate_config must be a name (zero3) or a file path")

    training = sections["training"]
    for key in training:
        if key in OWNED_ELSEWHERE:
            raise RecipeError(f"{loc('training.' + key)}: training.{key} is set by {OWNED_ELSEWHERE[key]}; "
                              "move it there")
    upstream = {name: _checked(sections[name], _upstream_fields(name), name, loc) for name in UPSTREAM_SECTIONS}

    lora = {**LORA_DEFAULTS, **upstream["lora"]}
    quantization = {**QLORA_DEFAULTS, **upstream["quantization"]} if use_qlora else None
    training = {"num_train_epochs": 3, "learning_rate": 1e-4 if use_qlora else 5e-6, **_hardware_defaults(),
                **SPEED_DEFAULTS, "report_to": ["wandb"], **upstream["training"]}
    if own["data"].eval_split or own["data"].eval_path:
        training.setdefault("eval_strategy", "epoch")
        training.setdefault("eval_on_start", True)  # the eval loss before any step, to compare the last one with
    values = {"lora": lora, "training": training, "quantization": quantization or {},
              **{name: dataclasses.asdict(args) for name, args in own.items()}}
    for dotted in sorted(POSITIVE | FRACTIONS | set(CHOICES)):
        section, key = dotted.split(".")
        value = values[section].get(key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if dotted in POSITIVE and number and value <= 0:
            raise RecipeError(f"{loc(dotted)}: {dotted} must be > 0, got {value}")
        if dotted in FRACTIONS and number and not 0 <= value < 1:
            raise RecipeError(f"{loc(dotted)}: {dotted} must be in [0, 1), got {value}")
        if dotted in CHOICES and value is not None and value not in CHOICES[dotted]:
            raise RecipeError(f"{loc(dotted)}: {dotted} must be one of {', '.join(CHOICES[dotted])}, got {value!r}")

    from .secret_check import find_secret

    if found := find_secret({**values, "use_qlora": use_qlora}):  # the recipe is saved beside the adapters
        raise RecipeError(f"{loc(found[0])}: {found[0]} looks like a secret ({found[1]}); keep tokens in the "
                          "environment (HF_TOKEN, WANDB_API_KEY), never in a recipe")
    recipe = Recipe(source=source, use_qlora=use_qlora, accelerate_config=accelerate_config, lora=lora,
                    quantization=quantization, training=training, raw=raw, **own)
    _cross_check(recipe, loc)
    for build in (recipe.build_lora_config, recipe.build_bnb_config, recipe.build_sft_config):
        build()  # the upstream classes' own checks, reported under the recipe's section
    return recipe


def _cross_check(recipe: Recipe, loc) -> None:
    model, data = recipe.model, recipe.data
    if not model.name_or_path:
        raise RecipeError(f"{loc('model')}: model.name_or_path is required (a hub id or a local directory)")
    if not data.path:
        raise RecipeError(f"{loc('data')}: data.path is required (.json, .jsonl, a saved dataset dir or a hub id)")
    for name in recipe.check.ignore:
        if name not in CHECK_NAMES:
            raise RecipeError(f"{loc('check.ignore')}: check.ignore: unknown check '{name}' (one of "
                              f"{', '.join(CHECK_NAMES)}){_suggest(str(name), CHECK_NAMES)}")
    if recipe.report.smoke_prompts < 0:
        raise RecipeError(f"{loc('report.smoke_prompts')}: report.smoke_prompts must be >= 0, got "
                          f"{recipe.report.smoke_prompts}")
    if data.eval_split and data.eval_path:
        raise RecipeError(f"{loc('data.eval_path')}: set data.eval_split or data.eval_path, not both")
    strategy = str(recipe.training.get("eval_strategy", "no"))
    if strategy not in ("no", "IntervalStrategy.NO") and not (data.eval_split or data.eval_path):
        raise RecipeError(f"{loc('training.eval_strategy')}: training.eval_strategy={strategy} needs evaluation "
                          "data; set data.eval_split or data.eval_path")


def _checked(given: dict[str, Any], fields: dict[str, tuple[Any, Any]], section: str, loc) -> dict[str, Any]:
    """Reject unknown keys (with a suggestion) and values of the wrong type; return the values to use."""
    out = {}
    for key, value in given.items():
        dotted = f"{section}.{key}"
        if key not in fields:
            raise RecipeError(f"{loc(dotted)}: unknown key '{key}' in section '{section}'{_suggest(key, fields)}")
        hint, default = fields[key]
        value = _coerce(value, hint, default)
        if not _type_ok(value, hint, default):
            raise RecipeError(f"{loc(dotted)}: {dotted} expects {_describe(hint, default)}, got {value!r}")
        out[key] = value
    return out


def _suggest(key: str, choices) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _expand_env(section: dict[str, Any], name: str, loc) -> dict[str, Any]:
    """Expand `${VAR}` and `${VAR:-default}` in string values, so one recipe serves several machines."""
    def expand(key: str, value: str) -> str:
        def sub(match: re.Match) -> str:
            var, default = match.group(1), match.group(3)
            if var in os.environ:
                return os.environ[var]
            if default is not None:
                return default
            raise RecipeError(f"{loc(f'{name}.{key}')}: {name}.{key} uses ${{{var}}} but {var} is not set; "
                              f"export it or write ${{{var}:-default}}")
        return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", sub, value)

    return {k: expand(k, v) if isinstance(v, str) else v for k, v in section.items()}


def _coerce(value: Any, hint: Any, default: Any) -> Any:
    """Undo two YAML 1.1 surprises: `1e-4` is read as a string (it wants `1.0e-4`), and `no`/`yes` as booleans
    (`eval_strategy: no`). Each is turned back where the field expects a float, or a string but no bool."""
    if isinstance(value, str) and (_accepts(hint, float) or type(default) is float):
        try:
            return float(value)
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
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, hint) or value in {m.value for m in hint}
    if hint in (str, list, dict, tuple):
        return isinstance(value, hint)
    return True  # richer upstream types (torch.dtype, classes) are left to the upstream constructor


def _describe(hint: Any, default: Any) -> str:
    if hint is Any or isinstance(hint, str):
        return type(default).__name__
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _hardware_defaults() -> dict[str, bool]:
    """bf16 where the GPU supports it, fp32 on CPU, where TRL's bf16 default is ~30 % slower (README, The recipe).
    `use_cpu` on a machine without a GPU: without it, processes started by `accelerate launch` never form a
    process group on CPU and each trains alone."""
    import torch

    gpu = torch.cuda.is_available()
    return {"bf16": bool(gpu and torch.cuda.is_bf16_supported()), "use_cpu": not gpu}


def recipe_keys() -> str:
    """The recipe's keys, for --help: own sections in full, upstream sections by class."""
    lines = ["top level:", "  use_qlora  QLoRA (4-bit base) when true (default), plain LoRA when false",
             "  accelerate_config  launch under this accelerate config (zero3, fsdp, … or a path)"]
    for name, cls in OWN_SECTIONS.items():
        lines.append(f"{name}:")
        docs = _attribute_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            lines.append(f"  {f.name} = {default!r}  {docs.get(f.name, '')}")
    lines += ["lora:          any peft.LoraConfig field (defaults: r 16, lora_alpha 32, all-linear)",
              "quantization:  any transformers.BitsAndBytesConfig field (QLoRA defaults: nf4, double quant, bf16)",
              "training:      any trl.SFTConfig field (defaults: 3 epochs, lr 1e-4 QLoRA / 5e-6 LoRA)"]
    return "\n".join(lines)


def _attribute_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings written under each field above (litgpt style)."""
    source = inspect.getsource(cls)
    return dict(re.findall(r"^\s+(\w+):[^\n]*\n\s+\"\"\"(.*?)\"\"\"", source, flags=re.M))
