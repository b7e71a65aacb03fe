"""Layers of CLIP towers that hide their linears, rewritten as modules that call plain ``nn.Linear`` children.

Adapters (ours and peft's) replace ``nn.Linear`` modules by name and take effect only where the model
calls them. Three kinds of layer in open_clip's zoo keep that from working, and each gets an exact
replacement here (outputs equal up to float rounding):

- a fused projection, one ``nn.Linear`` whose output is q, k and v side by side (timm's ``attn.qkv``,
  the ``kv`` of timm's attention pool): :class:`SplitLinear` computes it as one linear a part
  (``q_proj``, ``k_proj``, ``v_proj``) and concatenates, so the owning attention's own forward (q/k norms,
  rope, masks, fused or eager attention) runs unchanged; EVA's fused attention, which adds its q and v
  biases itself through ``F.linear(x, self.qkv.weight, bias)``, gets its biases moved into the parts
  (:func:`split_eva_qkv`);
- a 1x1 ``nn.Conv2d`` used as a linear over channels (FastViT's and conv-MLP ConvNeXt's MLPs):
  :class:`PointwiseConv` calls an ``nn.Linear`` on channels-last input;
- open_clip's ResNet ``AttentionPool2d``, which hands its projection weights to
  ``F.multi_head_attention_forward``: :class:`SeparateAttentionPool2d` calls them.

Every replacement knows the stock layout of its weights (``stock_state``), so :func:`fuse_qkv_state_dict`
turns a state dict of a converted model back into one that stock open_clip and timm load.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kr_vlm.models.attention import SeparateQKVAttention, SeparateQKVCustomAttention, linear_like

__all__ = [
    "PointwiseConv",
    "SeparateAttentionPool2d",
    "SplitLinear",
    "fuse_qkv_state_dict",
    "is_pointwise_conv",
    "split_eva_qkv",
]


class SplitLinear(nn.Module):
    """A linear layer whose output features are computed in named parts, each a plain ``nn.Linear``.

    ``forward(x)`` is ``torch.cat([part(x) for part in parts], dim=-1)``: the fused layer's output, so the
    module that owns it (``attn.qkv(x)``) works unchanged while each part can be adapted on its own.
    ``parent_biases`` names, for parts whose bias the stock layout keeps on the parent module rather than
    in the fused layer (EVA's ``q_bias`` / ``v_bias``), the parent's parameter name; the export writes them
    there.
    """

    def __init__(
        self, parts: Mapping[str, nn.Linear], parent_biases: Mapping[str, str] | None = None
    ) -> None:
        super().__init__()
        if len({part.in_features for part in parts.values()}) != 1:
            raise ValueError("the parts of a SplitLinear must share their input features")
        for name, part in parts.items():
            self.add_module(name, part)
        self.part_names = tuple(parts)
        self.parent_biases = dict(parent_biases or {})
        self.in_features = next(iter(parts.values())).in_features
        self.out_features = sum(part.out_features for part in parts.values())

    @classmethod
    def split(
        cls,
        linear: nn.Linear,
        names: Sequence[str],
        biases: Sequence[torch.Tensor | None] | None = None,
        parent_biases: Mapping[str, str] | None = None,
    ) -> SplitLinear:
        """``linear`` cut into ``len(names)`` equal parts along its outputs, weights copied exactly.

        ``biases`` (one a part, or None for none) replaces the chunks of ``linear.bias``.
        """
        weights = linear.weight.chunk(len(names), dim=0)
        if biases is None:
            biases = linear.bias.chunk(len(names)) if linear.bias is not None else [None] * len(names)
        parts = {
            name: linear_like(weight, bias) for name, weight, bias in zip(names, weights, biases, strict=True)
        }
        return cls(parts, parent_biases).train(linear.training)

    def parts(self) -> list[nn.Linear]:
        return [getattr(self, name) for name in self.part_names]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts()], dim=-1)

    def stock_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        """Replace this module's part keys in ``state`` (module name ``prefix``) by the fused layer's."""
        parent = prefix.rpartition(".")[0]
        weights = [state.pop(f"{prefix}.{name}.weight") for name in self.part_names]
        state[f"{prefix}.weight"] = torch.cat(weights)
        fused_biases = []
        for name in self.part_names:
            bias = state.pop(f"{prefix}.{name}.bias", None)
            if name in self.parent_biases:
                state[f"{parent}.{self.parent_biases[name]}" if parent else self.parent_biases[name]] = bias
            elif bias is not None:
                fused_biases.append(bias)
        if fused_biases:
            state[f"{prefix}.bias"] = torch.cat(fused_biases)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, parts={self.part_names}"


def split_eva_qkv(attention: nn.Module) -> None:
    """Split the fused ``qkv`` of a timm ``EvaAttention`` into ``qkv.q_proj`` / ``k_proj`` / ``v_proj``.

    EVA's fused attention keeps its q and v biases on the attention (``q_bias``, ``v_bias``; k has none)
    and, when they exist, calls ``F.linear(x, self.qkv.weight, bias)``, which never calls the ``qkv``
    module: an adapter there would never run. The biases move into the parts and the attention's own
    ``q_bias`` / ``v_bias`` become None, so its forward calls ``self.qkv(x)``.
    """
    q_bias = getattr(attention, "q_bias", None)
    if q_bias is None:
        attention.qkv = SplitLinear.split(attention.qkv, ("q_proj", "k_proj", "v_proj"))
        return
    if getattr(attention, "k_bias", None) is not None and torch.any(attention.k_bias != 0):
        raise NotImplementedError(
            "EvaAttention with a non-zero k_bias cannot be split (timm keeps it at zero)"
        )
    attention.qkv = SplitLinear.split(
        attention.qkv,
        ("q_proj", "k_proj", "v_proj"),
        biases=(q_bias, None, attention.v_bias),
        parent_biases={"q_proj": "q_bias", "v_proj": "v_bias"},
    )
    attention.q_bias = attention.v_bias = attention.k_bias = None


def is_pointwise_conv(module: nn.Module) -> bool:
    """True for an ``nn.Conv2d`` that is a linear map over channels: 1x1, stride 1, no padding, one group."""
    return (
        type(module) is nn.Conv2d
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.padding in ((0, 0), "valid")
        and module.dilation == (1, 1)
        and module.groups == 1
    )


class PointwiseConv(nn.Module):
    """A 1x1 ``nn.Conv2d`` on ``(N, C, H, W)`` input computed by ``linear`` on channels-last input."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> PointwiseConv:
        if not is_pointwise_conv(conv):
            raise ValueError(f"{conv} is not a pointwise (1x1, stride 1, unpadded, ungrouped) convolution")
        return cls(linear_like(conv.weight.flatten(1), conv.bias)).train(conv.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.movedim(1, -1)).movedim(-1, 1)

    def stock_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        state[f"{prefix}.weight"] = state.pop(f"{prefix}.linear.weight")[:, :, None, None]
        if f"{prefix}.linear.bias" in state:
            state[f"{prefix}.bias"] = state.pop(f"{prefix}.linear.bias")


class SeparateAttentionPool2d(nn.Module):
    """open_clip's ResNet ``AttentionPool2d`` with its projections called as modules.

    Same parameters under the same names (``positional_embedding``, ``q_proj``, ``k_proj``, ``v_proj``,
    ``c_proj``), so state dicts load both ways unchanged; the forward computes what
    ``F.multi_head_attention_forward`` computes there, the mean token attending over all tokens.
    """

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.positional_embedding = source.positional_embedding
        self.k_proj, self.q_proj, self.v_proj = source.k_proj, source.q_proj, source.v_proj
        self.c_proj = source.c_proj
        self.num_heads = source.num_heads
        self.train(source.training)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # NCHW -> N(HW)C
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        # Only the mean token's output is kept, so it is the only query.
        q, k, v = self._heads(self.q_proj(x[:, :1])), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.c_proj(out.transpose(1, 2).flatten(2))[:, 0]


def fuse_qkv_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo every conversion in a state dict of ``model`` (in place; returned): the q/k/v projections of
    converted attention become open_clip's fused ``in_proj_weight`` / ``in_proj_bias`` again, split
    linears timm's fused ``qkv`` / ``kv`` (EVA's q and v biases back on the attention), pointwise linears
    1x1 convolutions; so stock open_clip and timm load it."""
    for name, module in model.named_modules():
        if isinstance(module, (SeparateQKVAttention, SeparateQKVCustomAttention, SplitLinear, PointwiseConv)):
            module.stock_state(state, name)
    return state
