"""The recipe's schema: its own sections (`model`, `data`, `output`, `wandb`, `check`, `report`), one dataclass each,
every knob documented once as an attribute docstring that `--help` prints, and the rules on upstream sections' keys."""

import functools
import inspect
import re
from dataclasses import asdict, dataclass, field


@dataclass
class ModelArgs:
    name_or_path: str = ""
    """Hub id or local directory of the base model."""
    name: str | None = None
    """Name used in the output layout and the wandb run name; defaults to the last part of `name_or_path`."""
    dtype: str = "auto"
    """Weights dtype: auto, bfloat16, float16 or float32."""
    attn_implementation: str | None = None
    """sdpa, eager, flash_attention_2 …; None: per document on padding-free batches (flex_attention on CUDA,
    sdpa_documents on CPU), else sdpa."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint. Only for models you trust."""
    device_map: str | None = None
    """Single process only: `auto` spreads a model too big for one GPU over all GPUs (naive pipeline)."""
    build_tiny: bool = False
    """Build a tiny random Llama + tokenizer at `name_or_path` if it is missing (default job and tests)."""


@dataclass
class DataArgs:
    path: str | list = ""
    """A .json/.jsonl (.gz too)/.parquet/.csv/.arrow file, save_to_disk dir or hub dataset id, or a list of them or of
    {path, source, weight, split}."""
    input_field: str = "input"
    """Record field holding the user's question."""
    output_field: str = "output"
    """Record field holding the answer the model learns to give."""
    source_field: str = "source"
    """Optional record field naming where the record came from."""
    system_prompt: str | None = None
    """Optional system turn put before every question."""
    fold_system_prompt: bool = False
    """Put system_prompt atop the user turn (blank line between): for chat templates without a usable system role."""
    mask_history: bool = False
    """Multi-turn conversations: loss on the last assistant turn only (earlier ones are context), not on every one."""
    split: str = "train"
    """Split to read from a hub dataset or a DatasetDict directory."""
    eval_split: float = 0.0
    """Fraction of records held out for evaluation (0 = none)."""
    eval_path: str | list | None = None
    """Data used for evaluation instead of `eval_split`: a path or a list, as `path`."""
    chat_template: str | None = None
    """A .jinja file replacing the tokenizer's chat template."""
    chat_template_kwargs: dict = field(default_factory=dict)
    """Chat template variables in training, chat and the smoke check (enable_thinking: false unless set here)."""
    on_bad_record: str = "fail"
    """A record that is not valid (bad JSON/UTF-8, missing or empty field): fail the run, or skip it and count it."""


@dataclass
class OutputArgs:
    dir: str = "final_model"
    """Root of `{dir}/{model_name}/{num_epochs}/{lora|qlora}_adapters` and `…_merged`."""
    checkpoint_dir: str = "checkpoints"
    """Root of the training checkpoints: `{checkpoint_dir}/{model_name}/{num_epochs}/{lora|qlora}`."""
    merge: bool = True
    """Merge the adapters into the base model when training ends."""
    merge_into: str = "dequantized"
    """QLoRA only: merge into the `dequantized` 4-bit base (what was trained against) or the `original` weights."""
    push_to_hub: str | None = None
    """Hub repo id (`org/name`) for the merged model (else the adapters) and its card at the end; token: HF_TOKEN."""


@dataclass
class WandbArgs:
    project: str = "RAPA"
    """wandb project (the seed's)."""
    run_name: str | None = None
    """Defaults to `{model_name}_{lora|qlora}`."""
    mode: str = "auto"
    """auto (online with an API key, else offline), online, offline or disabled."""


# the failures check.ignore can name
CHECK_NAMES = ("no_loss", "eos", "truncated", "empty_source", "template", "special_text")


@dataclass
class CheckArgs:
    enabled: bool = True
    """Print the pre-flight data report at the start of every run, and stop the run when a check fails."""
    ignore: list[str] = field(default_factory=list)
    """Failed checks reported as warnings, not stopping the run: no_loss, eos, truncated, empty_source, template,
    special_text."""
    max_truncated_share: float = 0.05
    """Fail (truncated) when more than this share of training rows is cut at training.max_length."""
    sources: list[str] = field(default_factory=list)
    """Sources the training data must hold; one with no trainable record fails the run (empty_source)."""


