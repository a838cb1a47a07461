"""Recipe → one resolved configuration, built once: the upstream objects (LoraConfig, BitsAndBytesConfig, SFTConfig)
and own sections, every key checked first (`keys.py`: a typo fails at file:line), plus `decisions.py`'s choices."""

import dataclasses
import enum
import re
import sys
import typing
from pathlib import Path
from typing import Any

import yaml

from . import decisions, keys, recipe_yaml
from .recipe_yaml import RecipeError, place
from .sections import OWN_SECTIONS, UPSTREAM, CheckArgs, DataArgs, ModelArgs, OutputArgs, ReportArgs, WandbArgs
from .text import first_line
from .values import class_fields

RECIPE_FILE = "sft_lora_recipe.yaml"  # the resolved recipe, saved beside the adapters; merge and chat read it
SEED_FLAGS = {  # the seed's command-line flags (README.ko) and the recipe key each one sets
    "base_model": "model.name_or_path", "dataset_path": "data.path", "output_dir": "output.dir",
    "checkpoint_path": "output.checkpoint_dir", "use_qlora": "use_qlora", "num_epochs": "training.num_train_epochs",
    "lora_r": "lora.r", "lora_alpha": "lora.lora_alpha", "learning_rate": "training.learning_rate"}


@dataclasses.dataclass
class Recipe:
    """A loaded recipe, resolved once. `training`, `lora`, `quantization`: the upstream objects (None without QLoRA);
    `given`: the keys they were built from (the saved recipe); `decisions`: the library's choices and rules."""

    source: str
    use_qlora: bool
    accelerate_config: str | None
    model: ModelArgs
    data: DataArgs
    output: OutputArgs
    wandb: WandbArgs
    check: CheckArgs
    report: ReportArgs
    given: dict[str, dict[str, Any] | None]
    raw: dict[str, Any] = dataclasses.field(repr=False)
    training: Any = None
    lora: Any = None
    quantization: Any = None
    decisions: dict[str, str] = dataclasses.field(default_factory=dict)
    where: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)  # dotted key → file:line / command line

    def at(self, dotted: str) -> str:
        """Where a key was set (`recipe.yaml:14`, `command line`), for an error found after loading."""
        return place(self.where, dotted) or self.source

    @property
    def method(self) -> str:
        return "qlora" if self.use_qlora else "lora"

    @property
    def model_name(self) -> str:
        return self.model.name or Path(self.model.name_or_path.rstrip("/")).name

    @property
    def run_dir(self) -> Path:
        epochs = self.given["training"]["num_train_epochs"]
        epochs = int(epochs) if float(epochs).is_integer() else epochs
        return Path(self.output.dir) / self.model_name / str(epochs)

    @property
    def adapters_dir(self) -> Path:
        return self.run_dir / f"{self.method}_adapters"

    @property
    def merged_dir(self) -> Path:
        return self.run_dir / f"{self.method}_merged"

    @property
    def final_dir(self) -> Path:
        """What a run ends with: the merged model with output.merge, else the adapters."""
        return self.merged_dir if self.output.merge else self.adapters_dir

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.output.checkpoint_dir) / self.model_name / self.run_dir.name / self.method

    def to_yaml(self) -> str:
        """The resolved recipe as a recipe file that reproduces this run: the library's decisions atop, as comments
        with their rules, and not among the keys, so a machine that reads the file decides again (a CPU run's
        `use_cpu: true` saved as a key trained on the CPU of a GPU machine)."""
        out: dict[str, Any] = {"use_qlora": self.use_qlora, "accelerate_config": self.accelerate_config}
        out.update({name: dataclasses.asdict(getattr(self, name)) for name in OWN_SECTIONS})
        out.update({name: {k: v for k, v in values.items() if k not in self.decisions or f"{name}.{k}" in self.where}
                    for name, values in self.given.items() if values is not None})  # the recipe's own: kept
        decided = "".join(f"# decided: {key}: {why}\n" for key, why in self.decisions.items())
        return decided + yaml.safe_dump(out, sort_keys=False, allow_unicode=True)


