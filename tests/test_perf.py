"""The speed defaults change no result: packed documents stay isolated, prepared tokens equal TRL's, the prepared
dataset is cached, the LM head scores only labelled positions, and the loss matches plain TRL step by step."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from sft_lora.config import DataArgs, RecipeError, load_recipe
from sft_lora.data import load_datasets
from sft_lora.model import load_tokenizer
from sft_lora.prepare import prepare_rows, trainable
from sft_lora.trainer import build_trainer

from .conftest import ROOT, SAMPLE, to_examples

pytestmark = pytest.mark.slow
TEMPLATES = sorted((ROOT / "tests" / "chat_templates").glob("*.jinja"))


@pytest.mark.parametrize("attn", ["sdpa_documents", "sdpa", "eager"])
def test_a_packed_documents_logits_equal_its_logits_alone(tiny_model, attn):
    from transformers import AutoModelForCausalLM

    from sft_lora.decisions import register

    register()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attn).eval()
    generator = torch.Generator().manual_seed(0)
    docs = [torch.randint(10, 400, (n,), generator=generator) for n in (37, 120, 1, 64)]
    row = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]  # reset per document, as TRL's collator does
    with torch.no_grad():
        packed = model(input_ids=row, position_ids=positions, use_cache=False).logits[0]
        unreset = model(input_ids=row, use_cache=False).logits[0]
        start = 0
        for doc in docs:
            alone = model(input_ids=doc[None], use_cache=False).logits[0]
            assert (packed[start:start + len(doc)] - alone).abs().max() < 1e-4
            if start:  # without the reset, later documents attend to earlier ones: the test can tell
                assert (unreset[start:start + len(doc)] - alone).abs().max() > 1e-2
            start += len(doc)


def test_packed_documents_keep_their_sliding_window():
    from transformers import AutoModelForCausalLM, MistralConfig

    from sft_lora.decisions import register

    register()

    def model(attn: str, window: int | None):  # a config object each: from_config records the attention on it
        config = MistralConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, sliding_window=window,
                               initializer_range=0.5)  # a wide init, so the window visibly changes the logits
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()

    generator = torch.Generator().manual_seed(0)
    docs = [torch.randint(10, 400, (n,), generator=generator) for n in (37, 5, 40)]  # two longer than the window
    row, positions = torch.cat(docs)[None], torch.cat([torch.arange(len(d)) for d in docs])[None]
    windowed, unwindowed = model("sdpa", 16), model("sdpa", None)
    with torch.no_grad():
        packed = model("sdpa_documents", 16)(input_ids=row, position_ids=positions, use_cache=False).logits[0]
        several = model("sdpa_documents", 16)(input_ids=docs[2][None].repeat(2, 1), use_cache=False).logits
        start = 0
        for doc in docs:
            alone = windowed(input_ids=doc[None], use_cache=False).logits[0]
            assert (packed[start:start + len(doc)] - alone).abs().max() < 1e-4
            if len(doc) > 16:  # the window matters for this document: the test can tell
                assert (unwindowed(input_ids=doc[None], use_cache=False).logits[0] - alone).abs().max() > 1e-2
            start += len(doc)
        assert (several - alone).abs().max() < 1e-4  # several rows, no padding: each row is one document


def test_the_trainers_padding_free_batches_keep_documents_apart(make_recipe):
    recipe = load_recipe(make_recipe(data={"eval_split": 0}))
    tokenizer = load_tokenizer(recipe.model, recipe.data)
    trainer = build_trainer(recipe, tokenizer, load_datasets(recipe.data)[0])
    assert trainer.padding_free and trainer.model.config._attn_implementation == "sdpa_documents"
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    bounds = batch["cu_seq_lens_q"].tolist()
    assert len(bounds) == recipe.training.per_device_train_batch_size + 1
    model = trainer.model.eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        for start, end in zip(bounds, bounds[1:], strict=False):
            alone = model(input_ids=batch["input_ids"][:, start:end], use_cache=False).logits[0]
            assert (packed[start:end] - alone).abs().max() < 1e-4


@pytest.mark.parametrize(("cuda", "use_cpu", "named", "expected"), [
    (True, False, None, "flex_attention"),  # README, Performance, GPU table: flex_attention fastest on CUDA
    (False, True, None, "sdpa_documents"),  # CPU: flex_attention has no backward there
    (True, True, None, "sdpa_documents"),  # use_cpu on a GPU machine trains on the CPU
    (True, False, "sdpa", "sdpa"),  # a named attention is kept
])
def test_padding_free_attention_is_chosen_by_device(make_recipe, monkeypatch, cuda, use_cpu, named, expected):
    import dataclasses

    from sft_lora.decisions import _choose_attention

    recipe = load_recipe(make_recipe(model={"attn_implementation": named}))
    args = dataclasses.replace(recipe.training, use_cpu=use_cpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)  # the choice as made on a CUDA machine
    chosen = _choose_attention(recipe, args)
    assert (chosen or (args.model_init_kwargs or {}).get("attn_implementation")) == expected


@pytest.mark.parametrize(("model_type", "cuda", "expected"), [
    ("gemma2", False, "eager"), ("gemma2", True, "flex_attention"), ("stablelm", True, "sdpa")])
def test_a_model_transformers_runs_without_sdpa_attends_eagerly(make_recipe, tmp_path, monkeypatch, model_type, cuda,
                                                               expected):
    """Gemma 2 (attention softcapping): transformers refuses every sdpa attention for it, so the CPU choice,
    sdpa_documents, failed with a traceback at model load, after the data was prepared. A class without
    flex_attention (StableLM, Falcon, OLMoE …) failed so on CUDA: sdpa there, the second fastest in README's table."""
    from transformers import AutoConfig

    from sft_lora.decisions import _choose_attention

    base = tmp_path / model_type
    AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, **({"head_dim": 16} if model_type == "gemma2" else {}),
                         vocab_size=512).save_pretrained(base)
    recipe = load_recipe(make_recipe(model={"name_or_path": str(base), "build_tiny": False}))
    args = dataclasses.replace(recipe.training, use_cpu=not cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)  # on CUDA, flex_attention serves it
    assert _choose_attention(recipe, args) == expected
    if not cuda:
        assert recipe.training.model_init_kwargs["attn_implementation"] == "eager"
        assert recipe.decisions["attention"].startswith("eager (")


