"""The library's own choices where the recipe leaves a key unset (`--print-config` lists them): precision, padding-free
batches attending per document (`sdpa_documents`, below), activation checkpointing only where memory needs it; the
model keys behind them (attention, device map) checked at load as transformers checks them only when it loads."""

import dataclasses
import logging
import os
import re

from .recipe_yaml import KeyProblem
from .values import suggest

logger = logging.getLogger(__name__)
ATTENTION = "sdpa_documents"


def decide_hardware(recipe) -> None:
    """bf16 where the GPU supports it, fp32 on CPU, where TRL's bf16 default is ~30 % slower (README, The recipe);
    `use_cpu` without a GPU, else processes started by `accelerate launch` never form a process group on CPU."""
    import torch
    gpu = torch.cuda.is_available()
    _default(recipe, "bf16", gpu and torch.cuda.is_bf16_supported(), "bf16 where the GPU supports it, fp32 on CPU")
    _default(recipe, "use_cpu", not gpu, "on where no GPU is visible, so launched processes form one group")


def _default(recipe, key: str, value, rule: str) -> bool:
    """Set a training key the recipe leaves unset; record the choice and its rule. False when the recipe set it."""
    if key in recipe.given["training"]:
        return False
    recipe.given["training"][key] = value
    recipe.decisions[key] = f"{value} ({rule})"
    return True


def decide(recipe) -> None:
    """The choices that read the built SFTConfig: padding-free batches (the same examples per step as padded ones,
    so losses match plain TRL step by step; README, Performance), attention, end-of-turn token."""
    from .prepare import unsupported
    args, reason = recipe.training, unsupported(recipe.training)
    rule = "where sft_lora's data preparation applies" + (f"; it does not here: {reason}" if reason else "")
    if args.packing and args.packing_strategy == "wrapped":  # TRL warns against padding-free rows for it
        reason, rule = "wrapped", "not for wrapped packing, where TRL advises against padding-free rows"
    if _default(recipe, "padding_free", reason is None, rule) and reason is None:
        recipe.training = dataclasses.replace(recipe.training, padding_free=True)
    elif args.padding_free and reason and not args.packing:  # set by the recipe: trained padded, with a warning
        raise KeyProblem("training.padding_free", f"training.padding_free needs sft_lora's data preparation, which "
                         f"does not apply with {reason}; remove training.padding_free")
    if attention := _choose_attention(recipe, recipe.training):
        kwargs = {**(recipe.training.model_init_kwargs or {}), "attn_implementation": attention}
        recipe.training = dataclasses.replace(recipe.training, model_init_kwargs=kwargs)
        recipe.decisions["attention"] = f"{attention} (padding-free rows attend per document: flex_attention on " \
            "CUDA, sdpa_documents elsewhere, sdpa or eager for a model without them; model.attn_implementation names " \
            "another)"
    eos = recipe.training.eos_token
    recipe.decisions["eos_token"] = (f"{eos} (training.eos_token; TRL makes it the tokenizer's EOS)" if eos else
                                     "the tokenizer's EOS (training.eos_token names another)")
    if not {"activation_checkpointing", "gradient_checkpointing"} & set(recipe.given["training"]):
        recipe.decisions["activation_checkpointing"] = (
            "once the data is prepared: on for QLoRA, else only when weights + activations of the largest "
            "micro-batch exceed half the device's memory")


def _choose_attention(recipe, args) -> str | None:
    """Padding-free batches' attention unless `model.attn_implementation` names one (then None). CUDA: `flex_attention`
    (block-sparse document mask), fastest in README's H200 table: 28,018 tokens/s vs 15,534 for `sdpa`'s dense mask
    and 4,617 for `sdpa_documents`, which serves elsewhere (flex_attention has no backward on CPU)."""
    import torch
    padding_free = args.padding_free or (args.packing and args.packing_strategy in ("bfd", "bfd_split"))
    if recipe.model.attn_implementation == ATTENTION:  # named, as --print-config shows it: made known to transformers
        register()
    if not padding_free or recipe.model.attn_implementation is not None:
        return None
    cuda = torch.cuda.is_available() and not args.use_cpu
    if cuda and _model_supports(recipe, "_supports_flex_attn"):
        return "flex_attention"
    if not _model_supports(recipe, "_supports_sdpa"):
        return "eager"  # transformers refuses sdpa for Gemma 2's softcapping, gpt-oss's sinks …; eager separates too
    return "sdpa" if cuda else register()  # a model without flex_attention on CUDA: the table's second fastest


