"""Load an open_clip CLIP offline, with its attention converted to separate q/k/v/out linears.

Weights come from a local file, a local folder, or the caches open_clip downloads into (the Hugging
Face hub cache and open_clip's URL cache), looked up the way open_clip and huggingface_hub look them up
(``huggingface_hub.hf_hub_download(..., local_files_only=True)``; huggingface_hub reads ``HF_HOME``,
``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` when it is imported). Nothing is downloaded unless asked for (``allow_download=True``)
and Hugging Face offline mode is off; missing weights raise :class:`WeightsNotFoundError`, which names the
folders looked in and the command that fetches them on a connected machine.
"""

from __future__ import annotations

import atexit
import contextlib
import difflib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import huggingface_hub
import open_clip
import torch
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2
from torch import nn
from torchvision.transforms import Compose, RandomHorizontalFlip

from kr_vlm.compat import OPEN_CLIP_URL_CACHE, parse_model_name, safe_weight_alternatives
from kr_vlm.errors import ConfigError, KrVlmError
from kr_vlm.models.hf_offline import (
    cached_hub_file,
    hf_text_overrides,
    hf_tokenizer,
    hub_cache_folder,
    open_clip_config,
)
from kr_vlm.models.towers import convert_towers, initialize_random_towers
from kr_vlm.models.weights_check import check_shipped_weights, check_weights_file, weights_load_errors

__all__ = ["PRECISIONS", "SHIPPED_WEIGHTS", "WeightsNotFoundError", "load_clip"]

log = logging.getLogger(__name__)

#: Values of open_clip's ``precision`` (``amp*`` keep float32 weights; autocast is the trainer's job).
PRECISIONS = ("fp32", "fp16", "bf16", "pure_fp16", "pure_bf16", "amp", "amp_bf16", "amp_bfloat16")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Preprocessing settings of a pretrained tag (open_clip merges these into the model's preprocess cfg).
TAG_PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode", "fill_color")

# The architectures kr_vlm ships (open_clip model configs, one JSON file each), registered with open_clip
# so that create_model and get_tokenizer know their names.
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)
# Weights shipped inside the package, by (model name, pretrained tag): open_clip has no public way to
# register a tag, so load_clip looks here before open_clip's own tags.
SHIPPED_WEIGHTS_DIR = Path(__file__).parent / "pretrained"
SHIPPED_WEIGHTS: dict[tuple[str, str], Path] = {
    ("kr-vlm-mini", "kr-vlm-mini"): SHIPPED_WEIGHTS_DIR / "kr-vlm-mini.safetensors",
}


class WeightsNotFoundError(KrVlmError, FileNotFoundError):
    """Pretrained weights are neither in a cache nor at the given path (and were not downloaded)."""


def _weights_candidates(filename: str) -> list[str]:
    """The files open_clip's download_pretrained_from_hf would load for ``filename`` of a hub repo, in its
    order: a .safetensors file first where it can be one."""
    return [*safe_weight_alternatives(filename), filename]


def _fetch_command(model_name: str, pretrained: str | None, cache_dir: str | os.PathLike | None) -> str:
    arguments = [repr(model_name)]
    if pretrained is not None:
        arguments.append(f"pretrained={pretrained!r}")
    if cache_dir is not None:
        arguments.append(f"cache_dir={str(cache_dir)!r}")
    return f'python -c "import open_clip; open_clip.create_model({", ".join(arguments)})"'


def _weights_not_found(
    what: str, looked_in: Sequence[str], command: str, reason: str
) -> WeightsNotFoundError:
    folders = "\n".join(f"  - {place}" for place in looked_in)
    return WeightsNotFoundError(
        f"{what} were not found locally. Looked in:\n{folders}\n{reason}\n"
        f"On a machine with internet access, fetch them into open_clip's cache with\n  {command}\n"
        "then copy that cache folder here (to the first folder above, or point HF_HUB_CACHE / cache_dir at "
        "it), or pass pretrained=<path to a .safetensors/.bin/.pt file>."
    )


