"""The model card (README.md) of every directory a run leaves: the adapters, the merged model, each checkpoint.

Metadata through huggingface_hub's `ModelCardData` (base model, library, license where the base model's card names
one); body: base model, method, data sources with their record counts and eval loss before/after, how to load it,
and the resolved recipe (secrets redacted).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from .config import looks_like_hub_id, read_saved_recipe


def model_card(adapter_dir: str | Path, base_model: str, merged_into: str | None = None) -> str:
    """README.md of a merged model (`merged_into` says into which weights) or, without it, of the adapters: from
    what training left in the adapters directory (the recipe and, if present, summary.json)."""
    from .report import SUMMARY_FILE

    adapter_dir = Path(adapter_dir)
    summary = {}
    if (adapter_dir / SUMMARY_FILE).is_file():
        summary = json.loads((adapter_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    return card_text(base_model, read_saved_recipe(adapter_dir), summary, merged_into)


def checkpoint_card(recipe, counts: dict[str, dict[str, int]], log_history: list[dict], step: int) -> str:
    """README.md of `checkpoint-<step>`: the run's card with the eval losses logged so far."""
    from .report import eval_history

    sources = sorted(counts.get("eval") or {})
    evals = eval_history(log_history, sources)
    summary = {"global_step": step, "records_by_source": counts,
               "eval_loss_before": _point(evals.get("overall"), 0), "eval_loss_after": _point(evals.get("overall"), -1),
               "eval_by_source": {s: {"before": _point(p, 0), "after": _point(p, -1)} for s, p in evals.items()
                                  if s != "overall"}}
    return card_text(recipe.model.name_or_path, yaml.safe_load(recipe.to_yaml()), summary, None, f"checkpoint {step}")


def _point(points: list | None, index: int) -> float | None:
    return points[index][1] if points else None


def card_text(base_model: str, recipe: dict, summary: dict, merged_into: str | None, what: str = "") -> str:
    from huggingface_hub import ModelCardData

    from .manifest import redact

    method = "QLoRA" if recipe.get("use_qlora") else "LoRA"
    adapters = merged_into is None
    metadata = ModelCardData(base_model=base_model if looks_like_hub_id(base_model) else None,
                             library_name="peft" if adapters else "transformers", license=base_license(base_model),
                             pipeline_tag="text-generation", tags=["sft", method.lower(), "trl", "sft_lora"])
    kind = f"{method} adapters" + (f" ({what})" if what else "") if adapters else f"merged {method} model"
    lines = ["---", metadata.to_yaml(), "---", "", f"# {Path(base_model).name}: {kind} (sft_lora)", "",
             f"- base model: `{base_model}`" + (f", license {metadata.license}" if metadata.license else ""),
             f"- method: {method}" + (f", merged into the {merged_into}" if merged_into else ", adapters only"),
             f"- data: `{(recipe.get('data') or {}).get('path', '?')}`"]
    if summary.get("global_step") is not None:
        tokens = f", {summary['tokens']:,} tokens" if summary.get("tokens") else ""
        lines.append(f"- trained: {summary['global_step']} steps{tokens}")
    lines += _data_table(summary) + _usage(adapters)
    if recipe:
        text = yaml.safe_dump(redact(recipe), sort_keys=False, allow_unicode=True)
        lines += ["", "## Recipe", "", "```yaml", text.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _data_table(summary: dict) -> list[str]:
    counts = summary.get("records_by_source") or {}
    if not counts.get("train"):
        return []
    evals = summary.get("eval_by_source", {})
    lines = ["", "## Data and evaluation", "", "| source | train records | eval records | eval loss before | "
             "eval loss after |", "|---|---:|---:|---:|---:|"]
    for source, n in counts["train"].items():
        loss = evals.get(source, {})
        lines.append(f"| {source} | {n} | {(counts.get('eval') or {}).get(source, 0)} | {_fmt(loss.get('before'))} "
                     f"| {_fmt(loss.get('after'))} |")
    lines.append(f"| **all** | {sum(counts['train'].values())} | {sum((counts.get('eval') or {}).values())} | "
                 f"{_fmt(summary.get('eval_loss_before'))} | {_fmt(summary.get('eval_loss_after'))} |")
    return lines


def _usage(adapters: bool) -> list[str]:
    load = ("from peft import AutoPeftModelForCausalLM", "model = AutoPeftModelForCausalLM.from_pretrained(path)") \
        if adapters else ("from transformers import AutoModelForCausalLM",
                          'model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")')
    return ["", "## Use", "", "```python", load[0], "from transformers import AutoTokenizer", "",
            'path = "<this directory>"', "tokenizer = AutoTokenizer.from_pretrained(path)", load[1],
            'messages = [{"role": "user", "content": "..."}]',
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
            "return_dict=True)",
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=256)[0, inputs['input_ids'].shape[1]:], "
            "skip_special_tokens=True))", "```", "",
            "Or chat with it: `python -m sft_lora.chat <this directory>` (`--prompt \"...\"` for one answer).",
            "The chat template it was trained with is `chat_template.jinja`."]


def base_license(base_model: str) -> str | None:
    """The license the base model's own card names (a local directory's README.md, or a hub model's README in the
    local cache; never the network); None when unknown."""
    from huggingface_hub import ModelCard, hf_hub_download

    readme = Path(base_model) / "README.md"
    try:
        if not readme.is_file():
            if not looks_like_hub_id(base_model):
                return None
            readme = Path(hf_hub_download(base_model, "README.md", local_files_only=True))
        return ModelCard.load(readme).data.license
    except Exception:  # no card, not cached, unreadable metadata: the license is unknown
        return None


def _fmt(value: Any) -> str:
    return "—" if value is None else f"{value:.4f}"
