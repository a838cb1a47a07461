"""Put the pieces into an SFTTrainer: recipe sections become SFTConfig, LoraConfig and BitsAndBytesConfig."""

from __future__ import annotations

import re
from pathlib import Path

from .config import Recipe, RecipeError, first_line

OVERALL = "eval"  # key of the whole eval set among the eval datasets; per-source keys are "eval/<source>"


def source_metric(source: str) -> str:
    """The metric prefix of one source's eval: `eval_<source>`, logged as `eval/<source>_loss` by TensorBoard/wandb."""
    return "eval_" + re.sub(r"\s+", "_", source.strip())


def build_trainer(recipe: Recipe, tokenizer, train_dataset, eval_dataset=None):
    """An `SFTTrainer` that loads the base model itself (4-bit when QLoRA) and wraps it with the LoRA adapter.

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

    eval_sets = eval_dataset
    if eval_dataset is not None and recipe.report.eval_per_source:
        sources = sorted(set(eval_dataset["source"]))
        if len(sources) > 1:  # one source: its loss is the overall loss
            eval_sets = {OVERALL: eval_dataset}
            column = eval_dataset["source"]
            eval_sets.update({f"{OVERALL}/{s}": eval_dataset.select([i for i, v in enumerate(column) if v == s])
                              for s in sources})
    check_target_modules(recipe)  # a wrong target name fails before any weight is downloaded or loaded
    try:
        trainer = SourceEvalSFTTrainer(
            model=recipe.model.name_or_path,
            args=recipe.build_sft_config(),
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
