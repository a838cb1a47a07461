"""Recipe CI: every recipes/**/*.yaml validates, renders its family's chat template correctly, trains 2 steps,
saves an adapter and merges it, on a tiny random model of its own architecture built here (the hub is not
reachable). A new recipe is picked up by the glob; a new family needs one FAMILIES entry (the test says so).

Only what CPU and a tiny model force is overridden: model path and dtype, data (8 records, no eval), steps,
batch size, reporting, output directories. Target modules, quantization, chat template, EOS and system-prompt
handling are the recipe's own.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from importlib import resources
from pathlib import Path

import pytest
import yaml

from sft_lora.config import Recipe, RecipeError, load_recipe

from .conftest import ROOT, SAMPLE, to_examples

pytestmark = pytest.mark.slow

RECIPES = sorted((ROOT / "recipes").glob("**/*.yaml"))
TEMPLATES = Path(__file__).parent / "chat_templates"


def _trl_template(name: str) -> str:
    """A chat template TRL ships verbatim from the model's hub repo (trl/chat_templates)."""
    return resources.files("trl").joinpath("chat_templates", name).read_text(encoding="utf-8")


@dataclasses.dataclass(frozen=True)
class Family:
    """What the hub would give us for a family: architecture and tokenizer facts, as the checkpoint ships them."""

    model_type: str
    eos: str
    bos: str | None = None
    pad: str | None = None
    special: tuple[str, ...] = ()
    chat_template: str | None = None  # None: the tokenizer has none and the library's default applies
    config: dict = dataclasses.field(default_factory=dict)  # architecture-specific tiny config


GEMMA3_TOKENS = ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>")
# Keyed by the recipe's directory under recipes/ (recipes/tiny.yaml is family "tiny"). Templates come from TRL
# (verbatim hub copies) or tests/chat_templates/ (each file says where from); tokens as the hub tokenizers ship
# them, except HyperCLOVA X SEED's, which could not be checked offline (its EOS here is a guess: the recipe pins
# <|endofturn|> either way, and the template is reconstructed from the model card).
FAMILIES: dict[str, Family] = {
    "tiny": Family("llama", bos="<s>", eos="</s>", pad="<pad>"),
    "llama3": Family("llama", bos="<|begin_of_text|>", eos="<|eot_id|>", chat_template=_trl_template("llama3_1.jinja"),
                     special=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>")),
    "qwen3": Family("qwen3", eos="<|im_end|>", pad="<|endoftext|>", chat_template=_trl_template("qwen3.jinja"),
                    special=("<|im_start|>", "<|im_end|>", "<think>", "</think>")),
    "mistral": Family("mistral", bos="<s>", eos="</s>", special=("[INST]", "[/INST]"),
                      chat_template=(TEMPLATES / "mistral-v0.3.jinja").read_text(encoding="utf-8")),
    "gemma3": Family("gemma3", bos="<bos>", eos="<eos>", pad="<pad>", special=GEMMA3_TOKENS,
                     chat_template=_trl_template("gemma3.jinja"),
                     config={"vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                               "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
                             "mm_tokens_per_image": 4}),
    "exaone": Family("exaone", bos="[BOS]", eos="[|endofturn|]", pad="[PAD]",
                     special=("[|system|]", "[|user|]", "[|assistant|]", "[|endofturn|]"),
                     chat_template=(TEMPLATES / "exaone-3.5.jinja").read_text(encoding="utf-8")),
    "hyperclovax-seed": Family("hyperclovax", eos="<|endoftext|>",
                               special=("<|im_start|>", "<|im_end|>", "<|endofturn|>", "<|stop|>"),
                               chat_template=(TEMPLATES / "hyperclovax-seed.jinja").read_text(encoding="utf-8")),
    "phi4-mini": Family("phi3", bos="<|endoftext|>", eos="<|endoftext|>", pad="<|endoftext|>",
                        special=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>", "<|/tool|>"),
                        chat_template=(TEMPLATES / "phi-4-mini.jinja").read_text(encoding="utf-8")),
}
TINY_DIMS = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 1024}
CI_SYSTEM_PROMPT = "Answer in one short paragraph."  # every recipe must survive a system prompt


def family_of(path: Path) -> str:
    return "tiny" if path.parent == ROOT / "recipes" else path.parent.name