def _fetched(
    what: str, looked_in: Sequence[str], command: str, allow_download: bool, fetch: Callable[[], Any]
):
    """``fetch()`` (a download through open_clip) when downloading is allowed; else, or when it fails,
    the ``WeightsNotFoundError`` that says where the files were looked for."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise _weights_not_found(what, looked_in, command, "Downloading is off: HF_HUB_OFFLINE is set.")
    if not allow_download:
        reason = (
            "Downloading is off: load_clip(..., allow_download=False), the default "
            "(model.clip.allow_download=true in the configs turns it on)."
        )
        raise _weights_not_found(what, looked_in, command, reason)
    log.info("Downloading %s", what[0].lower() + what[1:])
    try:
        return fetch()
    except Exception as error:  # any network or hub failure: report it as missing weights
        raise _weights_not_found(what, looked_in, command, f"Downloading failed: {error}") from error


def _tag_weights(
    model_name: str,
    tag: str,
    tag_cfg: dict[str, Any],
    cache_dir: str | os.PathLike | None,
    allow_download: bool,
) -> str:
    """Local path of the weights behind an open_clip pretrained tag, from the caches or downloaded."""
    if "file" in tag_cfg:
        return tag_cfg["file"]
    looked_in = []
    if tag_cfg.get("hf_hub"):
        # open_clip's hf_hub entries are "org/repo/filename" or "org/repo/" (default weights filename).
        repo_id, filename = os.path.split(tag_cfg["hf_hub"])
        candidates = _weights_candidates(filename or HF_WEIGHTS_NAME)
        cached = cached_hub_file(repo_id, candidates, cache_dir)
        if cached is not None:
            return cached
        looked_in.append(
            f"{hub_cache_folder(repo_id, cache_dir)} (Hugging Face cache; files {', '.join(candidates)})"
        )
    if tag_cfg.get("url"):
        url_file = Path(cache_dir or OPEN_CLIP_URL_CACHE).expanduser() / os.path.basename(tag_cfg["url"])
        if url_file.is_file():
            return str(url_file)
        looked_in.append(f"{url_file} (open_clip URL cache)")
    what = f"Pretrained weights for model {model_name!r} (pretrained={tag!r})"
    command = _fetch_command(model_name, tag, cache_dir)
    return _fetched(
        what,
        looked_in,
        command,
        allow_download,
        lambda: open_clip.download_pretrained(tag_cfg, cache_dir=cache_dir),
    )


def _has_weights_file(folder: Path) -> bool:
    # The file types open_clip's local-dir loader picks up.
    return any(any(folder.glob(f"*{suffix}")) for suffix in (".safetensors", ".bin", ".pth"))


def _hf_hub_folder(repo_id: str, cache_dir: str | os.PathLike | None, allow_download: bool) -> Path:
    """The cached snapshot folder of an open_clip hub repo (config + weights), downloaded if allowed."""
    config = cached_hub_file(repo_id, ["open_clip_config.json"], cache_dir)
    weights = cached_hub_file(repo_id, _weights_candidates(HF_WEIGHTS_NAME), cache_dir)
    if config is not None and weights is not None and Path(config).parent == Path(weights).parent:
        return Path(config).parent
    looked_in = [
        f"{hub_cache_folder(repo_id, cache_dir)} (Hugging Face cache; files open_clip_config.json and "
        f"{HF_SAFE_WEIGHTS_NAME} or {HF_WEIGHTS_NAME})"
    ]

    def fetch() -> Path:
        download = open_clip.pretrained.download_pretrained_from_hf
        config = download(repo_id, filename="open_clip_config.json", cache_dir=cache_dir)
        download(repo_id, cache_dir=cache_dir)
        return Path(config).parent

    what = f"Config and weights of model 'hf-hub:{repo_id}'"
    return _fetched(
        what, looked_in, _fetch_command(f"hf-hub:{repo_id}", None, cache_dir), allow_download, fetch
    )


def _unknown_model_error(name: str) -> ConfigError:
    known = open_clip.list_models()
    by_lower = {model.lower(): model for model in known}
    close = [by_lower[m] for m in difflib.get_close_matches(name.lower(), list(by_lower), n=5, cutoff=0.6)]
    hint = f" Close matches: {', '.join(close)}." if close else ""
    return ConfigError(
        f"Unknown open_clip model name {name!r} (model.clip.name).{hint} open_clip.list_models() lists all {len(known)} "
        "names; or pass model_cfg={...} to build a custom architecture under this name, or use "
        "'hf-hub:org/repo' / 'local-dir:/path/to/folder'."
    )


# Custom architectures (load_clip's model_cfg) are written here for open_clip.add_model_config, for the
# process's lifetime: open_clip reads the folder again whenever a config is added.
_CUSTOM_CONFIG_DIR: Path | None = None


def _registered_name(name: str, model_cfg: dict[str, Any] | None) -> str:
    """The name open_clip knows the architecture by: ``name``, or for a custom ``model_cfg`` a name made
    of ``name`` and a digest of the config, registered with ``open_clip.add_model_config``.

    The digest keeps two configs given under one name in one process apart (and one config registered
    once), and ``name`` itself never enters open_clip's registry, so it shadows nothing there.
    """
    global _CUSTOM_CONFIG_DIR
    if model_cfg is None:
        return name
    missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(model_cfg)
    if missing:
        raise ConfigError(
            f"model_cfg for {name!r} lacks {sorted(missing)} (open_clip model configs need all three)"
        )
    if name in open_clip.list_models():
        raise ConfigError(
            f"model_cfg was given under the name {name!r}, which open_clip already defines; "
            "choose another name for the custom architecture."
        )
    if "/" in name or ":" in name:
        raise ConfigError(f"a custom architecture name may not contain '/' or ':', got {name!r}")
    text = json.dumps(model_cfg, sort_keys=True)
    registered = f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    if registered not in open_clip.list_models():
        if _CUSTOM_CONFIG_DIR is None:
            _CUSTOM_CONFIG_DIR = Path(tempfile.mkdtemp(prefix="kr_vlm_model_configs_"))
            atexit.register(shutil.rmtree, _CUSTOM_CONFIG_DIR, ignore_errors=True)
        path = _CUSTOM_CONFIG_DIR / f"{registered}.json"
        path.write_text(text)
        open_clip.add_model_config(path)
    return registered


def _looks_like_path(value: str) -> bool:
    return value.lower().endswith(WEIGHT_SUFFIXES) or os.sep in value or "/" in value


def _is_torchscript_archive(path: str) -> bool:
    """OpenAI's original checkpoints (as in the open_clip / OpenAI ``clip`` URL cache) are TorchScript."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(entry.endswith("constants.pkl") for entry in archive.namelist())


