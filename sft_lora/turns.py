"""Chat turns rendered by the chat template and tokenized with loss on every assistant turn (its content and
end-of-turn token) and nothing else; the template's variables, its refusals, the tokens that end a turn."""

import bisect
import contextlib
import logging
import os
import re
from typing import Any

from .text import first_line

logger = logging.getLogger(__name__)
OPEN, CLOSE = "\ue000", "\ue001"  # private-use characters that stand for {% generation %} / {% endgeneration %}
# How rendered text is encoded: as apply_chat_template does, without transformers' warning that a text longer than
# the tokenizer's model_max_length "will result in indexing errors": rows are cut at training.max_length, and
# rows.check_lengths says when that is above model_max_length.
ENCODE = {"add_special_tokens": False, "verbose": False}


def template_refusal(exc: Exception) -> str | None:
    """The one line for a chat template failing on a record (raise_exception(): Gemma 2 on a system turn; a template
    that is not valid jinja is said when the tokenizer loads, `model.load_tokenizer`)."""
    from jinja2 import TemplateError

    if not isinstance(exc, TemplateError):
        return None
    # records alternate user and assistant (data.py): "roles must alternate" (Mistral v0.1) is the system turn's
    fix = ("set data.fold_system_prompt: true" if re.search("system|alternate", str(exc), re.I) else
           "check the records and data.chat_template_kwargs")
    return (f"the chat template refuses a record ({first_line(exc)}); {fix}, or set data.chat_template to a "
            "template that takes it")


def template_kwargs(template: str | dict | None, given: dict | None = None) -> dict:
    """Every render's template variables: `data.chat_template_kwargs`, and `enable_thinking: false` where the template
    takes it (Qwen3) unless given: its empty think block is then part of the prompt, as Qwen3 answers."""
    thinking = "enable_thinking" in str(template)
    return {**({"enable_thinking": False} if thinking else {}), **(given or {})}


def tokenize_conversations(tokenizer, prompts: list[list[dict]], completions: list[list[dict]], kwargs: dict
                           ) -> list[tuple[list[int], list[tuple[int, int]], bool]]:
    """(input_ids, loss spans, drift: the rendered prompt is no prefix of the whole) per row, untruncated, as TRL does:
    a one-turn completion starts where the tokens of the prompt (with the generation prompt) and of the whole
    diverge (one batched tokenizer call); longer ones: `tokenize_turns`."""
    from transformers.utils.logging import warning_once
    from trl.data_utils import common_prefix_length
    single = [n for n, c in enumerate(completions) if len(c) == 1]
    multi = [n for n, c in enumerate(completions) if len(c) > 1]
    out: list[Any] = [None] * len(prompts)
    if single:
        heads = [prompts[n] for n in single]
        rendered = tokenizer.apply_chat_template(heads, tokenize=False, add_generation_prompt=True, **kwargs)
        full = tokenizer.apply_chat_template([prompts[n] + completions[n] for n in single], tokenize=False, **kwargs)
        encoded = tokenizer(rendered + full, **ENCODE)["input_ids"]
        for k, n in enumerate(single):
            prompt_ids, ids, drift = encoded[k], encoded[len(single) + k], not full[k].startswith(rendered[k])
            start = common_prefix_length(prompt_ids, ids)
            if start < len(prompt_ids) and not drift:  # TRL warns of it too; drift is the `template` check's
                # once for each prompt end, as TRL warns once: a template that merges one row merges them all
                warning_once(logger, "the prompt's end %r merges with the answer's first token (e.g. an answer "
                             "starting with a newline): as in TRL, the loss starts at the merged token, and training "
                             "sees a prompt end that chat never shows; strip what the answers start with",
                             tokenizer.decode(prompt_ids[start:]))
            out[n] = (ids, [(start, len(ids))], drift)
    if multi:
        conversations = [prompts[n] + completions[n] for n in multi]
        for n, row in zip(multi, tokenize_turns(tokenizer, conversations, kwargs), strict=True):
            out[n] = row
    return out


