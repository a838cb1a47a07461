"""Model cards (README.md) of the adapters, the merged model and each checkpoint: metadata, base model, method, the
data and its eval losses, how to load it, the recipe (secrets redacted)."""

from pathlib import Path
from typing import Any

import yaml

from .atomic import read_json
from .config import looks_like_hub_id, read_saved_recipe
from .report import SUMMARY_FILE, _before, _num, eval_history
from .text import cell, redact


def model_card(adapter_dir: str | Path, base_model: str, merged_into: str | None = None) -> str:
    """README.md of the adapters or, with `merged_into` (into which weights), of the merged model; from the adapters."""
    summary, what = read_json(Path(adapter_dir) / SUMMARY_FILE), ""
    if not summary and (state := read_json(Path(adapter_dir) / "trainer_state.json")):  # a checkpoint: its step
        summary, what = _so_far({}, state["log_history"], state["global_step"]), f"checkpoint {state['global_step']}"
    return card_text(base_model, read_saved_recipe(Path(adapter_dir)), summary, merged_into, what,
                     _template(adapter_dir))


def checkpoint_card(recipe, counts: dict[str, dict[str, int]], log_history: list[dict], step: int,
                    checkpoint: Path | None = None) -> str:
    """README.md of `checkpoint-<step>`: the run's card with the eval losses logged so far."""
    return card_text(recipe.model.name_or_path, yaml.safe_load(recipe.to_yaml()), _so_far(counts, log_history, step),
                     None, f"checkpoint {step}", checkpoint and _template(checkpoint))


def _template(directory: str | Path) -> str | None:
    """The chat template saved beside the weights (the tokenizer's), which the card's snippet renders."""
    path = Path(directory) / "chat_template.jinja"
    return path.read_text(encoding="utf-8") if path.is_file() else None


def _so_far(counts: dict[str, dict[str, int]], log_history: list[dict], step: int) -> dict[str, Any]:
    """A card's numbers at `step`: records by source and the eval losses of the log history up to it."""
    evals = eval_history(log_history, sorted(counts.get("eval") or {}))
    ends = {name: {"before": _before(points), "after": points[-1][1] if points[-1][0] > 0 else None}  # step 0's is
            for name, points in evals.items()}  # the untrained model's, not this checkpoint's
    overall = ends.pop("overall", {})
    return {"global_step": step, "records_by_source": counts, "eval_loss_before": overall.get("before"),
            "eval_loss_after": overall.get("after"), "eval_by_source": ends,
            "evaluated_at": evals["overall"][-1][0] if evals.get("overall") else None}  # maybe before `step`