def _train_transform(preprocess_cfg: PreprocessCfg, crop_scale: tuple[float, float], flip: bool) -> Compose:
    """CLIP-LoRA's train augmentation: RandomResizedCrop(scale, bicubic) + horizontal flip + CLIP norm."""
    transform = image_transform_v2(preprocess_cfg, is_train=True, aug_cfg=AugmentationCfg(scale=crop_scale))
    # open_clip's train transform starts with RandomResizedCrop (bicubic) and has no flip.
    if flip:
        transform.transforms.insert(1, RandomHorizontalFlip())
    return transform


def _architecture_weights(
    name: str,
    pretrained: str,
    cache_dir: str | os.PathLike | None,
    force_quick_gelu: bool | None,
    allow_download: bool,
) -> tuple[str, bool, dict[str, Any]]:
    """``(weights file, use QuickGELU, preprocess overrides)`` for a named architecture's tag or file."""
    shipped = SHIPPED_WEIGHTS.get((name, pretrained))
    if shipped is not None:
        if not shipped.is_file():
            raise WeightsNotFoundError(
                f"The weights kr_vlm ships for model {name!r} (pretrained={pretrained!r}) are missing: "
                f"{shipped}. Reinstall kr_vlm, or regenerate them with scripts/pretrain_mini.py (README)."
            )
        check_shipped_weights(shipped)
        return str(shipped), bool(force_quick_gelu), {}
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not tag_cfg:
        if os.path.isfile(pretrained):
            check_weights_file(pretrained)
            return pretrained, bool(force_quick_gelu), {}
        if _looks_like_path(pretrained):
            raise WeightsNotFoundError(f"Pretrained weights file for model {name!r} not found: {pretrained}")
        tags = open_clip.list_pretrained_tags_by_model(name) + [
            tag for model, tag in SHIPPED_WEIGHTS if model == name
        ]
        raise ConfigError(
            f"pretrained={pretrained!r} is neither a pretrained tag of {name!r} "
            f"(known tags: {tags or 'none'}) nor an existing weights file."
        )

    quick_gelu = bool(force_quick_gelu)
    if tag_cfg.get("quick_gelu", False):
        if force_quick_gelu is None:
            quick_gelu = True
            log.info(
                "%s weights %r were trained with QuickGELU: building the model with QuickGELU "
                "(force_quick_gelu=True).",
                name,
                pretrained,
            )
        elif not force_quick_gelu:
            log.warning(
                "%s weights %r were trained with QuickGELU but force_quick_gelu=False: "
                "features will not match the original model.",
                name,
                pretrained,
            )
    checkpoint = _tag_weights(name, pretrained, tag_cfg, cache_dir, allow_download)
    # create_model gets a file path, not the tag, so pass on the tag's preprocessing explicitly.
    preprocess_overrides = {key: tag_cfg[key] for key in TAG_PREPROCESS_KEYS if key in tag_cfg}
    return checkpoint, quick_gelu, preprocess_overrides


