"""open_clip's model zoo at reduced depth, and the check that kr_vlm adapts each of its models exactly.

:func:`shrunk_config` turns any ``open_clip.list_models()`` config into one that builds fast with random
weights: 2 blocks a transformer tower (1 a stage of a staged timm tower, a first stage of 2 for Swin's
shifted windows), vocabularies of 1000 tokens, and with ``small=True`` narrow widths and small images too (the
real widths otherwise). timm towers get their depth through a timm model registered under a new name
(``timm.models.register_model``), Hugging Face text towers a ``config.json`` written into a Hugging Face
cache folder (:func:`write_hf_text_config`) with the published shape of the hub model (depth and
vocabulary reduced).

:func:`check_model` walks one config the way kr_vlm uses it: build, convert (features equal), select every
label of every tower, inject KRAdapter and then LoRA (through peft) on all of them with the forward check,
one training step (every adapter gets a gradient), merge (equal to unmerged) and export (stock open_clip
and timm load the merged weights and give the same features). ``scripts/zoo_coverage.py`` runs it over the
zoo; ``tests/test_zoo.py`` over the representative subset, and over every config with ``--zoo``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import timm
import torch
from torch import nn

from kr_vlm.adapters import (
    AdapterConfig,
    adapted_layers,
    inject_adapters,
    merge_adapters,
    unload,
    unmerge_adapters,
)
from kr_vlm.adapters.merged import merged_state_dict
from kr_vlm.models.converted import fuse_qkv_state_dict
from kr_vlm.models.hf_offline import hf_text_overrides
from kr_vlm.models.targets import clip_targets
from kr_vlm.models.towers import (
    clip_towers,
    convert_towers,
    example_forward,
    example_inputs,
    initialize_random_towers,
)

__all__ = [
    "HF_TEXT_CONFIGS",
    "ZooResult",
    "build_model",
    "check_model",
    "shrunk_config",
    "write_hf_text_config",
]

#: Blocks of each transformer tower in the shrunk configs.
DEPTH = 2
#: Width and attention heads of every tower with ``small=True``.
SMALL_WIDTH, SMALL_HEADS = 64, 2
#: The vocabularies of the shrunk configs, every width: they set only the size of the token embedding
#: (and of CoCa's caption logits), and the zoo's reach 256k tokens.
VOCAB = 1000
#: Tolerances (relative): conversion in fp32, and in float64 where fp32 rounding alone reaches the fp32
#: tolerance (deep real-width towers: there the fp32 model differs from itself in float64 by as much);
#: merge and export.
CONVERSION_TOLERANCE, CONVERSION_TOLERANCE_FP64, MERGE_TOLERANCE = 1e-6, 1e-12, 1e-5

#: The hub names of open_clip's Hugging Face text towers, with their ``model_type`` and the fields of
#: their published ``config.json`` that give the tower its shape (kr_vlm cannot download them here).
HF_TEXT_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "roberta-base": ("roberta", {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072}),
    "xlm-roberta-base": (
        "xlm-roberta",
        {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072},
    ),
    "xlm-roberta-large": (
        "xlm-roberta",
        {"hidden_size": 1024, "num_attention_heads": 16, "intermediate_size": 4096},
    ),
    "google/mt5-base": ("mt5", {"d_model": 768, "d_ff": 2048, "d_kv": 64, "num_heads": 12}),
    "google/mt5-xl": ("mt5", {"d_model": 2048, "d_ff": 5120, "d_kv": 64, "num_heads": 32}),
    "facebook/nllb-200-distilled-600M": (
        "m2m_100",
        {"d_model": 1024, "encoder_ffn_dim": 4096, "encoder_attention_heads": 16},
    ),
    "facebook/nllb-200-distilled-1.3B": (
        "m2m_100",
        {"d_model": 1024, "encoder_ffn_dim": 8192, "encoder_attention_heads": 16},
    ),
}
# Per model type: the depth and vocabulary fields, and fixed values (a one-layer decoder that
# open_clip drops, RoBERTa's padding index and position table).
_HF_FIELDS = {
    "roberta": (
        "num_hidden_layers",
        {"pad_token_id": 1, "max_position_embeddings": 514, "type_vocab_size": 1},
    ),
    "xlm-roberta": (
        "num_hidden_layers",
        {"pad_token_id": 1, "max_position_embeddings": 514, "type_vocab_size": 1},
    ),
    "mt5": (
        "num_layers",
        {"num_decoder_layers": 1, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
    ),
    "m2m_100": ("encoder_layers", {"decoder_layers": 1, "decoder_ffn_dim": 64, "pad_token_id": 1}),
}
_SMALL_HF = {
    "roberta": {
        "hidden_size": SMALL_WIDTH,
        "num_attention_heads": SMALL_HEADS,
        "intermediate_size": 2 * SMALL_WIDTH,
    },
    "mt5": {
        "d_model": SMALL_WIDTH,
        "d_ff": 2 * SMALL_WIDTH,
        "d_kv": SMALL_WIDTH // SMALL_HEADS,
        "num_heads": SMALL_HEADS,
    },
    "m2m_100": {
        "d_model": SMALL_WIDTH,
        "encoder_ffn_dim": 2 * SMALL_WIDTH,
        "encoder_attention_heads": SMALL_HEADS,
    },
}
_SMALL_HF["xlm-roberta"] = _SMALL_HF["roberta"]


def write_hf_text_config(hub_cache: Path, hub_name: str, small: bool = False) -> Path:
    """Write ``config.json`` of the Hugging Face text tower ``hub_name`` (a key of :data:`HF_TEXT_CONFIGS`)
    at reduced depth into the Hugging Face cache folder ``hub_cache``, in the cache's layout
    (``models--<org>--<name>/snapshots/<revision>/config.json`` and ``refs/main``); returns the file."""
    from transformers import AutoConfig

    model_type, shape = HF_TEXT_CONFIGS[hub_name]
    depth_field, fixed = _HF_FIELDS[model_type]
    fields = {**shape, **(_SMALL_HF[model_type] if small else {}), **fixed, depth_field: DEPTH}
    fields["vocab_size"] = VOCAB
    revision = "0" * 40
    repo = hub_cache / f"models--{hub_name.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    AutoConfig.for_model(model_type, **fields).save_pretrained(snapshot)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot / "config.json"


# The keyword arguments of each timm model registered by _shrunk_timm_name, by registered name.
_SHRUNK_TIMM_KWARGS: dict[str, dict[str, Any]] = {}


@functools.cache
def _shrunk_timm_name(timm_name: str, small: bool) -> str:
    """A timm model name registered for ``timm_name`` at reduced depth (and width with ``small``)."""
    with torch.device("meta"):
        trunk = timm.create_model(timm_name)
    kwargs: dict[str, Any] = {}
    if timm.models.is_model_in_modules(timm_name, ["fastvit"]):
        kwargs["layers"] = (1,) * len(trunk.stages)
        if small:  # attention heads are 32 wide
            kwargs["embed_dims"] = tuple(32 * 2 ** (stage // 2) for stage in range(len(trunk.stages)))
    elif timm.models.is_model_in_modules(timm_name, ["convnext"]):
        kwargs["depths"] = (1,) * len(trunk.stages)
        if small:
            kwargs["dims"] = tuple(16 * 2**stage for stage in range(len(trunk.stages)))
    elif timm.models.is_model_in_modules(timm_name, ["swin_transformer"]):
        kwargs["depths"] = (2,) + (1,) * (len(trunk.layers) - 1)  # block 1 shifts its windows
        if small:  # at its own image size: its windows tile the feature maps of that size
            kwargs["img_size"] = trunk.patch_embed.img_size[0]
            kwargs.update(embed_dim=32, num_heads=tuple(2**stage for stage in range(len(trunk.layers))))
    else:  # the ViT family
        kwargs["depth"] = DEPTH
        if small:
            kwargs["img_size"] = 4 * trunk.patch_embed.feat_ratio()  # a 4x4 grid of patches
            # ViTamin's and the hybrid ViT's convolutional stems fix their width.
            if not timm.models.is_model_in_modules(timm_name, ["vitamin", "vision_transformer_hybrid"]):
                kwargs.update(embed_dim=SMALL_WIDTH, num_heads=SMALL_HEADS)
    original = timm.models.model_entrypoint(timm_name)

    def entrypoint(pretrained: bool = False, **given: Any) -> nn.Module:
        return original(pretrained=pretrained, **{**given, **kwargs})

    entrypoint.__name__ = f"{timm_name}_kr_vlm_{'small' if small else 'depth'}{DEPTH}"
    timm.models.register_model(entrypoint)
    _SHRUNK_TIMM_KWARGS[entrypoint.__name__] = kwargs
    return entrypoint.__name__


def shrunk_config(name: str, small: bool = False) -> dict[str, Any]:
    """The open_clip config of ``name`` at reduced depth (and width, with ``small``); see the module doc."""
    cfg = copy.deepcopy(open_clip.get_model_config(name))
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    towers = [text] + ([cfg["multimodal_cfg"]] if "multimodal_cfg" in cfg else [])
    if small:
        cfg["embed_dim"] = SMALL_WIDTH
    if vision.get("timm_model_name"):
        vision["timm_model_name"] = _shrunk_timm_name(vision["timm_model_name"], small)
        if small:  # a ViT's image size is its registered img_size; convolutional towers take any
            vision["image_size"] = _SHRUNK_TIMM_KWARGS[vision["timm_model_name"]].get("img_size", 64)
    elif isinstance(vision.get("layers"), (list, tuple)):  # open_clip's ResNet
        vision["layers"] = [1, 1, 1, 1]
        if small:
            vision.update(width=16, image_size=64)
    else:
        vision["layers"] = DEPTH
        if small:
            patch = vision.get("patch_size", 16)
            vision.update(width=SMALL_WIDTH, head_width=SMALL_WIDTH // SMALL_HEADS, image_size=4 * patch)
            vision.update(attn_pooler_heads=SMALL_HEADS, attn_pooler_queries=8)
    for tower in towers:
        if tower.get("hf_model_name"):
            continue
        tower["layers"] = DEPTH
        tower["vocab_size"] = VOCAB
        if small:
            tower.update(width=SMALL_WIDTH, heads=SMALL_HEADS)
            if tower is not text:  # CoCa's decoder
                tower.update(attn_pooler_heads=SMALL_HEADS, n_queries=8, dim_head=SMALL_WIDTH // SMALL_HEADS)
    return cfg


def build_model(name: str, cfg: dict[str, Any], hub_cache: Path | None = None, seed: int = 0) -> nn.Module:
    """A stock open_clip model of ``cfg`` with random weights (Hugging Face text towers from ``hub_cache``),
    in eval mode; the model class chosen as ``open_clip.create_model`` chooses it."""
    cfg = {**copy.deepcopy(cfg), **hf_text_overrides(name, cfg, hub_cache, allow_download=False)}
    custom_text = cfg.pop("custom_text", False) or bool(cfg["text_cfg"].get("hf_model_name"))
    model_class = (
        open_clip.CoCa
        if "multimodal_cfg" in cfg
        else open_clip.CustomTextCLIP
        if custom_text
        else open_clip.CLIP
    )
    torch.manual_seed(seed)
    return initialize_random_towers(model_class(**cfg)).eval()


@dataclasses.dataclass
class ZooResult:
    """What :func:`check_model` found for one config; ``status`` is ``FULL`` when every check passed."""

    name: str
    towers: dict[str, str] = dataclasses.field(default_factory=dict)  # tower label -> kind name
    labels: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # tower label -> layers
    conversion_error: float | None = None
    conversion_error_fp64: float | None = None  # measured where the fp32 one is above its tolerance
    adapters: dict[str, str] = dataclasses.field(default_factory=dict)  # method -> "ok" or what failed
    export_error: float | None = None
    seconds: float = 0.0
    failure: str = ""

    @property
    def status(self) -> str:
        unlabelled = [tower for tower in self.towers if not self.labels.get(tower)]
        failed = self.failure or unlabelled or any(verdict != "ok" for verdict in self.adapters.values())
        return "FAILED" if failed else "FULL"

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "status": self.status}


def _outputs(model: nn.Module, image: torch.Tensor, text: torch.Tensor) -> list[torch.Tensor]:
    """The float tensors ``model(image, text)`` returns (features, CoCa's decoder logits), scalars left out."""
    out = model(image, text)
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else [out]
    return [
        value for value in values if torch.is_tensor(value) and value.is_floating_point() and value.dim() > 0
    ]


def _loss(outputs: list[torch.Tensor]) -> torch.Tensor:
    """Every output against a fixed random direction: a loss whose gradient reaches every layer the
    outputs depend on (the square of a normalised feature would be constant, its gradient zero)."""
    generator = torch.Generator().manual_seed(1)
    return sum((tensor.float() * torch.randn(tensor.shape, generator=generator)).sum() for tensor in outputs)


def _relative_error(reference: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    return max(
        ((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item()
        for a, b in zip(reference, other, strict=True)
    )


def _float64_conversion_error(
    name: str, cfg: dict[str, Any], hub_cache: Path | None, inputs: tuple[torch.Tensor, torch.Tensor]
) -> float:
    """The relative change of the outputs by ``convert_towers``, the model and images in float64."""
    model = build_model(name, cfg, hub_cache).double()
    image, text = inputs
    with torch.no_grad():
        reference = _outputs(model, image.double(), text)
        return _relative_error(reference, _outputs(convert_towers(model), image.double(), text))


def _check_method(
    model: nn.Module,
    method: str,
    targets: dict[str, dict[str, Any]],
    inputs: tuple[torch.Tensor, torch.Tensor],
    stock: Callable[[], nn.Module],
) -> tuple[str, float | None]:
    """Inject ``method`` on ``targets`` (forward check on), train one step, merge, export: ``("ok" or what
    failed, relative export error)``. The model is left without adapters."""
    inject_adapters(model, AdapterConfig(method, targets), forward_check=example_forward(model))
    try:
        outputs = _outputs(model, *inputs)
        _loss(outputs).backward()
        layers = dict(adapted_layers(model))
        without_gradient = [
            name
            for name, layer in layers.items()
            if not any(
                t.grad is not None and t.grad.abs().sum() > 0 for t in layer.adapter_state_dict().values()
            )
        ]
        if without_gradient:
            return f"no gradient in {len(without_gradient)} adapters, e.g. {without_gradient[0]}", None
        trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
        torch.optim.AdamW(trainable, lr=1e-2).step()
        with torch.no_grad():
            adapted = _outputs(model, *inputs)
            if _relative_error([tensor.detach() for tensor in outputs], adapted) <= MERGE_TOLERANCE:
                return "the training step did not change the outputs", None
            merge_adapters(model)
            merged = _outputs(model, *inputs)
            unmerge_adapters(model)
            if (error := _relative_error(adapted, merged)) > MERGE_TOLERANCE:
                return f"merged outputs differ from unmerged ones by {error:.1e}", None
            plain = stock()
            plain.load_state_dict(fuse_qkv_state_dict(model, merged_state_dict(model)), strict=True)
            export_error = _relative_error(adapted, _outputs(plain, *inputs))
            if export_error > MERGE_TOLERANCE:
                return f"stock open_clip loading the export differs by {export_error:.1e}", export_error
            return "ok", export_error
    finally:
        model.zero_grad(set_to_none=True)
        unload(model)


def check_model(name: str, small: bool = False, hub_cache: Path | None = None) -> ZooResult:
    """Check one ``open_clip.list_models()`` config at reduced depth (see the module doc); Hugging Face
    text towers read their ``config.json`` from ``hub_cache`` (:func:`write_hf_text_config`)."""
    result, started = ZooResult(name), time.perf_counter()
    try:
        cfg = shrunk_config(name, small)
        model = build_model(name, cfg, hub_cache)
        inputs = example_inputs(model, batch=1, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            reference = _outputs(model, *inputs)
            convert_towers(model)
            result.conversion_error = _relative_error(reference, _outputs(model, *inputs))
        if result.conversion_error > CONVERSION_TOLERANCE:
            result.conversion_error_fp64 = _float64_conversion_error(name, cfg, hub_cache, inputs)
            if result.conversion_error_fp64 > CONVERSION_TOLERANCE_FP64:
                result.failure = (
                    f"conversion changed the outputs by {result.conversion_error:.1e} "
                    f"({result.conversion_error_fp64:.1e} in float64)"
                )
                return result
        result.towers = {
            tower.label: tower.kind.name if tower.kind else type(tower.module).__name__
            for tower in clip_towers(model)
        }
        targets = clip_targets(model, towers="all")
        for labels in targets.values():
            layers = result.labels.setdefault(labels["tower"], [])
            layer = labels["layer"] if labels["block"] != "pool" else f"pool.{labels['layer']}"
            if layer not in layers:
                layers.append(layer)
        for method in ("kradapter", "lora"):
            verdict, export_error = _check_method(
                model, method, targets, inputs, lambda: build_model(name, cfg, hub_cache)
            )
            result.adapters[method] = verdict
            if export_error is not None:
                result.export_error = max(export_error, result.export_error or 0.0)
    except Exception as error:  # one config's failure is a row of the table, not the end of the walk
        result.failure = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    finally:
        result.seconds = time.perf_counter() - started
    return result


#: Configs that are not FULL, each with the reason (the zoo test and the coverage table accept them).
ALLOW_LIST: dict[str, str] = {}
