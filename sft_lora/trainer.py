"""Put the pieces into an SFTTrainer: recipe sections become SFTConfig, LoraConfig and BitsAndBytesConfig.

Before the trainer is built, the speed defaults that need more than an SFTConfig value are applied (each one
measured in README, Performance): the dataset is prepared by `prepare.py` (same tokens as TRL's, cached),
padding-free batches attend per document (`attention.py`), the LM head scores only labelled positions on CPU
too, and activation checkpointing is turned on only where the activations would not fit.
"""

from __future__ import annotations

import logging
import os

from .config import Recipe, RecipeError

logger = logging.getLogger(__name__)


def build_trainer(recipe: Recipe, tokenizer, train_dataset, eval_dataset=None):
    """An `SFTTrainer` that loads the base model itself (4-bit when QLoRA) and wraps it with the LoRA adapter.

    The LoRA target modules are checked against the architecture first, so a wrong name fails before any
    weight is downloaded or loaded."""
    from peft.utils.error import NoMatchingPeftModuleError
    from trl import SFTTrainer

    from .targets import check_target_modules

    check_target_modules(recipe)
    args = recipe.build_sft_config()
    train_dataset, eval_dataset = _prepare_datasets(args, tokenizer, train_dataset, eval_dataset)
    _choose_attention(recipe, args)
    _choose_activation_checkpointing(recipe, args, train_dataset)
    score_labelled_positions_only()
    try:
        return SFTTrainer(
            model=recipe.model.name_or_path,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=recipe.build_lora_config(),
            quantization_config=recipe.build_bnb_config(),
        )
    except NoMatchingPeftModuleError as exc:  # when the architecture could not be checked beforehand
        raise RecipeError(f"{recipe.source}: lora.target_modules: {str(exc).splitlines()[0]}") from None


def _prepare_datasets(args, tokenizer, train_dataset, eval_dataset):
    """Tokenize with `prepare.py` where it gives TRL's exact result; otherwise leave the datasets to TRL.

    Without packing the prepared rows are already truncated, so TRL's preparation is skipped; padding-free then
    needs `max_length=None` on the SFTConfig (TRL's rule: it does not truncate padding-free rows itself). With
    packing TRL still packs (bfd truncates each document to max_length, as TRL's own path does)."""
    from accelerate import PartialState

    from .prepare import prepare, unsupported

    reason = unsupported(args, train_dataset) or (eval_dataset is not None and unsupported(args, eval_dataset))
    if reason:
        if args.padding_free and not args.packing:
            logger.warning("padding-free batches need sft_lora's data preparation, which does not apply (%s); "
                           "training on padded batches", reason)
            args.padding_free = False
        return train_dataset, eval_dataset
    if args.eos_token is not None:  # TRL sets it in __init__, after we tokenize: the chat template renders it
        tokenizer.eos_token = args.eos_token
    eval_packing = args.packing if args.eval_packing is None else args.eval_packing
    with PartialState().main_process_first():  # the first process tokenizes into the cache, the others read it
        train_dataset = prepare(train_dataset, tokenizer, None if args.packing else args.max_length,
                                num_proc=args.dataset_num_proc)
        if eval_dataset is not None:
            eval_dataset = prepare(eval_dataset, tokenizer, None if eval_packing else args.max_length,
                                   num_proc=args.dataset_num_proc)
    if not args.packing:
        args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
        if args.shuffle_dataset:  # what TRL's skipped preparation would have done
            train_dataset = train_dataset.shuffle(seed=args.seed)
        if args.padding_free:
            args.max_length = None
    return train_dataset, eval_dataset


def _choose_attention(recipe: Recipe, args) -> None:
    """Padding-free batches attend per document with `sdpa_documents` (sdpa without the dense block mask over the
    whole row) unless the recipe names an attention (`model.attn_implementation`: sdpa, eager, flash_attention_2 …),
    which is kept."""
    from .attention import register

    padding_free = args.padding_free or (args.packing and args.packing_strategy in ("bfd", "bfd_split"))
    if padding_free and recipe.model.attn_implementation is None:
        args.model_init_kwargs = {**(args.model_init_kwargs or {}), "attn_implementation": register()}


# Bytes of saved activations per token, layer and (10·hidden + 4·intermediate) element for LoRA on a Llama-style
# block (inputs of every projection, norms, rotary q/k, SiLU); a deliberate over-estimate.
_ACTIVATION_ELEMENTS = (10, 4)


def _choose_activation_checkpointing(recipe: Recipe, args, train_dataset) -> None:
    """Checkpoint activations only where memory needs it: when the recipe leaves `activation_checkpointing`
    unset, it is on for QLoRA (memory is why one picks it) and otherwise only when the estimated weights +
    activations of the largest micro-batch exceed half the device's memory (checkpointing recomputes every
    layer's forward: +26-41 % time per token on the tiny CPU job, README, Performance)."""
    if {"activation_checkpointing", "gradient_checkpointing"} & set(recipe.training):
        return
    need, have = _memory_estimate(recipe, args, train_dataset)
    on = recipe.use_qlora or need is None or need > 0.5 * have
    args.activation_checkpointing = args.gradient_checkpointing = on
    if need is not None:
        logger.info("activation checkpointing %s: ~%.1f GiB of weights + activations, device has %.1f GiB",
                    "on" if on else "off", need / 2**30, have / 2**30)


def _memory_estimate(recipe: Recipe, args, train_dataset) -> tuple[float | None, float]:
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


def score_labelled_positions_only() -> None:
    """Make TRL's fused LM head score only the positions that carry a label on CPU too, as it does on Triton
    devices. TRL scores every position (padding and prompt included) elsewhere to keep tile shapes fixed for
    compiled backends such as Neuron; eager CPU has no such constraint, and scoring all positions took ~44 % of a
    padded CPU step (MEASURED.md). Patches the device test that picks this (one name in `trl.trainer.utils`);
    a no-op if TRL no longer has it (tests/test_perf.py then fails)."""
    import trl.trainer.utils as trl_utils

    use_triton = getattr(trl_utils, "_use_triton", None)
    if use_triton is None or getattr(use_triton, "sft_lora", False):
        return

    def compact(device) -> bool:
        return device.type == "cpu" or use_triton(device)

    compact.sft_lora = True
    trl_utils._use_triton = compact