def _model_supports(recipe, flag: str) -> bool:
    """Whether the base model's transformers class declares `flag` (`_supports_sdpa` …), from a config already here
    (loading a recipe asks no network); True where unknown: `settle_attention` asks again before training."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    try:
        return getattr(MODEL_FOR_CAUSAL_LM_MAPPING[type(_config(recipe, True))], flag, True)
    except Exception:  # None: not downloaded yet, a tiny model not built yet; remote code: loading the model tells
        return True


def settle_attention(recipe) -> None:
    """Before a run's fingerprint (its checkpoints record the attention trained with): the choice made again with the
    base model's config on this machine (fetched where loading found none; training needs it anyway), with a notice
    where the model's class refuses the choice made then. Each process chooses again, so all choose alike."""
    from .hub import check_reachable

    chosen = (recipe.training.model_init_kwargs or {}).get("attn_implementation")
    if recipe.model.attn_implementation is not None or chosen in (None, "eager"):
        return
    if _config(recipe, True) is None:
        check_reachable(recipe)  # no network: one line in 5 s, not the hub client's wait
        if _config(recipe, False) is None:
            return
    if (again := _choose_attention(recipe, recipe.training)) in (None, chosen):  # a config read at load: the same
        return
    print(f"notice: {recipe.model.name_or_path} runs no {chosen} attention; padding-free rows attend with {again}")
    kwargs = {**recipe.training.model_init_kwargs, "attn_implementation": again}
    recipe.training = dataclasses.replace(recipe.training, model_init_kwargs=kwargs)
    recipe.decisions["attention"] = recipe.decisions["attention"].replace(chosen, again, 1)


def check_model_keys(recipe) -> None:
    """`model.attn_implementation` and `model.device_map` as transformers checks them only when the model loads, after
    the data is prepared: a name it does not know, flash-attn not installed, a device this machine lacks."""
    import torch
    from transformers import utils
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    cuda = torch.cuda.is_available() and not recipe.training.use_cpu
    if (name := recipe.model.attn_implementation) and "/" not in name:  # a hub kernel: transformers fetches it
        known = ["eager", "sdpa", ATTENTION, *ALL_ATTENTION_FUNCTIONS.valid_keys()]
        flash = re.fullmatch(r"flash_attention_(\d)", name)
        if name.removeprefix("paged|") not in known:
            raise KeyProblem("model.attn_implementation", f"model.attn_implementation: unknown attention '{name}' "
                             f"(eager, sdpa, {ATTENTION}, flash_attention_2, flex_attention …){suggest(name, known)}")
        if flash and not getattr(utils, f"is_flash_attn_{flash[1]}_available", lambda: False)():
            raise KeyProblem("model.attn_implementation", f"model.attn_implementation: {name} needs the flash-attn "
                             "package for it, which is not installed here (or no GPU); install it or use sdpa")
        if name.removeprefix("paged|") == "flex_attention" and not cuda:  # fails at the first backward
            raise KeyProblem("model.attn_implementation", "model.attn_implementation: flex_attention has no backward "
                             f"on a CPU; use {ATTENTION} (per-document attention, the CPU default) or sdpa")
    if (device := recipe.model.device_map) and device not in ("auto", "balanced", "balanced_low_0", "sequential"):
        try:  # a GPU index past this machine's count too; other accelerators (mps, xpu …) are left to torch
            usable = (place := torch.device(device)).type != "cuda" or cuda and (place.index or 0) < (
                torch.cuda.device_count())
        except RuntimeError:
            usable = False
        if not usable:
            raise KeyProblem("model.device_map", f"model.device_map: '{device}' is no device of this machine; use "
                             "auto (spread over all GPUs) or leave it unset")


def _config(recipe, local_files_only: bool):
    """The base model's config where it is on this machine (`local_files_only`), else fetched now; None where not."""
    from .model import base_config
    try:
        return base_config(recipe, local_files_only=local_files_only)
    except Exception:  # loading the model says what is wrong
        return None


def decide_activation_checkpointing(recipe, train_dataset) -> None:
    """Once the data is prepared, where the recipe leaves it unset: on for QLoRA (memory is why one picks it), else
    only where memory needs it, as each layer's forward runs twice (+26-41 % time per token, README, Performance)."""
    if {"activation_checkpointing", "gradient_checkpointing"} & set(recipe.given["training"]):
        return
    need, have = _memory_estimate(recipe, recipe.training, train_dataset)
    on = recipe.use_qlora or need is None or need > 0.5 * have
    if need is not None:
        logger.info("activation checkpointing %s: ~%.1f GiB of weights + activations, device has %.1f GiB",
                    "on" if on else "off", need / 2**30, have / 2**30)
    recipe.training = dataclasses.replace(recipe.training, activation_checkpointing=on)


