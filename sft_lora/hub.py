"""The Hugging Face Hub, reached only where the recipe names it: endpoint `HF_ENDPOINT`, token `HF_TOKEN` from the
environment (never a recipe value or a stored login); a hub id that does not answer, said in seconds; the push of a
run's outputs, checked before training; the base model's license for the cards, read from the local cache only."""

import os
from pathlib import Path

from .config import Recipe, RecipeError, looks_like_hub_id
from .text import first_line


def _endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT  # read now: a test or a launcher may set it late


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def check_reachable(recipe: Recipe) -> None:
    """A hub id the hub does not answer for within 5 s: one line now, not a minute of the hub client's retries."""
    model = None if recipe.model.build_tiny else recipe.model.name_or_path  # a tiny model is built, not fetched
    names = [(key, value) for key, value in (("model.name_or_path", model), ("data.path", recipe.data.path))
             if isinstance(value, str) and looks_like_hub_id(value)]
    if not _offline() and names and (problem := _unreachable()):
        key, name = names[0]
        raise RecipeError(f"{key}: '{name}' is a hub id but {_endpoint()} cannot be reached ({problem}); "
                          f"set HF_HUB_OFFLINE=1 to use the copy in the local cache, or set {key} to a local path")


def _unreachable() -> str | None:
    """Why the hub does not answer within 5 s, or None: any answer will do."""
    import httpx

    try:
        httpx.head(_endpoint(), timeout=5)
    except httpx.HTTPError as exc:
        return first_line(exc)
    return None


def check_push(recipe: Recipe) -> None:
    """Before training, not only after it: a push needs a token in the environment, a repo id and the network."""
    if not (repo := recipe.output.push_to_hub):
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not os.environ.get("HF_TOKEN"):
        raise RecipeError(f"output.push_to_hub: pushing to '{repo}' needs HF_TOKEN (a write token) in the "
                          "environment; export it or remove output.push_to_hub")
    if _offline():
        raise RecipeError(f"output.push_to_hub: HF_HUB_OFFLINE is set, so '{repo}' cannot be pushed to; unset it "
                          "or remove output.push_to_hub")
    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise RecipeError(f"output.push_to_hub: '{repo}' is not a repo id ({first_line(exc)})") from None
    if problem := _unreachable():
        raise RecipeError(f"output.push_to_hub: {_endpoint()} cannot be reached ({problem}), so '{repo}' cannot be "
                          "pushed to; check the network or remove output.push_to_hub")


def push_outputs(recipe: Recipe) -> str:
    """Upload the merged model (else the adapters), card included, to `output.push_to_hub` (private if new); its URL."""
    from huggingface_hub import HfApi

    repo, directory = recipe.output.push_to_hub, recipe.final_dir
    api = HfApi(endpoint=_endpoint(), token=os.environ.get("HF_TOKEN") or False)  # False: no stored login
    try:
        api.create_repo(repo, private=True, exist_ok=True)
        commit = api.upload_folder(repo_id=repo, folder_path=directory,
                                   commit_message=f"sft_lora: {recipe.model_name} {recipe.method}")
    except Exception as exc:  # HTTP errors, no network: the outputs on disk are kept, so nothing to continue
        error = RecipeError(f"output.push_to_hub: could not push {directory} to '{repo}' ({first_line(exc)}); the "
                            f"outputs are saved; check that HF_TOKEN may write to it, then: hf upload {repo} "
                            f"{directory}")
        error.training_started = False  # a --resume would not push: no continue command
        raise error from None
    print(f"pushed {directory} to {commit.commit_url}")
    return commit.commit_url


def base_license(base_model: str) -> dict[str, str]:
    """The license fields the base model's own card names (local dir, or the hub cache; never the network): license,
    and for `license: other` (EXAONE's) its license_name and license_link, a link into a hub base's repo made
    absolute so it still points there from this model's card; {} when unknown."""
    from huggingface_hub import ModelCard, hf_hub_download

    readme, hub = Path(base_model) / "README.md", looks_like_hub_id(base_model)
    try:
        if not readme.is_file():
            readme = Path(hf_hub_download(base_model, "README.md", local_files_only=True)) if hub else None
        data = ModelCard.load(readme).data.to_dict() if readme else {}
    except Exception:  # no card, not cached, unreadable metadata: the license is unknown
        return {}
    fields = {key: data[key] if isinstance(data[key], list) else str(data[key])  # `license: [mit, apache-2.0]` too
              for key in ("license", "license_name", "license_link") if data.get(key)}
    if "://" not in (link := fields.pop("license_link", "")) and link and hub:  # relative to the base's own repo
        link = f"https://huggingface.co/{base_model}/blob/main/{link.removeprefix('./')}"
    return ({"license_link": link} if "://" in link else {}) | fields if "license" in fields else {}