def tokenize_turns(tokenizer, conversations: list[list[dict]], kwargs: dict
                   ) -> list[tuple[list[int], list[tuple[int, int]], bool]]:
    """(input_ids, [(start, end) token span of each assistant turn], drift) per conversation, untruncated: with
    `{% generation %}` markers made `OPEN`/`CLOSE` characters, one plain render gives every span (transformers'
    generation tracking is ~2.5x slower); a token overlapping one is in it (transformers' assistant-mask rule)."""
    # Only here, at a conversation: TRL's template module imports for seconds.
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers
    template = None  # the tokenizer's own, or TRL's training version (as its assistant_only_loss renders) if it has one
    if not has_generation_markers(tokenizer.chat_template):
        with contextlib.suppress(ValueError):  # TRL has no training version of this template
            template = get_training_chat_template(tokenizer)
    given = template or tokenizer.chat_template
    if not given or not has_generation_markers(given):
        return _by_prefixes(tokenizer, conversations, template, kwargs)
    # a conversation holding a marker character itself takes the other way, alone: its batch's rows are labelled
    # as they would be without it (the whole batch went the other way, and its labels changed with it)
    plain = [any(OPEN in t["content"] or CLOSE in t["content"] for t in c) for c in conversations]
    out: list[Any] = [None] * len(conversations)
    for way, tokenize, chosen in ((True, _by_prefixes, template), (False, _by_markers, given)):
        if rows := [n for n, is_plain in enumerate(plain) if is_plain == way]:
            for n, row in zip(rows, tokenize(tokenizer, [conversations[n] for n in rows], chosen, kwargs), strict=True):
                out[n] = row
    return out


def _by_markers(tokenizer, conversations: list[list[dict]], given: str, kwargs: dict
                ) -> list[tuple[list[int], list[tuple[int, int]], bool]]:
    """`tokenize_turns` with the template's `{% generation %}` blocks rendered as `OPEN`/`CLOSE` characters."""
    marked = re.sub(r"\{%(-?)\s*(end)?generation\s*(-?)%\}",
                    lambda m: f"{{{{{m[1]} '{CLOSE if m[2] else OPEN}' {m[3]}}}}}", given)
    rendered = tokenizer.apply_chat_template(conversations, tokenize=False, chat_template=marked, **kwargs)
    texts, spans = zip(*map(_unmark, rendered), strict=True)
    encoded = tokenizer(list(texts), **ENCODE)
    return [(ids, [_token_span(encoded.encodings[n], start, stop) for start, stop in spans[n]], False)
            for n, ids in enumerate(encoded["input_ids"])]


def _unmark(text: str) -> tuple[str, list[tuple[int, int]]]:
    """`text` without the marker characters, and the (start, end) character span each OPEN/CLOSE pair enclosed."""
    # Where each marker falls in the text without them; they alternate OPEN, CLOSE (a Jinja block always closes).
    marks = [found.start() - n for n, found in enumerate(re.finditer(f"[{OPEN}{CLOSE}]", text))]
    return text.replace(OPEN, "").replace(CLOSE, ""), list(zip(marks[::2], marks[1::2], strict=False))


def _token_span(encoding, start: int, stop: int) -> tuple[int, int]:
    """The tokens overlapping characters [start, stop): the first ending after `start` to the first starting after."""
    def first(position: int, edge: int) -> int:  # the first token whose start (edge 0) or end (1) is past it
        return bisect.bisect_right(range(len(encoding)), position, key=lambda n: encoding.token_to_chars(n)[edge])
    return first(start, 1), first(stop - 1, 0)


