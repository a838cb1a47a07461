"""sft_lora: LoRA/QLoRA supervised fine-tuning recipes on top of TRL's SFTTrainer."""

import logging

# bitsandbytes warns at import, on CPUs with AVX512-BF16, that an optional kernel from the hub is missing; it
# falls back to its own kernel, so the line is noise (and the hub is often unreachable where we train).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
