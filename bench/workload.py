"""What the benchmark trains on: model shapes, a fixed-seed synthetic chat set, the MFU formula, the CPU/GPU peak.

Every figure in the benchmark's table comes from these definitions, so both paths see the same model and data.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample.jsonl"

# Architectures with random weights. `tiny` is sft_lora.model.build_tiny_model's (hidden 256 x 4 layers) with an 8k
# vocabulary; the Llama shapes are Llama-3.2-1B's and Llama-3.1-8B's configs.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 8192, "max_position_embeddings": 1024,
             "tie_word_embeddings": False},
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 4096,
                 "rope_theta": 500000.0, "tie_word_embeddings": True},
    "llama-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 4096,
                 "rope_theta": 500000.0, "tie_word_embeddings": False},
}
# The job each shape runs: batch, max_length, and the chat lengths (median words of prompt and answer, log-normal).
JOBS: dict[str, dict[str, Any]] = {
    "tiny": {"batch": 8, "max_length": 512, "prompt_median": 48, "answer_median": 96, "sigma": 0.8},
    "llama-1b": {"batch": 8, "max_length": 2048, "prompt_median": 96, "answer_median": 192, "sigma": 0.9},
    "llama-8b": {"batch": 4, "max_length": 2048, "prompt_median": 96, "answer_median": 192, "sigma": 0.9},
}
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s, the MFU denominator on GPU


def synthetic_records(n: int, seed: int = 0, prompt_median: float = 48, answer_median: float = 96,
                      sigma: float = 0.8) -> list[dict[str, str]]:
    """`n` chat records whose prompt and answer lengths (in words) are log-normal, from a Zipf vocabulary of
    pseudo-words; the same `seed` gives the same records on every machine."""
    import numpy as np

    rng = np.random.default_rng(seed)
    consonants, vowels = list("bcdfghjklmnprstvwz"), list("aeiou")
    words = sorted({"".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.integers(1, 4)))
                    for _ in range(8000)})
    weights = 1.0 / np.arange(1, len(words) + 1) ** 1.1
    weights /= weights.sum()

    def text(median: float) -> str:
        count = max(1, int(rng.lognormal(math.log(median), sigma)))
        picked = rng.choice(len(words), size=count, p=weights)
        out = []
        for i, w in enumerate(picked):
            out.append(words[w] + ("." if i % 12 == 11 else ""))
        return " ".join(out)

    return [{"input": text(prompt_median), "output": text(answer_median), "source": "synthetic"} for _ in range(n)]


def real_text_records(n: int, seed: int = 0, median_records: float = 9, sigma: float = 0.7) -> list[dict[str, str]]:
    """`n` records of real Korean/English text from data/sample.jsonl: each joins a log-normal number of sample
    questions (and answers), so lengths vary like chat data (~150 tokens on average with the tiny tokenizer)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    sample = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for _ in range(n):
        k_in, k_out = (max(1, int(rng.lognormal(math.log(median_records), sigma))) for _ in range(2))
        ins = rng.integers(0, len(sample), size=k_in)
        outs = rng.integers(0, len(sample), size=k_out)
        out.append({"input": " ".join(sample[i]["input"] for i in ins),
                    "output": " ".join(sample[i]["output"] for i in outs), "source": "sample"})
    return out


def write_jsonl(records: list[dict[str, str]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def write_json(data: Any, path: Path | None) -> None:
    """Write a benchmark's results to `path` (its folder created); nothing when no path was asked for."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1))


def spawn_one(module: str, spec: dict[str, Any], label: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one measurement as `python -m <module> _one SPEC RESULT` in a fresh process (its own heap and thread
    pool); its JSON result comes back through a file. `env` adds to the environment."""
    result = Path(spec["out"]) / f"{label}-{time.time_ns()}.json"
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(env or {})}
    done = subprocess.run([sys.executable, "-m", module, "_one", json.dumps(spec), str(result)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return json.loads(result.read_text())


def answer_spawn(argv: list[str], run_one) -> bool:
    """The child side of `spawn_one`: for `_one SPEC RESULT`, run `run_one(SPEC)` into RESULT and return True."""
    if argv[:1] != ["_one"]:
        return False
    Path(argv[2]).write_text(json.dumps(run_one(json.loads(argv[1]))))
    return True


def build_model(shape: str, data: Path, out: Path, gpu: bool) -> Path:
    """A random-init Llama of `shape` at `out` with a byte-level BPE tokenizer of 8k trained on `data`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sft_lora.model import build_tiny_model

    if (out / "config.json").is_file():
        return out
    tok_dir = build_tiny_model(out.with_name(out.name + "-tok"), data, hidden_size=64, layers=1, vocab_size=8192)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    config = dict(SHAPES[shape])
    if shape == "tiny":
        config["vocab_size"] = len(tokenizer)
    torch.manual_seed(0)
    llama = LlamaConfig(**config, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    with torch.device("cuda" if gpu else "cpu"):
        model = LlamaForCausalLM(llama).to(torch.bfloat16 if gpu else torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    if gpu:
        torch.cuda.empty_cache()  # the runs are child processes: leave them the whole card
    return out


def matmul_params(config) -> tuple[int, int]:
    """(every linear layer's weights incl. the LM head, LoRA r-16 all-linear weights) of a Llama config."""
    d, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    hd = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, i), (d, i), (i, d)]
    n_matmul = layers * sum(a * b for a, b in shapes) + d * config.vocab_size
    n_lora = layers * sum(LORA["r"] * (a + b) for a, b in shapes)
    return n_matmul, n_lora


def flops_per_token(config, mean_square_len: float) -> float:
    """The issue's formula: 4·N_matmul + 6·N_lora + 12·L·d·s̄ (s̄ = Σnᵢ²/Σnᵢ over the documents)."""
    n_matmul, n_lora = matmul_params(config)
    return 4 * n_matmul + 6 * n_lora + 12 * config.num_hidden_layers * config.hidden_size * mean_square_len


def measured_peak_flops(gpu: bool) -> tuple[float, str]:
    """Best of several large matmuls: bf16 8192³ on GPU, fp32 2048³ on CPU (this process's threads); the best
    trial, so a machine shared with other jobs still shows its ceiling."""
    import time

    import torch

    n, dtype, device = (8192, torch.bfloat16, "cuda") if gpu else (2048, torch.float32, "cpu")
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(8 if gpu else 20):
        if gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10 if gpu else 1):
            a @ b
        if gpu:
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / (10 if gpu else 1))
    name = f"{'bf16' if gpu else 'fp32'} {n}³ matmul, {'GPU' if gpu else f'{torch.get_num_threads()} CPU threads'}"
    return 2 * n**3 / best, name


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo, with the core count this process may use."""
    import os

    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {len(os.sched_getaffinity(0))} cores"