def test_an_attention_the_model_refuses_is_replaced_before_training_where_load_could_not_tell(
        make_recipe, tmp_path, monkeypatch, capsys):
    """Loading a recipe reads the model's class from a config already on this machine only (asking the hub made
    --print-config of a hub recipe wait 23 s without network); the trainer, which has fetched it, asks again."""
    from transformers import AutoConfig

    from sft_lora import decisions

    base = tmp_path / "gemma2"
    AutoConfig.for_model("gemma2", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, vocab_size=512).save_pretrained(base)
    asked, read = [], AutoConfig.from_pretrained.__func__
    monkeypatch.setattr(AutoConfig, "from_pretrained", classmethod(
        lambda cls, *a, **kw: asked.append(kw.get("local_files_only")) or read(cls, *a, **kw)))
    path = make_recipe(model={"name_or_path": str(base), "build_tiny": False})
    assert load_recipe(path).training.model_init_kwargs["attn_implementation"] == "eager" and asked == [True]
    with monkeypatch.context() as patched:  # as if the config were not here at load: the CPU's usual choice stands
        patched.setattr(decisions, "_model_supports", lambda recipe, flag: True)
        recipe = load_recipe(path)
    assert recipe.training.model_init_kwargs["attn_implementation"] == "sdpa_documents"
    fetched, config_here = [], decisions._config

    def config(recipe, local_files_only):  # on this machine once fetched
        if local_files_only and not fetched:
            return None
        fetched.append(True)
        return config_here(recipe, local_files_only)

    with monkeypatch.context() as patched:  # ... and fetched when the run starts
        patched.setattr(decisions, "_config", config)
        decisions.settle_attention(recipe)
    # another process of the run fetched it meanwhile: this one, finding it here, must choose alike (it kept its
    # load-time choice, and the ranks trained with different attention)
    with monkeypatch.context() as patched:
        patched.setattr(decisions, "_model_supports", lambda recipe, flag: True)
        other = load_recipe(path)
    decisions.settle_attention(other)
    assert other.training.model_init_kwargs["attn_implementation"] == "eager"
    with monkeypatch.context() as patched:  # not here and no network: hub.check_reachable's line, not the hub's wait
        patched.setattr(decisions, "_model_supports", lambda recipe, flag: True)
        unsettled = load_recipe(path)
        patched.setattr(decisions, "_config", lambda recipe, local_files_only: None)
        patched.setattr("sft_lora.hub.check_reachable", lambda recipe: (_ for _ in ()).throw(RecipeError("no hub")))
        with pytest.raises(RecipeError, match="no hub"):
            decisions.settle_attention(unsettled)
    # on the recipe, before the run's fingerprint: its checkpoints recorded sdpa_documents, and --resume refused them
    assert recipe.training.model_init_kwargs["attn_implementation"] == "eager"
    assert recipe.decisions["attention"].startswith("eager (")
    assert f"notice: {base} runs no sdpa_documents attention; padding-free rows attend with eager" in (
        capsys.readouterr().out)
    settled = recipe.training
    decisions.settle_attention(recipe)  # its config is here now: nothing more to settle
    assert recipe.training is settled