class RecipeCheckFailed(Exception):
    """A recipe that validates but would train wrongly (a chat-template, EOS or output problem)."""


def build_tiny_arch(family: Family, base_tokenizer_dir: Path, out_dir: Path) -> Path:
    """A tiny random-init model of the family's architecture, with the tiny BPE tokenizer dressed in the family's
    special tokens and chat template, saved like a hub checkpoint."""
    import torch
    from tokenizers import AddedToken
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_tokenizer_dir)
    named = [t for t in (family.bos, family.eos, family.pad) if t]
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in (*named, *family.special)],
                         special_tokens=True)
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = family.bos, family.eos, family.pad
    tokenizer.chat_template = family.chat_template
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if family.model_type == "gemma3":  # multimodal: the language model's dimensions live in text_config
        image_ids = tokenizer.convert_tokens_to_ids(["<start_of_image>", "<end_of_image>", "<image_soft_token>"])
        config = AutoConfig.for_model("gemma3", text_config={**TINY_DIMS, **ids, "sliding_window": 64},
                                      boi_token_id=image_ids[0], eoi_token_id=image_ids[1],
                                      image_token_id=image_ids[2], **ids, **family.config)
    else:
        config = AutoConfig.for_model(family.model_type, **TINY_DIMS, **ids, **family.config)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_arch(tmp_path_factory, tiny_model):
    """family name → directory of its tiny model, built once per session (LoRA and QLoRA recipes share it)."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in FAMILIES:
            raise RecipeCheckFailed(f"no architecture facts for recipe family '{name}'; add a FAMILIES entry in "
                                    f"{Path(__file__).name} (model_type, tokens, chat template as the hub ships them)")
        if name not in built:
            built[name] = build_tiny_arch(FAMILIES[name], tiny_model, tmp_path_factory.mktemp("arch") / name)
        return built[name]

    return get


@pytest.fixture(scope="session")
def ci_data(tmp_path_factory) -> Path:
    """The first 8 records of the shipped sample: enough for 2 steps of batch 2."""
    path = tmp_path_factory.mktemp("data") / "ci.jsonl"
    path.write_text("\n".join(SAMPLE.read_text(encoding="utf-8").splitlines()[:8]) + "\n", encoding="utf-8")
    return path


def ci_overrides(arch_dir: Path, data: Path, out: Path) -> list[str]:
    """What must change to run on CPU with a tiny model; nothing that decides how the recipe trains."""
    return [f"model.name_or_path={arch_dir}", "model.dtype=float32", "model.attn_implementation=null",
            f"data.path={data}", "data.eval_split=0", "data.eval_path=null", "training.max_steps=2",
            "training.per_device_train_batch_size=2", "training.gradient_accumulation_steps=1",
            "training.report_to=none", "training.bf16=false", "training.logging_steps=1",
            "training.dataloader_pin_memory=false", f"output.dir={out / 'final'}",
            f"output.checkpoint_dir={out / 'checkpoints'}", "output.merge=true"]


def validate(path: Path, overrides: list[str] = ()) -> Recipe:
    """load_recipe, with upstream deprecation warnings about keys the recipe sets turned into failures: a
    deprecated key is the next release's renamed key (TRL's max_seq_length was deprecated before it went)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recipe = load_recipe(path, list(overrides))
    keys = {key for section in ("lora", "quantization", "training") for key in (recipe.raw.get(section) or {})}
    for warning in caught:
        message = str(warning.message)
        deprecation = issubclass(warning.category, (FutureWarning, DeprecationWarning))
        if deprecation and any(re.search(rf"\b{re.escape(key)}\b", message) for key in keys):
            raise RecipeCheckFailed(f"{path}: a key is deprecated upstream: {message.splitlines()[0]}")
    return recipe


