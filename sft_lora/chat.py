"""Talk to a trained model: `python -m sft_lora.chat DIR [--prompt "…"]`, DIR = the adapters or the merged model.

Uses the chat template, tokenizer and system prompt it was trained with; `smoke_check`: do held-out answers stop?"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .config import RecipeError, local_model_missing, read_saved_recipe, saved_section
from .data import opened
from .merge import check_loadable
from .text import first_line, printable
from .turns import stop_token_ids, template_kwargs


def load(model_dir: str | Path, trust_remote_code: bool = False):
    """(model, tokenizer, system prompt, template variables) of an adapters dir (base + adapter) or a merged model;
    code shipped with the model runs only with `trust_remote_code` (the command line's, or the run's own recipe)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from .model import bitsandbytes_problem

    model_dir = Path(model_dir)
    recipe = read_saved_recipe(model_dir)
    model_args = saved_section(recipe, "model")
    check_loadable(model_dir, recipe, trust_remote_code, "--trust-remote-code")
    kwargs = {"dtype": model_args.dtype, "trust_remote_code": trust_remote_code, "use_safetensors": True,
              "device_map": "auto" if torch.cuda.is_available() else None}  # None: from_pretrained's default
    adapter = model_dir / "adapter_config.json"
    if not adapter.is_file() and not (model_dir / "config.json").is_file():
        raise RecipeError(f"{model_dir}: neither an adapters directory (adapter_config.json) nor a model "
                          "(config.json); pass a *_adapters or *_merged directory")
    if adapter.is_file() and recipe.get("quantization") and (problem := bitsandbytes_problem()):
        raise RecipeError(f"{model_dir}: QLoRA adapters run on their 4-bit base, but bitsandbytes cannot run here "
                          f"({problem}); install it, or merge them with --merge_into original and chat with that")
    try:
        if adapter.is_file():
            from peft import PeftModel

            if recipe.get("quantization"):
                kwargs["quantization_config"] = BitsAndBytesConfig(**recipe["quantization"])
            base = json.loads(adapter.read_text(encoding="utf-8"))["base_model_name_or_path"]
            if local_model_missing(base):
                raise RecipeError(f"{base}: the adapter's base model directory is not found; merge it with "
                                  "`python -m sft_lora.merge --base_model DIR` instead")
            model = PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(base, revision=model_args.revision, **kwargs), str(model_dir))
        else:
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:  # also a hand-edited saved recipe's
        raise RecipeError(f"{model_dir}: cannot load the model ({first_line(exc)})") from None
    if not tokenizer.chat_template:
        raise RecipeError(f"{model_dir}: no chat template saved with the model; pass a directory sft_lora wrote")
    data = saved_section(recipe, "data")  # its system prompt, fold_system_prompt and template variables
    return model.eval(), tokenizer, data, template_kwargs(tokenizer.chat_template, data.chat_template_kwargs)


def generate(model, tokenizer, messages: list[dict[str, str]], max_new_tokens: int = 256,
             temperature: float = 0.0, streamer=None, template_kwargs: dict | None = None) -> dict[str, Any]:
    """One answer to `messages`, its prompt rendered as in training: {text, stopped (on EOS by itself), tokens}."""
    import jinja2

    try:
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt", tokenizer_kwargs={"verbose": False},  # the
                                               **template_kwargs or {}).to(model.device)  # length: checked below
    except jinja2.TemplateError as exc:  # e.g. "System role not supported" (Gemma) for --system
        raise RecipeError(f"the chat template refuses this conversation ({first_line(exc)})") from None
    length = inputs["input_ids"].shape[1]
    context = getattr(model.config.get_text_config(), "max_position_embeddings", 0)
    if context and length >= context:  # past it the positions were never trained: transformers only warns
        raise RecipeError(f"the conversation is {length:,} tokens, the model's context {context:,}; send a shorter "
                          "message (or /reset the chat)")
    max_new_tokens = min(max_new_tokens, context - length) if context else max_new_tokens  # answers end inside it
    stops = stop_token_ids(tokenizer, model.generation_config)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=stops, streamer=streamer, **sampling,
                            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0])
    new = output[0, length:].tolist()
    return {"text": tokenizer.decode(new, skip_special_tokens=True).strip(),
            "stopped": any(token in stops for token in new), "tokens": len(new), "limit": max_new_tokens}


