"""The library's own choices, taken while a recipe is resolved (`config.py`) and listed by `--print-config`.

Each applies only where the recipe leaves the key unset, and is set on the resolved objects, not patched in later:
precision from the hardware; padding-free batches (one row, no padding) wherever sft_lora's data preparation
applies, with attention per document (`attention.py`) — the same examples per step as padded batches, so losses
match plain TRL step by step, and faster (README, Performance); activation checkpointing only where memory needs
it, the one choice that needs the prepared data (`decide_activation_checkpointing`, before the trainer is built).
"""

from __future__ import annotations

import dataclasses
import logging
import os

logger = logging.getLogger(__name__)


def decide_hardware(recipe) -> None:
    """bf16 where the GPU supports it, fp32 on CPU, where TRL's bf16 default is ~30 % slower (README, The recipe).
    `use_cpu` on a machine without a GPU: without it, processes started by `accelerate launch` never form a process
    group on CPU."""
    import torch

    gpu = torch.cuda.is_available()
    bf16 = bool(gpu and torch.cuda.is_bf16_supported())
    _default(recipe, "bf16", bf16, "bf16 where the GPU supports it, fp32 on CPU")
    _default(recipe, "use_cpu", not gpu, "on where no GPU is visible, so launched processes form one group")


def _default(recipe, key: str, value, rule: str) -> bool:
    """Set a training key the recipe leaves unset; record the choice and its rule. False when the recipe set it."""
    if key in recipe.given["training"]:
        return False
    recipe.given["training"][key] = value
    recipe.decisions[key] = f"{value} ({rule})"
    return True


def decide(recipe) -> None:
    """The choices that read the built SFTConfig: padding-free batches, attention, end-of-turn token, and the rule
    of activation checkpointing (taken with the data)."""
    from .prepare import unsupported_settings

    reason = unsupported_settings(recipe.training)
    rule = "where sft_lora's data preparation applies" + (f"; it does not here: {reason}" if reason else "")
    if _default(recipe, "padding_free", reason is None, rule) and reason is None:
        recipe.training = dataclasses.replace(recipe.training, padding_free=True)
    if attention := _choose_attention(recipe, recipe.training):
        kwargs = {**(recipe.training.model_init_kwargs or {}), "attn_implementation": attention}
        recipe.training = dataclasses.replace(recipe.training, model_init_kwargs=kwargs)
        recipe.decisions["attention"] = f"{attention} (padding-free rows attend per document: flex_attention on " \
            "CUDA, sdpa_documents elsewhere; model.attn_implementation names another)"
    eos = recipe.training.eos_token
    recipe.decisions["eos_token"] = (f"{eos} (training.eos_token; TRL makes it the tokenizer's EOS)" if eos else
                                     "the tokenizer's EOS (training.eos_token names another)")
    if not {"activation_checkpointing", "gradient_checkpointing"} & set(recipe.given["training"]):
        recipe.decisions["activation_checkpointing"] = (
            "once the data is prepared: on for QLoRA, else only when weights + activations of the largest "
            "micro-batch exceed half the device's memory")


def decide_activation_checkpointing(recipe, train_dataset) -> None:
    """The resolution step taken once the data is prepared, before the trainer is built: the choice of
    `_choose_activation_checkpointing`, set on `recipe.training` (a no-op when the recipe sets it)."""
    on = _choose_activation_checkpointing(recipe, recipe.training, train_dataset)
    if on is not None:
        recipe.training = dataclasses.replace(recipe.training, activation_checkpointing=on)


def _choose_attention(recipe, args) -> str | None:
    """Padding-free batches attend within each document without a dense mask over the whole row: `flex_attention`
    on CUDA, `sdpa_documents` elsewhere (`attention.padding_free_attention`), unless the recipe names an attention
    (`model.attn_implementation`: sdpa, eager, flash_attention_2 …), which is kept. Returns the attention to use,
    None for the recipe's own."""
    import torch

    from .attention import padding_free_attention

    padding_free = args.padding_free or (args.packing and args.packing_strategy in ("bfd", "bfd_split"))
    if padding_free and recipe.model.attn_implementation is None:
        device = "cpu" if args.use_cpu or not torch.cuda.is_available() else "cuda"
        return padding_free_attention(device)
    return None


# Bytes of saved activations per token, layer and (10·hidden + 4·intermediate) element for LoRA on a Llama-style
# block (inputs of every projection, norms, rotary q/k, SiLU); a deliberate over-estimate.
_ACTIVATION_ELEMENTS = (10, 4)


def _choose_activation_checkpointing(recipe, args, train_dataset) -> bool | None:
    """Checkpoint activations only where memory needs it: when the recipe leaves `activation_checkpointing`
    unset, it is on for QLoRA (memory is why one picks it) and otherwise only when the estimated weights +
    activations of the largest micro-batch exceed half the device's memory (checkpointing recomputes every
    layer's forward: +26-41 % time per token on the tiny CPU job, README, Performance). None: the recipe's own."""
    if {"activation_checkpointing", "gradient_checkpointing"} & set(recipe.given["training"]):
        return None
    need, have = _memory_estimate(recipe, args, train_dataset)
    on = recipe.use_qlora or need is None or need > 0.5 * have
    if need is not None:
        logger.info("activation checkpointing %s: ~%.1f GiB of weights + activations, device has %.1f GiB",
                    "on" if on else "off", need / 2**30, have / 2**30)
    return on


def _memory_estimate(recipe, args, train_dataset) -> tuple[float | None, float]:
    """(estimated bytes of weights + activations without checkpointing, device memory); None if unknown."""
    import numpy as np
    import torch
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(recipe.model.name_or_path, revision=recipe.model.revision,
                                            trust_remote_code=recipe.model.trust_remote_code).get_text_config()
        hidden, layers = config.hidden_size, config.num_hidden_layers
        intermediate = getattr(config, "intermediate_size", 4 * hidden)
        params = layers * (4 * hidden * hidden + 3 * hidden * intermediate) + 2 * config.vocab_size * hidden
    except Exception:  # an architecture we cannot read: keep TRL's default (on)
        return None, 0.0
    bf16 = args.bf16 or args.fp16 or recipe.model.dtype in ("bfloat16", "float16")
    weight_bytes = 0.56 if recipe.use_qlora else (2 if bf16 else 4)
    act_bytes = 2 if bf16 or recipe.use_qlora else 4
    rows = args.per_device_train_batch_size
    if args.packing or not args.padding_free or train_dataset is None or "input_ids" not in getattr(
            train_dataset, "column_names", ()):
        tokens = rows * (args.max_length or 1024)
    else:  # padding-free: the longest rows of the data, not max_length, bound a micro-batch
        import pyarrow.compute as pc

        lengths = pc.list_value_length(train_dataset.data.column("input_ids")).to_numpy()
        tokens = int(np.sort(lengths)[-rows:].sum())
    per_token = layers * (_ACTIVATION_ELEMENTS[0] * hidden + _ACTIVATION_ELEMENTS[1] * intermediate) * act_bytes
    need = params * weight_bytes + tokens * per_token
    if torch.cuda.is_available() and not args.use_cpu:
        have = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return need, float(have)
