"""The embedded tiny model: a random-init Llama and a BPE tokenizer trained on the shipped data.

Lets the default job and the tests run on a fresh machine with no GPU and no hub access.
"""

from __future__ import annotations

import json
from pathlib import Path

from .atomic import atomic_dir
from .mix import paths
from .model import DEFAULT_CHAT_TEMPLATE

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]


def build_tiny_model(out_dir: str | Path, data: str | Path | list, *, hidden_size: int = 256, layers: int = 4,
                     vocab_size: int = 2048, seed: int = 0) -> Path:
    """Write a tiny Llama (config, safetensors, tokenizer with chat template) to `out_dir`; return it. `data`: the
    .jsonl file(s) its tokenizer learns from (a `data.path` value: a path or a list of entries).

    Built in a temporary sibling and renamed, so an interrupted build never leaves a half model behind."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    texts = []
    for data_path in paths(data if isinstance(data, list) else str(data)):
        for line in Path(data_path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                turns = record.get("messages") or record.get("conversations") or []
                texts += [record.get("input", ""), record.get("output", ""),
                          *(t.get("content") or t.get("value") or "" for t in turns)]

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", model_max_length=1024)
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)

    with atomic_dir(out_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir
