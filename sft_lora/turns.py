"""Multi-turn conversations: OpenAI/TRL `{"messages": [{"role", "content"}, …]}` and ShareGPT
`{"conversations": [{"from", "value"}, …]}` records → chat turns, and their tokenization with loss on every
assistant turn (its content and end-of-turn token) and nothing else.

A conversation is stored like a single-turn record, as prompt/completion: the prompt is the (system and) first user
turn, the completion the rest, so both kinds mix in one dataset. TRL would put loss on the whole completion, user
turns included, so completions of more than one turn are always tokenized here (`tokenize_turns`): each assistant
turn's span is where the conversation up to it, rendered with the generation prompt, ends, to where the conversation
up to and including it ends — the rule TRL's `assistant_only_loss` applies with `{% generation %}` markers, which
most templates lack. Where TRL ships a training version of the tokenizer's template (Qwen3, Gemma 3 …: prefix-
preserving), conversations are rendered with it, as TRL's `assistant_only_loss` does; tests/test_recipes.py checks
the labels equal TRL's there, token by token.
"""

from __future__ import annotations

from typing import Any

ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}


def is_conversation(record: Any) -> bool:
    return isinstance(record, dict) and ("messages" in record or "conversations" in record)


def conversation(record: dict) -> list[dict[str, str]] | str:
    """The record's turns as {role, content} (ShareGPT's human/gpt named user/assistant), or what is wrong."""
    key = "messages" if "messages" in record else "conversations"
    role_key, text_key = ("role", "content") if key == "messages" else ("from", "value")
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        return f"'{key}' must be a non-empty list of turns"
    out: list[dict[str, str]] = []
    for n, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(role_key), str) or \
                not isinstance(turn.get(text_key), str):
            return f"{key}[{n}] must be {{\"{role_key}\": …, \"{text_key}\": \"text\"}}"
        role = ROLES.get(turn[role_key]) if key == "conversations" else turn[role_key]
        if role not in ("system", "user", "assistant"):
            return f"{key}[{n}]: unknown role '{turn[role_key]}' (system, user, assistant)"
        position = n - (out[0]["role"] == "system" if out else 0)
        expected = "system" if n == 0 and role == "system" else ("user", "assistant")[position % 2]
        if role != expected:
            return (f"{key}[{n}]: roles out of order ({role} where {expected} belongs); a conversation is an optional "
                    "system turn, then user and assistant turns alternating")
        if not turn[text_key].strip():
            return f"{key}[{n}]: the {role} turn is empty"
        out.append({"role": role, "content": turn[text_key]})
    if out[-1]["role"] != "assistant":
        return (f"{key}: no assistant turn ends the conversation" if any(t["role"] == "assistant" for t in out) else
                f"{key}: no assistant turn; there is nothing to learn from it")
    return out


