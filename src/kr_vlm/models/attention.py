"""Attention with separate q/k/v/out ``nn.Linear`` layers, as drop-in replacements for open_clip's.

``nn.MultiheadAttention`` keeps q, k and v fused in one ``in_proj_weight`` Parameter, so adapters that
replace ``nn.Linear`` layers by name (ours and peft's) cannot reach them one by one. ``convert_attention``
swaps every such module of a model for an equivalent one whose projections are four plain linears
(``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``), with the weights copied exactly, computed with
``F.scaled_dot_product_attention``. open_clip's own ``Attention`` (used by ``CustomResidualAttentionBlock``
when a tower config sets ``qk_norm``, ``scale_heads``, ``scale_attn_inner``, ...) is converted the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import Attention as OpenClipAttention
from torch import nn

__all__ = ["SeparateQKVAttention", "SeparateQKVCustomAttention", "convert_attention", "linear_like"]


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A mask in ``nn.MultiheadAttention`` semantics as an additive float mask.

    For MultiheadAttention a boolean True means "masked out"; for ``scaled_dot_product_attention`` a
    boolean True means "may attend". Converting booleans to 0 / -inf here sidesteps that inversion.
    """
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"attention masks must be bool or floating point, got {mask.dtype}")
    return mask.to(dtype)


def linear_like(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight``/``bias`` (same device, dtype and requires_grad)."""
    out_features, in_features = weight.shape
    linear = nn.Linear(
        in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    # Keep a frozen (e.g. locked) tower frozen after conversion.
    linear.weight.requires_grad_(weight.requires_grad)
    if bias is not None:
        linear.bias.requires_grad_(bias.requires_grad)
    return linear


class SeparateQKVAttention(nn.Module):
    """``nn.MultiheadAttention`` with separate ``q_proj``/``k_proj``/``v_proj``/``out_proj`` linears.

    Same call signature and mask semantics as ``nn.MultiheadAttention.forward`` (boolean masks: True
    = masked out; float masks are added to the attention logits; ``attn_mask`` of shape ``(L, S)`` or
    ``(N * num_heads, L, S)``; ``key_padding_mask`` of shape ``(N, S)``), and the same tuple return, so
    open_clip's ``attn(q, k, v, need_weights=False, attn_mask=...)[0]`` works unchanged. The attention
    weights are never materialised (``scaled_dot_product_attention``), so ``need_weights=True`` is
    refused, the second element of the tuple is always None and ``average_attn_weights`` is accepted
    only for signature compatibility. Attention dropout applies in training mode only.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    @classmethod
    def from_multihead_attention(cls, mha: nn.MultiheadAttention) -> SeparateQKVAttention:
        """An equivalent module with the weights (and their requires_grad) copied from ``mha``."""
        if mha.bias_k is not None or mha.bias_v is not None:
            raise NotImplementedError(
                "nn.MultiheadAttention(add_bias_kv=True) cannot be converted to SeparateQKVAttention "
                "(no open_clip model uses it)."
            )
        if mha.add_zero_attn:
            raise NotImplementedError(
                "nn.MultiheadAttention(add_zero_attn=True) cannot be converted to SeparateQKVAttention "
                "(no open_clip model uses it)."
            )
        embed_dim = mha.embed_dim
        if mha._qkv_same_embed_dim:
            q_weight, k_weight, v_weight = mha.in_proj_weight.chunk(3, dim=0)
        else:  # kdim / vdim differ from embed_dim: MultiheadAttention already keeps three matrices
            q_weight, k_weight, v_weight = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
        if mha.in_proj_bias is not None:
            q_bias, k_bias, v_bias = mha.in_proj_bias.chunk(3, dim=0)
        else:
            q_bias = k_bias = v_bias = None

        converted = cls(
            embed_dim,
            mha.num_heads,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            kdim=mha.kdim,
            vdim=mha.vdim,
            batch_first=mha.batch_first,
            device="meta",  # placeholders only: the copies below replace them
        )
        converted.q_proj = linear_like(q_weight, q_bias)
        converted.k_proj = linear_like(k_weight, k_bias)
        converted.v_proj = linear_like(v_weight, v_bias)
        converted.out_proj = linear_like(mha.out_proj.weight, mha.out_proj.bias)
        converted.train(mha.training)
        return converted

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def _merged_mask(
        self,
        attn_mask: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        batch: int,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """One additive mask broadcastable to ``(N, num_heads, L, S)``, or None."""
        mask = None
        if attn_mask is not None:
            mask = _additive_mask(attn_mask, dtype)
            if mask.dim() == 3:  # (N * num_heads, L, S), batch-major as in MultiheadAttention
                mask = mask.view(batch, self.num_heads, *mask.shape[-2:])
            elif mask.dim() != 2:
                raise ValueError(
                    f"attn_mask must be 2-D (L, S) or 3-D (N*num_heads, L, S), got {tuple(mask.shape)}"
                )
        if key_padding_mask is not None:
            padding = _additive_mask(key_padding_mask, dtype).view(batch, 1, 1, -1)
            mask = padding if mask is None else mask + padding
        return mask

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        """Attention output and None, shaped like ``nn.MultiheadAttention``'s output."""
        if need_weights:
            raise ValueError(
                "SeparateQKVAttention computes attention with F.scaled_dot_product_attention and never "
                "materialises the attention weights: call it with need_weights=False (as open_clip does)."
            )
        unbatched = query.dim() == 2  # (L, E): MultiheadAttention ignores batch_first then
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)

        batch, length, _ = query.shape
        q = self._split_heads(self.q_proj(query))
        k = self._split_heads(self.k_proj(key))
        v = self._split_heads(self.v_proj(value))
        mask = self._merged_mask(attn_mask, key_padding_mask, batch, q.dtype)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            # MultiheadAttention treats is_causal as a hint that attn_mask is causal; without a mask
            # SDPA builds the causal mask itself.
            is_causal=is_causal and mask is None,
        )
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, self.embed_dim))

        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    def stock_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        """Replace ``{prefix}.{q,k,v}_proj.{weight,bias}`` in ``state`` by ``nn.MultiheadAttention``'s
        parameters: one fused ``in_proj_weight``, or, when keys and values have another width than
        queries (``kdim`` / ``vdim``, as in the attentional pooler), ``q_proj_weight``, ``k_proj_weight``
        and ``v_proj_weight``; the biases are always one fused ``in_proj_bias``."""
        _fuse_projections(self, state, prefix)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
            f"batch_first={self.batch_first}"
        )


