"""The pre-flight report's mix table (per entry and per source: records, tokens, share of the loss tokens), figured
from `rows.row_stats`' arrays.
"""

from __future__ import annotations

from typing import Any


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