def card_text(base_model: str, recipe: dict, summary: dict, merged_into: str | None, what: str = "",
              template: str | None = None) -> str:
    """The card: `ModelCardData` metadata, base model, method, data table, how to load it, recipe (secrets redacted)."""
    from huggingface_hub import ModelCardData

    from .hub import base_license

    method, adapters = "QLoRA" if recipe.get("use_qlora") else "LoRA", merged_into is None
    metadata = ModelCardData(base_model=base_model if looks_like_hub_id(base_model) else None,
                             library_name="peft" if adapters else "transformers", **base_license(base_model),
                             pipeline_tag="text-generation", tags=["sft", method.lower(), "trl", "sft_lora"])
    kind = (f"{method} adapters" if adapters else f"merged {method} model") + (f" ({what})" if what else "")
    license = f", license {metadata.license_name or metadata.license}" if metadata.license else ""
    lines = ["---", metadata.to_yaml(), "---", "", f"# {Path(base_model).name}: {kind} (sft_lora)", "",
             f"- base model: `{base_model}`{license}",
             f"- method: {method}" + (f", merged into the {merged_into}" if merged_into else ", adapters only"),
             f"- data: {_files((recipe.get('data') or {}).get('path'))}"]
    lines += _trained(summary)
    counts = summary.get("records_by_source") or {}
    if counts.get("train"):
        evals, eval_counts = summary.get("eval_by_source", {}), counts.get("eval") or {}
        at = summary.get("evaluated_at")  # a checkpoint between evaluations: the last one's losses, said as such
        after = f"eval loss at step {at}" if at and at != summary.get("global_step") else "eval loss after"
        lines += ["", "## Data and evaluation", "", "| source | train rows | eval rows | eval loss before | "
                  f"{after} |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {cell(source)} | {counts['train'].get(source, 0)} | {eval_counts.get(source, 0)} | "
                  f"{_num(evals.get(source, {}).get('before'))} | {_num(evals.get(source, {}).get('after'))} |"
                  for source in sorted({**counts["train"], **eval_counts})]  # a source held out only too
        lines.append(f"| **all** | {sum(counts['train'].values())} | {sum(eval_counts.values())} | "
                     f"{_num(summary.get('eval_loss_before'))} | {_num(summary.get('eval_loss_after'))} |")
    lines += _use(recipe, adapters, template)
    if recipe:
        text = yaml.safe_dump(redact(recipe), sort_keys=False, allow_unicode=True)
        lines += ["", "## Recipe", "", "```yaml", text.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _use(recipe: dict, adapters: bool, template: str | None) -> list[str]:
    """The card's "Use" code: the prompt as trained (its system prompt and the template's variables), generation
    stopping at the trained end-of-turn token, QLoRA adapters on the 4-bit base they trained with."""
    from .data import opened
    from .turns import template_kwargs

    data, training = recipe.get("data") or {}, recipe.get("training") or {}
    fold, kwargs = data.get("fold_system_prompt"), data.get("chat_template_kwargs")
    stop = ", eos_token_id=tokenizer.eos_token_id" if training.get("eos_token") else ""  # the trained end of turn
    auto, dtype = ("AutoPeftModelForCausalLM", "") if adapters else ("AutoModelForCausalLM", ', dtype="auto"')
    if bnb := adapters and recipe.get("quantization"):  # on the 4-bit base it trained with, not the full-precision
        dtype = ", quantization_config=BitsAndBytesConfig(" + ", ".join(f"{k}={v!r}" for k, v in bnb.items()) + ")"
    return ["", "## Use", "", "```python", f"from {'peft' if adapters else 'transformers'} import {auto}",
            "from transformers import AutoTokenizer" + ", BitsAndBytesConfig" * bool(bnb), "",
            'path = "<this directory>"',
            "tokenizer = AutoTokenizer.from_pretrained(path)", f"model = {auto}.from_pretrained(path{dtype})",
            f"messages = {opened([{'role': 'user', 'content': '...'}], data.get('system_prompt'), fold)!r}",
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
            "return_dict=True" + "".join(f", {k}={v!r}" for k, v in template_kwargs(template, kwargs).items()) + ")",
            f"print(tokenizer.decode(model.generate(**inputs, max_new_tokens=256{stop})[0, inputs['input_ids']"
            ".shape[1]:], skip_special_tokens=True))", "```", "",
            "Or chat with it: `python -m sft_lora.chat <this directory>` (`--prompt \"...\"` for one answer).",
            "The chat template it was trained with is `chat_template.jinja`."]


def _trained(summary: dict) -> list[str]:
    """The card's `trained:` line: steps, tokens (TRL counts a resumed session's only), whose weights these are."""
    if summary.get("global_step") is None:
        return []
    tokens, start = f"{summary['tokens']:,} tokens" if summary.get("tokens") else "", summary.get("resumed_at_step")
    if start:
        trained = f" (resumed at step {start}" + (f"; {tokens} since)" if tokens else ")")
    else:
        trained = f", {tokens}" if tokens else ""
    best = f"; the weights are {summary['weights_of']}" if summary.get("weights_of") else ""
    return [f"- trained: {summary['global_step']} steps{trained}{best}"]


def _files(path) -> str:
    """`data.path` on a card: each file in backticks, with its weight and source where the recipe gives them."""
    from .data import entries

    if not path:
        return "?"
    return ", ".join(f"`{e.path}`" + f" ({e.split})" * bool(e.split) + f" × {e.weight:g}" * (e.weight != 1)
                     + f" (source {e.source})" * bool(e.source) for e in entries(path))
