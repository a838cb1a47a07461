"""LoRA target modules, checked against the model's architecture before any weight is loaded.

PEFT raises only when *no* target matches and silently skips the entries of a list that match nothing (a recipe
written for EXAONE's remote code, `c_fc_0`, trains attention only under the native Llama modules). Here every
entry must match, and the error names `lora.target_modules` and the linear layers the model really has.
"""

from __future__ import annotations

import re

from .config import Recipe, RecipeError


def model_modules(recipe: Recipe) -> dict[str, str] | None:
    """Dotted name → class name of every module of the recipe's model, built on the meta device (no weights).

    None when the architecture cannot be built here (offline hub id, exotic model): loading then reports it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model = recipe.model
    try:
        config = AutoConfig.from_pretrained(model.name_or_path, revision=model.revision,
                                            trust_remote_code=model.trust_remote_code)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=model.trust_remote_code)
    except Exception:  # any failure here is reported, better worded, by the real load that follows
        return None
    return {name: type(module).__name__ for name, module in skeleton.named_modules() if name}


def check_target_modules(recipe: Recipe, modules: dict[str, str] | None = None) -> None:
    """Raise RecipeError unless every `lora.target_modules` entry (or the regex) selects a module of the model."""
    targets = recipe.given["lora"]["target_modules"]  # in the recipe's order (LoraConfig keeps a set)
    if targets is None or targets == "all-linear":
        return
    modules = model_modules(recipe) if modules is None else modules
    if not modules:
        return
    if isinstance(targets, str):  # PEFT: a string is a regex matched against the full module name
        if not any(re.fullmatch(targets, name) for name in modules):
            raise _error(recipe, f"the regex {targets!r} matches no module", modules)
        return
    # PEFT: a list entry matches a module whose name is the entry or ends with "." + entry
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in modules)]
    if missing:
        verb = "matches" if len(missing) == 1 else "match"
        raise _error(recipe, f"{', '.join(map(repr, missing))} {verb} no module", modules)


def _error(recipe: Recipe, what: str, modules: dict[str, str]) -> RecipeError:
    linear = sorted({name.rsplit(".", 1)[-1] for name, kind in modules.items() if kind.endswith("Linear")})
    return RecipeError(f"{recipe.source}: lora.target_modules: {what} of {recipe.model.name_or_path}; its linear "
                       f"layers are {', '.join(linear)} (or use all-linear)")
