"""Where a NeMo plugin's ``.nemo`` weights come from: a local file, the Hugging Face cache, or a download.

Parakeet (speech-to-text) and Sortformer (diarization) are separate extras
that both restore a ``.nemo`` file; this is their one answer to "which
file", without importing NeMo (only ``huggingface_hub``, which NeMo brings).
"""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
from huggingface_hub import constants as hf_constants

from aistack_core import Network


def looks_like_path(name: str) -> bool:
    """A setting naming a file rather than a hub id."""
    return name.endswith(".nemo") or name.startswith(("/", ".", "~")) or "\\" in name


def hub_cache_file(repo_id: str, cache_dir: Path | None = None) -> Path | None:
    """The repository's ``.nemo`` in the local Hugging Face cache (the file NeMo itself downloads)."""
    filename = repo_id.rsplit("/", 1)[-1] + ".nemo"
    try:
        found = huggingface_hub.try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
    except ValueError:  # not a valid repository id
        return None
    return Path(found) if isinstance(found, str) else None


def resolve_nemo_weights(
    name: str, *, setting: str, default_id: str, what: str, provider: str, allow_downloads: bool
) -> Path | str:
    """A local ``.nemo`` path, or the hub id when NeMo may download it; else a ``Network`` error saying how.

    :param name: the setting's value (or ``default_id``);
    :param setting: the setting's name, for the messages;
    :param what: the model family ("Parakeet"), for the messages.
    """
    if looks_like_path(name):
        path = Path(name).expanduser()
        if not path.is_file():
            raise Network(
                f"{setting}={name} is not a file. Point it at a {what} .nemo file, "
                f"or unset it to use {default_id} from the Hugging Face cache.",
                provider=provider,
            )
        return path
    cached = hub_cache_file(name)
    if cached is not None:
        return cached
    if allow_downloads and not hf_constants.HF_HUB_OFFLINE:
        return name
    how = (
        "unset HF_HUB_OFFLINE so AISTACK_ALLOW_DOWNLOADS can fetch it"
        if allow_downloads
        else "allow downloads with AISTACK_ALLOW_DOWNLOADS=on"
    )
    raise Network(
        f"{name} is not available locally: it is not in the Hugging Face cache. Download it once "
        f"(huggingface-cli download {name}), set {setting} to a .nemo file, or {how}.",
        provider=provider,
    )
