"""Imported once by the forkserver in `tests/children.py`: the heavy modules every child needs (imports only)."""

import datasets  # noqa: F401
import peft  # noqa: F401
import torch  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer  # noqa: F401
from trl import SFTConfig, SFTTrainer  # noqa: F401

import sft_lora.callbacks  # noqa: F401
import sft_lora.data  # noqa: F401
import sft_lora.run  # noqa: F401
