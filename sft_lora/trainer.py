"""Put the pieces into an SFTTrainer: recipe sections become SFTConfig, LoraConfig and BitsAndBytesConfig."""

from __future__ import annotations

from .config import Recipe, RecipeError


def build_trainer(recipe: Recipe, tokenizer, train_dataset, eval_dataset=None):
    """An `SFTTrainer` that loads the base model itself (4-bit when QLoRA) and wraps it with the LoRA adapter.

    Its checkpoints carry a completion record and fingerprint (`checkpoints.CheckpointRecord`), and SIGTERM/SIGINT
    stop it at a step boundary after a checkpoint (`signals.GracefulStop`)."""
    from trl import SFTTrainer

    from .checkpoints import CheckpointRecord
    from .signals import GracefulStop

    try:
        return SFTTrainer(
            model=recipe.model.name_or_path,
            args=recipe.build_sft_config(),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=recipe.build_lora_config(),
            quantization_config=recipe.build_bnb_config(),
            callbacks=[GracefulStop(), CheckpointRecord(recipe)],  # in this order: a stop request triggers the save
        )
    except OSError as exc:  # from_pretrained: missing files, no safetensors weights, no network for a hub id
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RecipeError(f"{recipe.model.name_or_path}: cannot load the model ({first}); check "
                          "model.name_or_path, the network or HF_TOKEN") from None
