"""Put the pieces into an SFTTrainer: recipe sections become SFTConfig, LoraConfig and BitsAndBytesConfig.

Before the trainer is built, the speed defaults that need more than an SFTConfig value are applied (each one
measured in README, Performance): the dataset is prepared by `prepare.py` (same tokens as TRL's, cached),
padding-free batches attend per document (`attention.py`), the LM head scores only labelled positions on CPU
too, and activation checkpointing is turned on only where the activations would not fit.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from .config import Recipe, RecipeError, first_line

logger = logging.getLogger(__name__)

OVERALL = "eval"  # key of the whole eval set among the eval datasets; per-source keys are "eval/<source>"


def source_metric(source: str) -> str:
    """The metric prefix of one source's eval: `eval_<source>`, logged as `eval/<source>_loss` by TensorBoard/wandb."""
    return "eval_" + re.sub(r"\s+", "_", source.strip())


def build_trainer(recipe: Recipe, tokenizer, data, eval_dataset=None):
    """An `SFTTrainer` that loads the base model itself (4-bit when QLoRA) and wraps it with the LoRA adapter.

    `data`: the run's datasets as `prepare.prepare_datasets` prepared them (with the run's SFTConfig), or a
    chat-record train set (and `eval_dataset`), prepared here.

    With `report.eval_per_source` and more than one source, every evaluation also reports each source's loss.
    Its checkpoints carry a completion record and fingerprint (`checkpoints.CheckpointRecord`), and SIGTERM/SIGINT
    stop it at a step boundary after a checkpoint (`signals.GracefulStop`)."""
    from peft.utils.error import NoMatchingPeftModuleError
    from trl import SFTTrainer

    from .checkpoints import CheckpointRecord
    from .signals import GracefulStop
    from .targets import check_target_modules

    class SourceEvalSFTTrainer(SFTTrainer):
        """Evaluates the whole eval set (`eval_loss`, as usual) then each source (`eval_<source>_loss`).

        Trainer's dict of eval datasets would rename the overall loss to `eval_<name>_loss` (breaking
        `metric_for_best_model`'s default); evaluating each prepared set by its key keeps `eval_loss`."""

        source_prefix: str | None = None

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            if eval_dataset is not None or not isinstance(self.eval_dataset, dict):
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            metrics = super().evaluate(OVERALL, ignore_keys, metric_key_prefix)
            for key in self.eval_dataset:
                if key != OVERALL and len(self.eval_dataset[key]):
                    self.source_prefix = source_metric(key.removeprefix(OVERALL + "/"))
                    try:
                        metrics.update(super().evaluate(key, ignore_keys, self.source_prefix))
                    finally:
                        self.source_prefix = None
            return metrics

        def log(self, logs, start_time=None):
            # TRL logs its eval metrics (entropy, token accuracy) as eval_* whatever the prefix; name them per source
            # so they do not overwrite the overall eval_* curves.
            if self.source_prefix is not None:
                for key, values in self._metrics["eval"].items():
                    logs[f"{self.source_prefix}_{key}"] = sum(values) / len(values)
                self._metrics["eval"].clear()
            super().log(logs, start_time)

    from .prepare import Prepared, prepare_datasets

    check_target_modules(recipe)  # a wrong target name fails before any weight is downloaded or loaded
    if not isinstance(data, Prepared):
        data = prepare_datasets(recipe.build_sft_config(), tokenizer, data, eval_dataset)
    args, train_dataset, eval_dataset = data.args, data.train, data.eval
    eval_sets = eval_dataset
    if eval_dataset is not None and recipe.report.eval_per_source:
        sources = sorted(set(eval_dataset["source"]))
        if len(sources) > 1:  # one source: its loss is the overall loss
            eval_sets = {OVERALL: eval_dataset}
            column = eval_dataset["source"]
            eval_sets.update({f"{OVERALL}/{s}": eval_dataset.select([i for i, v in enumerate(column) if v == s])
                              for s in sources})
    _choose_attention(recipe, args)
    _choose_activation_checkpointing(recipe, args, train_dataset)
    score_labelled_positions_only()
    try:
        trainer = SourceEvalSFTTrainer(
            model=recipe.model.name_or_path,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_sets,
            processing_class=tokenizer,
            peft_config=recipe.build_lora_config(),
            quantization_config=recipe.build_bnb_config(),
            callbacks=[GracefulStop(), CheckpointRecord(recipe)],  # in this order: a stop request triggers the save
        )
    except NoMatchingPeftModuleError as exc:  # when the architecture could not be checked beforehand
        raise RecipeError(f"{recipe.source}: lora.target_modules: {str(exc).splitlines()[0]}") from None
    except OSError as exc:  # from_pretrained: missing files, no safetensors weights, no network for a hub id
        first = first_line(exc)
        raise RecipeError(f"{recipe.model.name_or_path}: cannot load the model ({first}); check "
                          "model.name_or_path, the network or HF_TOKEN") from None
    _pin_tensorboard_dir(trainer, recipe.checkpoint_dir / "runs")
    return trainer


def _pin_tensorboard_dir(trainer, directory: Path) -> None:
    """TensorBoard writes to `{checkpoint_dir}/runs`; without this, an eval before training (the writer is not yet
    set up) goes to `./runs` in the working directory and the rest to a dated folder under the checkpoints."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(directory)


def _choose_attention(recipe: Recipe, args) -> None:
    """Padding-free batches attend within each document without a dense mask over the whole row: `flex_attention`
    on CUDA, `sdpa_documents` elsewhere (`attention.padding_free_attention`), unless the recipe names an attention
    (`model.attn_implementation`: sdpa, eager, flash_attention_2 …), which is kept."""
    import torch

    from .attention import padding_free_attention

    padding_free = args.padding_free or (args.packing and args.packing_strategy in ("bfd", "bfd_split"))
    if padding_free and recipe.model.attn_implementation is None:
        device = "cpu" if args.use_cpu or not torch.cuda.is_available() else "cuda"
        args.model_init_kwargs = {**(args.model_init_kwargs or {}),
                                  "attn_implementation": padding_free_attention(device)}


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
    compiled backends such as Neuron; eager CPU has no such constraint, and scoring all positions costs +26 % time
    per token on the benchmark job (README, Performance). Patches the device test that picks this (one name in
    `trl.trainer.utils`); a no-op if TRL no longer has it (tests/test_perf.py then fails)."""
    import trl.trainer.utils as trl_utils

    use_triton = getattr(trl_utils, "_use_triton", None)
    if use_triton is None or getattr(use_triton, "sft_lora", False):
        return

    def compact(device) -> bool:
        return device.type == "cpu" or use_triton(device)

    compact.sft_lora = True
    trl_utils._use_triton = compact
