"""Multi-turn preparation: conversations → `input_ids` + `labels` (loss on every assistant turn), TRL vs ours.

    python -m bench.turns --conversations 20000 --repeats 3

Conversations of 3 user/assistant exchanges of real Korean/English text (data/sample.jsonl, as bench/prep.py),
rendered with the Qwen3 chat template (the tiny BPE tokenizer dressed in Qwen3's special tokens): a template TRL
supports, so TRL's own path is `SFTTrainer._prepare_dataset` on a `messages` dataset with `assistant_only_loss`
(its training template, per-row tokenization with the assistant mask), ours `sft_lora.prepare` on the same records
read by `load_datasets`. Runs alternate (TRL, ours, TRL, …), each in its own process with 1 torch thread; both
CPU time (all threads of the process) and wall time are reported, with the load average; the outputs are hashed
and must be identical.
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

from bench.prep import _digest, tokenizer_dir
from bench.workload import ROOT, answer_spawn, cpu_model_name, real_text_records, spawn_one, write_json

MAX_LENGTH = 1024  # TRL's default
QWEN3_TOKENS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|endoftext|>")


def conversations_file(n: int, out: Path, max_question: int | None = None) -> Path:
    """`n` conversations of three exchanges; each question cut at `max_question` characters (None: whole)."""
    path = out / f"conversations-{n}{f'-q{max_question}' if max_question else ''}.jsonl"
    if not path.is_file():
        records = real_text_records(3 * n, seed=7)
        with path.open("w", encoding="utf-8") as handle:
            for k in range(n):
                turns = [t for r in records[3 * k:3 * k + 3] for t in ({"role": "user",
                                                                         "content": r["input"][:max_question]},
                                                                        {"role": "assistant", "content": r["output"]})]
                handle.write(json.dumps({"messages": turns}, ensure_ascii=False) + "\n")
    return path


def qwen3_tokenizer(out: Path) -> Path:
    from importlib import resources

    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    path = out / "qwen3-tokenizer"
    if not (path / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(out))
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN3_TOKENS],
                             special_tokens=True)
        tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
        tokenizer.chat_template = resources.files("trl").joinpath("chat_templates", "qwen3.jinja").read_text()
        tokenizer.save_pretrained(path)
    return path


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from sft_lora.config import DataArgs
    from sft_lora.data import load_datasets
    from sft_lora.prepare import prepare_rows, trainable

    torch.set_num_threads(1)
    import trl.chat_template_utils  # noqa: F401  (imported outside the timed region, for both paths)

    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    dataset = load_datasets(DataArgs(path=spec["records"]))[0]
    if spec["kind"] == "trl":
        from trl import SFTConfig, SFTTrainer

        messages = dataset.map(lambda r: {"messages": r["prompt"] + r["completion"]},
                               remove_columns=["prompt", "completion"])
        args = SFTConfig(output_dir=str(Path(spec["out"]) / "trl"), max_length=MAX_LENGTH, use_cpu=True, bf16=False,
                         report_to="none", assistant_only_loss=True)
        trainer = SFTTrainer(model=spec["model"], args=args, train_dataset=messages.select(range(2)),
                             processing_class=tokenizer)
        wall, cpu = time.perf_counter(), time.process_time()
        prepared = trainer._prepare_dataset(messages, tokenizer, args, False, None, "train")
    else:
        wall, cpu = time.perf_counter(), time.process_time()
        prepared = trainable(prepare_rows(dataset, tokenizer, MAX_LENGTH, cache=False))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"kind": spec["kind"], "rows": len(dataset), "rows_out": len(prepared), "wall_s": wall, "cpu_s": cpu,
            "load": os.getloadavg()[0], "digest": _digest(prepared.select_columns(["input_ids", "labels"]))}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if answer_spawn(argv, run_one):
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "bench" / "turns")
    parser.add_argument("--json", type=Path, default=None, help="also write the runs here")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    spec = {"records": str(conversations_file(args.conversations, args.out)), "out": str(args.out),
            "tokenizer": str(qwen3_tokenizer(args.out)), "model": str(tokenizer_dir(args.out))}
    print(f"device: {cpu_model_name()}; load average {os.getloadavg()[0]:.2f}", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {"trl": [], "ours": []}
    for repeat in range(args.repeats):
        for kind in runs:  # interleaved, so a change in the machine's load hits both
            runs[kind].append(spawn_one("bench.turns", {**spec, "kind": kind}, f"turns-{kind}",
                                        {"OMP_NUM_THREADS": "1"}))
            r = runs[kind][-1]
            print(f"  {kind} run {repeat + 1}: {r['rows']:,} conversations, CPU {r['cpu_s']:.2f} s, wall "
                  f"{r['wall_s']:.2f} s, load {r['load']:.2f}", flush=True)
    median = {k: {m: statistics.median(r[m] for r in v) for m in ("cpu_s", "wall_s")} for k, v in runs.items()}
    same = len({r["digest"] for v in runs.values() for r in v}) == 1
    print(f"ours/TRL speed-up (medians): CPU {median['trl']['cpu_s'] / median['ours']['cpu_s']:.2f}x, wall "
          f"{median['trl']['wall_s'] / median['ours']['wall_s']:.2f}x; tokens and labels "
          f"{'IDENTICAL' if same else 'DIFFER'}")
    write_json({"device": cpu_model_name(), "runs": runs, "median": median, "identical": same}, args.json)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