@dataclass
class ReportArgs:
    eval_per_source: bool = True
    """Also evaluate each `source` on its own (eval_<source>_loss); one more pass over the eval set per eval."""
    smoke_prompts: int = 3
    """Held-out inputs the trained model answers at the end, to check that generation stops by itself (0 = skip)."""
    smoke_max_new_tokens: int = 128
    """Length limit of the smoke check: an answer still going at this many tokens did not stop."""


OWN_SECTIONS: dict[str, type] = {"model": ModelArgs, "data": DataArgs, "output": OutputArgs, "wandb": WandbArgs,
                                 "check": CheckArgs, "report": ReportArgs}
# Values that must be > 0 (upstream classes accept some of these silently and fail hours later).
POSITIVE = {"training.learning_rate", "training.num_train_epochs", "training.per_device_train_batch_size",
            "training.per_device_eval_batch_size", "training.gradient_accumulation_steps", "training.max_length",
            "training.save_steps", "training.logging_steps", "training.eval_steps", "lora.r", "lora.lora_alpha",
            "report.smoke_max_new_tokens"}
CHOICES = {  # values with a fixed set of choices; upstream accepts some of these and fails only while loading the model
    "model.dtype": ("auto", "bfloat16", "float16", "float32"), "output.merge_into": ("dequantized", "original"),
    "wandb.mode": ("auto", "online", "offline", "disabled"), "quantization.bnb_4bit_quant_type": ("nf4", "fp4"),
    "data.on_bad_record": ("fail", "skip"), "quantization.bnb_4bit_compute_dtype": ("bfloat16", "float16", "float32"),
    "quantization.bnb_4bit_quant_storage": ("uint8", "bfloat16", "float16", "float32")}
# Upper bounds: past them upstream allocates what no machine has (TRL's packing builds a max_length-sized tree; a
# LoRA rank past any model's hidden size only adds zeros).
MAXIMUM = {"training.max_length": 2**20, "lora.r": 2**16}
FRACTIONS = {"data.eval_split", "lora.lora_dropout", "check.max_truncated_share"}  # [0, 1)
UPSTREAM = {"lora": ("peft", "LoraConfig"), "quantization": ("transformers", "BitsAndBytesConfig"),
            "training": ("trl", "SFTConfig")}  # sections handed whole to an upstream class
OWNED_ELSEWHERE = {  # `training` keys that other sections own, and where to set them instead
    "output_dir": "output.checkpoint_dir", "run_name": "wandb.run_name", "model_init_kwargs": "the model section",
    "trust_remote_code": "model.trust_remote_code", "chat_template_path": "data.chat_template",
    "resume_from_checkpoint": "the --resume flag", "hub_token": "the HF_TOKEN environment variable",
    "push_to_hub": "output.push_to_hub (a repo id)", "hub_model_id": "output.push_to_hub"}


@functools.cache  # the --help epilog, built on every command line: reading the classes' sources takes ~40 ms
def recipe_keys() -> str:
    """The recipe's keys, for --help: own sections in full, upstream sections by class."""
    lines = ["top level:", "  use_qlora  QLoRA (4-bit base) when true (default), plain LoRA when false",
             "  accelerate_config  launch under this accelerate config (zero3, fsdp, … or a path)"]
    for name, cls in OWN_SECTIONS.items():
        lines.append(f"{name}:")  # the attribute docstrings written under each field above (litgpt style):
        found = re.findall(r"^\s+(\w+):[^\n]*\n\s+\"\"\"(.*?)\"\"\"", inspect.getsource(cls), flags=re.M | re.S)
        docs = {key: " ".join(doc.split()) for key, doc in found}  # a docstring of several lines on one
        lines += [f"  {key} = {default!r}  {docs.get(key, '')}" for key, default in asdict(cls()).items()]
    lines += ["lora:          any peft.LoraConfig field (defaults: r 16, lora_alpha 32, all-linear)",
              "quantization:  any transformers.BitsAndBytesConfig field (QLoRA defaults: nf4, double quant, bf16)",
              "training:      any trl.SFTConfig field (defaults: 3 epochs, lr 1e-4 QLoRA / 5e-6 LoRA)"]
    return "\n".join(lines)
