"""timm vision towers (open_clip's ``TimmModel``): the ViT family, Swin, FastViT (MobileCLIP) and ConvNeXt.

- ViT family (``trunk.blocks``): SigLIP and SigLIP 2, EVA01/EVA02, PE, ViTamin's transformer stage,
  MobileCLIP-B/MobileCLIP2-B/L, ViT-relpos. Attention keeps q, k and v in one fused ``attn.qkv`` linear
  (split exactly into ``attn.qkv.{q,k,v}_proj``) or as separate ``attn.{q,k,v}_proj`` (EVA02); the output
  is ``attn.proj``; the MLP is ``mlp.fc1``/``mlp.fc2``, a gated MLP's two input linears both ``fc1``
  (SwiGLU: ``mlp.fc1_g``/``mlp.fc1_x``; ViTamin's GeGLU: ``mlp.w0``/``mlp.w1``, output ``mlp.w2``). The
  attention-pool head of SigLIP and PE (``trunk.attn_pool``: ``q``, fused ``kv`` split into
  ``kv.{k,v}_proj``, ``proj``, ``mlp.fc1/fc2``) is labelled ``block: "pool"``.
- Swin (``trunk.layers.<stage>.blocks``): window attention with a fused ``attn.qkv`` (split), ``attn.proj``,
  ``mlp.fc1/fc2``; blocks numbered through the stages.
- FastViT (MobileCLIP S0-S4, ``trunk.stages.<stage>.blocks``): the attention stages' ``token_mixer.qkv``
  (split) and ``token_mixer.proj``; every block's MLP is two 1x1 convolutions, computed as linears
  (``mlp.fc1.linear``, ``mlp.fc2.linear``).
- ConvNeXt (``trunk.stages.<stage>.blocks``): no attention; the MLP ``mlp.fc1/fc2`` (1x1 convolutions where
  the model uses them, computed as linears).
"""

from __future__ import annotations

from open_clip.timm_model import TimmModel
from timm.layers import Attention, AttentionPoolLatent, AttentionRope, Mlp
from timm.models.convnext import ConvNeXt
from timm.models.eva import Eva, EvaAttention
from timm.models.fastvit import Attention as FastVitAttention
from timm.models.fastvit import ConvMlp, FastVit
from timm.models.swin_transformer import SwinTransformer, WindowAttention
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_relpos import RelPosAttention, VisionTransformerRelPos
from torch import nn

from kr_vlm.models.converted import PointwiseConv, SplitLinear, is_pointwise_conv, split_eva_qkv
from kr_vlm.models.towers.base import Conversion, TowerKind, numbered, present, staged

QKV = ("q_proj", "k_proj", "v_proj")


def _with_fused(attribute: str, names: tuple[str, ...]):
    def convert(module: nn.Module) -> nn.Module:
        setattr(module, attribute, SplitLinear.split(getattr(module, attribute), names))
        return module

    return convert


def _pointwise_mlp(module: nn.Module) -> nn.Module:
    module.fc1, module.fc2 = PointwiseConv.from_conv(module.fc1), PointwiseConv.from_conv(module.fc2)
    return module


FUSED_QKV = Conversion(
    applies=lambda module: (
        isinstance(module, (Attention, AttentionRope, RelPosAttention, WindowAttention, FastVitAttention))
        and type(getattr(module, "qkv", None)) is nn.Linear
    ),
    convert=_with_fused("qkv", QKV),
)
EVA_FUSED_QKV = Conversion(
    applies=lambda module: isinstance(module, EvaAttention) and type(module.qkv) is nn.Linear,
    convert=lambda module: (split_eva_qkv(module), module)[1],
)
POOL_FUSED_KV = Conversion(
    applies=lambda module: isinstance(module, AttentionPoolLatent) and type(module.kv) is nn.Linear,
    convert=_with_fused("kv", ("k_proj", "v_proj")),
)
POINTWISE_MLP = Conversion(
    applies=lambda module: isinstance(module, (Mlp, ConvMlp)) and is_pointwise_conv(module.fc1),
    convert=_pointwise_mlp,
    hides=("fc1", "fc2"),
)
CONVERSIONS = (FUSED_QKV, EVA_FUSED_QKV, POOL_FUSED_KV, POINTWISE_MLP)

ATTENTION_LAYERS = {
    "q": ("attn.q_proj", "attn.qkv.q_proj"),
    "k": ("attn.k_proj", "attn.qkv.k_proj"),
    "v": ("attn.v_proj", "attn.qkv.v_proj"),
    "o": ("attn.proj",),
}
MLP_LAYERS = {
    "fc1": ("mlp.fc1", "mlp.fc1_g", "mlp.fc1_x", "mlp.w0", "mlp.w1", "mlp.fc1.linear"),
    "fc2": ("mlp.fc2", "mlp.w2", "mlp.fc2.linear"),
}


def _trunk_is(*classes: type):
    return lambda tower: isinstance(tower, TimmModel) and isinstance(tower.trunk, classes)


TIMM_VIT = TowerKind(
    name="timm ViT",
    matches=_trunk_is(VisionTransformer, Eva, VisionTransformerRelPos),
    blocks=lambda tower: numbered("trunk.blocks", tower.trunk.blocks),
    block_layers={**ATTENTION_LAYERS, **MLP_LAYERS},
    poolers=lambda tower: [
        (name, pool)
        for name, pool in present(tower, "trunk.attn_pool")
        if isinstance(pool, AttentionPoolLatent)
    ],
    pooler_layers={
        "q": ("q",),
        "k": ("kv.k_proj",),
        "v": ("kv.v_proj",),
        "o": ("proj",),
        "fc1": ("mlp.fc1",),
        "fc2": ("mlp.fc2",),
    },
    conversions=CONVERSIONS,
    unlabelled="the patch embedding (ViTamin's and MobileCLIP-B's convolutional stem included) and the "
    "projection head",
)

TIMM_SWIN = TowerKind(
    name="timm Swin",
    matches=_trunk_is(SwinTransformer),
    blocks=lambda tower: staged("trunk.layers", tower.trunk.layers),
    block_layers={**ATTENTION_LAYERS, **MLP_LAYERS},
    conversions=CONVERSIONS,
    unlabelled="the patch embedding and patch merging, the projection head",
)

TIMM_FASTVIT = TowerKind(
    name="timm FastViT",
    matches=_trunk_is(FastVit),
    blocks=lambda tower: staged("trunk.stages", tower.trunk.stages),
    block_layers={
        "q": ("token_mixer.qkv.q_proj",),
        "k": ("token_mixer.qkv.k_proj",),
        "v": ("token_mixer.qkv.v_proj",),
        "o": ("token_mixer.proj",),
        **MLP_LAYERS,
    },
    conversions=CONVERSIONS,
    unlabelled="the convolutional stem, RepMixer token mixers, positional convolutions and the final "
    "convolution (convolutions, not linears); q/k/v/o exist in the attention stages only",
)

TIMM_CONVNEXT = TowerKind(
    name="timm ConvNeXt",
    matches=_trunk_is(ConvNeXt),
    blocks=lambda tower: staged("trunk.stages", tower.trunk.stages),
    block_layers=MLP_LAYERS,
    conversions=CONVERSIONS,
    unlabelled="no attention (so no q/k/v/o); the depthwise convolutions, stem and downsampling",
)

KINDS = (TIMM_VIT, TIMM_SWIN, TIMM_FASTVIT, TIMM_CONVNEXT)
