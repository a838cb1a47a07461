"""The tokenizer, with the chat template that turns a record into turns, and the device named to DeepSpeed.

The model itself is loaded by TRL's SFTTrainer from `SFTConfig.model_init_kwargs` and the quantization config,
so loading follows upstream (device maps under DeepSpeed, dtype, revision) without code of our own.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import DataArgs, ModelArgs, Recipe, RecipeError, first_line, looks_like_hub_id

# Used when a tokenizer has none (base models). Zephyr-style role markers, each turn ends with the tokenizer's
# EOS, so the end of the answer is a token the model already stops on. Turns are joined by "\n" (not ended by
# one), so the answer's labels are exactly the answer and its EOS, with no trailing newline to learn.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '\\n<|assistant|>\\n' }}{% endif %}"
)


def load_tokenizer(model: ModelArgs, data: DataArgs):
    """The base model's tokenizer, with `data.chat_template` or the default template when it has none."""
    from transformers import AutoTokenizer

    if not model.build_tiny and not looks_like_hub_id(model.name_or_path) and not Path(model.name_or_path).is_dir():
        raise RecipeError(f"{model.name_or_path}: model directory not found; check model.name_or_path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path, revision=model.revision,
                                                  trust_remote_code=model.trust_remote_code)
    except OSError as exc:
        raise RecipeError(f"{model.name_or_path}: cannot load the tokenizer ({str(exc).splitlines()[0]}); "
                          "check model.name_or_path, the network or HF_TOKEN") from None
    if data.chat_template:
        template = Path(data.chat_template)
        if not template.is_file():
            raise RecipeError(f"{template}: chat template file not found; check data.chat_template")
        tokenizer.chat_template = template.read_text(encoding="utf-8")
    elif not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.eos_token is None:
        raise RecipeError(f"{model.name_or_path}: the tokenizer has no EOS token; set training.eos_token")
    if tokenizer.pad_token is None:
        # What TRL would do silently, made explicit: the collator labels padding -100 whatever its id, so the
        # answer's own EOS keeps its label.
        tokenizer.pad_token = tokenizer.eos_token
        print(f"notice: {model.name_or_path}: the tokenizer has no pad token; padding with EOS "
              f"({tokenizer.eos_token}), which carries no loss")
    return tokenizer


def stop_token_ids(tokenizer, generation_config=None, eos_token: str | None = None) -> list[int]:
    """The tokens that end an answer: the EOS (`eos_token`, as training.eos_token names it, else the tokenizer's)
    first, then the generation config's EOS ids (end-of-turn tokens such as <|eot_id|> or <|im_end|>), no repeats."""
    ids = [tokenizer.convert_tokens_to_ids(eos_token) if eos_token else tokenizer.eos_token_id]
    extra = getattr(generation_config, "eos_token_id", None)
    ids += [extra] if isinstance(extra, int) else list(extra or [])
    return list(dict.fromkeys(i for i in ids if i is not None))


def name_the_cpu_to_deepspeed() -> None:
    """accelerate imports DeepSpeed whenever it is installed (to unwrap models, saving them too); on a machine with
    no accelerator DeepSpeed then logs "Setting accelerator to CPU" as a warning, unless told the device."""
    import torch

    if not torch.accelerator.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's own variable


def check_model_weights(recipe: Recipe) -> None:
    """A local base model must have safetensors weights: a .bin/.pt checkpoint is a pickle, which can run code
    when loaded. (Hub models are held to the same rule by `use_safetensors=True` when loading.)"""
    path = Path(recipe.model.name_or_path)
    if not path.is_dir() or any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise RecipeError(f"{path}: weights only as a pickle ({pickles[0]}), which can run code when loaded; "
                          "convert them to safetensors (save_pretrained writes safetensors) and point "
                          "model.name_or_path there")


def check_qlora_backend(recipe: Recipe) -> None:
    """QLoRA needs bitsandbytes importable on this machine; say so in one line instead of a deep traceback."""
    if not recipe.use_qlora:
        return
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a backend library that fails to load (OSError, RuntimeError)
        raise RecipeError(f"{recipe.source}: use_qlora is true but bitsandbytes cannot run here ({first_line(exc)}); "
                          "install a bitsandbytes build for this machine or set use_qlora: false") from None
