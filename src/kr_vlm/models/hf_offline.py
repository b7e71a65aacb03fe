"""Hugging Face text towers and tokenizers of open_clip models, built offline from local files.

open_clip's ``HFTextEncoder`` calls ``AutoConfig.from_pretrained(<hub name>)`` and, unless a CLIP
checkpoint is loaded, ``AutoModel.from_pretrained``; its ``HFTokenizer`` calls
``AutoTokenizer.from_pretrained(<hub name>)``: each reaches for the network. kr_vlm resolves those names to
folders first, a local folder as given or the snapshot in the Hugging Face cache
(``huggingface_hub.hf_hub_download(..., local_files_only=True)``, which honours ``HF_HUB_CACHE`` / ``HF_HOME``), and hands open_clip
the folders: the text tower is built from its ``config.json`` with random weights (the CLIP checkpoint, when
there is one, brings the trained ones), the tokenizer from its files. Nothing is downloaded unless
``allow_download`` is set and ``HF_HUB_OFFLINE`` is not; a missing file is a :class:`HubFilesNotFoundError`
that names the files, the folder looked in and the command that fetches them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HFValidationError
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import validate_repo_id

from kr_vlm.errors import KrVlmError

__all__ = ["HubFilesNotFoundError", "hf_text_overrides", "hf_tokenizer", "open_clip_config"]

log = logging.getLogger(__name__)

CONFIG_FILES = ("config.json",)
# A tokenizer needs its vocabulary in one of these forms (tokenizer_config.json and the special-tokens map
# come with them when the repo has them).
TOKENIZER_FILES = (
    "tokenizer.json",
    "sentencepiece.bpe.model",
    "spiece.model",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
)
TOKENIZER_PATTERNS = [
    "tokenizer*",
    "special_tokens_map.json",
    "*.model",
    "vocab*",
    "merges.txt",
    "config.json",
]


class HubFilesNotFoundError(KrVlmError, FileNotFoundError):
    """A Hugging Face config or tokenizer that an open_clip model needs is not available locally."""


def hub_cache_folder(repo_id: str, cache_dir: str | os.PathLike | None) -> Path:
    """The folder of ``repo_id`` in the Hugging Face cache (``cache_dir`` or huggingface_hub's own), for
    messages that say where files were looked for."""
    hub_cache = cache_dir if cache_dir is not None else huggingface_hub.constants.HF_HUB_CACHE
    return Path(hub_cache).expanduser() / repo_folder_name(repo_id=repo_id, repo_type="model")


def cached_hub_file(
    repo_id: str, filenames: Sequence[str], cache_dir: str | os.PathLike | None
) -> str | None:
    """Path of the first of ``filenames`` of ``repo_id`` in the Hugging Face cache, without the network."""
    for filename in filenames:
        try:
            return hf_hub_download(repo_id, filename, cache_dir=cache_dir, local_files_only=True)
        except EntryNotFoundError:  # LocalEntryNotFoundError included
            continue
    return None


def _fetch_command(repo_id: str, patterns: Sequence[str]) -> str:
    return (
        'python -c "from huggingface_hub import snapshot_download; '
        f'snapshot_download({repo_id!r}, allow_patterns={list(patterns)!r})"'
    )


def _local_folder(
    name: str,
    files: Sequence[str],
    patterns: Sequence[str],
    what: str,
    cache_dir: str | os.PathLike | None,
    allow_download: bool,
) -> Path:
    """The folder holding one of ``files`` for ``name``: ``name`` itself when it is a local folder, else
    the snapshot of the hub repo ``name`` in the cache, downloaded (``patterns``) when allowed."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        if any((folder / filename).is_file() for filename in files):
            return folder
        raise HubFilesNotFoundError(f"{what}: the folder {folder} holds none of {', '.join(files)}.")
    try:
        validate_repo_id(name)
    except HFValidationError as error:
        raise HubFilesNotFoundError(
            f"{what}: {name!r} is neither a folder nor a Hugging Face hub name ({error})."
        ) from error
    cached = cached_hub_file(name, files, cache_dir)
    if cached is not None:
        return Path(cached).parent
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        reason = "Downloading is off: HF_HUB_OFFLINE is set."
    elif not allow_download:
        reason = "Downloading is off (model.clip.allow_download=true, load_clip(..., allow_download=True), turns it on)."
    else:
        log.info("Downloading %s", what)
        try:
            return Path(snapshot_download(name, allow_patterns=list(patterns), cache_dir=cache_dir))
        except Exception as error:  # any network or hub failure: report it as missing files
            reason = f"Downloading failed: {error}"
    raise HubFilesNotFoundError(
        f"{what} was not found locally. Looked in {hub_cache_folder(name, cache_dir)} (Hugging Face cache) for "
        f"{' or '.join(files)}.\n{reason}\nOn a machine with internet access, fetch it into the Hugging Face "
        f"cache with\n  {_fetch_command(name, patterns)}\nthen copy that cache folder here (or point "
        "HF_HUB_CACHE at it), or give a local folder holding these files instead of the hub name."
    )


def open_clip_config(registered: str) -> dict[str, Any]:
    """The open_clip model config of a registered model name or of a ``local-dir:`` folder."""
    from open_clip.factory import get_model_config

    from kr_vlm.compat import parse_model_name

    schema, identifier = parse_model_name(registered)
    if schema == "local-dir":
        return json.loads((Path(identifier) / "open_clip_config.json").read_text())["model_cfg"]
    return get_model_config(registered)


def hf_text_overrides(
    model_name: str, model_cfg: dict[str, Any], cache_dir: str | os.PathLike | None, allow_download: bool
) -> dict[str, Any]:
    """``open_clip.create_model`` keyword arguments that build ``model_cfg``'s Hugging Face text tower from a
    local ``config.json`` with random weights (``{"text_cfg": {...}}``), or ``{}`` for other text towers."""
    text_cfg = model_cfg.get("text_cfg", {})
    hub_name = text_cfg.get("hf_model_name")
    if not hub_name:
        return {}
    what = (
        f"The Hugging Face config {hub_name!r} of the text tower of {model_name!r} (text_cfg.hf_model_name)"
    )
    folder = _local_folder(hub_name, CONFIG_FILES, CONFIG_FILES, what, cache_dir, allow_download)
    return {"text_cfg": {**text_cfg, "hf_model_name": str(folder), "hf_model_pretrained": False}}


def hf_tokenizer(
    model_name: str, model_cfg: dict[str, Any], cache_dir: str | os.PathLike | None, allow_download: bool
) -> Callable[..., Any] | None:
    """open_clip's ``HFTokenizer`` for ``model_cfg``'s ``text_cfg.hf_tokenizer_name`` (SigLIP's, a Hugging
    Face text tower's), read from local files as ``open_clip.get_tokenizer`` would build it; None when the
    model uses open_clip's own tokenizer."""
    from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer

    text_cfg = model_cfg.get("text_cfg", {})
    hub_name = text_cfg.get("hf_tokenizer_name")
    if not hub_name:
        if "siglip" in model_name.lower() and not allow_download:
            # open_clip.get_tokenizer gives such a name SigLIP's sentencepiece vocabulary, fetched from
            # storage.googleapis.com at every call.
            raise HubFilesNotFoundError(
                f"Model {model_name!r} has no text_cfg.hf_tokenizer_name, and for a name with 'siglip' in it "
                "open_clip downloads SigLIP's tokenizer vocabulary from storage.googleapis.com. Set "
                "text_cfg.hf_tokenizer_name (e.g. 'timm/ViT-B-16-SigLIP', read from the Hugging Face cache), "
                "choose a name without 'siglip' for open_clip's own tokenizer, or allow downloads "
                "(model.clip.allow_download=true)."
            )
        return None
    what = f"The tokenizer {hub_name!r} of {model_name!r} (text_cfg.hf_tokenizer_name)"
    folder = _local_folder(hub_name, TOKENIZER_FILES, TOKENIZER_PATTERNS, what, cache_dir, allow_download)
    try:
        return HFTokenizer(
            str(folder),
            context_length=text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH),
            tokenizer_mode=text_cfg.get("tokenizer_mode"),
            **text_cfg.get("tokenizer_kwargs", {}),
        )
    except (OSError, ValueError) as error:
        raise HubFilesNotFoundError(
            f"{what}: the files in {folder} do not load as a tokenizer: {error}"
        ) from error
