"""Put the pieces into an SFTTrainer: recipe sections become SFTConfig, LoraConfig and BitsAndBytesConfig."""

from __future__ import annotations

from .config import Recipe, RecipeError


def build_trainer(recipe: Recipe, tokenizer, train_dataset, eval_dataset=None):
    """An `SFTTrainer` that loads the base model itself (4-bit when QLoRA) and wraps it with the LoRA adapter.

    The LoRA target modules are checked against the architecture first, so a wrong name fails before any
    weight is downloaded or loaded."""
    from peft.utils.error import NoMatchingPeftModuleError
    from trl import SFTTrainer

    from .targets import check_target_modules

    check_target_modules(recipe)
    try:
        return SFTTrainer(
            model=recipe.model.name_or_path,
            args=recipe.build_sft_config(),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=recipe.build_lora_config(),
            quantization_config=recipe.build_bnb_config(),
        )
    except NoMatchingPeftModuleError as exc:  # when the architecture could not be checked beforehand
        raise RecipeError(f"{recipe.source}: lora.target_modules: {str(exc).splitlines()[0]}") from None
