"""`make train` on many records: peak RSS and time to the first training step, against the preparation alone.

    python -m bench.scale --records 100000            # README, Performance, Scale
    python -m bench.scale --records 100000 1000000
    python -m bench.scale --records 100000 --mix      # half {input, output} records, half 3-exchange conversations

For each size it writes `{input, output, source}` records of real Korean/English text (data/sample.jsonl joined to
log-normal lengths, ~250 tokens each with the default job's tokenizer) and runs two commands, each in a fresh
process with a fresh (cold) prepared-data cache:

- `prepare`: what the preparation alone costs — read the records, chat form, tokenize + labels + truncate
  (`load_datasets` + `prepare.prepare_datasets`), then exit;
- `train`: the real training command, `python -m sft_lora.run recipe.yaml` (the default job's tiny model,
  max_length 1024, the default pre-flight checks, no eval split), watched from outside: when its training progress
  bar appears (the training loop starts; the first step follows), its peak RSS (VmHWM) and CPU time are read from
  /proc and it is killed. Nothing in the library is patched.

Both commands tokenize in worker processes when the recipe sets `training.dataset_num_proc`: their CPU time is
counted (the reaped children's too), and a watcher samples the memory of the whole process tree every 0.2 s (PSS
summed: pages the workers share with the parent after fork are counted once), reported beside the main process's own
peak RSS.

Wall time is from the command's start (process spawn) in both. CPU time (user + system, all threads) is printed
beside it, and the load average, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from bench.workload import ROOT, SAMPLE, cpu_model_name, real_text_records, write_json

MAX_LENGTH = 1024  # TRL's default
MAX_QUESTION = 1500  # characters: ~600 tokens at most with the tiny tokenizer
STEPS = 7  # the training bar reads "0/7": distinct from the data bars
TICKS = os.sysconf("SC_CLK_TCK")


def records_file(n: int, out: Path, median_records: float) -> Path:
    """`n` records of ~`median_records` joined sample records per side, written 100k at a time. Questions are cut
    at `MAX_QUESTION` characters, so no prompt alone fills max_length (the no_loss check would stop the run)."""
    path = out / f"records-{n}-{median_records:g}-q{MAX_QUESTION}.jsonl"
    if not path.is_file():
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            for offset in range(0, n, 100_000):
                for record in real_text_records(min(100_000, n - offset), seed=offset, median_records=median_records):
                    record["input"] = record["input"][:MAX_QUESTION]
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        tmp.rename(path)
    return path


def write_recipe(out: Path, records: Path | list, model: Path, num_proc: int | None = None) -> Path:
    """The default job (recipes/tiny.yaml) on `records` (a file or a `data.path` list): max_length 1024, no eval
    split, outputs under `out`."""
    recipe = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text(encoding="utf-8"))
    recipe["model"].update(name_or_path=str(model), build_tiny=False)
    recipe["data"].update(path=records if isinstance(records, list) else str(records), eval_split=0)
    recipe["training"].update(max_length=MAX_LENGTH, max_steps=STEPS, save_steps=1000, dataset_num_proc=num_proc)
    recipe["output"].update(dir=str(out / "final_model"), checkpoint_dir=str(out / "checkpoints"))
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    return path


def prepare_only(recipe_path: str) -> dict[str, Any]:
    """In this process: the preparation alone, as `sft_lora.run` does it before the report."""
    import resource

    import pyarrow.compute as pc

    from sft_lora.config import load_recipe
    from sft_lora.data import load_datasets
    from sft_lora.model import load_tokenizer
    from sft_lora.prepare import LENGTH, prepare_datasets

    recipe = load_recipe(recipe_path)
    args = recipe.training  # the resolved SFTConfig
    train_set, eval_set = load_datasets(recipe.data, seed=args.seed)
    data = prepare_datasets(args, load_tokenizer(recipe.model, recipe.data), train_set, eval_set)
    usage, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"rows": len(data.rows), "tokens": pc.sum(data.rows.data.column(LENGTH)).as_py(),
            "cpu_s": usage.ru_utime + usage.ru_stime + workers.ru_utime + workers.ru_stime,
            "peak_rss_gib": usage.ru_maxrss / 2**20}


class TreeMemory(threading.Thread):
    """Samples the PSS summed over a process and its descendants until stopped; `peak_gib` is the largest sum."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak_gib, self.done = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            self.peak_gib = max(self.peak_gib, sum(map(_pss_kib, _tree(self.pid))) / 2**20)

    def stop(self) -> float:
        self.done.set()
        self.join()
        return self.peak_gib


def _tree(pid: int) -> list[int]:
    try:
        children = [int(c) for t in Path(f"/proc/{pid}/task").iterdir()
                    for c in (t / "children").read_text().split()]
    except OSError:  # the process ended between two reads
        return []
    return [pid, *(p for c in children for p in _tree(c))]


