"""Tiny Hugging Face models built from transformers configs (random weights), shared by the test files."""

from __future__ import annotations

import pytest
import torch


def tiny_llama(**config) -> torch.nn.Module:
    """A 2-layer ``LlamaForCausalLM`` in eval mode, seeded; ``config`` overrides its LlamaConfig settings.
    Skips the calling test when transformers is not installed."""
    transformers = pytest.importorskip("transformers")
    settings = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**settings, **config})).eval()
