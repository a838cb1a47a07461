"""Text that leaves sft_lora, safe and legible: no secret in it (the token formats a recipe may not hold, secret
environment values, a recipe's secret-named keys: `<redacted>`), one printable line per error, and the terminal
columns of wide (Hangul) text, with names cut to fit a table."""

import os
import re
import unicodedata
from typing import Any

# Tokens stay out of recipes (a recipe is saved beside the adapters, in checkpoints and logs); they belong in the
# environment, which sft_lora never copies into an output.
WANDB_KEY = "a wandb API key (40 hex digits)"  # a commit sha has the same shape: `model.revision` may hold one
TOKEN_FORMATS = {
    "a Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}"),
    "an OpenAI/Anthropic-style key": re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"),
    "a GitHub token": re.compile(r"\b(gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})"),
    "an AWS access key id": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    "a Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    # 40 hex digits, as a wandb key is; not as a path part or `@revision` (a commit sha: a snapshot directory)
    WANDB_KEY: re.compile(r"(?<![\w/@])[0-9a-f]{40}(?![\w/])"),
}


def is_secret_name(name: str) -> bool:
    """Whether a name (environment variable or recipe key) says its value is a secret; vocabulary tokens do not."""
    return name.lower() not in {"eos_token", "pad_token", "bos_token", "unk_token"} and bool(
        re.search(r"token|key|secret|password|passwd|credential|auth(?!or)", name, re.IGNORECASE))  # not GIT_AUTHOR_*


def secret_env_values() -> dict[str, str]:
    """name → value of environment variables whose name says they hold a secret (8+ characters, not a path)."""
    return {k: v for k, v in os.environ.items() if is_secret_name(k) and len(v) >= 8 and not os.path.exists(v)}


def scrub(text: str) -> str:
    """`text` with each secret environment value and each token-shaped part replaced by `<redacted>`."""
    for secret in secret_env_values().values():
        text = text.replace(secret, "<redacted>")
    for pattern in TOKEN_FORMATS.values():
        text = pattern.sub("<redacted>", text)
    return text


def first_line(exc: BaseException, whole: bool = False) -> str:
    """The first line of an upstream exception's message (its type when empty), for a one-line RecipeError; `whole`:
    all its lines joined (an upstream config check may end its first line mid-sentence: "…, but found")."""
    lines = str(exc).split() if whole else str(exc).strip().splitlines()[:1]
    return " ".join(lines) or type(exc).__name__


def printable(text: str) -> str:
    """An error line made safe to print: control characters and lone surrogates escaped, credentials redacted."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in scrub(text))


def columns(text: str) -> int:
    """Terminal columns of `text`: a wide character (Hangul) takes two, a combining one (decomposed Hangul) none."""
    return sum(0 if unicodedata.category(c) in ("Mn", "Me", "Cf") or 0x1160 <= ord(c) <= 0x11FF else
               2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def shortened(text: str, width: int, middle: bool = False) -> str:
    """`text` on one printable line (`printable`; whitespace runs as one space) in at most `width` columns (a CJK
    character takes two), cut at the end or the middle."""
    text = printable(" ".join(text.split()))
    if columns(text) <= width:
        return text
    if not middle:
        return _start(text, width - 1) + "…"
    head = _start(text, (width - 1) // 2)
    return head + "…" + _start(text[::-1], width - 1 - columns(head))[::-1]


def table_names(names: list[str], width: int = 34) -> dict[str, str]:
    """Each source or file name as the tables show it: cut in the middle, or whole where cuts would look alike."""
    cut = {name: shortened(name, width, middle=True) for name in names}
    return cut if len(set(cut.values())) == len(cut) else {name: printable(" ".join(name.split())) for name in names}


def cell(text: str) -> str:
    """`text` as one markdown table cell: printable, on one line, its `|` escaped."""
    return printable(" ".join(text.split())).replace("|", "\\|")


def _start(text: str, width: int) -> str:
    """The longest start of `text` within `width` columns."""
    used = 0
    for n, char in enumerate(text):
        used += columns(char)
        if used > width:
            return text[:n]
    return text


def redact(value: Any, key: str = "") -> Any:
    """`value` with every string under a secret-looking key (`training.hub_token: ${HF_TOKEN}`) replaced."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    return "<redacted>" if isinstance(value, str) and value and is_secret_name(key) else value


def say(line: str) -> None:
    """print, by the first process only: every rank of a launch runs the same steps and would say the same line."""
    if os.environ.get("RANK", "0") == "0":
        print(line)


def table(titles, rows: list[list[str]]) -> list[str]:
    """The lines of a table under `titles` (title, least width): the first column left-aligned, the others right-
    aligned and widened to keep two spaces before their longest value (a count of 100 M tokens or more); widths in
    terminal columns (`columns`), so a Korean source name keeps the table aligned."""
    widths = [max([least] + [columns(row[n]) + 2 * (n > 0) for row in rows]) for n, (_, least) in enumerate(titles)]

    def cell(text: str, n: int) -> str:
        space = " " * (widths[n] - columns(text))
        return space + text if n else text + space

    return ["  " + "".join(cell(text, n) for n, text in enumerate(row)) for row in [[t for t, _ in titles], *rows]]
