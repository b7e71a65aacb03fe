"""Hugging Face text towers (open_clip's ``HFTextEncoder``), in the three layouts open_clip's zoo uses.

- BERT style (BERT, RoBERTa, XLM-RoBERTa; ``transformer.encoder.layer``): ``attention.self.query`` /
  ``key`` / ``value``, ``attention.output.dense``, ``intermediate.dense``, ``output.dense``.
- T5 style (mT5's encoder; ``transformer.block``): ``layer.0.SelfAttention.q/k/v/o``, the MLP's
  ``layer.1.DenseReluDense.wi`` (gated: ``wi_0`` and ``wi_1``, both ``fc1``) and ``wo``.
- BART style (NLLB's M2M100 encoder; ``transformer.layers``): ``self_attn.q_proj/k_proj/v_proj/out_proj``,
  ``fc1``, ``fc2``.

Their attention calls these linears as modules, so nothing is converted. The pooler and the projection
head (``proj``) are not labelled.
"""

from __future__ import annotations

from open_clip.hf_model import HFTextEncoder
from torch import nn

from kr_vlm.models.towers.base import TowerKind, numbered

UNLABELLED = "token and position embeddings, the pooler and the projection head (proj)"


def _has_blocks(path: str):
    def matches(tower: nn.Module) -> bool:
        if not isinstance(tower, HFTextEncoder):
            return False
        try:
            return isinstance(tower.get_submodule(path), nn.ModuleList)
        except AttributeError:
            return False

    return matches


HF_BERT = TowerKind(
    name="Hugging Face BERT-style text",
    matches=_has_blocks("transformer.encoder.layer"),
    blocks=lambda tower: numbered("transformer.encoder.layer", tower.transformer.encoder.layer),
    block_layers={
        "q": ("attention.self.query",),
        "k": ("attention.self.key",),
        "v": ("attention.self.value",),
        "o": ("attention.output.dense",),
        "fc1": ("intermediate.dense",),
        "fc2": ("output.dense",),
    },
    unlabelled=UNLABELLED,
)

HF_T5 = TowerKind(
    name="Hugging Face T5-style text",
    matches=_has_blocks("transformer.block"),
    blocks=lambda tower: numbered("transformer.block", tower.transformer.block),
    block_layers={
        "q": ("layer.0.SelfAttention.q",),
        "k": ("layer.0.SelfAttention.k",),
        "v": ("layer.0.SelfAttention.v",),
        "o": ("layer.0.SelfAttention.o",),
        "fc1": ("layer.1.DenseReluDense.wi", "layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_1"),
        "fc2": ("layer.1.DenseReluDense.wo",),
    },
    unlabelled=UNLABELLED,
)

HF_BART = TowerKind(
    name="Hugging Face BART-style text",
    matches=_has_blocks("transformer.layers"),
    blocks=lambda tower: numbered("transformer.layers", tower.transformer.layers),
    block_layers={
        "q": ("self_attn.q_proj",),
        "k": ("self_attn.k_proj",),
        "v": ("self_attn.v_proj",),
        "o": ("self_attn.out_proj",),
        "fc1": ("fc1",),
        "fc2": ("fc2",),
    },
    unlabelled=UNLABELLED,
)

KINDS = (HF_BERT, HF_T5, HF_BART)
