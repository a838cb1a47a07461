"""Put the pieces into an SFTTrainer: recipe sections become SFTConfig, LoraConfig and BitsAndBytesConfig."""

from __future__ import annotations

from .config import Recipe


def build_trainer(recipe: Recipe, tokenizer, train_dataset, eval_dataset=None):
    """An `SFTTrainer` that loads the base model itself (4-bit when QLoRA) and wraps it with the LoRA adapter."""
    from trl import SFTTrainer

    return SFTTrainer(
        model=recipe.model.name_or_path,
        args=recipe.build_sft_config(),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=recipe.build_lora_config(),
        quantization_config=recipe.build_bnb_config(),
    )