def smoke_check(model_dir: str | Path, prompts: list[list[dict[str, str]]], max_new_tokens: int,
                trust_remote_code: bool = False) -> dict[str, Any]:
    """Answer each prompt (greedy) with the saved model; report how many answers ended on EOS within the limit."""
    model, tokenizer, _, kwargs = load(model_dir, trust_remote_code)
    samples = [{"question": messages[-1]["content"], **generate(model, tokenizer, messages, max_new_tokens,
                                                                template_kwargs=kwargs)} for messages in prompts]
    stopped = sum(s["stopped"] for s in samples)
    verdict = (f"{stopped} of {len(samples)} answers ended with the end-of-turn token within {max_new_tokens} "
               "tokens" + ("" if stopped == len(samples) else
                           f"; {len(samples) - stopped} ran to the limit — the model may not have learned to stop"))
    return {"model": str(model_dir), "max_new_tokens": max_new_tokens, "total": len(samples), "stopped": stopped,
            "ok": stopped == len(samples), "verdict": verdict, "samples": samples}


def run_smoke_check(recipe, held_out, inputs: str) -> dict[str, Any] | None:
    """A run's smoke check on the first `report.smoke_prompts` prompts of `held_out` (from the `inputs` set), None
    with none; a failure (out of memory on a model that trained sharded) is reported, the results kept."""
    if not (n := min(recipe.report.smoke_prompts, len(held_out))):
        return None
    try:
        return smoke_check(recipe.final_dir, [row["prompt"] for row in held_out.select(range(n))],
                           recipe.report.smoke_max_new_tokens, recipe.model.trust_remote_code) | {"inputs": inputs}
    except Exception as exc:
        return {"ok": None, "skipped": f"smoke check skipped: {type(exc).__name__}: {first_line(exc)}"}


def interactive(model, tokenizer, system: tuple[str | None, bool], max_new_tokens: int, temperature: float,
                kwargs: dict) -> None:
    from transformers import TextStreamer

    print("type a message; /reset clears the conversation, /exit or Ctrl-D quits", flush=True)
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = []
        if line in ("", "/reset"):
            continue
        if line != (line := _utf8(line)):
            print("notice: the message held bytes that are not UTF-8; they are sent as \ufffd", file=sys.stderr)
        history.append({"role": "user", "content": line})
        print("model> ", end="", flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        try:
            answer = generate(model, tokenizer, opened(history, *system), max_new_tokens, temperature, streamer, kwargs)
        except RecipeError as exc:  # said; the conversation goes on without that message
            print(f"\nerror: {printable(str(exc))}", file=sys.stderr)
            history.pop()
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            print("\n[answer interrupted; the message is dropped]", flush=True)
            history.pop()
            continue
        if not answer["stopped"]:
            print(f"[cut at {answer['limit']} tokens" + (", the end of the context]" if answer["limit"] <
                                                          max_new_tokens else "]"))
        history.append({"role": "assistant", "content": answer["text"]})


def _utf8(text: str) -> str:
    """`text` with the bytes stdin or argv could not decode (surrogate escapes) as U+FFFD: tokenizers refuse them."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expects a whole number of at least 1, got {text!r}")
    return int(text)


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):  # -1 and nan meant greedy, inf uniform noise
        raise argparse.ArgumentTypeError(f"expects a finite number >= 0 (0 = greedy), got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sft_lora.chat", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="a *_adapters or *_merged directory written by sft_lora")
    parser.add_argument("--prompt", help="answer this one message and exit")
    parser.add_argument("--system", help="system prompt (default: the one the model was trained with, if any)")
    parser.add_argument("--max-new-tokens", type=_positive, default=256, help="answer length limit (default 256)")
    parser.add_argument("--temperature", type=_temperature, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the code a model ships with (one "
                        "trained with model.trust_remote_code needs it; only for code you trust)")
    args = parser.parse_args(argv)
    try:
        model, tokenizer, data, kwargs = load(args.model_dir, args.trust_remote_code)
        system = (args.system if args.system is not None else data.system_prompt, data.fold_system_prompt)
        if args.prompt is None:
            interactive(model, tokenizer, system, args.max_new_tokens, args.temperature, kwargs)
            return 0
        answer = generate(model, tokenizer, opened([{"role": "user", "content": _utf8(args.prompt)}], *system),
                          args.max_new_tokens, args.temperature, template_kwargs=kwargs)
    except RecipeError as exc:
        print(f"error: {printable(str(exc))}", file=sys.stderr)
        return 2
    print(answer["text"])
    if not answer["stopped"]:
        limit = "the model's context" if answer["limit"] < args.max_new_tokens else f"the {answer['limit']}-token limit"
        print(f"(cut at {limit}: no end-of-turn token)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
