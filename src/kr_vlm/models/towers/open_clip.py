"""open_clip's own towers: ``VisionTransformer``, ``TextTransformer`` (or CLIP's text transformer at the
model's top level), CoCa's multimodal text decoder, and the ResNet of the RN50-style CLIPs.

Attention is ``nn.MultiheadAttention`` (or open_clip's ``Attention`` in custom blocks) with q, k and v
fused in one parameter; it becomes four linears (``kr_vlm.models.attention``). A block is
``ResidualAttentionBlock``: ``attn.{q,k,v,out}_proj`` and ``mlp.c_fc`` / ``mlp.c_proj``.
"""

from __future__ import annotations

from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet
from open_clip.transformer import Attention as OpenClipAttention
from open_clip.transformer import MultimodalTransformer, TextTransformer, Transformer, VisionTransformer
from torch import nn

from kr_vlm.models.attention import SeparateQKVAttention, SeparateQKVCustomAttention
from kr_vlm.models.converted import SeparateAttentionPool2d
from kr_vlm.models.towers.base import Conversion, TowerKind, numbered, present

#: The linears of a ``ResidualAttentionBlock`` (and of an attentional pooler's converted attention).
BLOCK_LAYERS = {
    "q": ("attn.q_proj",),
    "k": ("attn.k_proj",),
    "v": ("attn.v_proj",),
    "o": ("attn.out_proj",),
    "fc1": ("mlp.c_fc",),
    "fc2": ("mlp.c_proj",),
}

MULTIHEAD_ATTENTION = Conversion(
    applies=lambda module: isinstance(module, nn.MultiheadAttention),
    convert=SeparateQKVAttention.from_multihead_attention,
)
CUSTOM_ATTENTION = Conversion(
    applies=lambda module: isinstance(module, OpenClipAttention), convert=SeparateQKVCustomAttention
)


def _resblocks_path(tower: nn.Module) -> str | None:
    """Where a tower keeps open_clip's residual blocks: ``resblocks`` in a ``Transformer`` (CLIP keeps its
    text transformer at the top level), ``transformer.resblocks`` in the towers around one."""
    for path in ("resblocks", "transformer.resblocks"):
        try:
            if isinstance(tower.get_submodule(path), nn.ModuleList):
                return path
        except AttributeError:
            continue
    return None


def _is_transformer_tower(tower: nn.Module) -> bool:
    # Also a module laid out as open_clip's (resblocks of attn.*_proj and mlp.c_fc / c_proj).
    return (
        isinstance(tower, (VisionTransformer, TextTransformer, Transformer))
        or _resblocks_path(tower) is not None
    )


def _transformer_blocks(tower: nn.Module) -> list[tuple[str, nn.Module]]:
    path = _resblocks_path(tower)
    return numbered(path, tower.get_submodule(path))


def _decoder_blocks(decoder: nn.Module) -> list[tuple[str, nn.Module]]:
    # The decoder alternates a causal self-attention block and a cross-attention block over the image.
    return [
        item
        for index in range(len(decoder.resblocks))
        for item in (
            (f"resblocks.{index}", decoder.resblocks[index]),
            (f"cross_attn.{index}", decoder.cross_attn[index]),
        )
    ]


def _init_decoder_projection(decoder: nn.Module) -> None:
    # open_clip's MultimodalTransformer.init_parameters (which never runs: it reads attributes the decoder
    # does not have) would draw it so; left alone it is torch.empty's memory, zeros or garbage.
    nn.init.normal_(decoder.text_projection, std=decoder.width**-0.5)


OPEN_CLIP_DECODER = TowerKind(
    name="open_clip CoCa decoder",
    matches=lambda tower: isinstance(tower, MultimodalTransformer),
    blocks=_decoder_blocks,
    block_layers=BLOCK_LAYERS,
    conversions=(MULTIHEAD_ATTENTION,),
    random_init=_init_decoder_projection,
    unlabelled="blocks alternate self-attention (even) and cross-attention over the image tokens (odd)",
)

OPEN_CLIP_TRANSFORMER = TowerKind(
    name="open_clip transformer",
    matches=_is_transformer_tower,
    blocks=_transformer_blocks,
    block_layers=BLOCK_LAYERS,
    poolers=lambda tower: [
        (name, pooler)
        for name, pooler in present(tower, "attn_pool", "attn_pool_contrastive")
        if pooler is not None
    ],
    pooler_layers={layer: BLOCK_LAYERS[layer] for layer in ("q", "k", "v", "o")},
    conversions=(MULTIHEAD_ATTENTION, CUSTOM_ATTENTION),
    unlabelled="patch and token embeddings, the output projection (a parameter, not a linear)",
)

OPEN_CLIP_RESNET = TowerKind(
    name="open_clip ResNet",
    matches=lambda tower: isinstance(tower, ModifiedResNet),
    blocks=lambda tower: [],
    block_layers={},
    poolers=lambda tower: [("attnpool", tower.attnpool)],
    pooler_layers={"q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("c_proj",)},
    conversions=(
        Conversion(
            applies=lambda module: isinstance(module, AttentionPool2d), convert=SeparateAttentionPool2d
        ),
    ),
    unlabelled="the convolutions of the stem and the bottleneck blocks: adapters go on linear layers, "
    "and the attention pool is the ResNet's only one",
)

KINDS = (OPEN_CLIP_DECODER, OPEN_CLIP_TRANSFORMER, OPEN_CLIP_RESNET)
