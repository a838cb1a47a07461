"""The base model's side: tokenizer and chat template, the embedded tiny model, checks on the weights and backend
(TRL's SFTTrainer loads the model itself, from `SFTConfig.model_init_kwargs`), and the Hugging Face Hub: endpoint
`HF_ENDPOINT`, token `HF_TOKEN` from the environment, never a recipe value or a stored login."""

import os
from pathlib import Path

from .config import DataArgs, ModelArgs, Recipe, RecipeError, local_model_missing, looks_like_hub_id
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


def load_tokenizer(model: ModelArgs, data: DataArgs):
    """The base model's tokenizer, with `data.chat_template` or the default template when it has none."""
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
    if data.chat_template:
        tokenizer.chat_template = _chat_template(Path(data.chat_template), tokenizer)
    elif not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.eos_token is None:
        raise RecipeError(f"{model.name_or_path}: the tokenizer has no EOS token; set training.eos_token")
    if tokenizer.pad_token is None:
        # What TRL would do silently, made explicit: the collator labels padding -100 whatever its id, so the
        # answer's own EOS keeps its label.
        tokenizer.pad_token = tokenizer.eos_token
        print(f"notice: {model.name_or_path}: the tokenizer has no pad token; padding with EOS "
              f"({tokenizer.eos_token}), which carries no loss")
    return tokenizer


def _chat_template(template: Path, tokenizer) -> str:
    """The text of `data.chat_template`, checked to render a question and its answer (one line, not jinja's
    traceback, for a syntax error or a template that raises)."""
    import jinja2

    if not template.is_file():
        raise RecipeError(f"{template}: chat template file not found; check data.chat_template")
    try:
        text = template.read_text(encoding="utf-8")
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hi."}],
                                      chat_template=text, tokenize=False)
    except UnicodeDecodeError:
        raise RecipeError(f"{template}: not valid UTF-8; save the chat template as UTF-8") from None
    except (jinja2.TemplateError, TypeError, ValueError) as exc:
        raise RecipeError(f"{template}: the chat template does not render a question and its answer "
                          f"({first_line(exc)}); fix the template or data.chat_template") from None
    if not text.strip():
        raise RecipeError(f"{template}: the chat template is empty; fix the template or data.chat_template")
    return text


