"""Merge a LoRA/QLoRA adapter into its base model and save a normal Hugging Face model directory.

`python -m sft_lora.merge --adapter_model DIR` (the seed's flags); base model and 4-bit settings: as saved with it."""

import argparse
import hashlib
import json
import signal
import sys
from pathlib import Path

import yaml

from .atomic import atomic_dir, check_target, read_json, signals_interrupt
from .config import RECIPE_FILE, RecipeError, local_model_missing, read_saved_recipe, saved_section
from .text import first_line, printable, redact


def merge_adapter(adapter_dir: str | Path, base_model: str | None = None, output_dir: str | Path | None = None,
                  merge_into: str | None = None, overwrite: bool = False, trust_remote_code: bool = False) -> Path:
    """Merge `adapter_dir` into its base; return the merged directory. QLoRA adapters merge by default into the
    dequantized 4-bit base, the weights they were trained against: it reproduces the trained model far better than
    the original weights (README, Merge). The choice goes into merge_info.json."""
    from transformers import AutoTokenizer

    from .card import model_card
    from .outputs import check_not_inputs
    from .turns import stop_token_ids

    adapter_dir = Path(adapter_dir)
    recipe, base, merge_into = _what_to_merge(adapter_dir, base_model, merge_into, trust_remote_code)
    name = adapter_dir.name  # a checkpoint's: not `checkpoint-N_merged`, which Trainer's rotation would delete
    default = f"merged-{name}" if name.startswith("checkpoint-") else name.replace("_adapters", "") + "_merged"
    output_dir = Path(output_dir or adapter_dir.with_name(default))
    check_not_inputs(output_dir, {"the adapter": adapter_dir, "the base model": base}, "choose another --output_dir")
    if adapter_dir.resolve() in output_dir.resolve().parents:  # the next run would replace it with the adapters
        raise RecipeError(f"{output_dir}: is inside the adapter directory {adapter_dir}, which a run replaces whole; "
                          "choose another --output_dir")
    dequantize = bool(recipe.get("quantization")) and merge_into == "dequantized"  # plain LoRA: the original base
    inputs = {"adapter_sha256": adapter_sha256(adapter_dir), "base_model": base,
              "merge_into": "dequantized" if dequantize else "original"}
    if (earlier := _earlier_merge(adapter_dir, output_dir, inputs)) == "up to date":
        return output_dir
    overwrite = overwrite or earlier == "stale"  # the old merge of these same adapters: replacing it was asked
    check_target(output_dir, overwrite=overwrite)  # refuse now, not after minutes of loading and merging
    model = _merged_model(adapter_dir, base, recipe, dequantize, trust_remote_code)
    try:  # the tokenizer the run saved (a remote-code one runs only as trusted, never asking on a prompt)
        tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise RecipeError(f"{adapter_dir}: cannot load the saved tokenizer ({first_line(exc)})") from None
    if tokenizer.eos_token_id is not None:  # add the trained end-of-turn token, keep the stop tokens it shipped with
        model.generation_config.eos_token_id = stop_token_ids(tokenizer, model.generation_config)
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = {"base_model": base, "adapter": str(adapter_dir.resolve()), "inputs": inputs,
                "merged_into": ("dequantized 4-bit base" if dequantize else "original base weights"),
                "dtype": str(model.dtype).removeprefix("torch.")}
        (tmp / "merge_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if recipe:  # chat reads the system prompt the model was trained with from it; secrets never travel on
            (tmp / RECIPE_FILE).write_text(yaml.safe_dump(redact(recipe), sort_keys=False, allow_unicode=True),
                                           encoding="utf-8")
        (tmp / "README.md").write_text(model_card(adapter_dir, base, info["merged_into"]), encoding="utf-8")
    return output_dir


def adapter_sha256(adapter_dir: Path) -> str:
    """What a merge is made from: the adapter files but the report files, which training rewrites after merging."""
    from .fingerprint import file_sha256
    from .report import PLOT_FILE, SUMMARY_FILE

    files = sorted(p for p in adapter_dir.iterdir() if p.is_file() and p.name not in (SUMMARY_FILE, PLOT_FILE,
                                                                                        "README.md"))
    return hashlib.sha256("".join(f"{p.name}:{file_sha256(p)}\n" for p in files).encode()).hexdigest()


def _what_to_merge(adapter_dir: Path, base_model: str | None, merge_into: str | None, trust_remote_code: bool
                   ) -> tuple[dict, str, str]:
    """(the saved recipe, the base model, merge_into) of an adapters directory, the arguments winning."""
    if not (adapter_dir / "adapter_config.json").is_file():
        raise RecipeError(f"{adapter_dir}: no adapter_config.json; pass the *_adapters directory training wrote")
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    recipe = read_saved_recipe(adapter_dir)
    check_loadable(adapter_dir, recipe, trust_remote_code, "--trust_remote_code")
    if (recipe.get("lora") or {}).get("layer_replication"):  # save_pretrained refuses the shared tensors, at the end
        raise RecipeError(f"{adapter_dir}: trained with lora.layer_replication, which shares weights between layers, "
                          "so a merged model cannot be saved; load the adapters with PEFT instead")
    base = base_model or adapter_config.get("base_model_name_or_path")
    if not base:
        raise RecipeError(f"{adapter_dir}: the adapter does not name its base model; pass --base_model")
    if local_model_missing(base):
        raise RecipeError(f"{base}: base model directory not found; pass --base_model")
    base = str(Path(base).resolve()) if Path(base).is_dir() else base  # as the adapter names it: one base, one name
    if merge_into == "dequantized" and not recipe.get("quantization"):
        print(f"notice: {adapter_dir} is a plain LoRA adapter (no 4-bit base to dequantize); merging into the "
              "original weights")
    merge_into = merge_into or saved_section(recipe, "output").merge_into
    if merge_into not in ("dequantized", "original"):
        raise RecipeError(f"--merge_into must be 'dequantized' or 'original', got {merge_into!r}")
    return recipe, base, merge_into


def _earlier_merge(adapter_dir: Path, output_dir: Path, inputs: dict) -> str | None:
    """"up to date" when `output_dir` holds a merge of exactly these inputs, "stale" when it holds a merge of this
    adapters directory into the same base made before its files changed (each said in one line), else None (a merge
    into another base, or anything else there, is replaced only with --overwrite)."""
    previous = read_json(output_dir / "merge_info.json")  # {}: none, or unreadable
    weights = any((output_dir / w).is_file() for w in ("model.safetensors", "model.safetensors.index.json"))
    if previous.get("inputs") == inputs and weights:
        print(f"{output_dir}: up to date (a merge of these adapters into {inputs['base_model']}); nothing to do")
        return "up to date"
    earlier = previous.get("inputs") if isinstance(previous.get("inputs"), dict) else {}
    same_base = {**earlier, "adapter_sha256": inputs["adapter_sha256"]} == inputs  # base and merge_into alike
    if same_base and previous.get("adapter") and Path(previous["adapter"]).resolve() == adapter_dir.resolve():
        print(f"{output_dir}: {adapter_dir} changed since it was merged; merging again")
        return "stale"
    return None


def check_loadable(directory: Path, recipe: dict, trust_remote_code: bool, flag: str) -> None:
    """An adapters or merged directory, before anything in it is loaded: its own code runs only when the command
    line says so (its saved recipe is no say of the user's: a shared directory can claim anything), and an adapter
    only from safetensors (PEFT would unpickle an adapter_model.bin)."""
    if saved_section(recipe, "model").trust_remote_code and not trust_remote_code:
        raise RecipeError(f"{directory}: was trained with model.trust_remote_code: true, so loading it runs code that "
                          f"ships with the model; pass {flag} if you trust that code")
    if (directory / "adapter_config.json").is_file() and not (directory / "adapter_model.safetensors").is_file():
        raise RecipeError(f"{directory}: no adapter_model.safetensors (an adapter_model.bin is a pickle, which can "
                          "run code when loaded); convert the adapter to safetensors")


def _merged_model(adapter_dir: Path, base: str, recipe: dict, dequantize: bool, trust_remote_code: bool):
    """The base (dequantized from 4-bit when `dequantize`, in its compute dtype) with the adapter merged in."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from .model import bitsandbytes_problem, name_the_cpu_to_deepspeed

    if dequantize and (problem := bitsandbytes_problem()):  # a merge machine without it: the usual case
        raise RecipeError(f"{adapter_dir}: QLoRA adapters merge into their dequantized 4-bit base, but bitsandbytes "
                          f"cannot run here ({problem}); install it, or pass --merge_into original")
    name_the_cpu_to_deepspeed()
    model_args = saved_section(recipe, "model")
    kwargs = {"revision": model_args.revision, "trust_remote_code": trust_remote_code,
              "dtype": model_args.dtype, "use_safetensors": True}  # no pickled weights
    try:
        if dequantize:
            bnb = BitsAndBytesConfig(**recipe["quantization"])
            model = AutoModelForCausalLM.from_pretrained(base, quantization_config=bnb, **kwargs)
            model = model.dequantize().to(bnb.bnb_4bit_compute_dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    except (OSError, ValueError, TypeError, AttributeError) as exc:  # not a model, no network, a hand-edited recipe
        raise RecipeError(f"{base}: cannot load the base model ({first_line(exc)}); check --base_model, the network "
                          "or HF_TOKEN (HF_HUB_OFFLINE=1 uses the local cache)") from None
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload(progressbar=True)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        # torch's load_state_dict puts the useful part ("size mismatch for …") on a later line
        first = next((line for line in lines if line.startswith("size mismatch")), lines[0])
        raise RecipeError(f"{adapter_dir}: cannot merge into base '{base}' ({first}); the adapter was trained on "
                          "another base; check --base_model") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft_lora.merge", description=__doc__.splitlines()[0])
    parser.add_argument("--adapter_model", required=True, help="the *_adapters directory training wrote")
    parser.add_argument("--base_model", help="base model; default: the one the adapter was trained on")
    parser.add_argument("--output_dir", help="default: the sibling *_merged directory (merged-checkpoint-N for a "
                        "checkpoint)")
    parser.add_argument("--merge_into", choices=["dequantized", "original"],
                        help="QLoRA only: merge into the dequantized 4-bit base (default) or the original weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--trust_remote_code", action="store_true", help="run the code a model ships with (a model "
                        "trained with model.trust_remote_code needs it; only for code you trust)")
    args = parser.parse_args(argv)
    try:
        with signals_interrupt():
            out = merge_adapter(args.adapter_model, args.base_model, args.output_dir, args.merge_into, args.overwrite,
                                args.trust_remote_code)
    except RecipeError as exc:
        print(f"error: {printable(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM / SIGHUP (signals_interrupt)
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"interrupted: {signal.Signals(signum).name}; nothing written (the unfinished merge is removed)",
              file=sys.stderr)
        return 128 + signum
    print(f"merged model: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
