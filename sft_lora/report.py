"""What a run leaves to read: `summary.json` and a loss-curve PNG beside the adapters and the console table (the
model cards are `card.py`'s).

The numbers come from the Trainer's own `state.log_history`: train losses as logged, eval losses overall
(`eval_loss`) and per source (`eval_<source>_loss`, see `trainer.py`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .atomic import atomic_file, write_atomic
from .trainer import source_metric

SUMMARY_FILE = "summary.json"
PLOT_FILE = "loss.png"


def eval_history(log_history: list[dict[str, Any]], sources: list[str]) -> dict[str, list[list[float]]]:
    """{"overall": [[step, loss], …], source: […]} from the Trainer's log history, in step order."""
    keys = {"eval_loss": "overall", **{source_metric(s) + "_loss": s for s in sources}}
    history: dict[str, list[list[float]]] = {}
    for entry in log_history:
        for key, name in keys.items():
            if key in entry:
                points = history.setdefault(name, [])
                point = [entry["step"], entry[key]]
                if point not in points:  # the final evaluation repeats the last epoch's when they share a step
                    points.append(point)
    return history


def run_numbers(trainer, result, before: dict[str, float] | None, after: dict[str, float] | None,
                sources: list[str]) -> dict[str, Any]:
    """Steps, tokens, speed, losses and per-source eval of a finished run, for the summary."""
    history = trainer.state.log_history
    tokens = getattr(trainer, "_total_train_tokens", None)  # TRL's count of non-padding tokens trained this session
    runtime = result.metrics["train_runtime"]
    evals = eval_history(history, sources)  # the eval before training is in it at step 0 (`eval_on_start`)
    overall = evals.get("overall", [])
    best = min(overall, key=lambda point: point[1]) if overall else None
    by_source = {}
    for source in sources:
        key = source_metric(source) + "_loss"
        points = evals.get(source, [])
        if points:
            by_source[source] = {"before": (before or {}).get(key), "after": (after or {}).get(key),
                                 "best": min(p[1] for p in points)}
    return {
        "global_step": result.global_step, "runtime_s": runtime, "epochs": trainer.state.epoch,
        "tokens": tokens, "tokens_per_s": tokens / runtime if tokens and runtime else None,
        "train_losses": [(log["step"], log["loss"]) for log in history if "loss" in log],
        "best_eval_loss": best[1] if best else None, "best_eval_step": best[0] if best else None,
        "eval_by_source": by_source, "eval_history": evals, "speed_settings": speed_settings(trainer),
    }


def speed_settings(trainer) -> dict[str, Any]:
    """What the trainer ran with of the settings that decide speed and memory (several are chosen by trainer.py)."""
    args = trainer.args
    return {"padding_free": bool(getattr(trainer, "padding_free", False)), "packing": bool(args.packing),
            "attention": getattr(trainer.model.config, "_attn_implementation", None),
            "activation_checkpointing": bool(args.gradient_checkpointing)}


def write_summary(directory: str | Path, summary: dict[str, Any]) -> Path:
    """Write `summary.json` and `loss.png` into `directory` (each file replaced atomically); return the JSON path."""
    directory = Path(directory)
    plot = plot_losses(summary, directory / PLOT_FILE)
    summary["plot"] = str(plot) if plot else None
    summary["summary_file"] = str(directory / SUMMARY_FILE)
    write_atomic(directory / SUMMARY_FILE, json.dumps(summary, indent=2, ensure_ascii=False, default=str) + "\n")
    return directory / SUMMARY_FILE


def plot_losses(summary: dict[str, Any], path: Path) -> Path | None:
    """Train loss, eval loss and each source's eval loss against the step, as a PNG; None with nothing to plot."""
    train = summary.get("train_losses") or []
    evals = summary.get("eval_history") or {}
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5), dpi=100)
    colours = iter([c for c in plt.get_cmap("tab10").colors if c != plt.get_cmap("tab10").colors[3]] * 10)
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], color="black", linewidth=1.8, label="train")
    for name, points in evals.items():
        overall = name == "overall"
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o", linewidth=2.2 if overall else 1.2,
                linestyle="-" if overall else "--", color="tab:red" if overall else next(colours),
                label="eval" if overall else f"eval {name}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(summary.get("title", "loss"))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path


def summary_table(summary: dict[str, Any]) -> str:
    """The end-of-run console table."""
    def num(value: Any, fmt: str = ".4f") -> str:
        return "—" if value is None else format(value, fmt)

    processes = summary.get("world_size", 1)
    lines = [f"\ntrained to step {summary['global_step']} in {summary['runtime_s']:.1f} s "
             f"on {processes} process{'es' if processes > 1 else ''}"]
    rows = [("steps", f"{summary['global_step']} ({num(summary.get('epochs'), '.2g')} epochs)")]
    if summary.get("peak_memory_gib") is not None:
        rows.append(("peak memory", f"{summary['peak_memory_gib']:.2f} GiB"))
    if summary.get("replicas_agree") is not None:
        verdict = "identical" if summary["replicas_agree"] else "DIFFER — the processes did not stay in sync"
        rows.append(("replicas", f"{verdict} on all {processes} processes"))
    if summary.get("tokens"):
        rows.append(("tokens", f"{summary['tokens']:,} in {summary['runtime_s']:.1f} s "
                               f"({num(summary.get('tokens_per_s'), ',.0f')} tokens/s)"))
    speed = summary.get("speed_settings")
    if speed:
        batches = "packed" if speed["packing"] else "padding-free" if speed["padding_free"] else "padded"
        rows.append(("settings", f"{batches} batches, {speed['attention']} attention, activation checkpointing "
                                 f"{'on' if speed['activation_checkpointing'] else 'off'}"))
    losses = summary["train_losses"]
    if losses:
        rows.append(("train loss", f"{losses[0][1]:.4f} (step {losses[0][0]}) -> {losses[-1][1]:.4f} "
                                   f"(step {losses[-1][0]})"))
    if summary.get("eval_loss_after") is not None:
        before = summary.get("eval_loss_before")
        start = f"{before:.4f} (before) -> " if before is not None else ""
        rows.append(("eval loss", f"{start}{summary['eval_loss_after']:.4f} (after); best "
                                  f"{num(summary.get('best_eval_loss'))} at step {summary.get('best_eval_step')}"))
        for source, loss in summary.get("eval_by_source", {}).items():
            start = f"{loss['before']:.4f} -> " if loss.get("before") is not None else ""
            rows.append((f"  {source}", f"{start}{num(loss.get('after'))}"))
    smoke = summary.get("smoke")
    if smoke:
        rows.append(("smoke check", smoke.get("verdict") or smoke.get("skipped", "")))
        if smoke.get("samples"):  # one prompt and its answer, each on one line
            sample = smoke["samples"][0]
            rows.append(("  example", " -> ".join(json.dumps(sample[k][:200], ensure_ascii=False)
                                                  for k in ("question", "text"))))
    rows += [("checkpoints", summary["checkpoints"]), ("adapters", summary["adapters"])]
    if summary.get("merged"):
        rows.append(("merged", summary["merged"]))
    if summary.get("summary_file"):
        rows.append(("summary", summary["summary_file"] + (f", {summary['plot']}" if summary.get("plot") else "")))
    width = max(len(name) for name, _ in rows) + 2
    lines += [f"{name + ':':<{width}}{value}" for name, value in rows]
    return "\n".join(lines)