def base_config(recipe: Recipe):
    """The base model's transformers config (raises what `AutoConfig.from_pretrained` raises)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(recipe.model.name_or_path, revision=recipe.model.revision,
                                      trust_remote_code=recipe.model.trust_remote_code)


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


def check_qlora_backend(recipe: Recipe) -> None:
    """QLoRA needs bitsandbytes importable on this machine; say so in one line instead of a deep traceback."""
    if not recipe.use_qlora:
        return
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a backend library that fails to load (OSError, RuntimeError)
        raise RecipeError(f"{recipe.at('use_qlora')}: use_qlora is true but bitsandbytes cannot run here "
                          f"({first_line(exc)}); install a bitsandbytes build for this machine or set use_qlora: "
                          "false") from None


def build_tiny_model(out_dir: str | Path, data: str | Path | list, *, hidden_size: int = 256, layers: int = 4,
                     vocab_size: int = 2048, seed: int = 0, fields: DataArgs | None = None) -> Path:
    """The embedded tiny model (random Llama, BPE learnt from `data`'s texts, any format `data.path` takes, under
    `fields`' field names), for runs with no GPU and no hub; atomic."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from .atomic import atomic_dir
    from .data import paths, read_records

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


def _endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT  # read now: a test or a launcher may set it late


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def check_reachable(recipe: Recipe) -> None:
    """A hub id the hub does not answer for within 5 s: one line now, not a minute of the hub client's retries."""
    model = None if recipe.model.build_tiny else recipe.model.name_or_path  # a tiny model is built, not fetched
    names = [(key, value) for key, value in (("model.name_or_path", model), ("data.path", recipe.data.path))
             if isinstance(value, str) and looks_like_hub_id(value)]
    if not _offline() and names and (problem := _unreachable()):
        key, name = names[0]
        raise RecipeError(f"{key}: '{name}' is a hub id but {_endpoint()} cannot be reached ({problem}); "
                          f"set HF_HUB_OFFLINE=1 to use the copy in the local cache, or set {key} to a local path")


def _unreachable() -> str | None:
    """Why the hub does not answer within 5 s, or None: any answer will do."""
    import httpx

    try:
        httpx.head(_endpoint(), timeout=5)
    except httpx.HTTPError as exc:
        return first_line(exc)
    return None


def check_push(recipe: Recipe) -> None:
    """Before training, not only after it: a push needs a token in the environment, a repo id and the network."""
    if not (repo := recipe.output.push_to_hub):
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not os.environ.get("HF_TOKEN"):
        raise RecipeError(f"output.push_to_hub: pushing to '{repo}' needs HF_TOKEN (a write token) in the "
                          "environment; export it or remove output.push_to_hub")
    if _offline():
        raise RecipeError(f"output.push_to_hub: HF_HUB_OFFLINE is set, so '{repo}' cannot be pushed to; unset it "
                          "or remove output.push_to_hub")
    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise RecipeError(f"output.push_to_hub: '{repo}' is not a repo id ({first_line(exc)})") from None
    if problem := _unreachable():
        raise RecipeError(f"output.push_to_hub: {_endpoint()} cannot be reached ({problem}), so '{repo}' cannot be "
                          "pushed to; check the network or remove output.push_to_hub")


def push_outputs(recipe: Recipe) -> str:
    """Upload the merged model (else the adapters), card included, to `output.push_to_hub` (private if new); its URL."""
    from huggingface_hub import HfApi

    repo, directory = recipe.output.push_to_hub, recipe.final_dir
    api = HfApi(endpoint=_endpoint(), token=os.environ.get("HF_TOKEN") or False)  # False: no stored login
    try:
        api.create_repo(repo, private=True, exist_ok=True)
        commit = api.upload_folder(repo_id=repo, folder_path=directory,
                                   commit_message=f"sft_lora: {recipe.model_name} {recipe.method}")
    except Exception as exc:  # HTTP errors, no network: the outputs on disk are kept, so nothing to continue
        error = RecipeError(f"output.push_to_hub: could not push {directory} to '{repo}' ({first_line(exc)}); the "
                            f"outputs are saved; check that HF_TOKEN may write to it, then: hf upload {repo} "
                            f"{directory}")
        error.training_started = False  # a --resume would not push: no continue command
        raise error from None
    print(f"pushed {directory} to {commit.commit_url}")
    return commit.commit_url


def base_license(base_model: str) -> dict[str, str]:
    """The license fields the base model's own card names (local dir, or the hub cache; never the network): license,
    and for `license: other` (EXAONE's) its license_name and license_link, a link into a hub base's repo made
    absolute so it still points there from this model's card; {} when unknown."""
    from huggingface_hub import ModelCard, hf_hub_download

    readme, hub = Path(base_model) / "README.md", looks_like_hub_id(base_model)
    try:
        if not readme.is_file():
            readme = Path(hf_hub_download(base_model, "README.md", local_files_only=True)) if hub else None
        data = ModelCard.load(readme).data.to_dict() if readme else {}
    except Exception:  # no card, not cached, unreadable metadata: the license is unknown
        return {}
    fields = {key: str(data[key]) for key in ("license", "license_name", "license_link") if data.get(key)}
    if "://" not in (link := fields.pop("license_link", "")) and link and hub:  # relative to the base's own repo
        link = f"https://huggingface.co/{base_model}/blob/main/{link.removeprefix('./')}"
    return ({"license_link": link} if "://" in link else {}) | fields if "license" in fields else {}
