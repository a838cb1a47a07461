"""The base model's side: tokenizer and chat template, the embedded tiny model, checks on the weights and backend
(TRL's SFTTrainer loads the model itself, from `SFTConfig.model_init_kwargs`); the hub's side is `hub.py`."""

import os
import re
from pathlib import Path

from .config import DataArgs, ModelArgs, Recipe, RecipeError, local_model_missing
from .text import first_line

# Used when a tokenizer has none (base models). Zephyr-style role markers, each turn ends with the tokenizer's
# EOS, so the end of the answer is a token the model already stops on. Turns are joined by "\n" (not ended by
# one), so the answer's labels are exactly the answer and its EOS, with no trailing newline to learn.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '\\n<|assistant|>\\n' }}{% endif %}"
)


def load_tokenizer(model: ModelArgs, data: DataArgs, eos_token: str | None = None):
    """The base model's tokenizer, with `data.chat_template` or the default template when it has none; `eos_token`:
    training.eos_token (checked against the vocabulary by `prepare.prepare_datasets`, which makes it the EOS)."""
    from transformers import AutoTokenizer

    if not model.build_tiny and local_model_missing(model.name_or_path):
        raise RecipeError(f"{model.name_or_path}: model directory not found; check model.name_or_path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path, revision=model.revision,
                                                  trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as exc:  # ValueError: a directory holding no tokenizer
        if Path(model.name_or_path).is_dir() and not (Path(model.name_or_path) / "config.json").is_file():
            raise RecipeError(f"{model.name_or_path}: not a model directory (no config.json); check "
                              "model.name_or_path") from None
        fix = ("set model.trust_remote_code: true if you trust the code it ships" if "trust_remote_code" in str(exc)
               else "check model.name_or_path, the network or HF_TOKEN")
        raise RecipeError(f"{model.name_or_path}: cannot load the tokenizer ({first_line(exc)}); {fix}") from None
    if tokenizer.eos_token is None and eos_token and tokenizer.convert_tokens_to_ids(eos_token) is not None:
        tokenizer.eos_token = eos_token  # before a template that renders eos_token is tried below
    if data.chat_template:
        tokenizer.chat_template = _chat_template(Path(data.chat_template), tokenizer)
    elif not tokenizer.chat_template:  # a base model: its BOS first where its tokenizer adds one (Llama, Gemma)
        adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
        tokenizer.chat_template = ("{{ bos_token }}" if adds_bos else "") + DEFAULT_CHAT_TEMPLATE
    else:
        if isinstance(tokenizer.chat_template, str):  # a local model's chat_template.jinja saved with a BOM
            tokenizer.chat_template = tokenizer.chat_template.removeprefix("\ufeff")
        _check_own_template(tokenizer, model.name_or_path)
    if tokenizer.eos_token is None and not eos_token:
        raise RecipeError(f"{model.name_or_path}: the tokenizer has no EOS token; set training.eos_token")
    if tokenizer.pad_token is None:
        # What TRL would do silently, made explicit: the collator labels padding -100 whatever its id, so the
        # answer's own EOS keeps its label.
        tokenizer.pad_token = tokenizer.eos_token or eos_token
        print(f"notice: {model.name_or_path}: the tokenizer has no pad token; padding with EOS "
              f"({tokenizer.pad_token}), which carries no loss")
    return tokenizer


def _chat_template(template: Path, tokenizer) -> str:
    """The text of `data.chat_template`, checked to render a question and its answer (one line, not jinja's
    traceback, for a syntax error or a template that raises)."""
    import jinja2

    if not template.is_file():
        raise RecipeError(f"{template}: chat template file not found; check data.chat_template")
    try:
        _render_a_pair(tokenizer, text := template.read_text(encoding="utf-8-sig"))  # no BOM before <bos>
    except UnicodeDecodeError:
        raise RecipeError(f"{template}: not valid UTF-8; save the chat template as UTF-8") from None
    except (jinja2.TemplateError, TypeError, ValueError) as exc:
        raise RecipeError(f"{template}: the chat template does not render a question and its answer "
                          f"({first_line(exc)}); fix the template or data.chat_template") from None
    if not text.strip():
        raise RecipeError(f"{template}: the chat template is empty; fix the template or data.chat_template")
    return text


def _render_a_pair(tokenizer, template: str | None = None) -> None:
    tokenizer.apply_chat_template([{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hi."}],
                                  chat_template=template, tokenize=False)


def _check_own_template(tokenizer, name: str) -> None:
    """The model's own chat template compiles (a syntax error named with the model here, not while tokenizing)."""
    import jinja2

    try:
        _render_a_pair(tokenizer)
    except jinja2.TemplateSyntaxError as exc:
        raise RecipeError(f"{name}: its chat template is not valid jinja ({first_line(exc)}, line {exc.lineno}); "
                          "set data.chat_template to a template file that is") from None
    except (jinja2.TemplateError, TypeError, ValueError):  # refusing this pair: said per record while tokenizing
        pass


def base_config(recipe: Recipe, local_files_only: bool = False):
    """The base model's transformers config (raises what `AutoConfig.from_pretrained` raises)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(recipe.model.name_or_path, revision=recipe.model.revision,
                                      trust_remote_code=recipe.model.trust_remote_code,
                                      local_files_only=local_files_only)


def name_the_cpu_to_deepspeed() -> None:
    """accelerate imports DeepSpeed whenever it is installed (to unwrap models, saving them too); on a machine with
    no accelerator DeepSpeed then logs "Setting accelerator to CPU" as a warning, unless told the device."""
    import torch

    if not torch.accelerator.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's own variable


def check_model_weights(recipe: Recipe) -> None:
    """A local base model must have safetensors weights: a .bin/.pt checkpoint is a pickle, which can run code
    when loaded. (Hub models are held to the same rule by `use_safetensors=True` when loading.)"""
    path = Path(recipe.model.name_or_path)
    if not path.is_dir() or any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise RecipeError(f"{path}: weights only as a pickle ({pickles[0]}), which can run code when loaded; "
                          "convert them to safetensors (save_pretrained writes safetensors) and point "
                          "model.name_or_path there")


def bitsandbytes_problem() -> str | None:
    """Why bitsandbytes (4-bit weights: QLoRA) cannot run on this machine, else None; a user needing it gets this in
    one line instead of transformers' deep traceback."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a backend library that fails to load (OSError, RuntimeError)
        return first_line(exc)
    return None


def check_qlora_backend(recipe: Recipe) -> None:
    if recipe.use_qlora and (problem := bitsandbytes_problem()):
        raise RecipeError(f"{recipe.at('use_qlora')}: use_qlora is true but bitsandbytes cannot run here ({problem}); "
                          "install a bitsandbytes build for this machine or set use_qlora: false")


def check_tiny_path(recipe: Recipe) -> None:
    """`model.build_tiny` builds at the recipe's own path: not at a missing one the command line names (a mistyped
    --base_model got a random model, trained and merged, exit 0), unless build_tiny is given there too."""
    given = [recipe.where.get(key, "").startswith("command line") for key in ("model.name_or_path", "model.build_tiny")]
    if recipe.model.build_tiny and given == [True, False] and not Path(name := recipe.model.name_or_path).is_dir():
        raise RecipeError(f"{recipe.where['model.name_or_path']}: {name}: model directory not found; the recipe's "
                          "model.build_tiny builds a tiny model at its own path only (add model.build_tiny=true to "
                          "build one here)")


def build_tiny_if_asked(recipe: Recipe) -> None:
    """`model.build_tiny`: the tiny model built where `model.name_or_path` names none, by one process per machine (the
    others then find it; each built it into the same directory, racing)."""
    from accelerate import PartialState

    from .hub import check_reachable
    name_the_cpu_to_deepspeed()  # saving the model imports DeepSpeed
    with PartialState().local_main_process_first():
        if recipe.model.build_tiny and not Path(recipe.model.name_or_path).is_dir():
            check_tiny_path(recipe)  # --check comes here only
            check_reachable(recipe)  # its tokenizer learns from the data: a hub id with no network, said now
            print(f"building the tiny model at {recipe.model.name_or_path}")
            build_tiny_model(recipe.model.name_or_path, recipe.data.path, fields=recipe.data)


def build_tiny_model(out_dir: str | Path, data: str | Path | list, *, hidden_size: int = 256, layers: int = 4,
                     vocab_size: int = 2048, seed: int = 0, fields: DataArgs | None = None) -> Path:
    """The embedded tiny model (random Llama, BPE learnt from `data`'s texts, any format `data.path` takes, under
    `fields`' field names), for runs with no GPU and no hub; atomic."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from .atomic import atomic_dir
    from .data import paths
    from .records import read_records

    fields, texts = fields or DataArgs(), []
    for data_path in paths(data if isinstance(data, list) else str(data)):
        for record in (record for _, record in read_records(data_path, fields) if isinstance(record, dict)):
            turns = record.get("messages") or record.get("conversations")
            turns = [turn for turn in turns if isinstance(turn, dict)] if isinstance(turns, list) else []
            values = [record.get(fields.input_field), record.get(fields.output_field),
                      *(turn.get("content") or turn.get("value") for turn in turns)]
            texts += [value if isinstance(value, str) else "" for value in values]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))  # its bar writes blank lines to stdout (and panics when stdout is a closed pipe)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", model_max_length=1024)
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False))
    with atomic_dir(Path(out_dir), overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def model_modules(recipe: Recipe) -> dict[str, str] | None:
    """Dotted name → class name of every module of the recipe's model, built on the meta device (no weights); None
    when the architecture cannot be built here (offline hub id, exotic model): loading then reports it."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        config = base_config(recipe)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    except Exception:  # any failure here is reported, better worded, by the real load that follows
        return None
    return {name: type(module).__name__ for name, module in skeleton.named_modules() if name}


def check_target_modules(recipe: Recipe) -> None:
    """RecipeError unless every `lora.target_modules` entry (or the regex) selects a module of the model: PEFT fails
    only when none matches, and silently skips list entries that match nothing (EXAONE's remote-code `c_fc_0` under
    the native Llama modules trains attention only)."""
    targets = recipe.given["lora"]["target_modules"]  # in the recipe's order (LoraConfig keeps a set)
    if targets is None or targets == "all-linear" or not (modules := model_modules(recipe)):
        return
    if isinstance(targets, str):  # PEFT: a string is a regex matched against the full module name
        what = "" if any(re.fullmatch(targets, name) for name in modules) else f"the regex {targets!r} matches"
    else:  # PEFT: a list entry matches a module whose name is the entry or ends with "." + entry
        missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in modules)]
        what = missing and f"{', '.join(map(repr, missing))} {'matches' if len(missing) == 1 else 'match'}"
    if what:
        linear = sorted({name.rsplit(".", 1)[-1] for name, kind in modules.items() if kind.endswith("Linear")})
        raise RecipeError(f"{recipe.at('lora.target_modules')}: lora.target_modules: {what} no module of "
                          f"{recipe.model.name_or_path}; its linear layers are {', '.join(linear)} (or use all-linear)")
