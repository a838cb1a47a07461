"""sft_lora: LoRA/QLoRA supervised fine-tuning recipes on top of TRL's SFTTrainer."""

import logging
import warnings

# bitsandbytes warns at import, on CPUs with AVX512-BF16, that an optional kernel from the hub is missing; it
# falls back to its own kernel, so the line is noise (and the hub is often unreachable where we train).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# PEFT (PeftModel) and TRL (generation helpers) read `model.is_gradient_checkpointing`, which transformers 5
# deprecated; the call is theirs and runs whatever sft_lora does, so only this one message is silenced.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