def check_chat_template(recipe: Recipe) -> None:
    """Render one record the way TRL does (prompt with generation prompt, then prompt + answer) and check that
    the prompt is a prefix of the whole, the system prompt survives, and the answer's labels reach the EOS."""
    from sft_lora.model import load_tokenizer

    data = recipe.data if recipe.data.system_prompt else dataclasses.replace(recipe.data,
                                                                             system_prompt=CI_SYSTEM_PROMPT)
    tokenizer = load_tokenizer(recipe.model, data)
    eos = recipe.training.eos_token or tokenizer.eos_token
    tokenizer.eos_token = eos  # what TRL does with training.eos_token
    record = json.loads(SAMPLE.read_text(encoding="utf-8").splitlines()[0])
    example = to_examples([(1, record)], data, "ci")
    prompt, completion = example["prompt"][0], example["completion"][0]
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    source = recipe.source
    if data.system_prompt not in full_text:
        raise RecipeCheckFailed(f"{source}: the chat template drops the system prompt; set data.fold_system_prompt: "
                                "true")
    if not full_text.startswith(prompt_text):
        raise RecipeCheckFailed(f"{source}: the chat template renders the prompt differently once the answer "
                                f"follows (prompt ends {prompt_text[-60:]!r}), so training sees another context "
                                "than inference; set data.fold_system_prompt: true or fix data.chat_template")
    answer = full_text[len(prompt_text):]
    if eos not in answer:
        raise RecipeCheckFailed(f"{source}: the trained answer {answer[-40:]!r} never reaches the EOS {eos!r}, so the "
                                "model does not learn to stop; set training.eos_token to the template's end-of-turn "
                                "token")


def check_recipe(path: Path, arch_dir: Path, data: Path, out: Path) -> dict:
    """The recipe CI for one file: validate as written, check the chat template, train 2 steps, save, merge."""
    from safetensors import safe_open

    from sft_lora.run import train

    validate(path)
    recipe = validate(path, ci_overrides(arch_dir, data, out))
    check_chat_template(recipe)
    summary = train(recipe)
    adapters, merged = Path(summary["adapters"]), Path(summary["merged"])
    with safe_open(adapters / "adapter_model.safetensors", "pt") as weights:
        keys = list(weights.keys())
        dtypes = {str(weights.get_tensor(key).dtype) for key in keys if "lora_" in key}
    if not any("lora_A" in key for key in keys):
        raise RecipeCheckFailed(f"{path}: the saved adapter holds no LoRA weights")
    # TRL casts the adapter to bf16 only on a quantized base: the trace that QLoRA really trained on 4-bit weights.
    expected_dtype = {"torch.bfloat16"} if recipe.use_qlora else {"torch.float32"}
    if dtypes != expected_dtype:
        raise RecipeCheckFailed(f"{path}: adapter weights are {sorted(dtypes)}, expected {sorted(expected_dtype)}: "
                                f"use_qlora={recipe.use_qlora} did not train the base it promises")
    if any("vision" in key for key in keys):
        raise RecipeCheckFailed(f"{path}: LoRA adapters landed on the vision tower; restrict lora.target_modules "
                                "to the language model")
    info = json.loads((merged / "merge_info.json").read_text(encoding="utf-8"))
    expected = "dequantized 4-bit base" if recipe.use_qlora else "original base weights"
    if info["merged_into"] != expected:
        raise RecipeCheckFailed(f"{path}: merged into the {info['merged_into']}, expected the {expected}")
    return {"recipe": recipe, "summary": summary, "adapter_keys": keys,
            "merged_config": json.loads((merged / "config.json").read_text(encoding="utf-8"))}


def test_every_family_has_a_lora_and_a_qlora_recipe():
    by_family: dict[str, set[bool]] = {}
    for path in RECIPES:
        by_family.setdefault(family_of(path), set()).add(load_recipe(path).use_qlora)
    real = {name: methods for name, methods in by_family.items() if name != "tiny"}
    assert len(real) >= 6, sorted(real)
    lacking = {name: "a -qlora.yaml" if False in methods else "a -lora.yaml" for name, methods in real.items()
               if methods != {True, False}}
    assert not lacking, f"each family ships a LoRA and a QLoRA recipe; add: {lacking} (docs/adding-a-model.md)"


