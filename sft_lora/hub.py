"""The Hugging Face Hub from a recipe: a hub id the machine cannot reach fails in one line within seconds (the hub
client would retry for about a minute first), and `output.push_to_hub: <repo id>` hands the finished model on.

The endpoint is `HF_ENDPOINT` (huggingface_hub's own variable) and the token is `HF_TOKEN` from the environment,
never a recipe value or a stored login.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import Recipe, RecipeError, first_line, looks_like_hub_id


def _endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT  # read now: a test or a launcher may set it late


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def check_reachable(recipe: Recipe) -> None:
    """RecipeError when the recipe names a model or data set by hub id and the hub does not answer within 5 s."""
    if _offline():
        return
    names = [(key, value) for key, value in (("model.name_or_path", recipe.model.name_or_path),
                                             ("data.path", recipe.data.path))
             if isinstance(value, str) and looks_like_hub_id(value)
             and not (key == "model.name_or_path" and recipe.model.build_tiny)]
    if not names:
        return
    import httpx

    try:
        httpx.head(_endpoint(), timeout=5)  # any answer will do: the hub is reachable
    except httpx.HTTPError as exc:
        key, name = names[0]
        raise RecipeError(f"{key}: '{name}' is a hub id but {_endpoint()} cannot be reached ({first_line(exc)}); "
                          f"set HF_HUB_OFFLINE=1 to use the copy in the local cache, or set {key} to a local path"
                          ) from None


def check_push(recipe: Recipe) -> None:
    """Before training: a push needs a token in the environment and the network."""
    repo = recipe.output.push_to_hub
    if repo and not os.environ.get("HF_TOKEN"):
        raise RecipeError(f"output.push_to_hub: pushing to '{repo}' needs HF_TOKEN (a write token) in the "
                          "environment; export it or remove output.push_to_hub")
    if repo and _offline():
        raise RecipeError(f"output.push_to_hub: HF_HUB_OFFLINE is set, so '{repo}' cannot be pushed to; unset it "
                          "or remove output.push_to_hub")


def push_outputs(recipe: Recipe) -> str:
    """Upload the merged model (the adapters when the run does not merge), model card included, to the private (if
    new) repo `output.push_to_hub`; return the commit URL."""
    from huggingface_hub import HfApi

    repo = recipe.output.push_to_hub
    directory = Path(recipe.merged_dir if recipe.output.merge else recipe.adapters_dir)
    api = HfApi(endpoint=_endpoint(), token=os.environ.get("HF_TOKEN") or False)  # False: no stored login
    try:
        api.create_repo(repo, private=True, exist_ok=True)
        commit = api.upload_folder(repo_id=repo, folder_path=directory,
                                   commit_message=f"sft_lora: {recipe.model_name} {recipe.method}")
    except Exception as exc:  # HTTP errors, bad repo ids, no network: the outputs on disk are kept
        raise RecipeError(f"output.push_to_hub: could not push {directory} to '{repo}' ({first_line(exc)}); the "
                          "outputs are saved; check the repo id and that HF_TOKEN may write to it") from None
    print(f"pushed {directory} to {commit.commit_url}")
    return commit.commit_url