class SeparateQKVCustomAttention(nn.Module):
    """open_clip's ``transformer.Attention`` (custom blocks) with separate q/k/v linears.

    Keeps the original's optional parts as they are (``ln_q``/``ln_k`` for qk-norm, ``head_scale``,
    ``ln_inner``, dropouts, ``out_proj``) and reproduces its forward: ``attn(x, attn_mask=None) -> x``
    on batch-first input. Scaled-cosine attention is refused with NotImplementedError.
    """

    def __init__(self, source: OpenClipAttention) -> None:
        super().__init__()
        if source.logit_scale is not None:
            raise NotImplementedError(
                "open_clip Attention with scaled cosine attention (tower config option "
                "`scaled_cosine_attn=True`) cannot be converted: open_clip 3.3's own forward fails on it "
                "(torch.bmm on 4-D tensors), so there is no reference to reproduce. Set "
                "scaled_cosine_attn=False in vision_cfg/text_cfg."
            )
        self.num_heads = source.num_heads
        self.head_dim = source.head_dim
        q_weight, k_weight, v_weight = source.in_proj_weight.chunk(3, dim=0)
        if source.in_proj_bias is not None:
            q_bias, k_bias, v_bias = source.in_proj_bias.chunk(3, dim=0)
        else:
            q_bias = k_bias = v_bias = None
        self.q_proj = linear_like(q_weight, q_bias)
        self.k_proj = linear_like(k_weight, k_bias)
        self.v_proj = linear_like(v_weight, v_bias)
        self.ln_q = source.ln_q
        self.ln_k = source.ln_k
        self.attn_drop = source.attn_drop
        self.head_scale = source.head_scale
        self.ln_inner = source.ln_inner
        self.out_proj = source.out_proj
        self.out_drop = source.out_drop
        self.train(source.training)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention over batch-first ``x`` of shape ``(N, L, C)``."""
        batch, length, channels = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, -1).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_heads, -1).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_heads, -1).transpose(1, 2)
        if attn_mask is not None:
            if attn_mask.dim() == 3:  # (N * num_heads, L, L), as open_clip's Attention accepts
                attn_mask = attn_mask.reshape(batch, self.num_heads, length, length)
            attn_mask = _additive_mask(attn_mask, q.dtype)
        out = F.scaled_dot_product_attention(
            self.ln_q(q),
            self.ln_k(k),
            v,
            attn_mask=attn_mask,
            dropout_p=self.attn_drop.p if self.training else 0.0,
        )
        if self.head_scale is not None:
            out = out * self.head_scale
        out = self.ln_inner(out.transpose(1, 2).reshape(batch, length, channels))
        return self.out_drop(self.out_proj(out))

    def stock_state(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        """Replace ``{prefix}.{q,k,v}_proj.*`` in ``state`` by open_clip's ``in_proj_weight`` / ``in_proj_bias``."""
        _fuse_projections(self, state, prefix)


def convert_attention(model: nn.Module) -> nn.Module:
    """Replace, in place, every ``nn.MultiheadAttention`` and open_clip ``Attention`` in ``model``.

    Each becomes a :class:`SeparateQKVAttention` / :class:`SeparateQKVCustomAttention` with the same
    weights, so outputs are unchanged (up to float rounding) and ``<...>.attn.q_proj`` etc. are plain
    ``nn.Linear`` layers that adapters can target by name. Returns ``model``. Converting an already
    converted model is a no-op.
    """
    if isinstance(model, (nn.MultiheadAttention, OpenClipAttention)):
        raise TypeError(
            "convert_attention replaces attention modules inside a parent module; for a standalone "
            "nn.MultiheadAttention call SeparateQKVAttention.from_multihead_attention(mha) instead."
        )
    # Collect first: replacing children while iterating named_modules() would skip or revisit modules.
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, (nn.MultiheadAttention, OpenClipAttention))
    ]
    for name, module in targets:
        if isinstance(module, nn.MultiheadAttention):
            replacement = SeparateQKVAttention.from_multihead_attention(module)
        else:
            replacement = SeparateQKVCustomAttention(module)
        model.set_submodule(name, replacement)
    return model


def _fuse_projections(attention: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """Replace ``{name}.{q,k,v}_proj.{weight,bias}`` in ``state`` by the fused layout of the attention
    they came from (``SeparateQKVAttention.stock_state``)."""
    projections = ("q_proj", "k_proj", "v_proj")
    weights = [state.pop(f"{name}.{proj}.weight") for proj in projections]
    if len({attention.q_proj.in_features, attention.k_proj.in_features, attention.v_proj.in_features}) == 1:
        state[f"{name}.in_proj_weight"] = torch.cat(weights)
    else:
        for proj, weight in zip(projections, weights, strict=True):
            state[f"{name}.{proj}_weight"] = weight
    biases = [state.pop(f"{name}.{proj}.bias", None) for proj in projections]
    if all(bias is not None for bias in biases):
        state[f"{name}.in_proj_bias"] = torch.cat(biases)
