"""Keep API keys and tokens out of recipes: a recipe is saved beside the adapters, in checkpoints and in logs.

Tokens belong in the environment (HF_TOKEN, WANDB_API_KEY, …), which sft_lora never copies into an output. A
recipe value that looks like a token — a known token format, or the value of a secret-named environment
variable (a `${VAR}` reference expands to it) — is rejected at load time, naming the key but not the value.
"""

from __future__ import annotations

import os
import re
from typing import Any

# A name (environment variable or recipe key) that says its value is a secret; vocabulary tokens are not.
SECRET_NAME = re.compile(r"token|key|secret|password|passwd|credential|auth", re.IGNORECASE)
TOKEN_NAMES = {"eos_token", "pad_token", "bos_token", "unk_token"}


def is_secret_name(name: str) -> bool:
    return name.lower() not in TOKEN_NAMES and bool(SECRET_NAME.search(name))
TOKEN_FORMATS = {
    "a Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}"),
    "an OpenAI/Anthropic-style key": re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"),
    "a GitHub token": re.compile(r"\b(gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})"),
    "an AWS access key id": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    "a Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    # 40 hex digits, as a wandb key is; not as a path part or `@revision` (a commit sha: a snapshot directory)
    "a wandb API key (40 hex digits)": re.compile(r"(?<![\w/@])[0-9a-f]{40}(?![\w/])"),
}
NOT_SECRET = {"model.revision"}  # a commit sha is 40 hex digits too


def secret_env_values() -> dict[str, str]:
    """name → value of environment variables whose name says they hold a secret (8+ characters, not a path)."""
    return {k: v for k, v in os.environ.items()
            if is_secret_name(k) and len(v) >= 8 and not os.path.exists(v)}


def scrub(text: str) -> str:
    """`text` with each secret environment value and each token-shaped part replaced by `<redacted>`."""
    for secret in secret_env_values().values():
        text = text.replace(secret, "<redacted>")
    for pattern in TOKEN_FORMATS.values():
        text = pattern.sub("<redacted>", text)
    return text


def find_secret(values: dict[str, Any]) -> tuple[str, str] | None:
    """(dotted key, what it looks like) of the first value that looks like a secret, or None.

    `values` maps section → {key: value}, or a top-level key → value."""
    env = secret_env_values()
    for dotted, value in _flatten(values):
        if not isinstance(value, str) or dotted in NOT_SECRET:
            continue
        for name, secret in env.items():
            if secret in value:
                return dotted, f"the value of ${name}"
        for kind, pattern in TOKEN_FORMATS.items():
            if pattern.search(value):
                return dotted, kind
    return None


def _flatten(values: Any, prefix: str = ""):
    if isinstance(values, dict):
        for key, value in values.items():
            yield from _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(values, (list, tuple)):
        for value in values:
            yield from _flatten(value, prefix)
    else:
        yield prefix, values
