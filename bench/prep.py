"""Data preparation throughput: records file → chat examples → `input_ids` + `labels`, TRL's own path vs ours.

    python -m bench.prep --records 100000 --repeats 3     # README's figures
    python -m bench.prep --records 1000000 --only ours    # bounded memory: peak RSS of 1 M records

Both paths read the same JSONL of real Korean/English text (records joined from data/sample.jsonl, log-normal
lengths) with the project's reader (`load_datasets`: read + validate + chat form), then TRL tokenizes, builds labels,
truncates and filters (`SFTTrainer._prepare_dataset`, what SFTTrainer runs), or `sft_lora.prepare` does it in one
batched pass into its cache. A second `ours` run in a fresh process shows the cache hit. Every run is its own
process, so peak RSS is that run's; the outputs of both paths are hashed and must be equal.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.workload import ROOT, SAMPLE, answer_spawn, cpu_model_name, real_text_records, spawn_one

MAX_LENGTH = 1024  # TRL's default


def _digest(dataset) -> str:
    """Hash of the prepared rows' input_ids and labels, whatever integer width they are stored in."""
    import numpy as np
    import pyarrow.compute as pc

    digest = hashlib.sha256()
    for batch in dataset.with_format("arrow").iter(batch_size=10_000):  # in batches: bounded memory
        for name in ("input_ids", "labels"):
            column = batch.column(name)
            digest.update(pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
            digest.update(pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
    return digest.hexdigest()


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """One preparation in this process: `trl`, `ours` (fresh cache dir) or `ours-again` (the same cache dir)."""
    from transformers import AutoTokenizer

    from sft_lora.config import DataArgs
    from sft_lora.data import load_datasets

    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    import trl.data_utils  # noqa: F401  (imports outside the timed region, for both paths)

    from sft_lora.prepare import prepare_rows, trainable

    start = time.perf_counter()
    dataset, _ = load_datasets(DataArgs(path=spec["records"]))
    formatted = time.perf_counter()
    if spec["kind"] == "trl":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(output_dir=str(Path(spec["out"]) / "trl"), max_length=MAX_LENGTH, use_cpu=True, bf16=False,
                         report_to="none", dataset_num_proc=spec.get("num_proc"))
        trainer = SFTTrainer(model=spec["tokenizer"], args=args, train_dataset=dataset.select(range(2)),
                             processing_class=tokenizer)
        formatted_trl = time.perf_counter()  # trainer construction (model load) is not preparation
        prepared = trainer._prepare_dataset(dataset, tokenizer, args, False, None, "train")
        done = time.perf_counter()
        tokenize_s = done - formatted_trl
    else:
        prepared = trainable(prepare_rows(dataset, tokenizer, MAX_LENGTH, cache=Path(spec["cache"]),
                                          num_proc=spec.get("num_proc")))
        done = time.perf_counter()
        tokenize_s = done - formatted
    rows = len(dataset)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # before hashing the output
    return {"kind": spec["kind"], "rows": rows, "rows_out": len(prepared), "format_s": formatted - start,
            "prepare_s": tokenize_s, "total_s": (formatted - start) + tokenize_s,
            "rows_per_s": rows / ((formatted - start) + tokenize_s), "prepare_rows_per_s": rows / tokenize_s,
            "peak_rss_gib": peak, "digest": _digest(prepared) if spec.get("digest", True) else None}


def records_file(n: int, out: Path) -> Path:
    path = out / f"records-{n}.jsonl"
    if not path.is_file():
        chunk = 100_000
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            for offset in range(0, n, chunk):  # in chunks: the 1 M file is written with bounded memory too
                for record in real_text_records(min(chunk, n - offset), seed=offset):
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        tmp.rename(path)
    return path


def tokenizer_dir(out: Path) -> Path:
    """The default job's tokenizer (byte-level BPE trained on data/sample.jsonl, with its chat template)."""
    from sft_lora.model import build_tiny_model

    path = out / "tokenizer"
    return path if (path / "tokenizer.json").is_file() else build_tiny_model(path, SAMPLE, hidden_size=64, layers=1)


def measure(n: int, repeats: int, out: Path, kinds: list[str], num_proc: int | None = None,
            log=print) -> dict[str, list[dict[str, Any]]]:
    out.mkdir(parents=True, exist_ok=True)
    spec = {"records": str(records_file(n, out)), "tokenizer": str(tokenizer_dir(out)), "out": str(out),
            "num_proc": num_proc}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for repeat in range(repeats):
        cache = out / f"cache-{repeat}"
        shutil.rmtree(cache, ignore_errors=True)
        for kind in kinds:
            if kind == "ours-again" and "ours" not in kinds:
                raise ValueError("ours-again reads the cache that ours writes")
            result = spawn_one("bench.prep", {**spec, "kind": kind, "cache": str(cache)}, f"prep-{kind}")
            runs[kind].append(result)
            log(f"  prep {kind} run {repeat + 1}: {result['rows_per_s']:,.0f} rows/s end to end "
                f"({result['prepare_s']:.1f} s preparing), peak RSS {result['peak_rss_gib']:.2f} GiB")
        shutil.rmtree(cache, ignore_errors=True)
    return runs


def print_table(n: int, runs: dict[str, list[dict[str, Any]]]) -> None:
    def spread(values: list[float], fmt: str) -> str:
        return " / ".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))

    label = {"trl": "TRL's own (SFTTrainer._prepare_dataset)", "ours": "sft_lora.prepare, cold",
             "ours-again": "sft_lora.prepare, cache hit (new process)"}
    print(f"\ndata preparation, {n:,} records, max_length {MAX_LENGTH}; min / median / max of "
          f"{len(next(iter(runs.values())))} runs")
    print("| path | rows/s end to end | read + chat form s | tokenize + labels + truncate s | total s | peak RSS GiB |")
    print("|---|---|---|---|---|---|")
    for kind, results in runs.items():
        cells = [spread([r["rows_per_s"] for r in results], ",.0f")]
        cells += [spread([r[key] for r in results], ".1f") for key in ("format_s", "prepare_s", "total_s")]
        cells.append(spread([r["peak_rss_gib"] for r in results], ".2f"))
        print(f"| {label[kind]} | {' | '.join(cells)} |")
    digests = {r["digest"] for results in runs.values() for r in results if r["digest"]}
    if "trl" in runs and "ours" in runs:
        ratio = statistics.median(r["rows_per_s"] for r in runs["ours"]) / statistics.median(
            r["rows_per_s"] for r in runs["trl"])
        print(f"ours/TRL (medians, end to end): {ratio:.2f}x; prepared tokens and labels "
              f"{'IDENTICAL' if len(digests) == 1 else 'DIFFER'} across paths")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if answer_spawn(argv, run_one):
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["trl", "ours"], default=None)
    parser.add_argument("--num-proc", type=int, default=None, help="dataset_num_proc for both paths")
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "bench" / "prep")
    args = parser.parse_args(argv)
    kinds = {"trl": ["trl"], "ours": ["ours", "ours-again"], None: ["trl", "ours", "ours-again"]}[args.only]
    print(f"device: {cpu_model_name()}; load average {os.getloadavg()[0]:.2f}", flush=True)
    runs = measure(args.records, args.repeats, args.out, kinds, args.num_proc)
    print_table(args.records, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
