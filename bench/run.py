"""Train the same model on the same data through plain TRL and through the project's recipe, side by side.

    python -m bench.run                                   # CPU: tiny shape + data preparation (make bench)
    python -m bench.run --shape llama-1b llama-8b --qlora # GPU: see README, Performance, for the full command

(a) `plain`: `trl.SFTTrainer` with its defaults (on CPU only `bf16=False, use_cpu=True`, so it runs); (b) `recipe`:
the project's path (`load_recipe` → `load_datasets` → `load_tokenizer` → `build_trainer`) with the library defaults.
Both get the same job (model, records, batch, max_length, learning rate, seed, LoRA r16 all-linear) and nothing
else. Each measurement runs in its own process (clean peak memory); the table shows min/median/max over repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from bench.workload import (
    H100_BF16_PEAK,
    JOBS,
    LORA,
    ROOT,
    answer_spawn,
    build_model,
    cpu_model_name,
    flops_per_token,
    measured_peak_flops,
    spawn_one,
    synthetic_records,
    write_json,
    write_jsonl,
)

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
# The paths `--paths` can name: which trainer builds the run and what it sets on top of the job. `plain-best` is
# plain TRL's best honest configuration on a big card: its own packing (bfd, padding-free) and no activation
# checkpointing (every job here fits without it); the `recipe-*` variants change only the attention.
PATHS: dict[str, tuple[str, dict[str, Any]]] = {
    "plain": ("plain", {}),
    "plain-best": ("plain", {"packing": True, "activation_checkpointing": False}),
    "recipe": ("recipe", {}),
    "recipe-sdpa": ("recipe", {"model.attn_implementation": "sdpa"}),
    "recipe-flex": ("recipe", {"model.attn_implementation": "flex_attention"}),
}


# ---------------------------------------------------------------------------------------------------- one run


def _messages(record: dict[str, str]) -> dict[str, Any]:
    return {"prompt": [{"role": "user", "content": record["input"]}],
            "completion": [{"role": "assistant", "content": record["output"]}]}


def plain_trainer(spec: dict[str, Any]):
    """TRL's SFTTrainer as its docs show it: model path, SFTConfig with the job's values, LoraConfig."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, BitsAndBytesConfig, set_seed
    from trl import SFTConfig, SFTTrainer

    records = [json.loads(line) for line in Path(spec["data"]).read_text(encoding="utf-8").splitlines()]
    dataset = Dataset.from_list([_messages(r) for r in records])
    gpu = spec["gpu"]
    kwargs = dict(output_dir=str(Path(spec["out"]) / "plain"), max_steps=spec["steps"],
                  per_device_train_batch_size=spec["batch"], learning_rate=spec["lr"], max_length=spec["max_length"],
                  logging_steps=1, save_strategy="no", report_to="none", seed=42, disable_tqdm=True)
    if not gpu:
        kwargs.update(bf16=False, use_cpu=True)  # TRL's bf16 default needs a GPU; fp32 is what a CPU runs fast
    else:
        kwargs["model_init_kwargs"] = {"dtype": "bfloat16"}  # TRL's float32 default would double an 8B's memory
    kwargs.update(spec.get("plain_set", {}))
    kwargs.update(PATHS[spec.get("path", "plain")][1])
    quantization = None
    if spec["qlora"]:
        import torch

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    set_seed(42)  # the LoRA A matrices are drawn before Trainer seeds: same draw in both paths
    return SFTTrainer(model=spec["model"], args=SFTConfig(**kwargs), train_dataset=dataset,
                      processing_class=AutoTokenizer.from_pretrained(spec["model"]),
                      peft_config=LoraConfig(**LORA, task_type="CAUSAL_LM"), quantization_config=quantization)


