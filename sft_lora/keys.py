"""Every recipe key checked against the class that receives it, before any upstream object is built or model touched:
unknown keys (with a did-you-mean), wrong types, out-of-range values, bad combinations, and tokens (never saved)."""

import importlib
import inspect
from typing import Any

from .recipe_yaml import KeyProblem, expand_env, leaves
from .sections import CHECK_NAMES, CHOICES, FRACTIONS, MAXIMUM, OWN_SECTIONS, OWNED_ELSEWHERE, POSITIVE, UPSTREAM
from .text import TOKEN_FORMATS, WANDB_KEY, secret_env_values
from .values import class_fields, coerce, describe, field_choices, suggest, type_ok

REMOVED = {  # keys of the tutorials that transformers 5 removed, and what says it now
    "training.warmup_ratio": "transformers 5 took it into warmup_steps, where a value below 1 is a ratio "
                             "(warmup_steps: 0.03)",
    "training.group_by_length": "transformers 5 replaced it by train_sampling_strategy: group_by_length"}


def upstream_class(section: str) -> type:
    return getattr(importlib.import_module(UPSTREAM[section][0]), UPSTREAM[section][1])


def checked(given: dict[str, Any], cls: type, section: str) -> dict[str, Any]:
    """Reject unknown keys (with a suggestion) and values of the wrong type; return the values to use."""
    fields, out = class_fields(cls), {}
    for key, value in given.items():
        dotted = f"{section}.{key}"
        if key not in fields:
            hint = f"; {REMOVED[dotted]}" if dotted in REMOVED else suggest(key, fields)
            raise KeyProblem(dotted, f"unknown key '{key}' in section '{section}'{hint}")
        hint, default = fields[key]
        out[key] = value = coerce(value, hint, default)
        choices = [str(c) for c in field_choices(cls).get(key, ())]  # the field's own (TRL: packing_strategy …)
        if value is not None and choices and value not in choices:
            raise KeyProblem(dotted, f"{dotted} must be one of {', '.join(choices)}, got {value!r}"
                             f"{suggest(str(value), choices)}")
        if not type_ok(value, hint, default):
            kind = type(default).__name__ if hint is Any else describe(hint)
            read = [type(v) for v in (value if isinstance(value, list) else [value]) if v is None or type(v) is bool]
            quote = {bool: " (YAML reads unquoted yes/no/on/off as booleans; quote it)", type(None):
                     " (YAML reads an empty value, null or a bare ~ as nothing; quote it, or write ~/ for home)"
                     }.get(read[0] if read else None, "")
            raise KeyProblem(dotted, f"{dotted} expects {kind}, got {value!r}{quote}")
    return out


