"""Run the shipped accelerate configs on one GPU (or the CPU) for a few steps each: train, save, reload.

    python bench/distributed_check.py --shape llama-1b --out /tmp/dist      # on the GPU machine
    python bench/distributed_check.py --shape tiny --out /tmp/dist          # on CPU, to test this script

For each of single_gpu, zero2, zero3 and zero3 + QLoRA it launches `python -m sft_lora.run` with the shipped
config (one process), reloads the saved adapter onto the base model (4-bit for QLoRA) and checks a forward pass,
then prints tokens/s and peak memory per config and writes them to OUT/distributed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # Llama-3.2-1B's architecture; tiny = the same family at test size
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 4096},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 2048, "max_position_embeddings": 1024},
}
RUNS = {"single_gpu": ("single_gpu", False), "zero2": ("zero2", False), "zero3": ("zero3", False),
        "zero3_qlora": ("zero3", True)}


def build_model(shape: str, out: Path) -> Path:
    """A random-init Llama of `shape` with the tiny tokenizer (its ids fit any vocab of at least 2,048)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sft_lora.model import build_tiny_model

    tokenizer_dir = build_tiny_model(out / "tokenizer", ROOT / "data" / "sample.jsonl", hidden_size=64, layers=1)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(**SHAPES[shape], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return out / "model"


def run_one(name: str, model: Path, out: Path, steps: int, gpu: bool) -> dict:
    config_name, qlora = RUNS[name]
    config = yaml.safe_load((ROOT / "accelerate_configs" / f"{config_name}.yaml").read_text())
    config.update(num_processes=1, mixed_precision="bf16" if gpu else "no")
    (out / name).mkdir(parents=True, exist_ok=True)
    config_path = out / name / "accelerate.yaml"
    config_path.write_text(yaml.safe_dump(config))
    recipe = {
        "use_qlora": qlora, "accelerate_config": str(config_path),
        "model": {"name_or_path": str(model), "dtype": "bfloat16" if gpu else "float32", "name": name},
        "data": {"path": str(ROOT / "data" / "sample.jsonl")},
        "training": {"max_steps": steps, "per_device_train_batch_size": 8, "learning_rate": 1.0e-4,
                     "logging_steps": 1, "save_steps": steps, "report_to": "none", "bf16": gpu,
                     "activation_checkpointing": False, "max_length": 512},
        "output": {"dir": str(out / name / "final"), "checkpoint_dir": str(out / name / "ckpt"), "merge": False},
        "report": {"smoke_prompts": 0},  # the reload below checks the saved adapter; generation would only cost time
    }
    if qlora:
        recipe["quantization"] = {"bnb_4bit_quant_storage": "bfloat16"}  # required under ZeRO-3 (checked)
    recipe_path = out / name / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(out / "torch_extensions"), "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-m", "sft_lora.run", str(recipe_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    (out / name / "log.txt").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return {"config": name, "ok": False, "error": (done.stdout + done.stderr)[-800:]}
    tokens = [float(t) for t in re.findall(r"'num_tokens': '([0-9.e+]+)'", done.stdout + done.stderr)]
    runtime = float(re.search(r"trained to step \d+ in ([0-9.]+) s", done.stdout).group(1))
    peak = float(re.search(r"peak memory:\s+([0-9.]+) GiB", done.stdout).group(1))
    adapters = next((out / name / "final").rglob("adapter_model.safetensors")).parent
    return {"config": name, "ok": True, "tokens_per_s": (tokens[-1] if tokens else 0) / runtime,
            "peak_gib": peak, "reload_ok": reload_and_forward(model, adapters, qlora)}


def reload_and_forward(model: Path, adapters: Path, qlora: bool) -> bool:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.bfloat16) if qlora else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(model, quantization_config=quantization, device_map=device)
    tuned = PeftModel.from_pretrained(base, adapters).eval()
    batch = AutoTokenizer.from_pretrained(adapters)(["What is 3 plus 4?"], return_tensors="pt").to(device)
    with torch.no_grad():
        logits = tuned(**batch).logits
    return bool(torch.isfinite(logits).all())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--out", type=Path, default=Path("/tmp/sft_lora_distributed"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--configs", default=",".join(RUNS))
    args = parser.parse_args()
    import torch

    gpu = torch.cuda.is_available()
    args.out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.shape, args.out)
    device = torch.cuda.get_device_name() if gpu else "CPU"
    results = []
    for name in args.configs.split(","):  # written after each config: a run cut short keeps what finished
        results.append(run_one(name, model, args.out, args.steps, gpu))
        (args.out / "distributed.json").write_text(json.dumps({"device": device, "shape": args.shape,
                                                               "results": results}, indent=2))
    print(f"\n{args.shape} on {device}, {args.steps} steps each")
    print(f"{'config':<14}{'ok':<6}{'tokens/s':>10}{'peak GiB':>10}  reload")
    for r in results:
        if r["ok"]:
            print(f"{r['config']:<14}{'yes':<6}{r['tokens_per_s']:>10.0f}{r['peak_gib']:>10.2f}  {r['reload_ok']}")
        else:
            print(f"{r['config']:<14}FAILED  {r['error'][-300:]}")
    sys.exit(0 if all(r["ok"] and r["reload_ok"] for r in results) else 1)


if __name__ == "__main__":
    main()