def recipe_for(spec: dict[str, Any]) -> Path:
    """The job as a recipe: only what the job fixes; every performance setting is the library's default."""
    out = Path(spec["out"]) / "recipe"
    recipe = {
        "use_qlora": spec["qlora"],
        "model": {"name_or_path": spec["model"], "dtype": "bfloat16" if spec["gpu"] else "float32"},
        "data": {"path": spec["data"]},
        "lora": {k: v for k, v in LORA.items() if k != "target_modules"},
        "training": {"max_steps": spec["steps"], "per_device_train_batch_size": spec["batch"],
                     "learning_rate": spec["lr"], "max_length": spec["max_length"], "logging_steps": 1,
                     "save_strategy": "no", "report_to": "none", "seed": 42, "disable_tqdm": True},
        "output": {"dir": str(out / "final"), "checkpoint_dir": str(out / "ckpt"), "merge": False},
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def recipe_trainer(spec: dict[str, Any]):
    from transformers import set_seed

    from sft_lora.config import load_recipe
    from sft_lora.data import load_datasets
    from sft_lora.model import load_tokenizer
    from sft_lora.trainer import build_trainer

    overrides = {**spec.get("recipe_set", {}), **PATHS[spec.get("path", "recipe")][1]}
    recipe = load_recipe(recipe_for(spec), [f"{k}={v}" for k, v in overrides.items()])
    train_set, _ = load_datasets(recipe.data, seed=42)
    tokenizer = load_tokenizer(recipe.model, recipe.data)
    set_seed(42)
    return build_trainer(recipe, tokenizer, train_set)


def _batch_documents(batch: dict[str, Any]) -> list[int]:
    """Real (non-pad) lengths of the documents in a collated batch: padded rows or one padding-free row."""
    if "attention_mask" in batch:
        return [int(n) for n in batch["attention_mask"].sum(dim=1).tolist()]
    position_ids = batch["position_ids"][0]
    starts = (position_ids == 0).nonzero().flatten().tolist() + [position_ids.numel()]
    return [b - a for a, b in zip(starts, starts[1:], strict=False) if b > a]


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Build one path's trainer, train `steps`, time the steps after `warmup`; return the figures."""
    import resource

    import torch
    from transformers import TrainerCallback

    gpu = spec["gpu"]
    decisions = _LogLines("sft_lora", "activation checkpointing")
    t0 = time.perf_counter()
    trainer = plain_trainer(spec) if PATHS[spec["path"]][0] == "plain" else recipe_trainer(spec)
    build_s = time.perf_counter() - t0
    documents: list[list[int]] = []
    collate = trainer.data_collator

    def counting_collator(features):
        batch = collate(features)
        documents.append(_batch_documents(batch))
        return batch

    trainer.data_collator = counting_collator
    stamps: list[tuple[float, float]] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if gpu:
                torch.cuda.synchronize()
            stamps.append((time.perf_counter(), time.process_time()))

    trainer.add_callback(Stamp())
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    warmup, steps = spec["warmup"], spec["steps"]
    timed = documents[warmup:steps]  # the dataloader may fetch one batch ahead: count the trained steps only
    tokens = sum(sum(d) for d in timed)
    squares = sum(n * n for d in timed for n in d)
    seconds = stamps[steps - 1][0] - stamps[warmup - 1][0]
    cpu_seconds = stamps[steps - 1][1] - stamps[warmup - 1][1]
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    args = trainer.args
    peak = (torch.cuda.max_memory_allocated() / 2**30 if gpu
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return {"path": spec["path"], "tokens_per_s": tokens / seconds, "tokens": tokens, "seconds": seconds,
            "tokens_per_cpu_s": tokens / cpu_seconds,
            "mean_square_len": squares / tokens, "peak_gib": peak, "losses": losses, "build_s": build_s,
            "checkpointing_rule": decisions.lines,
            "settings": {"padding_free": getattr(trainer, "padding_free", None), "packing": args.packing,
                         "activation_checkpointing": args.activation_checkpointing, "optim": str(args.optim),
                         "bf16": args.bf16, "attn": trainer.model.config._attn_implementation}}


class _LogLines:
    """Collects the messages of `logger` (and its children) that contain `needle`: the library's logged decisions."""

    def __init__(self, logger: str, needle: str) -> None:
        import logging

        self.lines: list[str] = []
        handler = logging.Handler(logging.INFO)
        handler.emit = lambda record: needle in record.getMessage() and self.lines.append(record.getMessage())
        log = logging.getLogger(logger)
        log.setLevel(min(log.level or logging.INFO, logging.INFO))
        log.addHandler(handler)


# ------------------------------------------------------------------------------------------------ orchestration


def spawn(spec: dict[str, Any], jemalloc: bool, threads: int | None = None) -> dict[str, Any]:
    """One measurement in a fresh process (`workload.spawn_one`), with jemalloc and the thread count asked for."""
    env = {"TOKENIZERS_PARALLELISM": "false", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    if jemalloc:
        env.update(LD_PRELOAD=JEMALLOC, MALLOC_CONF="dirty_decay_ms:-1,muzzy_decay_ms:-1")
    return spawn_one("bench.run", spec, f"result-{spec['path']}", env)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if answer_spawn(argv, run_one):
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs="+", default=["tiny"], choices=list(JOBS))
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "bench")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: 16 tiny, 40 GPU)")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the timed ones")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--records", type=int, default=4000, help="synthetic training records")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--qlora", action="store_true", help="also run QLoRA (every shape but llama-1b)")
    parser.add_argument("--jemalloc", choices=["auto", "on", "off"], default="auto",
                        help="preload jemalloc into both paths' processes (auto: when installed)")
    parser.add_argument("--paths", default="plain,recipe", help=f"comma-separated, of: {', '.join(PATHS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in both paths (default: torch's)")
    parser.add_argument("--prep-records", type=int, default=20_000,
                        help="also time data preparation on this many real-text records (0: skip; CPU only)")
    parser.add_argument("--prep-repeats", type=int, default=1)
    parser.add_argument("--set-plain", action="append", default=[], help="key=value into the plain SFTConfig")
    parser.add_argument("--set-recipe", action="append", default=[], help="section.key=value recipe override")
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    args = parser.parse_args(argv)
    import torch

    gpu = torch.cuda.is_available()
    jemalloc = args.jemalloc == "on" or (args.jemalloc == "auto" and not gpu and Path(JEMALLOC).is_file())
    device = torch.cuda.get_device_name() if gpu else cpu_model_name()
    if args.threads and not gpu:
        torch.set_num_threads(args.threads)
    peak_flops, peak_name = measured_peak_flops(gpu)
    print(f"device: {device}; measured peak {peak_flops / 1e12:.2f} TFLOP/s ({peak_name})"
          f"{'; jemalloc preloaded' if jemalloc else ''}; load average {os.getloadavg()[0]:.2f}", flush=True)
    report: dict[str, Any] = {"device": device, "peak_flops": peak_flops, "peak_name": peak_name,
                              "jemalloc": jemalloc, "load_before": os.getloadavg(), "shapes": {}}
    for shape in args.shape:
        job = JOBS[shape]
        out = args.out / shape
        data = write_jsonl(synthetic_records(args.records, seed=0, prompt_median=job["prompt_median"],
                                             answer_median=job["answer_median"], sigma=job["sigma"]),
                           out / "synthetic.jsonl")
        model = build_model(shape, data, out / "model", gpu)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
        variants = [(shape, False)] + ([(shape + "-qlora", True)] if args.qlora and shape != "llama-1b" else [])
        for name, qlora in variants:
            spec = {"shape": shape, "model": str(model), "data": str(data), "out": str(out), "gpu": gpu,
                    "qlora": qlora, "batch": job["batch"], "max_length": job["max_length"], "lr": args.lr,
                    "steps": args.steps or (40 if gpu else 16), "warmup": args.warmup,
                    "plain_set": dict(_kv(s) for s in args.set_plain),
                    "recipe_set": dict(s.split("=", 1) for s in args.set_recipe)}
            runs: dict[str, list[dict[str, Any]]] = {p: [] for p in args.paths.split(",")}
            for repeat in range(args.repeats):
                for path in runs:  # interleaved, so a change in machine load hits both paths alike
                    try:
                        result = spawn({**spec, "path": path}, jemalloc, args.threads)
                    except RuntimeError as exc:  # one path failing (e.g. an attention this stack lacks) is a result
                        print(f"  {name} {path} run {repeat + 1}: FAILED {str(exc)[-600:]}", flush=True)
                        report.setdefault("failed", {})[f"{name}/{path}"] = str(exc)[-3000:]
                        continue
                    result["mfu"] = result["tokens_per_s"] * flops_per_token(config, result["mean_square_len"]) / (
                        H100_BF16_PEAK if gpu else peak_flops)
                    runs[path].append(result)
                    print(f"  {name} {path} run {repeat + 1}: {result['tokens_per_s']:,.0f} tok/s "
                          f"({result['tokens_per_cpu_s']:,.0f} per CPU-s), "
                          f"peak {result['peak_gib']:.2f} GiB, final loss {_final(result):.4f}", flush=True)
            runs = {path: results for path, results in runs.items() if results}
            report["shapes"][name] = runs
            print_table(name, runs, gpu, peak_name)
            write_json(report, args.json)  # after each shape, so a run stopped by a time limit keeps what it measured
    if args.prep_records and not gpu:
        from bench import prep

        runs = prep.measure(args.prep_records, args.prep_repeats, args.out / "prep", ["trl", "ours", "ours-again"],
                            log=lambda line: print(line, flush=True))
        report["prep"] = runs
        prep.print_table(args.prep_records, runs)
    report["load_after"] = os.getloadavg()
    print(f"load average after: {report['load_after'][0]:.2f} (1 min), {report['load_after'][1]:.2f} (5 min)")
    write_json(report, args.json)
    return 0


