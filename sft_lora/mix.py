"""Several data files in one run: `data.path` (and `data.eval_path`) as a list of entries, each a path or a mapping
`{path, source, weight}`; `weight` samples an entry deterministically by seed (0.5 = half its records, 2 = each
record twice). The pre-flight report's mix table (per entry and per source: records, tokens, share of the loss
tokens) is figured here too, from `rows.row_stats`' arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KEYS = ("path", "source", "weight")


@dataclass(frozen=True)
class Entry:
    path: str
    source: str | None = None
    """Names every record of this entry that has no source of its own."""
    weight: float = 1.0


def entries(value: Any, key: str = "data.path") -> list[Entry]:
    """`data.path` / `data.eval_path` as entries; ValueError naming `key[i]` for a malformed one."""
    from .keys import suggest

    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError(f"{key} is an empty list; give at least one data file")
    out = []
    for n, item in enumerate(items):
        where = f"{key}[{n}]" if isinstance(value, list) else key
        item = {"path": item} if isinstance(item, str) else item
        if not isinstance(item, dict):
            raise ValueError(f"{where}: an entry is a path or a mapping {{path, source, weight}}, got {item!r}")
        for name in item:
            if name not in KEYS:
                raise ValueError(f"{where}: unknown key '{name}' (path, source, weight){suggest(str(name), KEYS)}")
        path, source, weight = item.get("path"), item.get("source"), item.get("weight", 1)
        if not isinstance(path, str) or not path:
            raise ValueError(f"{where}: needs a path (.json, .jsonl, a saved dataset dir or a hub id)")
        if source is not None and not isinstance(source, str):
            raise ValueError(f"{where}.source must be a string, got {source!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise ValueError(f"{where}.weight must be a number > 0 (0.5 = half the records, 2 = each twice), "
                             f"got {weight!r}")
        out.append(Entry(path, source, float(weight)))
    return out


def paths(value: Any) -> list[str]:
    """The file paths (or hub ids) of `data.path` / `data.eval_path`; [] when unset."""
    return [e.path for e in entries(value)] if value else []


def describe(value: Any) -> str:
    """How errors and notices name the data: the path, or the paths joined by ' + '."""
    return " + ".join(paths(value))


def weighted(dataset, entry: Entry, seed: int):
    """`dataset` (the records of `entry`) sampled by its weight: each record int(weight) times, plus round(fraction
    × n) records drawn by `seed` (kept in file order)."""
    import numpy as np

    from .config import RecipeError

    if entry.weight == 1:
        return dataset
    n, whole, part = len(dataset), int(entry.weight), entry.weight - int(entry.weight)
    extra = np.sort(np.random.default_rng(seed).permutation(n)[:round(part * n)])
    if not whole and not len(extra):
        raise RecipeError(f"{entry.path}: weight {entry.weight:g} leaves none of its {n} records; raise the weight")
    return dataset.select(np.concatenate([np.tile(np.arange(n), whole), extra]))


def concatenated(parts: list):
    from datasets import concatenate_datasets

    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def mix_table(stats: dict[str, Any], codes: str, names: str) -> dict[str, dict[str, Any]]:
    """Per name (entry or source): records, tokens and loss tokens as trained, and the share of all loss tokens."""
    import numpy as np

    total = int(stats["loss"].sum()) or 1
    out = {}
    for k, name in enumerate(stats[names]):
        mine = stats[codes] == k
        loss = int(stats["loss"][mine].sum())
        out[name] = {"records": int(np.count_nonzero(mine)), "tokens": int(stats["tokens"][mine].sum()),
                     "loss_tokens": loss, "loss_share": loss / total}
    return out


def mix_lines(by_entry: dict[str, dict[str, Any]]) -> list[str]:
    """The report's per-entry lines (only when there is more than one entry)."""
    if len(by_entry) < 2:
        return []
    lines = [f"  {'data entry':<36}{'records':>9}{'tokens':>11}{'loss tokens':>13}{'share':>8}"]
    for name, s in by_entry.items():
        name = name if len(name) <= 35 else "…" + name[-34:]
        lines.append(f"  {name:<36}{s['records']:>9}{s['tokens']:>11,}{s['loss_tokens']:>13,}"
                     f"{s['loss_share']:>8.1%}")
    return lines


def percentiles(values) -> dict[str, int]:
    """p50, p90, p99 and max of `values` (0s when empty)."""
    import numpy as np

    if not len(values):
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    return {f"p{q}": int(np.percentile(values, q, method="nearest")) for q in (50, 90, 99)} | \
        {"max": int(values.max())}


def by_source(stats: dict[str, Any], sources: list[str]) -> dict[str, dict[str, Any]]:
    """Per source (those in the data and those `check.sources` names): rows, trainable rows, prompt and answer
    p50/max, tokens, loss tokens and their share, truncated rows."""
    import numpy as np

    table = mix_table(stats, "code", "names")
    out = {}
    for source in sorted(set(table) | set(sources)):
        mine = (stats["code"] == stats["names"].index(source)) if source in table else np.zeros(0, dtype=np.int64)
        prompt, answer = stats["prompt"][mine], (stats["length"] - stats["prompt"])[mine]
        out[source] = {"rows": table.get(source, {}).get("records", 0),
                       "trainable_rows": int((stats["loss"][mine] > 0).sum()),
                       "prompt_p50": percentiles(prompt)["p50"], "prompt_max": percentiles(prompt)["max"],
                       "answer_p50": percentiles(answer)["p50"], "answer_max": percentiles(answer)["max"],
                       "tokens": 0, "loss_tokens": 0, "loss_share": 0.0,
                       **{k: v for k, v in table.get(source, {}).items() if k != "records"},
                       "truncated": int((stats["tokens"][mine] < stats["length"][mine]).sum())}
    return out
