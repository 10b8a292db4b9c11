"""Byte counts read off a model: weights and KV per token.

These are the measured inputs of the memory model (the planner issue builds the sympy expressions and
the solver on top of them); the compile-time budget check uses them directly.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (``parameters()`` already counts tied weights once)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def head_dim(config: PretrainedConfig) -> int:
    explicit = getattr(config, "head_dim", None)
    return int(explicit) if explicit else config.hidden_size // config.num_attention_heads


def num_kv_heads(config: PretrainedConfig) -> int:
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def kv_bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """Bytes of K and V that one token adds to the cache over all layers, for one sequence."""
    per_layer = 2 * num_kv_heads(config) * head_dim(config) * torch.empty((), dtype=dtype).element_size()
    return per_layer * config.num_hidden_layers