def test_a_hub_recipe_needs_its_data_named(monkeypatch):
    # the hub recipes read ${SFT_DATA:-data/sample.jsonl}: a run that forgot to export it trained an 8B model on the
    # 224 sample records, exit 0
    monkeypatch.delenv("SFT_DATA")
    for path in [p for p in RECIPES if family_of(p) != "tiny"]:
        with pytest.raises(RecipeError, match=r"data.path uses \$\{SFT_DATA\} but SFT_DATA is not set"):
            load_recipe(path)
        assert load_recipe(path, [f"data.path={ROOT / 'data' / 'chat.jsonl'}"]).data.path.endswith("chat.jsonl")


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def test_recipe(path, tiny_arch, ci_data, tmp_path):
    family = family_of(path)
    try:
        result = check_recipe(path, tiny_arch(family), ci_data, tmp_path)
    except (RecipeError, RecipeCheckFailed) as exc:
        pytest.fail(str(exc), pytrace=False)
    assert result["summary"]["global_step"] == 2
    assert result["merged_config"]["model_type"] == FAMILIES[family].model_type


# --- The checker on deliberately broken recipes: each must fail with one clear line naming the key to fix. ---

def broken(tmp_path: Path, name: str, **sections) -> Path:
    """A copy of recipes/<name> with `sections` merged in (a None value deletes the key), written to tmp_path."""
    recipe = yaml.safe_load((ROOT / "recipes" / name).read_text(encoding="utf-8"))
    for section, values in sections.items():
        for key, value in values.items():
            if value is None:
                recipe[section].pop(key, None)
            else:
                recipe.setdefault(section, {})[key] = value
    path = tmp_path / "broken" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def failure(path: Path, family: str, tiny_arch, ci_data, tmp_path) -> str:
    with pytest.raises((RecipeError, RecipeCheckFailed)) as info:
        check_recipe(path, tiny_arch(family), ci_data, tmp_path / "run")
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))
    assert not (tmp_path / "run" / "final").exists(), "nothing may be trained or saved"
    return message


def test_renamed_upstream_key_fails_with_file_line_and_the_new_name(tmp_path, tiny_arch, ci_data):
    # TRL renamed max_seq_length to max_length; alignment-handbook recipes still carry the old name.
    path = broken(tmp_path, "llama3/8b-lora.yaml", training={"max_seq_length": 2048, "max_length": None})
    message = failure(path, "llama3", tiny_arch, ci_data, tmp_path)
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "max_seq_length" in text)
    assert message.startswith(f"{path}:{line}: unknown key 'max_seq_length' in section 'training'")
    assert "did you mean 'max_length'?" in message


def test_key_deprecated_upstream_fails_before_it_is_removed(tmp_path, tiny_arch, ci_data):
    path = broken(tmp_path, "llama3/8b-lora.yaml", training={"pad_token": "<|eot_id|>"})
    message = failure(path, "llama3", tiny_arch, ci_data, tmp_path)
    assert "deprecated upstream" in message and "pad_token" in message


@pytest.mark.parametrize("name, family, targets, expected", [
    # Phi-3/4 fuse attention and MLP: the names of a Llama recipe match nothing.
    ("phi4-mini/3.8b-lora.yaml", "phi4-mini", ["q_proj", "v_proj"],
     "lora.target_modules: 'q_proj', 'v_proj' match no module of "),
    # EXAONE's remote-code names: q/k/v still match, so PEFT alone would silently train attention only.
    ("exaone/7.8b-qlora.yaml", "exaone", ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc_0", "c_fc_1", "c_proj"],
     "lora.target_modules: 'out_proj', 'c_fc_0', 'c_fc_1', 'c_proj' match no module of "),
    ("gemma3/12b-lora.yaml", "gemma3", r".*text_model.*\.(q_proj|v_proj)",
     r"lora.target_modules: the regex '.*text_model.*\\.(q_proj|v_proj)' matches no module of "),
])
def test_wrong_target_modules_fail_before_loading_and_list_the_real_layers(tmp_path, tiny_arch, ci_data, name,
                                                                           family, targets, expected):
    path = broken(tmp_path, name, lora={"target_modules": targets})
    message = failure(path, family, tiny_arch, ci_data, tmp_path)
    assert expected in message, message
    linear = {"phi4-mini": "down_proj, gate_up_proj, lm_head, o_proj, qkv_proj",
              "exaone": "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"}
    assert linear.get(family, "q_proj") in message


