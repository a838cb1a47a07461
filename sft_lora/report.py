"""What a run leaves to read: `summary.json`, a loss-curve PNG and the console table, from the Trainer's
`state.log_history` (the model cards: `card.py`)."""

import json
from pathlib import Path
from typing import Any

from .atomic import atomic_file, write_atomic
from .text import columns, table_names
from .trainer import source_metric

SUMMARY_FILE = "summary.json"
PLOT_FILE = "loss.png"


def _num(value: Any, fmt: str = ".4f") -> str:
    return "—" if value is None else format(value, fmt)


def eval_history(log_history: list[dict[str, Any]], sources: list[str]) -> dict[str, list[list[float]]]:
    """{"overall": [[step, loss], …], source: […]} from the Trainer's log history, in step order."""
    keys = {"eval_loss": "overall", **{source_metric(s) + "_loss": s for s in sources}}
    history: dict[str, list[list[float]]] = {}
    for entry in log_history:
        for key, name in keys.items():
            # not twice: the final evaluation repeats the last epoch's when they share a step
            if key in entry and [entry["step"], entry[key]] not in (points := history.setdefault(name, [])):
                points.append([entry["step"], entry[key]])
    return history


def _before(points: list[list[float]]) -> float | None:
    """The eval loss at step 0 (`eval_on_start`, inside train(): ZeRO-2 refuses an evaluate() before); else None."""
    return points[0][1] if points and points[0][0] == 0 else None


def logged_at_best(trainer) -> dict[str, float]:
    """The eval metrics logged at the best checkpoint's step when load_best_model_at_end put its weights back, else {}:
    evaluating them again logged a second point at the last step (summary.json, loss.png, TensorBoard), as if the
    last step's weights had the best's loss."""
    best, state = trainer.state.best_model_checkpoint, trainer.state
    if not (trainer.args.load_best_model_at_end and best and Path(best).is_dir()):
        return {}
    step = int(Path(best).name.rsplit("-", 1)[-1])
    logged = {key: value for log in state.log_history if log.get("step") == step for key, value in log.items()
              if key.startswith("eval_")}  # the overall and each source's, logged one after the other
    return logged if step != state.global_step and "eval_loss" in logged else {}


def run_numbers(trainer, result, after: dict[str, float], sources: list[str]) -> dict:
    """A finished run's steps, tokens, speed, losses (eval before/after too), per-source eval and speed settings."""
    history, args = trainer.state.log_history, trainer.args
    tokens = getattr(trainer, "_total_train_tokens", None)  # TRL's count of non-padding tokens trained this session
    runtime = result.metrics["train_runtime"] if result else 0.0  # None: resumed at the end, nothing trained
    evals = eval_history(history, sources)
    before = {name: _before(points) for name, points in evals.items()}
    best = min(evals.get("overall", []), key=lambda point: point[1], default=None)
    metric = f"eval_{(args.metric_for_best_model or '').removeprefix('eval_')}"  # as Trainer names it
    by_source = {s: {"before": before.get(s), "after": after.get(source_metric(s) + "_loss"),
                     "best": min(p[1] for p in evals[s])} for s in sources if evals.get(s)}
    return {
        "eval_loss_before": before.get("overall"), "eval_loss_after": after.get("eval_loss"),
        "global_step": trainer.state.global_step, "runtime_s": runtime, "epochs": trainer.state.epoch,
        "tokens": tokens, "tokens_per_s": tokens / runtime if tokens and runtime else None,
        "train_losses": [(log["step"], log["loss"]) for log in history if "loss" in log],
        "best_eval_loss": best[1] if best else None, "best_eval_step": best[0] if best else None,
        "eval_by_source": by_source, "eval_history": evals,
        "weights_of": f"{Path(chosen).name}, the best by {metric} (load_best_model_at_end)"
        if (chosen := args.load_best_model_at_end and trainer.state.best_model_checkpoint) else None,
        "speed_settings": {  # what decides speed and memory (several chosen by decisions.py)
            "padding_free": bool(getattr(trainer, "padding_free", False)), "packing": bool(args.packing),
            "attention": getattr(trainer.model.config, "_attn_implementation", None),
            "activation_checkpointing": bool(args.gradient_checkpointing)},
    }


def write_summary(directory: str | Path, summary: dict[str, Any]) -> None:
    """Write `summary.json` and `loss.png` (train, eval, per-source eval loss by step) into `directory`, atomically."""
    directory = Path(directory)
    train, evals = summary.get("train_losses") or [], summary.get("eval_history") or {}
    summary["plot"] = None
    if train or evals:
        _plot(directory / PLOT_FILE, summary.get("title", "loss"), train, evals)
        summary["plot"] = str(directory / PLOT_FILE)
    summary["summary_file"] = str(directory / SUMMARY_FILE)
    write_atomic(directory / SUMMARY_FILE, json.dumps(summary, indent=2, ensure_ascii=False, default=str) + "\n")


