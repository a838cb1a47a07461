"""Secrets: the token formats a recipe may not hold, the environment variables that hold one, and the redaction of
both from every output and error line."""

import os
import re

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
        re.search(r"token|key|secret|password|passwd|credential|auth", name, re.IGNORECASE))


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