class _RandomInitWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def _without_random_init_warning(active: bool) -> Iterator[None]:
    """Drop open_clip's warning that a model was "initialized randomly" while ``active``: for a config
    that asks for random weights it is the expected outcome, which ``load_clip`` logs as INFO instead."""
    if not active:
        yield
        return
    # open_clip logs it on the root logger itself, whose own filters see only its own records.
    root, record_filter = logging.getLogger(), _RandomInitWarningFilter()
    root.addFilter(record_filter)
    try:
        yield
    finally:
        root.removeFilter(record_filter)


def load_clip(
    name: str,
    pretrained: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    model_cfg: dict[str, Any] | None = None,
    force_quick_gelu: bool | None = None,
    train_crop_scale: Sequence[float] = (0.08, 1.0),
    train_flip: bool = True,
    allow_download: bool = False,
) -> tuple[nn.Module, Compose, Compose, Callable[..., torch.Tensor]]:
    """Build an open_clip model with converted attention, its train/eval transforms and tokenizer.

    Args:
        name: an open_clip architecture (``"ViT-B-16"``; see ``open_clip.list_models()``), a new name
            for ``model_cfg``, ``"hf-hub:org/repo"`` (config and weights from the Hugging Face cache),
            or ``"local-dir:/path"`` (a folder with ``open_clip_config.json`` and a weights file).
        pretrained: None (random init, of every tower: a Hugging Face text tower is built from its
            ``config.json``, never from its hub weights), an open_clip tag (``"openai"``, ``"laion2b_s34b_b88k"``, ...;
            see ``open_clip.list_pretrained_tags_by_model(name)``), a tag of the weights kr_vlm ships
            (:data:`SHIPPED_WEIGHTS`: ``"kr-vlm-mini"`` for the model ``"kr-vlm-mini"``), or a local ``.safetensors``,
            ``.bin``, ``.pt`` or ``.pth`` file (an open_clip state dict, or OpenAI's TorchScript file).
            ``"local-dir:/path"`` or ``"hf-hub:org/repo"`` here means the same as in ``name`` (config
            and weights both come from there; ``name`` is then only a label). Must be None when
            ``name`` itself has one of these forms.
        cache_dir: where open_clip caches downloads (default: the Hugging Face hub cache, honouring
            ``HF_HUB_CACHE``/``HF_HOME``, and ``~/.cache/clip`` for URL-only weights).
        device: device to build on (default CPU).
        precision: one of :data:`PRECISIONS` (open_clip's meaning; ``fp16``/``bf16`` cast the weights
            the way OpenAI's CLIP did, ``pure_*`` cast everything, ``amp*`` keep float32).
        model_cfg: an open_clip model config dict (``embed_dim``, ``vision_cfg``, ``text_cfg``, ...)
            defining a custom architecture called ``name``; ``name`` must not be a built-in one.
        force_quick_gelu: None picks QuickGELU when the pretrained tag was trained with it (all
            ``openai`` tags) and logs it; True forces QuickGELU; False keeps the architecture's own
            activation (``*-quickgelu`` names have QuickGELU built in) and warns if the tag expects QuickGELU.
        train_crop_scale: the ``scale`` range of the train RandomResizedCrop.
        train_flip: whether the train transform flips images horizontally (CLIP-LoRA does); off for
            classes that a mirror image changes (digits, text).
        allow_download: fetch missing weights, and the Hugging Face configs and tokenizers of Hugging
            Face text towers, from the internet (never when ``HF_HUB_OFFLINE`` is set).

    Returns:
        ``(model, preprocess_train, preprocess_val, tokenizer)``: the model in eval mode with its towers
        converted (``kr_vlm.models.convert_towers``: ``...attn.q_proj`` etc. are ``nn.Linear``); the train transform
        (RandomResizedCrop + horizontal flip + normalisation); open_clip's eval transform; the tokenizer.

    Raises:
        WeightsNotFoundError: the pretrained weights are not available locally (and were not downloaded).
        HubFilesNotFoundError: the Hugging Face config of a text tower (``text_cfg.hf_model_name``) or a
            tokenizer (``text_cfg.hf_tokenizer_name``) is not available locally.
        ValueError: unknown model name or pretrained tag, bad precision, bad model_cfg.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    crop_scale = tuple(float(bound) for bound in train_crop_scale)
    if len(crop_scale) != 2 or not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
        raise ConfigError(
            f"train_crop_scale must be (low, high) with 0 < low <= high <= 1, got {train_crop_scale}"
        )
    pretrained = os.fspath(pretrained) if pretrained is not None else None

    if pretrained is not None and parse_model_name(pretrained)[0] is not None:
        # The folder / hub repo holds the architecture (open_clip_config.json) as well as the weights.
        if model_cfg is not None:
            raise ConfigError(
                f"pretrained={pretrained!r} brings its own model config: leave model_cfg at None."
            )
        log.info("Building %r from %s (architecture from its open_clip_config.json).", name, pretrained)
        name, pretrained = pretrained, None

    schema, identifier = parse_model_name(name)
    checkpoint, quick_gelu, preprocess_overrides = None, bool(force_quick_gelu), {}
    if schema is not None:
        if pretrained is not None or model_cfg is not None:
            raise ConfigError(
                f"{name!r} carries its own config and weights: leave pretrained and model_cfg at None."
            )
        if schema == "hf-hub":
            name = f"local-dir:{_hf_hub_folder(identifier, cache_dir, allow_download)}"
        elif not Path(identifier).is_dir() or not _has_weights_file(Path(identifier)):
            # open_clip would only warn about a folder without weights and return a random model.
            raise WeightsNotFoundError(
                f"Model {name!r}: {identifier} is not a folder holding open_clip_config.json and a "
                ".safetensors/.bin/.pth weights file (the layout of an open_clip Hugging Face repo)."
            )
    else:
        if model_cfg is None and name not in open_clip.list_models():
            raise _unknown_model_error(name)
        if pretrained is not None:
            checkpoint, quick_gelu, preprocess_overrides = _architecture_weights(
                name, pretrained, cache_dir, force_quick_gelu, allow_download
            )

    random_weights = schema is None and checkpoint is None
    if random_weights:
        log.info("%s: random weights, as configured (pretrained is None).", name)
    registered = _registered_name(name, model_cfg)
    architecture = open_clip_config(registered)
    # Hugging Face text towers and tokenizers come from local files (kr_vlm.models.hf_offline).
    text_overrides = hf_text_overrides(name, architecture, cache_dir, allow_download)
    with _without_random_init_warning(random_weights), weights_load_errors(checkpoint, name):
        model = open_clip.create_model(
            registered,
            pretrained=checkpoint,
            precision=precision,
            device=device or "cpu",
            force_quick_gelu=quick_gelu,
            force_preprocess_cfg=preprocess_overrides,
            cache_dir=cache_dir,
            # OpenAI's original checkpoint is a TorchScript archive, which torch.load refuses under
            # weights_only=True; everything else is loaded the safe way.
            weights_only=not (checkpoint is not None and _is_torchscript_archive(checkpoint)),
            # A Hugging Face text tower's own pretrained weights are never fetched: random weights for
            # pretrained=None, the CLIP checkpoint's otherwise.
            pretrained_text=False,
            **text_overrides,
        )
    # A local-dir model's tokenizer files sit in its folder, where open_clip reads them.
    tokenizer = (schema is None and hf_tokenizer(name, architecture, cache_dir, allow_download)) or (
        open_clip.get_tokenizer(registered)
    )

    if random_weights:
        initialize_random_towers(model)
    convert_towers(model)
    model.eval()
    preprocess_cfg = PreprocessCfg(**model.visual.preprocess_cfg)
    preprocess_train = _train_transform(preprocess_cfg, crop_scale, train_flip)
    preprocess_val = image_transform_v2(preprocess_cfg, is_train=False)
    return model, preprocess_train, preprocess_val, tokenizer