def _kv(item: str) -> tuple[str, Any]:
    key, _, value = item.partition("=")
    return key, yaml.safe_load(value)


def _final(result: dict[str, Any], last: int = 5) -> float:
    return statistics.fmean(result["losses"][-last:])


def _median(runs: dict[str, list[dict[str, Any]]], path: str) -> float:
    return statistics.median(r["tokens_per_s"] for r in runs[path])


def _spread(values: list[float], fmt: str) -> str:
    return " / ".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


def loss_parity(plain: dict[str, Any], recipe: dict[str, Any]) -> tuple[float, float]:
    """(largest per-step relative loss difference, relative difference of the final loss) of two runs."""
    per_step = max(abs(a - b) / abs(a) for a, b in zip(plain["losses"], recipe["losses"], strict=True))
    return per_step, abs(_final(recipe) - _final(plain)) / abs(_final(plain))


def print_table(name: str, runs: dict[str, list[dict[str, Any]]], gpu: bool, peak_name: str) -> None:
    mfu_basis = "989 TFLOP/s bf16" if gpu else f"measured {peak_name}"
    print(f"\n{name}: real tokens/s, MFU (vs {mfu_basis}), peak {'GPU memory' if gpu else 'RSS'}; "
          f"min / median / max of {len(next(iter(runs.values())))} runs")
    print("| path | real tokens/s | MFU % | peak GiB | final loss | settings |\n|---|---|---|---|---|---|")
    for path, results in runs.items():
        s = results[0]["settings"]
        settings = (f"padding_free={s['padding_free']}, packing={s['packing']}, "
                    f"ckpt={s['activation_checkpointing']}, {s['attn']}, {s['optim'].split('.')[-1].lower()}")
        print(f"| {path} | {_spread([r['tokens_per_s'] for r in results], ',.0f')} | "
              f"{_spread([100 * r['mfu'] for r in results], '.2f')} | "
              f"{_spread([r['peak_gib'] for r in results], '.2f')} | "
              f"{_spread([_final(r) for r in results], '.4f')} | {settings} |")
    if "recipe" in runs and "plain-best" in runs:
        print(f"speed-up recipe/plain-best (medians): {_median(runs, 'recipe') / _median(runs, 'plain-best'):.2f}x")
    if "plain" in runs and "recipe" in runs:
        speedup = _median(runs, "recipe") / _median(runs, "plain")
        step, final = loss_parity(runs["plain"][0], runs["recipe"][0])
        ok = final <= 0.01
        print(f"speed-up recipe/plain (medians): {speedup:.2f}x; loss parity: final loss differs by "
              f"{100 * final:.3f} % (bar 1 %), largest per-step difference {100 * step:.3f} % -> "
              f"{'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    sys.exit(main())