def _by_prefixes(tokenizer, conversations: list[list[dict]], template: str | None, kwargs: dict
                 ) -> list[tuple[list[int], list[tuple[int, int]], bool]]:
    """`tokenize_turns` for a template without markers: each assistant turn's span runs from where the conversation
    up to it, rendered with the generation prompt, ends, to where the conversation up to and including it ends
    (three batched renders); `drift` where such a prompt is not a prefix of the whole."""
    import numpy as np
    answers = [(n, a) for n, turns in enumerate(conversations) for a, t in enumerate(turns) if t["role"] == "assistant"]
    heads, ends = [conversations[n][:a] for n, a in answers], [conversations[n][:a + 1] for n, a in answers]

    def render(conversations: list, generation: bool = False) -> list[str]:
        return tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=generation,
                                             chat_template=template, **kwargs)

    full, head_texts, end_texts = render(conversations), render(heads, True), render(ends)
    encoded = tokenizer(full, return_offsets_mapping=True, **ENCODE)
    out = [(ids, [], False) for ids in encoded["input_ids"]]
    offsets = [np.asarray(o, dtype=np.int64).reshape(-1, 2) for o in encoded["offset_mapping"]]
    for (n, _), head, end in zip(answers, head_texts, end_texts, strict=True):
        text, starts_ends = full[n], offsets[n]
        start = len(head) if end.startswith(head) else len(os.path.commonprefix([head, end]))
        first = int(np.searchsorted(starts_ends[:, 1], start, side="right"))  # first token ending after `start`
        if text.startswith(end):
            last = int(np.searchsorted(starts_ends[:, 0], len(end), side="left"))  # first token starting at its end
        else:  # the template closes a last turn differently (Phi-4 adds its EOS): the tokens the two share
            last = int(np.searchsorted(starts_ends[:, 1], len(os.path.commonprefix([end, text])), side="right"))
        drift = not text.startswith(head) or last <= first
        out[n] = (out[n][0], out[n][1] + [(first, max(first, last))], out[n][2] or drift)  # drifted: maybe empty
    return out


def stop_token_ids(tokenizer, generation_config=None, eos_token: str | None = None) -> list[int]:
    """The tokens that end an answer: the EOS (training.eos_token, else the tokenizer's) first, then the generation
    config's EOS ids (end-of-turn tokens such as <|eot_id|> or <|im_end|>), no repeats."""
    ids = [tokenizer.convert_tokens_to_ids(eos_token) if eos_token else tokenizer.eos_token_id]
    extra = getattr(generation_config, "eos_token_id", None)
    ids += [extra] if isinstance(extra, int) else list(extra or [])
    return list(dict.fromkeys(i for i in ids if i is not None))


def special_text_rows(records, tokenizer, chunk: int = 10_000) -> tuple[int, int | None, str | None]:
    """(rows, first row, where in it and which text) of the records whose messages hold a special token's text (`</s>`,
    `<|im_end|>` …): the tokenizer reads it as the token itself, so an end-of-turn token inside an answer teaches the
    model to stop there (in TRL too). Column-wise over the Arrow turns (one RE2 pass), no row held in Python."""
    import pyarrow.compute as pc
    texts = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special} | {tokenizer.eos_token} - {None}
    texts = sorted(texts, key=len, reverse=True)  # the EOS too: training.eos_token may name an added token
    pattern, count, first = "|".join(map(re.escape, texts)), 0, None
    for n, batch in enumerate(records.select_columns(["prompt", "completion"]).with_format("arrow").iter(chunk)
                              if texts and records is not None else ()):
        found = set()
        for turns in (batch.column(c).combine_chunks() for c in ("prompt", "completion")):  # shuffled: a chunk a row
            hit = pc.match_substring_regex(pc.struct_field(pc.list_flatten(turns), "content"), pattern)
            found.update(pc.list_parent_indices(turns).filter(pc.fill_null(hit, False)).to_pylist())
        count += len(found)
        first = n * chunk + min(found) if found and first is None else first
    if first is None:
        return 0, None, None
    turn = next(t for t in records[first]["prompt"] + records[first]["completion"] if re.search(pattern, t["content"]))
    return count, first, f"in its {turn['role']} turn: {re.search(pattern, turn['content']).group()!r}"


def multi_turn(dataset) -> bool:
    """Whether a prompt/completion dataset holds a completion of more than one turn (a conversation)."""
    import pyarrow.compute as pc
    if "completion" not in getattr(dataset, "column_names", ()):
        return False
    completions = dataset.select_columns(["completion"]).with_format("arrow")[:].column("completion")
    return (pc.max(pc.list_value_length(completions)).as_py() or 0) > 1