def prepare(dataset, tokenizer, max_length: int | None, **kwargs):
    """The rows TRL trains on, by sft_lora's preparation: rows truncation leaves without a label dropped."""
    return trainable(prepare_rows(dataset, tokenizer, max_length, **kwargs))


def _trl_prepared(tokenizer, dataset, max_length: int, output_dir: Path):
    """TRL's own preparation of `dataset` (what SFTTrainer does without sft_lora)."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(output_dir), max_length=max_length, use_cpu=True, bf16=False, report_to="none")
    trainer = SFTTrainer(model=tokenizer.name_or_path, args=args, train_dataset=dataset.select(range(2)),
                         processing_class=tokenizer)
    return trainer._prepare_dataset(dataset, tokenizer, args, False, None, "train")


@pytest.mark.parametrize("template", [None, *TEMPLATES], ids=lambda t: t.stem if t else "default")
def test_prepared_tokens_and_labels_equal_trls(tiny_model, template, tmp_path):
    from sft_lora.config import ModelArgs

    data = DataArgs(path=str(SAMPLE), system_prompt="Answer briefly.",
                    chat_template=str(template) if template else None,
                    fold_system_prompt=bool(template and "mistral" in template.stem))  # as recipes/mistral does

    tokenizer = load_tokenizer(ModelArgs(name_or_path=str(tiny_model)), data)
    records = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    long = {"input": " ".join(r["input"] for r in records[:12]), "output": "short answer"}  # loses its labels
    dataset = load_datasets(data)[0]
    from datasets import Dataset, concatenate_datasets

    dataset = concatenate_datasets([dataset, Dataset.from_dict(to_examples([(1, long)], data, "long"))])
    lengths = sorted(len(ids) for ids in prepare(dataset, tokenizer, None, cache=False)["input_ids"])
    max_length = lengths[len(lengths) // 2]  # cuts half the rows, and the long one to no label at all: dropped
    ours = prepare(dataset, tokenizer, max_length, cache=False)
    theirs = _trl_prepared(tokenizer, dataset, max_length, tmp_path / "trl")  # not ./unused in the repository
    assert len(ours) == len(theirs) < len(dataset)
    assert ours["input_ids"] == theirs["input_ids"]
    assert ours["labels"] == theirs["labels"]
    assert ours["source"] == theirs["source"]  # kept beside the tokens, as TRL keeps it (per-source eval, report)
    assert any(len(ids) == max_length for ids in ours["input_ids"])


def test_the_prepared_dataset_is_cached_and_a_second_run_reuses_it(tiny_model, tmp_path, monkeypatch):
    from sft_lora.config import ModelArgs

    data = DataArgs(path=str(SAMPLE))
    tokenizer = load_tokenizer(ModelArgs(name_or_path=str(tiny_model)), data)
    first = prepare(load_datasets(data)[0], tokenizer, 256, cache=tmp_path)
    assert first.cache_files and len(list(tmp_path.glob("*.arrow"))) == 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(type(tokenizer), "__call__", no_tokenizing)
    second = prepare(load_datasets(data)[0], tokenizer, 256, cache=tmp_path)  # a fresh load of the same file
    assert second.cache_files == first.cache_files and second["input_ids"] == first["input_ids"]
    with pytest.raises(AssertionError, match="tokenized again"):  # any change of the inputs is a new entry
        prepare(load_datasets(data)[0], tokenizer, 128, cache=tmp_path)


def test_a_cache_file_cut_short_or_overwritten_is_prepared_again(tiny_model, tmp_path, capsys):
    """A cache file a full disk or a crash left unreadable stopped every later run with an Arrow error (a 0-byte one:
    a traceback), naming no file; it is only a cache: said, and prepared again."""
    from sft_lora.config import ModelArgs

    data = DataArgs(path=str(SAMPLE))
    tokenizer = load_tokenizer(ModelArgs(name_or_path=str(tiny_model)), data)
    good = prepare(load_datasets(data)[0], tokenizer, 256, cache=tmp_path)
    file, rows = Path(good.cache_files[0]["filename"]), good["input_ids"]
    whole = file.read_bytes()
    for broken in (whole[:3000], b"", bytes(range(256)) * 40):
        file.unlink()  # a new file: the datasets above still map the old one
        file.write_bytes(broken)
        again = prepare(load_datasets(data)[0], tokenizer, 256, cache=tmp_path)
        assert again["input_ids"] == rows and file.read_bytes() == whole
        assert f"notice: {file}: the prepared-data cache file is unreadable" in capsys.readouterr().out


def test_a_cache_that_fills_the_disk_while_written_is_prepared_in_memory(tiny_model, tmp_path):
    """A full disk (here `ulimit -f`) while the cache file was written stopped the run with `error: File too large;
    check the paths`, naming no path; it is only a cache: said, and the rows prepared in memory."""
    import subprocess
    import sys

    from sft_lora.config import ModelArgs

    data = DataArgs(path=str(SAMPLE))
    expected = prepare_rows(load_datasets(data)[0], load_tokenizer(ModelArgs(name_or_path=str(tiny_model)), data),
                            256, cache=False)
    child = f"""if True:
        import json, resource
        from sft_lora.config import DataArgs, ModelArgs
        from sft_lora.data import load_datasets
        from sft_lora.model import load_tokenizer
        from sft_lora.prepare import prepare_rows
        data = DataArgs(path={str(SAMPLE)!r})
        tokenizer, records = load_tokenizer(ModelArgs(name_or_path={str(tiny_model)!r}), data), load_datasets(data)[0]
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # the disk is full past 4 KB
        print(json.dumps(prepare_rows(records, tokenizer, 256, cache={str(tmp_path)!r})[:]["labels"]))"""
    done = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    notice, rows = done.stdout.strip().splitlines()[-2:]
    assert notice.startswith(f"notice: {tmp_path}: cannot write the prepared-data cache (File too large); preparing "
                             "in memory")
    assert json.loads(rows) == expected[:]["labels"]


def test_training_dataset_num_proc_tokenizes_in_that_many_processes_into_the_same_rows(make_recipe, tmp_path,
                                                                                      monkeypatch):
    from sft_lora.prepare import LENGTH, LOSS, PROMPT, prepare_datasets

    recipe = load_recipe(make_recipe())
    tokenizer = load_tokenizer(recipe.model, recipe.data)
    records = load_datasets(recipe.data)[0]
    monkeypatch.setenv("SFT_LORA_CACHE", str(tmp_path / "one"))
    one = prepare_datasets(recipe.training, tokenizer, records).rows  # TRL's default: one process
    monkeypatch.setenv("SFT_LORA_CACHE", str(tmp_path / "three"))
    three = prepare_datasets(dataclasses.replace(recipe.training, dataset_num_proc=3), tokenizer, records).rows
    assert len(one.cache_files) == 1 and len(three.cache_files) == 3  # one shard per process
    for column in ("input_ids", "labels", "source", LENGTH, PROMPT, LOSS):
        assert three[column] == one[column], column


def test_a_cache_directory_that_cannot_be_written_prepares_in_memory(tiny_model, tmp_path, capsys):
    from sft_lora.config import ModelArgs

    data = DataArgs(path=str(SAMPLE))
    tokenizer = load_tokenizer(ModelArgs(name_or_path=str(tiny_model)), data)
    (tmp_path / "a-file").write_text("")
    train, evaluation = load_datasets(dataclasses.replace(data, eval_split=0.2))
    prepared = prepare(train, tokenizer, 256, cache=tmp_path / "a-file" / "cache")
    assert not prepare(evaluation, tokenizer, 256, cache=tmp_path / "a-file" / "cache").cache_files
    assert capsys.readouterr().out.count("cannot write the prepared-data cache") == 1  # said once, not per split
    assert not prepared.cache_files
    assert prepared["input_ids"] == prepare(train, tokenizer, 256, cache=False)["input_ids"]


def test_the_lm_head_scores_only_labelled_positions(make_recipe, monkeypatch):
    from trl.kernels import chunked_logprob

    recipe = load_recipe(make_recipe(data={"eval_split": 0}))
    trainer = build_trainer(recipe, load_tokenizer(recipe.model, recipe.data), load_datasets(recipe.data)[0])
    batch = next(iter(trainer.get_train_dataloader()))
    scored = []
    apply = chunked_logprob.ChunkedLogProbFunction.apply

    def spy(hidden, *args):
        scored.append(hidden.shape[0])
        return apply(hidden, *args)

    monkeypatch.setattr(chunked_logprob.ChunkedLogProbFunction, "apply", spy)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert scored == [labelled] and labelled < batch["input_ids"].numel() * 0.9  # the prompts were skipped
    assert torch.isfinite(loss)
    import trl.trainer.utils as trl_utils

    assert trl_utils._use_triton is chunked_logprob._use_triton  # TRL's module is left as it is, for everyone else


def test_the_private_trl_name_sft_lora_relies_on_is_still_there(tiny_model):
    """`trainer.TRL_DEVICE_TEST` is the one private TRL name sft_lora uses; this fails when TRL renames it."""
    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from sft_lora.trainer import TRL_DEVICE_TEST

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    add_fused_lm_head(model)
    assert TRL_DEVICE_TEST in vars(trl_utils) and TRL_DEVICE_TEST in model.forward.__func__.__code__.co_names


def test_activation_checkpointing_only_where_memory_needs_it(make_recipe):
    from sft_lora.decisions import decide_activation_checkpointing

    tiny = load_recipe(make_recipe(training={"activation_checkpointing": None}))
    decide_activation_checkpointing(tiny, None)
    assert tiny.training.activation_checkpointing is False  # a tiny model's activations fit many times over
    assert tiny.training.gradient_checkpointing is False  # the deprecated alias follows (TrainingArguments)
    assert "activation_checkpointing" in tiny.decisions  # --print-config shows the rule
    qlora = load_recipe(make_recipe(use_qlora=True, training={"activation_checkpointing": None}))
    decide_activation_checkpointing(qlora, None)
    assert qlora.training.activation_checkpointing is True  # QLoRA is chosen to save memory
    explicit = load_recipe(make_recipe(training={"activation_checkpointing": True}))
    decide_activation_checkpointing(explicit, None)
    assert explicit.training.activation_checkpointing is True  # the recipe's own choice wins
    off = load_recipe(make_recipe(use_qlora=True, training={"activation_checkpointing": False}))
    decide_activation_checkpointing(off, None)
    assert off.training.activation_checkpointing is False and "activation_checkpointing" not in off.decisions


def test_loss_matches_plain_trl_step_by_step(tiny_model, tmp_path):
    """The cheap form of the benchmark's parity check: same model, data, seed and job; plain TRL's defaults
    (padded batches, checkpointing, every position scored) against the recipe path's."""
    from bench.run import plain_trainer, recipe_trainer
    from bench.workload import synthetic_records, write_jsonl

    data = write_jsonl(synthetic_records(64, seed=3, prompt_median=12, answer_median=24), tmp_path / "d.jsonl")
    spec = {"model": str(tiny_model), "data": str(data), "out": str(tmp_path), "gpu": False, "qlora": False,
            "batch": 4, "max_length": 64, "lr": 1e-3, "steps": 4}
    losses = {}
    for name, build in (("plain", plain_trainer), ("recipe", recipe_trainer)):
        trainer = build(spec)
        trainer.train()
        losses[name] = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        settings = (trainer.padding_free, trainer.args.activation_checkpointing)
        assert settings == ((False, True) if name == "plain" else (True, False))
    assert len(losses["plain"]) == len(losses["recipe"]) == 4
    assert losses["plain"][0] != losses["plain"][-1]  # it trained
    for a, b in zip(losses["plain"], losses["recipe"], strict=True):
        assert b == pytest.approx(a, rel=1e-4)


def test_bench_documents_count_real_tokens():
    from bench.run import _batch_documents

    padded = {"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}
    flat = {"position_ids": torch.tensor([[0, 1, 2, 0, 1, 0]])}
    assert _batch_documents(padded) == [3, 2] and _batch_documents(flat) == [3, 2, 1]


def test_bench_formula_matches_the_issue(tiny_model):
    from transformers import AutoConfig

    from bench.workload import flops_per_token, matmul_params

    config = AutoConfig.from_pretrained(tiny_model)
    n_matmul, n_lora = matmul_params(config)
    d, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * d // config.num_attention_heads
    assert n_matmul == layers * (2 * d * d + 2 * d * kv + 3 * d * i) + d * config.vocab_size
    assert n_lora == layers * 16 * (4 * d + 2 * (d + kv) + 3 * (d + i))
    assert flops_per_token(config, 100.0) == 4 * n_matmul + 6 * n_lora + 12 * layers * d * 100.0
    assert Path(ROOT / "bench" / "run.py").is_file()