def test_peft_alone_accepts_a_partly_wrong_target_list(tiny_arch):
    # Why the library checks every entry: PEFT raises only when nothing matches.
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_arch("exaone"))
    peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "c_fc_0", "c_proj"]))
    wrapped = {name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == {"q_proj"}


@pytest.mark.parametrize("name, family, sections, expected", [
    # Gemma's tokenizer EOS is <eos>, which its template never writes after an answer.
    ("gemma3/12b-qlora.yaml", "gemma3", {"training": {"eos_token": None}}, "never reaches the EOS '<eos>'"),
    ("hyperclovax-seed/14b-lora.yaml", "hyperclovax-seed", {"training": {"eos_token": None}},
     "set training.eos_token to the template's end-of-turn token"),
    # Mistral keeps a system message only in the last user turn: gone once the answer follows.
    ("mistral/7b-lora.yaml", "mistral", {"data": {"fold_system_prompt": None}},
     "the chat template drops the system prompt; set data.fold_system_prompt: true"),
])
def test_family_quirk_left_out_of_the_recipe_fails(tmp_path, tiny_arch, ci_data, name, family, sections, expected):
    message = failure(broken(tmp_path, name, **sections), family, tiny_arch, ci_data, tmp_path)
    assert expected in message, message


def test_template_that_renders_the_prompt_differently_fails(tmp_path, tiny_arch, ci_data):
    # The generation prompt ends "A:\n" but a rendered answer follows "A: ": TRL would then train the answer
    # after a context the model never sees at inference.
    template = tmp_path / "drift.jinja"
    template.write_text("{% for m in messages %}{% if m.role == 'assistant' %}A: {{ m.content }}{{ eos_token }}"
                        "{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}"
                        "{% if add_generation_prompt %}A:\n{% endif %}")
    path = broken(tmp_path, "llama3/8b-lora.yaml", data={"chat_template": str(template)})
    message = failure(path, "llama3", tiny_arch, ci_data, tmp_path)
    assert "renders the prompt differently once the answer follows" in message, message


def test_lora_on_the_vision_tower_fails(tmp_path, tiny_arch, ci_data):
    # all-linear on Gemma 3 (a vision-language model) wraps the SigLIP tower too.
    path = broken(tmp_path, "gemma3/12b-lora.yaml", lora={"target_modules": "all-linear"})
    with pytest.raises(RecipeCheckFailed, match="LoRA adapters landed on the vision tower"):
        check_recipe(path, tiny_arch("gemma3"), ci_data, tmp_path / "run")


def test_target_modules_peft_rejects_are_one_line_when_the_architecture_could_not_be_checked(
        tmp_path, tiny_arch, ci_data, monkeypatch):
    import sft_lora.model

    monkeypatch.setattr(sft_lora.model, "model_modules", lambda recipe: None)  # e.g. a config behind remote code
    path = broken(tmp_path, "llama3/8b-lora.yaml", lora={"target_modules": ["wq", "wv"]})
    message = failure(path, "llama3", tiny_arch, ci_data, tmp_path)
    assert "lora.target_modules: Target modules" in message and "not found in the base model" in message


def test_a_recipe_of_an_unknown_family_says_where_to_add_it(tiny_arch):
    with pytest.raises(RecipeCheckFailed, match="no architecture facts for recipe family 'olmo'; add a FAMILIES"):
        tiny_arch("olmo")


def test_fold_system_prompt_puts_it_atop_the_user_turn():
    from sft_lora.config import DataArgs

    record = {"input": "Q?", "output": "A."}
    folded = to_examples([(1, record)], DataArgs(system_prompt="Be brief.", fold_system_prompt=True), "x")
    assert folded["prompt"][0] == [{"role": "user", "content": "Be brief.\n\nQ?"}]
    plain = to_examples([(1, record)], DataArgs(system_prompt="Be brief."), "x")
    assert plain["prompt"][0] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}]
    assert to_examples([(1, record)], DataArgs(fold_system_prompt=True), "x")["prompt"][0] == [
        {"role": "user", "content": "Q?"}]


# --- Multi-turn conversations: loss on every assistant turn's content and end-of-turn token, nothing else. ---

CONVERSATION = [("What is 2 plus 2?", "2 plus 2 is 4."), ("And 3 plus 3?", "It is 6."),
                ("한국의 수도는?", "서울입니다.")]
