"""Per-document attention for padding-free batches: SDPA run document by document, no dense block mask.

Padding-free training (TRL's `padding_free`) flattens a batch into one row and marks where each document starts by
resetting `position_ids`. transformers 5.24 then builds, for sdpa and eager, a dense T×T block-diagonal mask over
the whole row and attends over all of it (cost ∝ T², of which a document-sized block per document is used); only
flash-attention kernels read the document boundaries directly, and none is available on CPU. This module adds
an attention implementation, `sdpa_documents`, that attends within each document with causal SDPA (cost ∝ Σnᵢ²),
keeping a sliding-window layer's window (the window lives in the mask this leaves out), and otherwise behaves
exactly like `sdpa`. Hand-written because no upstream CPU varlen attention exists.
"""

from __future__ import annotations

NAME = "sdpa_documents"


def document_bounds(position_ids, cu_seq_lens=None) -> list[int] | None:
    """Start offsets of the documents in a one-row padding-free batch, plus the row's end; None if not one row.

    From the collator's `cu_seq_lens_q` when given, else from where `position_ids` stop counting up by one (the
    rule transformers uses to detect packed sequences)."""
    import torch

    if cu_seq_lens is not None:
        return [int(x) for x in cu_seq_lens.tolist()]
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    row = position_ids[0]
    starts = (torch.nonzero(torch.diff(row) != 1).flatten() + 1).tolist()
    return [0, *starts, row.numel()]


def sdpa_documents_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs):
    """`sdpa`, except that a batch without padding attends causally within each document only (one padding-free
    row: the documents its positions mark; several rows: each row), within the layer's sliding window if any."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None or query.shape[2] != key.shape[2] or not getattr(module, "is_causal", True):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    bounds = document_bounds(kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q")) if query.shape[0] == 1 else None
    bounds = bounds or [0, query.shape[2]]
    # Sliding-window layers (Gemma 3, Mistral …) pass their window; transformers puts it in the mask we leave out.
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    outputs = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        if end <= start:
            continue
        mask, causal = None, True
        if window is not None and end - start > window:
            offsets = torch.arange(end - start, device=query.device)
            distance = offsets[:, None] - offsets[None, :]
            mask, causal = (distance >= 0) & (distance < window), False  # transformers' sliding_window_overlay
        outputs.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], attn_mask=mask,
            dropout_p=dropout, scale=scaling, is_causal=causal, enable_gqa=gqa))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def sdpa_documents_mask(*args, attention_mask=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0,
                        **kwargs):
    """No mask for a batch without padding (the attention above finds the documents); sdpa's mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length and not q_offset and not kv_offset:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, q_length=q_length, kv_length=kv_length,
                     q_offset=q_offset, kv_offset=kv_offset, **kwargs)


def padding_free_attention(device_type: str) -> str:
    """The attention padding-free batches get when the recipe names none. CUDA: transformers' `flex_attention`
    (a block-sparse document mask, compiled): fastest in README's GPU table (Llama-3.2-1B shape on an H200: 28,018
    real tokens/s vs 15,534 for `sdpa`'s dense mask and 4,617 for `sdpa_documents`). Elsewhere `sdpa_documents`
    (flex_attention has no backward on CPU)."""
    return "flex_attention" if device_type == "cuda" else register()


def register() -> str:
    """Register `sdpa_documents` with transformers (idempotent); return its name for `attn_implementation`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, sdpa_documents_forward)
    AttentionMaskInterface.register(NAME, sdpa_documents_mask)
    return NAME