def _plot(path: Path, title: str, train: list, evals: dict[str, list]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    labels = ["eval" if name == "overall" else f"eval {name}" for name in evals]
    families, drawn = _legible([*labels, title])
    with plt.rc_context({"font.family": families}):
        fig, ax = plt.subplots(figsize=(9, 5), dpi=100, layout="tight")
        colours = iter([c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 3] * 10)  # 3: the eval's red
        if train:
            ax.plot([s for s, _ in train], [v for _, v in train], color="black", linewidth=1.8, label="train")
        for (name, points), label in zip(evals.items(), labels, strict=True):
            overall = name == "overall"
            ax.plot([s for s, _ in points], [v for _, v in points], marker="o", linewidth=2.2 if overall else 1.2,
                    linestyle="-" if overall else "--", color="tab:red" if overall else next(colours),
                    label=drawn[label])
        ax.set(xlabel="step", ylabel="loss", title=drawn[title])
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
        with atomic_file(path) as tmp:
            fig.savefig(tmp)
        plt.close(fig)


def _legible(texts: list[str]) -> tuple[list[str], dict[str, str]]:
    """(font families: DejaVu Sans, then installed fonts holding the texts' other characters (Hangul: Noto Sans CJK …);
    each text as drawn: a character no font holds as its \\u escape, which names it, not an empty box and a warning)."""
    from matplotlib import font_manager

    needed, covered, families = {ord(c) for text in texts for c in text}, set(), []
    fonts = [("DejaVu Sans", font_manager.findfont("DejaVu Sans")),
             *((font.name, font.fname) for font in font_manager.fontManager.ttflist
               if not font.name.startswith("Last Resort"))]  # its glyphs for every character are boxes
    for family, path in fonts:
        if not (missing := needed - covered):
            break
        try:
            holds = missing & font_manager.get_font(path).get_charmap().keys()
        except (OSError, RuntimeError):  # a font file FreeType cannot read
            continue
        if holds and family not in families:
            families, covered = [*families, family], covered | holds
    drawn = {text: "".join(c if ord(c) in covered else ascii(c)[1:-1] for c in text) for text in texts}
    return families or ["DejaVu Sans"], drawn


def summary_table(summary: dict[str, Any]) -> str:
    """The end-of-run console table."""
    processes, runtime, step = summary.get("world_size", 1), summary["runtime_s"], summary["global_step"]
    lines = [f"\ntrained to step {step} in {runtime:.1f} s on {processes} process{'es' if processes > 1 else ''}"]
    epochs = _num(summary.get("epochs"), ".2f").rstrip("0").rstrip(".")  # 100, 2.98, 10.5 (".2g": 1e+02, 3, 10)
    rows = [("steps", f"{step} ({epochs} epoch{'' if epochs == '1' else 's'})")]
    if summary.get("peak_memory_gib") is not None:
        rows.append(("peak memory", f"{summary['peak_memory_gib']:.2f} GiB"))
    if summary.get("replicas_agree") is not None:
        verdict = "identical" if summary["replicas_agree"] else "DIFFER — the processes did not stay in sync"
        rows.append(("replicas", f"{verdict} on all {processes} processes"))
    if summary.get("tokens"):  # TRL counts this session's: since the step a resume started from
        since = f" since step {summary['resumed_at_step']}" if summary.get("resumed_at_step") else ""
        rows.append(("tokens", f"{summary['tokens']:,}{since} in {runtime:.1f} s "  # Trainer's train_runtime
                               f"({_num(summary.get('tokens_per_s'), ',.0f')} tokens/s, evaluations included)"))
    if speed := summary.get("speed_settings"):
        batches = "packed" if speed["packing"] else "padding-free" if speed["padding_free"] else "padded"
        rows.append(("settings", f"{batches} batches, {speed['attention']} attention, activation checkpointing "
                                 f"{'on' if speed['activation_checkpointing'] else 'off'}"))
    if losses := summary["train_losses"]:
        rows.append(("train loss", f"{losses[0][1]:.4f} (step {losses[0][0]}) -> {losses[-1][1]:.4f} "
                                   f"(step {losses[-1][0]})"))
    if summary.get("eval_loss_after") is not None:
        start = f"{summary['eval_loss_before']:.4f} (before) -> " if summary.get("eval_loss_before") is not None else ""
        rows.append(("eval loss", f"{start}{summary['eval_loss_after']:.4f} (after); best "
                                  f"{_num(summary.get('best_eval_loss'))} at step {summary.get('best_eval_step')}"))
        names = table_names(list(by_source := summary.get("eval_by_source", {})))  # one printable line each
        for source, loss in by_source.items():
            start = f"{loss['before']:.4f} -> " if loss.get("before") is not None else ""
            rows.append((f"  {names[source]}", f"{start}{_num(loss.get('after'))}"))
    if smoke := summary.get("smoke"):
        rows.append(("smoke check", smoke.get("verdict") or smoke.get("skipped", "")))
        if smoke.get("samples"):  # one prompt and its answer, each on one line
            rows.append(("  example", " -> ".join(json.dumps(smoke["samples"][0][k][:200], ensure_ascii=False)
                                                  for k in ("question", "text"))))
    rows += [("checkpoints", summary["checkpoints"]), ("adapters", summary["adapters"])]
    if summary.get("weights_of"):  # not the last step's
        rows.append(("  weights of", summary["weights_of"]))
    if summary.get("merged"):
        rows.append(("merged", summary["merged"]))
    rows.append(("summary", summary["summary_file"] + (f", {summary['plot']}" if summary["plot"] else "")))
    width = max(columns(name) for name, _ in rows) + 2  # a Korean source name: two columns a character
    return "\n".join(lines + [name + ":" + " " * (width - columns(name) - 1) + value for name, value in rows])