def _memory_estimate(recipe, args, train_dataset) -> tuple[float | None, float]:
    """(estimated bytes of weights + activations without checkpointing, device memory); None if unknown."""
    import numpy as np
    import torch

    from .model import base_config
    try:
        config = base_config(recipe).get_text_config()
        hidden, layers = config.hidden_size, config.num_hidden_layers
        intermediate = getattr(config, "intermediate_size", 4 * hidden)
        params = layers * (4 * hidden * hidden + 3 * hidden * intermediate) + 2 * config.vocab_size * hidden
    except Exception:  # an architecture we cannot read: keep TRL's default (on)
        return None, 0.0
    bf16 = args.bf16 or args.fp16 or recipe.model.dtype in ("bfloat16", "float16")
    weight_bytes = 0.56 if recipe.use_qlora else (2 if bf16 else 4)
    act_bytes = 2 if bf16 or recipe.use_qlora else 4
    rows = args.per_device_train_batch_size
    if args.packing or not args.padding_free or "input_ids" not in getattr(train_dataset, "column_names", ()):
        tokens = rows * (args.max_length or 1024)
    else:  # padding-free: the longest rows of the data, not max_length, bound a micro-batch
        import pyarrow.compute as pc
        lengths = pc.list_value_length(train_dataset.data.column("input_ids")).to_numpy()
        tokens = int(np.sort(lengths)[-rows:].sum())
    # Saved activations per token and layer for LoRA on a Llama-style block: 10·hidden + 4·intermediate elements
    # (inputs of every projection, norms, rotary q/k, SiLU); a deliberate over-estimate.
    need = params * weight_bytes + tokens * layers * (10 * hidden + 4 * intermediate) * act_bytes
    if torch.cuda.is_available() and not args.use_cpu:
        return need, float(torch.cuda.get_device_properties().total_memory)  # the current device's
    return need, float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


# `sdpa_documents`: padding-free training (TRL's `padding_free`) flattens a batch into one row, marking where each
# document starts by resetting `position_ids`. For sdpa and eager, transformers 5.24 then attends over a dense T×T
# block-diagonal mask of the whole row (cost ∝ T²); only flash-attention kernels read the document boundaries, and
# none runs on CPU. Hand-written because no upstream CPU varlen attention exists.
def sdpa_documents_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs):
    """`sdpa`, except that a batch without padding attends causally within each document only (cost ∝ Σnᵢ²; one
    padding-free row: the documents its positions mark; several rows: each row), within the layer's sliding window."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if attention_mask is not None or query.shape[2] != key.shape[2] or not getattr(module, "is_causal", True):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    bounds, positions, cu_seq_lens = [0, query.shape[2]], kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q")
    if query.shape[0] == 1 and cu_seq_lens is not None:  # the collator's document starts, plus the row's end
        bounds = [int(x) for x in cu_seq_lens.tolist()] or bounds
    elif query.shape[0] == 1 and positions is not None and positions.dim() == 2 and positions.shape[0] == 1:
        # where positions stop counting up by one: the rule transformers uses to detect packed sequences
        starts = (torch.nonzero(torch.diff(positions[0]) != 1).flatten() + 1).tolist()
        bounds = [0, *starts, positions.shape[1]]
    # Sliding-window layers (Gemma 3, Mistral …) pass their window; transformers puts it in the mask we leave out.
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    outputs = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        if end <= start:
            continue
        mask, causal = None, True
        if window is not None and end - start > window:  # causal, within the window: transformers' overlay
            mask = torch.ones(end - start, end - start, dtype=torch.bool, device=query.device).tril().triu(1 - window)
            causal = False
        outputs.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], attn_mask=mask,
            dropout_p=dropout, scale=scaling, is_causal=causal, enable_gqa=gqa))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def sdpa_documents_mask(*args, attention_mask=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0, **kwargs):
    """No mask for a batch without padding (the attention above finds the documents); sdpa's mask otherwise."""
    from transformers.masking_utils import sdpa_mask
    if attention_mask is None and q_length == kv_length and not q_offset and not kv_offset:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, q_length=q_length, kv_length=kv_length,
                     q_offset=q_offset, kv_offset=kv_offset, **kwargs)


def register() -> str:
    """Register `sdpa_documents` with transformers (idempotent); return its name for `attn_implementation`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(ATTENTION, sdpa_documents_forward)
    AttentionMaskInterface.register(ATTENTION, sdpa_documents_mask)
    return ATTENTION