def with_system(turns: list[dict[str, str]], system_prompt: str | None, fold: bool) -> list[dict[str, str]]:
    """The turns with the record's own system turn, else `system_prompt`; `fold` puts it atop the first user turn
    (blank line between), for templates without a usable system role."""
    own = turns[0]["role"] == "system"
    system, rest = (turns[0]["content"], turns[1:]) if own else (system_prompt, turns)
    if system and fold:
        return [{"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}, *rest[1:]]
    return ([{"role": "system", "content": system}] if system else []) + rest


def split(turns: list[dict[str, str]], last_only: bool) -> tuple[list[dict], list[dict]]:
    """(prompt, completion): up to the first assistant turn and from it on; `last_only`: before the last one."""
    cut = len(turns) - 1 if last_only else next(n for n, t in enumerate(turns) if t["role"] == "assistant")
    return turns[:cut], turns[cut:]


def template_kwargs(tokenizer, given: dict | None = None) -> dict:
    """Variables every render passes the chat template (training, chat, smoke check): `data.chat_template_kwargs`,
    and `enable_thinking: false` where the template takes it (Qwen3) unless given: the no-thinking prompt, its empty
    think block part of the prompt, as Qwen3 answers with thinking off."""
    thinking = "enable_thinking" in str(tokenizer.chat_template)
    return {**({"enable_thinking": False} if thinking else {}), **(given or {})}


def render_template(tokenizer) -> str | None:
    """The template conversations are rendered with: None (the tokenizer's own), or TRL's training version of it
    where TRL has one and the tokenizer's lacks `{% generation %}` markers (what TRL's assistant_only_loss uses)."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(tokenizer.chat_template):
        return None
    try:
        return get_training_chat_template(tokenizer)
    except ValueError:  # TRL has no training version of this template
        return None


def tokenize_conversations(tokenizer, prompts: list[list[dict]], completions: list[list[dict]],
                           template: str | None = None, kwargs: dict | None = None
                           ) -> list[tuple[list[int], list[tuple[int, int]], bool]]:
    """(input_ids, loss spans, drift) of each prompt + completion, untruncated, as TRL tokenizes them: drift when
    the rendered prompt is not a prefix of the rendered whole (the template guard in preflight.py).

    A one-turn completion: the prompt (with the generation prompt) and the whole conversation are rendered with the
    chat template and tokenized in one batched call; the completion starts where the two token lists diverge (TRL's
    rule). Longer completions (multi-turn conversations): `turns.tokenize_turns` with `template`. `kwargs`: the
    template's variables (`template_kwargs`), as TRL passes a row's `chat_template_kwargs`."""
    from trl.data_utils import common_prefix_length

    single = [n for n, c in enumerate(completions) if len(c) == 1]
    multi = [n for n, c in enumerate(completions) if len(c) > 1]
    out: list[Any] = [None] * len(prompts)
    if single:
        heads = [prompts[n] for n in single]
        rendered = tokenizer.apply_chat_template(heads, tokenize=False, add_generation_prompt=True, **kwargs or {})
        full = tokenizer.apply_chat_template([prompts[n] + completions[n] for n in single], tokenize=False,
                                             **kwargs or {})
        encoded = tokenizer(rendered + full, add_special_tokens=False)["input_ids"]  # as apply_chat_template does
        for k, n in enumerate(single):
            prompt_ids, ids = encoded[k], encoded[len(single) + k]
            out[n] = (ids, [(common_prefix_length(prompt_ids, ids), len(ids))], not full[k].startswith(rendered[k]))
    if multi:
        turns = tokenize_turns(tokenizer, [prompts[n] + completions[n] for n in multi], template, kwargs or {})
        for n, row in zip(multi, turns, strict=True):
            out[n] = row
    return out


OPEN, CLOSE = "\ue000", "\ue001"  # private-use characters that stand for {% generation %} / {% endgeneration %}


def marked_template(template: str | None) -> str | None:
    """`template` with its `{% generation %}` markers turned into `OPEN`/`CLOSE` characters (None without markers):
    one plain render then gives every assistant span (transformers' generation tracking renders ~2.5x slower)."""
    import re

    from trl.chat_template_utils import has_generation_markers

    if not template or not has_generation_markers(template):
        return None
    return re.sub(r"\{%(-?)\s*(end)?generation\s*(-?)%\}",
                  lambda m: f"{{{{{m[1]} '{CLOSE if m[2] else OPEN}' {m[3]}}}}}", template)


def tokenize_turns(tokenizer, conversations: list[list[dict]], template: str | None, kwargs: dict
                   ) -> list[tuple[list[int], list[tuple[int, int]], bool]]:
    """(input_ids, [(start, end) token span of each assistant turn], drift) per conversation, untruncated.

    A template with generation markers (the tokenizer's, or TRL's training version): one render, the spans where
    the markers were, one batched tokenizer call; a token is in a span when its characters overlap it (transformers'
    assistant-mask rule). Other templates: `_by_prefixes`."""
    marked = marked_template(template or tokenizer.chat_template)
    if marked is None or any(OPEN in t["content"] or CLOSE in t["content"] for c in conversations for t in c):
        return _by_prefixes(tokenizer, conversations, template, kwargs)
    rendered = tokenizer.apply_chat_template(conversations, tokenize=False, chat_template=marked, **kwargs)
    texts, spans = zip(*map(_unmark, rendered), strict=True)
    encoded = tokenizer(list(texts), add_special_tokens=False)
    return [(ids, [_token_span(encoded.encodings[n], start, stop) for start, stop in spans[n]], False)
            for n, ids in enumerate(encoded["input_ids"])]


def _unmark(text: str) -> tuple[str, list[tuple[int, int]]]:
    """`text` without the marker characters, and the (start, end) character span each OPEN/CLOSE pair enclosed."""
    import re

    out, spans, position, start = [], [], 0, 0
    for piece in re.split(f"([{OPEN}{CLOSE}])", text):
        if piece == OPEN:
            start = position
        elif piece == CLOSE:
            spans.append((start, position))
        else:
            out.append(piece)
            position += len(piece)
    return "".join(out), spans


def _token_span(encoding, start: int, stop: int) -> tuple[int, int]:
    """The tokens overlapping characters [start, stop) of one encoded text: the first token ending after `start`
    to the first starting at or after `stop`, by bisection over the tokens' character offsets."""
    def first(position: int, edge: int) -> int:  # the first token whose start (edge 0) or end (1) is past it
        low, high = 0, len(encoding)
        while low < high:
            middle = (low + high) // 2
            if encoding.token_to_chars(middle)[edge] > position:
                high = middle
            else:
                low = middle + 1
        return low

    return first(start, 1), first(stop - 1, 0)


def _by_prefixes(tokenizer, conversations: list[list[dict]], template: str | None, kwargs: dict
                 ) -> list[tuple[list[int], list[tuple[int, int]], bool]]:
    """`tokenize_turns` for a template without generation markers: each assistant turn's span runs from where the
    conversation up to it, rendered with the generation prompt, ends, to where the conversation up to and including
    it ends (three batched renders); `drift` where such a prompt is not a prefix of the whole."""
    import numpy as np

    heads, ends, owner = [], [], []
    for n, turns in enumerate(conversations):
        for a in (i for i, t in enumerate(turns) if t["role"] == "assistant"):
            heads.append(turns[:a])
            ends.append(turns[:a + 1])
            owner.append(n)
    def render(conversations: list, generation: bool = False) -> list[str]:
        return tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=generation,
                                             chat_template=template, **kwargs)

    full, head_texts, end_texts = render(conversations), render(heads, True), render(ends)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)  # as apply_chat_template does
    out = [(ids, [], False) for ids in encoded["input_ids"]]
    offsets = [np.asarray(o, dtype=np.int64).reshape(-1, 2) for o in encoded["offset_mapping"]]
    for n, head, end in zip(owner, head_texts, end_texts, strict=True):
        text, starts_ends = full[n], offsets[n]
        start = len(head) if end.startswith(head) else _common_prefix(head, end)
        first = int(np.searchsorted(starts_ends[:, 1], start, side="right"))  # first token ending after `start`
        if text.startswith(end):
            last = int(np.searchsorted(starts_ends[:, 0], len(end), side="left"))  # first token starting at its end
        else:  # the template closes a last turn differently (Phi-4 adds its EOS): the tokens the two share
            last = int(np.searchsorted(starts_ends[:, 1], _common_prefix(end, text), side="right"))
        drift = not text.startswith(head) or last <= first
        out[n] = (out[n][0], out[n][1] + [(first, last)], out[n][2] or drift)
    return out


def multi_turn(dataset) -> bool:
    """Whether a prompt/completion dataset holds a completion of more than one turn (a conversation)."""
    import pyarrow.compute as pc

    if "completion" not in getattr(dataset, "column_names", ()):
        return False
    return (pc.max(pc.list_value_length(dataset.with_format("arrow")[:].column("completion"))).as_py() or 0) > 1


def _common_prefix(a: str, b: str) -> int:
    import os

    return len(os.path.commonprefix([a, b]))