def load_recipe(path: str | Path, overrides: list[str] = (), flags: dict[str, str | None] | None = None) -> Recipe:
    """Read a recipe, apply `section.key=value` overrides then seed flags (the command line wins), resolve; a mistake
    is a RecipeError naming file:line and key."""
    path = Path(path)
    raw, where = recipe_yaml.read_recipe(path)
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections (model, data, lora, training …)")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not all(key.split(".")) or "[" in key:  # `training.=3`, `data.path[0].weight=3`
            raise RecipeError(f"command line: '{item}' is not an override; write section.key=value (a list whole: "
                              "data.path=[a.jsonl, {path: b.jsonl, weight: 2}])")
        _set(raw, key, recipe_yaml.value(value, item) if value else None)
        where |= {k: "command line" for k in [*where, key] if k == key or k.startswith(f"{key}.")}  # and below
        where.setdefault(key.partition(".")[0], "command line")  # a section the file lacks
    for flag, value in [(f, v) for f, v in (flags or {}).items() if v is not None]:  # those given
        if where.get(SEED_FLAGS[flag]) == "command line":  # said: the override is not used
            print(f"notice: --{flag} wins over the override of {SEED_FLAGS[flag]}", file=sys.stderr)
        _set(raw, SEED_FLAGS[flag], recipe_yaml.value(value, f"--{flag}={value}"))
        where[SEED_FLAGS[flag]] = f"command line --{flag}"
    try:
        recipe = _resolve(raw, str(path))
    except keys.KeyProblem as problem:
        raise RecipeError(f"{_blame(where, problem) or path}: {problem}") from None
    recipe.where = where
    return recipe


def _blame(where: dict[str, str], problem: keys.KeyProblem) -> str | None:
    """Where `problem` lies: where its key was set; of several keys it may mean (an upstream message, a clash), the
    place they share, else the command line where one was set there (the override made the clash)."""
    places = {place(where, key) for key in problem.candidates}
    if len(places) == 1 and None not in places:
        return places.pop()
    return min((p for p in places if p and p.startswith("command line")), default=None) or place(where, problem.dotted)


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    section, _, key = dotted.partition(".")
    if not key:
        raw[section] = value
        return
    if raw.get(section) is None:
        raw[section] = {}
    if not isinstance(raw[section], dict):
        raise RecipeError(f"command line: {section} is not a section, cannot set {dotted}")
    raw[section][key] = value


def _resolve(raw: dict[str, Any], source: str) -> Recipe:
    """Check every key and value, then build the upstream objects and take the library's decisions."""
    sections = keys.sections_of(raw)
    own = {name: cls(**keys.checked(sections[name], cls, name)) for name, cls in OWN_SECTIONS.items()}
    use_qlora, accelerate_config = keys.top_level(raw)
    upstream = {name: keys.checked(sections[name], keys.upstream_class(name), name) for name in UPSTREAM}
    training = {"num_train_epochs": 3, "learning_rate": 1e-4 if use_qlora else 5e-6, "report_to": ["wandb"],
                **upstream["training"]}
    if own["data"].eval_split or own["data"].eval_path:
        training.setdefault("eval_strategy", "steps" if "eval_steps" in training else "epoch")  # eval_steps said it
        training.setdefault("eval_on_start", True)  # the eval loss before any step, to compare the last one with
    given = {"lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear",
                      "task_type": "CAUSAL_LM", **upstream["lora"]},
             "quantization": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                              "bnb_4bit_compute_dtype": "bfloat16", **upstream["quantization"]} if use_qlora else None,
             "training": training}
    keys.check_values({**{k: v or {} for k, v in given.items()}, **{n: dataclasses.asdict(a) for n, a in own.items()}})
    recipe = Recipe(source=source, use_qlora=use_qlora, accelerate_config=accelerate_config, given=given, raw=raw,
                    **own)
    decisions.decide_hardware(recipe)  # bf16 / use_cpu, unless the recipe sets them
    recipe.lora = _construct("lora", given["lora"], raw)
    recipe.quantization = _construct("quantization", given["quantization"], raw) if use_qlora else None
    recipe.training = _construct("training", sft_kwargs(recipe), raw)
    keys.check_combinations(recipe)
    if accelerate_config:  # on loading, not only when launching: --check and --print-config say it too
        from .launch import read_config, resolve_config
        try:
            path = resolve_config(accelerate_config)
        except RecipeError as exc:
            raise keys.KeyProblem("accelerate_config", str(exc)) from None
        read_config(path)  # a file that is no valid config: its own file:line
    decisions.decide(recipe)  # padding-free batches, attention, end-of-turn token, activation checkpointing
    return recipe


