"""Attention for padding-free rows, side by side: `sdpa_documents` vs transformers' `sdpa` vs `flex_attention`.

    python -m bench.attention                      # GPU: Llama-3.2-1B shape cut to 4 layers, bf16
    python -m bench.attention --shape tiny         # CPU: to test this script

One model, one padding-free row per measurement (documents marked by `position_ids` restarting at 0, no attention
mask, no KV cache: the case transformers detects as packed), forward + backward with the LM loss. For `sdpa` and
`flex_attention` transformers builds a block-diagonal mask (dense T×T for sdpa, a BlockMask for flex) from the
positions; `sdpa_documents` (sft_lora/decisions.py) runs causal SDPA per document. Rows: many short documents and
a few long ones, both ~8k tokens. Each implementation's loss must match `sdpa_documents`' (same weights, same row).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

IMPLEMENTATIONS = ["sdpa_documents", "sdpa", "flex_attention"]


def rows(tokens: int, seed: int = 0) -> dict[str, list[int]]:
    """Document lengths of each row kind: `short` = chat-length documents (log-normal, median 160 tokens),
    `long` = four equal documents; both sum to `tokens`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    short: list[int] = []
    while sum(short) < tokens:
        short.append(int(min(max(rng.lognormal(math.log(160), 0.6), 16), 1024)))
    short[-1] -= sum(short) - tokens
    short = [n for n in short if n > 0]
    return {"short": short, "long": [tokens // 4] * 4}


def measure(model, lengths: list[int], vocab: int, repeats: int, device: str) -> tuple[float, float]:
    """(median seconds of forward + backward, loss) on one padding-free row of documents of `lengths`."""
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, sum(lengths)), generator=generator).to(device)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).to(device)
    times, loss = [], None
    for i in range(repeats + 2):  # two warm-up calls (flex compiles on the first)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False)
        out.loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
        loss = float(out.loss)
        model.zero_grad(set_to_none=True)
    times.sort()
    return times[len(times) // 2], loss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["llama-1b", "tiny"], default="llama-1b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per row")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--implementations", default=",".join(IMPLEMENTATIONS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.workload import SHAPES, write_json
    from sft_lora.decisions import register

    register()
    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    tokens = args.tokens if gpu or args.shape != "tiny" else min(args.tokens, 2048)
    shape = {**SHAPES[args.shape], "num_hidden_layers": args.layers, "max_position_embeddings": tokens}
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="sdpa_documents")).to(dtype)
    model.train()
    results: dict[str, Any] = {"device": torch.cuda.get_device_name() if gpu else "cpu", "shape": args.shape,
                               "layers": args.layers, "tokens": tokens, "rows": {}}
    for kind, lengths in rows(tokens).items():
        results["rows"][kind] = {"documents": len(lengths), "by_impl": {}}
        for impl in args.implementations.split(","):
            try:
                model.set_attn_implementation(impl)
                seconds, loss = measure(model, lengths, shape["vocab_size"], args.repeats, device)
                entry = {"ms": 1000 * seconds, "tokens_per_s": tokens / seconds, "loss": loss}
            except Exception as exc:  # an implementation this stack cannot run is a result, not a crash
                entry = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            results["rows"][kind]["by_impl"][impl] = entry
            print(f"{kind:>5} ({len(lengths)} docs) {impl:<15} {json.dumps(entry)}", flush=True)
    print_table(results)
    write_json(results, args.json)
    return 0


def print_table(results: dict[str, Any]) -> None:
    print(f"\npadding-free attention, {results['shape']} shape x {results['layers']} layers, "
          f"{results['tokens']} tokens a row, forward + backward, {results['device']}")
    print("| row | documents | implementation | ms | tokens/s | loss vs sdpa_documents |\n|---|---|---|---|---|---|")
    for kind, row in results["rows"].items():
        reference = row["by_impl"].get("sdpa_documents", {}).get("loss")
        for impl, entry in row["by_impl"].items():
            if "error" in entry:
                print(f"| {kind} | {row['documents']} | {impl} | failed: {entry['error'][:80]} | | |")
                continue
            diff = "" if reference is None else f"{abs(entry['loss'] - reference):.2e}"
            print(f"| {kind} | {row['documents']} | {impl} | {entry['ms']:.1f} | {entry['tokens_per_s']:,.0f} | "
                  f"{diff} |")


if __name__ == "__main__":
    sys.exit(main())