def _pss_kib(pid: int) -> int:
    try:
        return int(re.search(r"^Pss:\s+(\d+) kB", Path(f"/proc/{pid}/smaps_rollup").read_text(), re.M)[1])
    except (OSError, TypeError):
        return 0


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "SFT_LORA_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
            "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def measure_prepare(recipe: Path, cache: Path) -> dict[str, Any]:
    result = cache.with_suffix(".json")
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "bench.scale", "_prepare", str(recipe), str(result)], cwd=ROOT,
                             env=_env(cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watch = TreeMemory(child.pid)
    watch.start()
    if child.wait():
        raise RuntimeError(f"the preparation alone failed (exit {child.returncode}): {recipe}")
    return {"wall_s": time.perf_counter() - start, "tree_pss_gib": watch.stop(), **json.loads(result.read_text())}


def measure_train(recipe: Path, cache: Path, log: Path) -> dict[str, Any]:
    """Run the training command until its training bar appears; its peak RSS and CPU time then."""
    bar = re.compile(rf"(?<![\d/])0/{STEPS} \[".encode())
    start = time.perf_counter()
    with log.open("wb") as sink:
        child = subprocess.Popen([sys.executable, "-m", "sft_lora.run", str(recipe)], cwd=ROOT, env=_env(cache),
                                 stdout=sink, stderr=subprocess.PIPE)
        seen, watch = b"", TreeMemory(child.pid)
        watch.start()
        while chunk := os.read(child.stderr.fileno(), 65536):
            sink.write(chunk)
            seen = seen[-200:] + chunk
            if bar.search(seen):
                wall = time.perf_counter() - start
                status = Path(f"/proc/{child.pid}/status").read_text()
                stat = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
                tree = watch.stop()
                child.send_signal(signal.SIGKILL)  # not SIGTERM: that would save a checkpoint first
                child.wait()
                kib = {k: int(v) / 2**20 for k, v in re.findall(r"(VmHWM|RssAnon|RssFile):\s+(\d+) kB", status)}
                return {"wall_s": wall, "cpu_s": sum(map(int, stat[11:15])) / TICKS,  # its own, reaped children's
                        "peak_rss_gib": kib["VmHWM"], "anon_gib": kib["RssAnon"], "file_gib": kib["RssFile"],
                        "tree_pss_gib": tree}
    raise RuntimeError(f"the training command ended (exit {child.wait()}) before its first step; see {log}")


def run(n: int, out: Path, median_records: float, mix: bool = False, num_proc: int | None = None) -> dict[str, Any]:
    from bench.turns import conversations_file
    from sft_lora.model import build_tiny_model

    out.mkdir(parents=True, exist_ok=True)
    model = out / "tiny-llama"
    if not (model / "config.json").is_file():
        build_tiny_model(model, SAMPLE)  # the default job's model and tokenizer
    records: Path | list = records_file(n, out, median_records)
    if mix:  # n records: half the file (weight 0.5, drawn by seed) and as many conversations (default template)
        records = [{"path": str(records), "weight": 0.5}, str(conversations_file(n // 2, out, MAX_QUESTION))]
    work = out / f"run-{n}{'-mix' if mix else ''}"
    work.mkdir(exist_ok=True)
    recipe = write_recipe(work, records, model, num_proc)
    stamp = time.time_ns()
    load = os.getloadavg()[0]
    prepare = measure_prepare(recipe, work / f"cache-prepare-{stamp}")
    train = measure_train(recipe, work / f"cache-train-{stamp}", work / f"train-{stamp}.log")
    return {"records": n, "load_before": load, "load_after": os.getloadavg()[0], "prepare": prepare,
            "train": train, "ratio": train["wall_s"] / prepare["wall_s"]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_prepare"]:
        Path(argv[2]).write_text(json.dumps(prepare_only(argv[1])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[100_000])
    parser.add_argument("--median-records", type=float, default=15,
                        help="sample records joined per prompt and per answer (15: ~250 tokens a record)")
    parser.add_argument("--mix", action="store_true", help="half the records as 3-exchange conversations")
    parser.add_argument("--num-proc", type=int, default=None, help="training.dataset_num_proc (default: one process)")
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "bench" / "scale")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    print(f"device: {cpu_model_name()}, {memory:.0f} GiB", flush=True)
    print("| records | tokens/record | preparation alone: wall s (CPU s), peak RSS GiB (process tree PSS) | make "
          "train to the first step: wall s (CPU s), peak RSS GiB (process tree PSS) | ratio | load average |")
    print("|---|---|---|---|---|---|")
    results = []
    for n in args.records:
        r = run(n, args.out, args.median_records, args.mix, args.num_proc)
        results.append(r)
        p, t = r["prepare"], r["train"]
        print(f"| {n:,} | {p['tokens'] / p['rows']:.0f} | {p['wall_s']:.1f} ({p['cpu_s']:.1f}), "
              f"{p['peak_rss_gib']:.2f} ({p['tree_pss_gib']:.2f}) | {t['wall_s']:.1f} ({t['cpu_s']:.1f}), "
              f"{t['peak_rss_gib']:.2f} ({t['tree_pss_gib']:.2f}) | "
              f"{r['ratio']:.2f}x | {r['load_before']:.1f} → {r['load_after']:.1f} |", flush=True)
    write_json(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