def sft_kwargs(recipe: Recipe) -> dict[str, Any]:
    """The SFTConfig's keyword arguments: the training section plus what other sections own."""
    model = recipe.model
    init = {"dtype": model.dtype, "revision": model.revision, "device_map": model.device_map,
            "attn_implementation": model.attn_implementation,
            "use_safetensors": True}  # never unpickle model weights (model.check_model_weights)
    training = dict(recipe.given["training"])
    if not {"activation_checkpointing", "gradient_checkpointing"} & set(training):
        # TRL's default, under the current name: TRL sets the old, deprecated one (a FutureWarning on every run)
        training["activation_checkpointing"] = True  # decisions.py settles it once the data is prepared
    return dict(training, output_dir=str(recipe.checkpoint_dir), trust_remote_code=model.trust_remote_code,
                run_name=recipe.wandb.run_name or f"{recipe.model_name}_{recipe.method}",
                model_init_kwargs={k: v for k, v in init.items() if v is not None})


def _construct(section: str, kwargs: dict[str, Any], raw: dict[str, Any]):
    """Build an upstream object; its own validation error blames the given key(s) it names, else the section."""
    try:
        return (kind := keys.upstream_class(section))(**kwargs)
    except (ValueError, TypeError) as exc:
        message, given, fields = first_line(exc, whole=True), raw.get(section) or {}, class_fields(kind)
        enums = {k: [t.__name__ for t in typing.get_args(fields[k][0]) if isinstance(t, enum.EnumType)]
                 for k in given if k in fields}  # SchedulerType, OptimizerNames …
        named = ([k for k in given if re.search(rf"\b{re.escape(k)}\b", message)]  # by name, its type's, its value
                 or [k for k, names in enums.items() if any(name in message for name in names)]
                 or [k for k, v in given.items() if isinstance(v, str) and v and
                     re.search(rf"(?<![\w.-]){re.escape(v)}(?![\w-])", message)])
        dotted = f"{section}.{named[0]}" if len(named) == 1 else section
        raise keys.KeyProblem(dotted, f"{dotted}: {message}", [f"{section}.{k}" for k in named]) from None


def looks_like_hub_id(name: str) -> bool:
    """Whether a name that is not here reads as a hub id (`org/name`, `name`), not a path (`./x`, `~/x`, `x.jsonl`)."""
    return (not name.startswith((".", "/", "~")) and name.count("/") <= 1 and not Path(name).exists()
            and Path(name).suffix.lower() not in (".json", ".jsonl", ".gz", ".yaml", ".yml", ".txt", ".csv", ".parquet",
                                                     ".arrow"))


def local_model_missing(name: str) -> bool:
    """Whether a model name reads as a local directory (not a hub id) that is not there."""
    return not looks_like_hub_id(name) and not Path(name).is_dir()


def read_saved_recipe(directory: str | Path) -> dict[str, Any]:
    """The resolved recipe training saved beside its outputs (`RECIPE_FILE`), as a dict; {} when there is none,
    RecipeError for one that is no longer a recipe (edited by hand)."""
    path = Path(directory) / RECIPE_FILE
    saved = (recipe_yaml.parse(path.read_text(encoding="utf-8"), str(path))[0] or {}) if path.is_file() else {}
    if not isinstance(saved, dict) or any(not isinstance(saved.get(name) or {}, dict) for name in
                                          (*OWN_SECTIONS, "quantization")):  # edited by hand: one line, no traceback
        raise RecipeError(f"{path}: not a recipe sft_lora saved (its sections must be mappings); restore it")
    return saved


def saved_section(saved: dict[str, Any], name: str):
    """A saved recipe's own section as its dataclass (keys another sft_lora version wrote, this one lacks: ignored)."""
    names = {f.name for f in dataclasses.fields(OWN_SECTIONS[name])}
    return OWN_SECTIONS[name](**{k: v for k, v in (saved.get(name) or {}).items() if k in names})