# What each family's template trains of one assistant turn ({} = its content), as rendered in the conversation;
# Qwen3 and Gemma 3 conversations render with TRL's training template (what TRL's assistant_only_loss does).
TRAINED_TURN = {"tiny": "{}</s>", "llama3": "{}<|eot_id|>", "qwen3": "<think>\n\n</think>\n\n{}<|im_end|>\n",
                "mistral": " {}</s>", "gemma3": "{}<end_of_turn>\n", "exaone": "{}[|endofturn|]\n",
                "hyperclovax-seed": "{}<|im_end|><|endofturn|>\n", "phi4-mini": "{}<|end|>"}
LAST_TURN_EXTRA = {"phi4-mini": "<|endoftext|>"}  # Phi-4's template closes the conversation with its EOS


def _runs(labels: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of loss-carrying labels."""
    runs, start = [], None
    for n, label in enumerate([*labels, -100]):
        if label != -100 and start is None:
            start = n
        elif label == -100 and start is not None:
            runs.append((start, n))
            start = None
    return runs


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_three_turn_conversation_trains_exactly_the_assistant_turns(family, tiny_arch, tmp_path):
    from sft_lora.data import load_datasets
    from sft_lora.model import load_tokenizer
    from sft_lora.prepare import prepare_datasets

    turns = [t for q, a in CONVERSATION for t in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    sharegpt = [{"from": {"user": "human", "assistant": "gpt"}[t["role"]], "value": t["content"]} for t in turns]
    data = tmp_path / "chat.jsonl"
    single = SAMPLE.read_text(encoding="utf-8").splitlines()[0]  # the template guard passes single turns too
    data.write_text(f"{json.dumps({'messages': turns})}\n{json.dumps({'conversations': sharegpt})}\n{single}\n",
                    encoding="utf-8")
    path = next(p for p in RECIPES if family_of(p) == family and not load_recipe(p).use_qlora)
    recipe = validate(path, ci_overrides(tiny_arch(family), data, tmp_path))
    recipe.data.system_prompt = recipe.data.system_prompt or CI_SYSTEM_PROMPT
    tokenizer = load_tokenizer(recipe.model, recipe.data)
    train = load_datasets(recipe.data)[0]
    rows = prepare_datasets(recipe.training, tokenizer, train).rows
    assert rows[0]["input_ids"] == rows[1]["input_ids"] and rows[0]["labels"] == rows[1]["labels"]  # both formats
    ids, labels = rows[0]["input_ids"], rows[0]["labels"]
    assert family in TRAINED_TURN, (f"add a TRAINED_TURN entry for family '{family}' in tests/test_recipes.py: what "
                                    "its template trains of one assistant turn ({} = its content)")
    expected = [TRAINED_TURN[family].format(a) for _, a in CONVERSATION]
    expected[-1] += LAST_TURN_EXTRA.get(family, "")
    assert [tokenizer.decode(ids[s:e]) for s, e in _runs(labels)] == expected
    assert all(label in (-100, token) for label, token in zip(labels, ids, strict=True))
    assert not any(rows["template_drift"])
    if family in ("qwen3", "gemma3"):  # TRL supports the case: its own preparation gives the same tokens and labels
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(output_dir=str(tmp_path / "trl"), assistant_only_loss=True, use_cpu=True, bf16=False,
                         report_to="none", max_length=None, eos_token=recipe.training.eos_token)
        conversation = [*train[0]["prompt"], *train[0]["completion"]]
        from datasets import Dataset

        theirs = SFTTrainer(model=str(tiny_arch(family)), args=args, processing_class=tokenizer,
                            train_dataset=Dataset.from_list([{"messages": conversation}])).train_dataset[0]
        assert (theirs["input_ids"], theirs["labels"]) == (ids, labels)


def test_the_template_guard_fails_a_template_that_drops_the_system_prompt(tmp_path, tiny_arch, ci_data):
    # Mistral v0.3 keeps the system prompt in the last user turn only: gone from the prompt once the answer follows.
    from sft_lora.data import load_datasets
    from sft_lora.model import load_tokenizer
    from sft_lora.preflight import run_check
    from sft_lora.prepare import prepare_datasets

    for fold in (None, True):  # the shipped recipe folds; without folding the guard fails
        path = broken(tmp_path / str(fold), "mistral/7b-lora.yaml",
                      data={"fold_system_prompt": fold, "system_prompt": CI_SYSTEM_PROMPT})
        recipe = validate(path, ci_overrides(tiny_arch("mistral"), ci_data, tmp_path))
        tokenizer = load_tokenizer(recipe.model, recipe.data)
        data = prepare_datasets(recipe.training, tokenizer, *load_datasets(recipe.data))
        if fold:
            assert "template" not in {name for name, _ in run_check(recipe, tokenizer, data).failures}
            continue
        with pytest.raises(RecipeError) as info:
            run_check(recipe, tokenizer, data)
        message, first = str(info.value), data.records[0]  # named by its line in the data file
        assert message.startswith("pre-flight check failed [template]: 8 of 8 training records render differently "
                                  f"once the answer follows (first: {recipe.data.path}:{first['number']}, source ")
        line = Path(recipe.data.path).read_text(encoding="utf-8").splitlines()[first["number"] - 1]
        assert json.loads(line)["input"] == first["prompt"][-1]["content"]
        assert "set data.fold_system_prompt: true" in message and "data.chat_template" in message


def test_qwen3_prompts_render_as_in_training_in_chat_and_thinking_mode_is_a_knob(tiny_arch, ci_data, tmp_path):
    # Qwen3's template takes enable_thinking: training, chat and the smoke check all render enable_thinking=False,
    # so the empty think block is prompt (no loss) and chat's prompt is token for token the trained one.
    import torch
    from transformers import PretrainedConfig

    from sft_lora.chat import generate
    from sft_lora.data import load_datasets
    from sft_lora.model import load_tokenizer
    from sft_lora.prepare import prepare_datasets
    from sft_lora.turns import template_kwargs

    path, data = ROOT / "recipes" / "qwen3" / "8b-lora.yaml", tmp_path / "think.jsonl"
    for given, answer, trained, prompt_end in (
            ({}, "4.", "4.<|im_end|>\n", "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
            ({"enable_thinking": True}, "<think>two and two</think>4.",  # the thinking mode, as the recipe says
             "<think>\ntwo and two\n</think>\n\n4.<|im_end|>\n", "<|im_start|>assistant\n")):
        data.write_text(json.dumps({"input": "2+2?", "output": answer}) + "\n", encoding="utf-8")
        recipe = validate(path, [*ci_overrides(tiny_arch("qwen3"), data, tmp_path),
                                 f"data.chat_template_kwargs={json.dumps(given)}"])
        tokenizer = load_tokenizer(recipe.model, recipe.data)
        kwargs = template_kwargs(tokenizer.chat_template, recipe.data.chat_template_kwargs)
        train = load_datasets(recipe.data)[0]
        row = prepare_datasets(recipe.training, tokenizer, train, None, kwargs).rows[0]
        start = row["prompt_length"]
        assert tokenizer.decode(row["labels"][start:]) == trained and set(row["labels"][:start]) == {-100}
        assert not row["template_drift"]
        seen: list[list[int]] = []

        class Model:  # records the prompt chat.generate feeds the model
            device, generation_config, config = "cpu", None, PretrainedConfig(max_position_embeddings=64)

            def generate(self, input_ids, seen=seen, eos=tokenizer.eos_token_id, **_):
                seen.append(input_ids[0].tolist())
                return torch.cat([input_ids, torch.tensor([[eos]])], dim=1)

        generate(Model(), tokenizer, train[0]["prompt"], 4, template_kwargs=kwargs)
        assert seen == [row["input_ids"][:start]]
        assert tokenizer.decode(seen[0]).endswith(prompt_end)
    # thinking answers without the thinking mode: the prompt's empty think block is no prefix of the answer's; the
    # failure names the knob (it named fold_system_prompt and data.chat_template alone)
    from sft_lora.preflight import run_check
    from sft_lora.prepare import load_inputs

    recipe = validate(path, ci_overrides(tiny_arch("qwen3"), data, tmp_path))
    with pytest.raises(RecipeError, match=r"^pre-flight check failed \[template\]: .*data.chat_template_kwargs: "
                       r"\{enable_thinking: true\} \(answers holding <think> blocks\)"):
        run_check(recipe, *load_inputs(recipe))