def sections_of(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """section → {key: value} with `${VAR}` expanded; unknown sections and keys another section owns rejected."""
    known = [*OWN_SECTIONS, *UPSTREAM, "use_qlora", "accelerate_config"]
    if unknown := [key for key in raw if key not in known]:
        raise KeyProblem(unknown[0], f"unknown section '{unknown[0]}'{suggest(unknown[0], known)}")
    sections = {}
    for name in [*OWN_SECTIONS, *UPSTREAM]:
        value = raw.get(name)
        if value is not None and not isinstance(value, dict):
            raise KeyProblem(name, f"section '{name}' must be a mapping of keys, got {value!r}")
        sections[name] = {k: expand_env(v, f"{name}.{k}") for k, v in (value or {}).items()}
    if sections["training"].get("enable_jit_checkpoint"):  # its SIGTERM handler, put back after training, swallowed
        raise KeyProblem("training.enable_jit_checkpoint", "training.enable_jit_checkpoint: sft_lora saves a "
                         "checkpoint on SIGTERM itself (README, Reliability); remove it")  # one in merge, smoke check
    for key, value in sections["training"].items():
        if key in OWNED_ELSEWHERE and value not in (None, False):  # `push_to_hub: false` sets nothing
            if key == "hub_model_id" and not sections["training"].get("push_to_hub"):
                raise KeyProblem(f"training.{key}", "training.hub_model_id pushes nothing without push_to_hub; drop "
                                 "it (to upload at the end, set output.push_to_hub to the repo id)")
            raise KeyProblem(f"training.{key}", f"training.{key} is set by {OWNED_ELSEWHERE[key]}; move it there")
    return sections


def check_values(values: dict[str, dict[str, Any]]) -> None:
    """Ranges and choices, then secrets at any depth: a token format or a secret env variable's value (`${VAR}`)."""
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
    env = secret_env_values()
    for dotted, value in leaves(values):
        inner = dotted.split(".", 2)[2] if dotted.count(".") > 1 else ""  # a mapping's keys (chat_template_kwargs)
        if not (value := f"{inner} {value}" if isinstance(value, str) else inner):
            continue
        kinds = [f"the value of ${name}" for name, secret in env.items() if secret in value]
        kinds += [kind for kind, pattern in TOKEN_FORMATS.items() if pattern.search(value)
                  and not (dotted == "model.revision" and kind == WANDB_KEY)]  # a commit sha is 40 hex digits too
        if kinds:
            raise KeyProblem(dotted, f"{dotted} looks like a secret ({kinds[0]}); keep tokens in the environment "
                             "(HF_TOKEN, WANDB_API_KEY), never in a recipe")


def top_level(raw: dict[str, Any]) -> tuple[bool, str | None]:
    """(use_qlora, accelerate_config): QLoRA unless use_qlora is false (the seed's default)."""
    use_qlora, accelerate_config = raw.get("use_qlora"), raw.get("accelerate_config")
    if "use_qlora" in raw and not isinstance(use_qlora, bool):  # `use_qlora=` (empty) silently meant QLoRA before
        got = "an empty value" if use_qlora is None else repr(use_qlora)
        raise KeyProblem("use_qlora", f"use_qlora must be true or false, got {got}")
    if use_qlora is False and raw.get("quantization"):
        raise KeyProblem("quantization", "a quantization section needs QLoRA but use_qlora is false; remove one "
                         "of them", ["use_qlora", "quantization"])  # blamed where one was set on the command line
    if accelerate_config is not None and not isinstance(accelerate_config, str):
        raise KeyProblem("accelerate_config", "accelerate_config must be a name (zero3) or a file path")
    return use_qlora is not False, accelerate_config


def check_combinations(recipe) -> None:
    """Keys that are each fine but not together, and the required ones (on the built upstream objects)."""
    model, data = recipe.model, recipe.data
    if not model.name_or_path:
        raise KeyProblem("model.name_or_path", "model.name_or_path is required (a hub id or a local directory)")
    from .config import looks_like_hub_id
    if model.build_tiny and looks_like_hub_id(model.name_or_path):  # it would build a random model there, not fetch
        raise KeyProblem("model.name_or_path", f"model.name_or_path '{model.name_or_path}' reads as a hub id, but "
                         "model.build_tiny builds a tiny random model at a local path; set model.build_tiny: false to "
                         "load the hub model, or name a path such as ./tiny")
    if not data.path:
        raise KeyProblem("data.path", "data.path is required (a data file, a saved dataset dir or a hub id)")
    name = recipe.model_name  # a directory name in the output layout: it must stay inside output.dir
    if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        key = "model.name" if model.name else "model.name_or_path"
        raise KeyProblem(key, f"{key} gives the run directory name '{name}', which would leave output.dir; set "
                         "model.name to a plain name (no '/' or '..')")
    if unknown := [name for name in recipe.check.ignore if name not in CHECK_NAMES]:
        raise KeyProblem("check.ignore", f"check.ignore: unknown check '{unknown[0]}' (one of "
                         f"{', '.join(CHECK_NAMES)}){suggest(str(unknown[0]), CHECK_NAMES)}")
    if (smoke := recipe.report.smoke_prompts) < 0:
        raise KeyProblem("report.smoke_prompts", f"report.smoke_prompts must be >= 0, got {smoke}")
    if recipe.quantization is not None and not recipe.quantization.load_in_4bit:  # transformers loaded 4-bit anyway
        raise KeyProblem("quantization.load_in_4bit", "QLoRA trains on 4-bit weights: quantization.load_in_4bit must "
                         "be true (merge and chat read 4-bit bases; 8-bit is not supported); set use_qlora: false for "
                         "plain LoRA")
    if recipe.lora.layer_replication and recipe.output.merge:  # save_pretrained refused its shared tensors
        raise KeyProblem("lora.layer_replication", "lora.layer_replication shares weights between layers, so a merged "
                         "model cannot be saved; set output.merge: false (the adapters are saved as usual)")
    _check_data(recipe)
    from .decisions import check_model_keys
    check_model_keys(recipe)
    _check_optimization(recipe.training)
    _check_training(recipe.training, bool(data.eval_split or data.eval_path))


def _check_training(args, evaluation_data: bool) -> None:
    """Training keys upstream takes but runs otherwise than asked (or checks only after loading the model)."""
    from transformers.integrations import get_reporting_integration_callbacks
    try:  # what Trainer checks when it is built, after the data is prepared
        get_reporting_integration_callbacks(args.report_to)
    except ValueError as exc:
        raise KeyProblem("training.report_to", f"training.report_to: {exc}") from None
    if args.max_steps == 0:  # Trainer takes one step at learning rate 0 and saves it as the trained model
        raise KeyProblem("training.max_steps", "training.max_steps must be > 0, got 0 (leave it unset, or -1, to "
                         "train training.num_train_epochs)")
    if args.save_strategy == "best" and args.metric_for_best_model is None:  # Trainer's check, after loading
        raise KeyProblem("training.save_strategy", "training.save_strategy: best needs training.metric_for_best_model "
                         "(eval_loss, eval_<source>_loss); set it")
    if args.save_strategy == "best" and args.eval_strategy == "no":  # saves on an improved evaluation: never
        raise KeyProblem("training.save_strategy", "training.save_strategy: best saves only when an evaluation "
                         "improves the metric, and this run evaluates never (no evaluation data or eval_strategy "
                         "no), so no checkpoint would be saved; set data.eval_split or data.eval_path, or use steps")
    import torch
    if args.fp16 and (args.use_cpu or not torch.cuda.is_available()):  # accelerate trains it as fp32, silently
        raise KeyProblem("training.fp16", "training.fp16 does nothing on a CPU (accelerate trains in fp32 there); "
                         "remove it, or set training.bf16: true for CPU mixed precision")
    strategy = args.eval_strategy  # an IntervalStrategy: a str enum
    if strategy != "no" and not evaluation_data:
        raise KeyProblem("training.eval_strategy", f"training.eval_strategy={strategy.value} needs evaluation data; "
                         "set data.eval_split or data.eval_path")


def _check_optimization(args) -> None:
    """The optimizer and schedule as Trainer builds them at the first step, after the data is prepared and the model
    loaded (a scheduler argument it does not take, an optimizer package not installed …), built now on a stand-in."""
    import torch
    from transformers import Trainer, get_scheduler
    from transformers.utils import is_liger_kernel_available

    from .text import first_line
    if (args.dataset_kwargs or {}).get("skip_prepare_dataset"):  # TRL then trains on untokenized text: a crash
        raise KeyProblem("training.dataset_kwargs", "training.dataset_kwargs: skip_prepare_dataset is sft_lora's to "
                         "set (it prepares the data itself, once); remove it")
    if args.use_liger_kernel and not is_liger_kernel_available():
        raise KeyProblem("training.use_liger_kernel", "training.use_liger_kernel needs the liger-kernel package, "
                         "which is not installed here; install it or remove the key")
    try:
        Trainer.get_optimizer_cls_and_kwargs(args)
    except (ImportError, ValueError, TypeError, KeyError) as exc:
        raise KeyProblem("training.optim", f"training.optim / optim_args: {first_line(exc)}",
                         ["training.optim", "training.optim_args"]) from None
    stand_in = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    try:
        get_scheduler(args.lr_scheduler_type, stand_in, num_warmup_steps=args.get_warmup_steps(100),
                      num_training_steps=100, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    except (ValueError, TypeError, KeyError) as exc:
        raise KeyProblem("training.lr_scheduler_kwargs", f"training.lr_scheduler_type / lr_scheduler_kwargs: "
                         f"{first_line(exc)}", ["training.lr_scheduler_type", "training.lr_scheduler_kwargs"]) from None


def _check_data(recipe) -> None:
    """The data section's combinations: template variables sft_lora sets itself, the data entries, evaluation."""
    from transformers import PreTrainedTokenizerBase
    data, template = recipe.data, inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters
    taken = {*template, "messages"} - {"self", "kwargs"}
    if reserved := sorted(taken & set(data.chat_template_kwargs)):  # sft_lora passes these itself
        raise KeyProblem("data.chat_template_kwargs", f"data.chat_template_kwargs: '{reserved[0]}' is set by sft_lora "
                         "or apply_chat_template itself, not a template variable; remove it")
    if data.mask_history and recipe.training.completion_only_loss is False:  # loss on every token: nothing masked
        raise KeyProblem("data.mask_history", "data.mask_history puts the loss on the last answer only, but "
                         "training.completion_only_loss: false puts it on every token; remove one of them")
    if data.eval_split and data.eval_path:
        raise KeyProblem("data.eval_path", "set data.eval_split or data.eval_path, not both")
    names = ("input_field", "output_field", "source_field")  # one field as two: the answer its own question …
    for a, b in [(a, b) for n, a in enumerate(names) for b in names[n + 1:] if getattr(data, a) == getattr(data, b)]:
        key = f"data.{a if getattr(type(data), a) != getattr(data, a) else b}"  # the one set, not defaulted
        raise KeyProblem(key, f"data.{a} and data.{b} are both '{getattr(data, a)}'; name two different fields",
                         [f"data.{a}", f"data.{b}"])
    from .data import entries
    from .records import identity
    read = {}
    for key in [k for k in ("path", "eval_path") if getattr(data, k)]:
        try:
            read[key] = [identity(e.path, e.split or data.split) for e in entries(getattr(data, key), f"data.{key}")]
        except ValueError as exc:
            raise KeyProblem(f"data.{key}", str(exc)) from None
    if same := [what for what in read.get("eval_path", []) if what in read["path"]]:
        split = f" (split '{same[0][1]}')" if same[0][1] else ""
        raise KeyProblem("data.eval_path", f"data.eval_path: {same[0][0]}{split} is training data too, and an eval "
                         "loss on it says nothing of held-out records; evaluate on another file, another split "
                         "({path: …, split: test}) or set data.eval_split instead")
