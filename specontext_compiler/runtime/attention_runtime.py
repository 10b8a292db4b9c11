"""What a ``specontext::attention`` node does when it runs: store the new KV, attend over all of it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kv_store import KVStore


def expand_kv_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, Hkv * groups, T, D]: each KV head repeated for its query group."""
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """Boolean [1, 1, q_len, kv_len] mask with the queries aligned to the end of the keys."""
    offset = kv_len - q_len
    rows = torch.arange(q_len, device=device)[:, None] + offset
    return (torch.arange(kv_len, device=device)[None, :] <= rows)[None, None]


def dense_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Reference dense attention, numerically the same as transformers' sdpa/eager paths.

    q [B, Hq, Tq, D], keys/values [B, Hkv, Tk, D], mask boolean [B, 1, Tq, Tk] (True = attend) or an
    additive float mask, or None for causal attention aligned to the last key. Returns [B, Hq, Tq, Dv].
    """
    groups = q.shape[1] // keys.shape[1]
    q_len, kv_len = q.shape[2], keys.shape[2]
    if mask is None and q_len == kv_len and not softcap:
        # Fresh causal block: SDPA's own causal mode (its fast kernels), as transformers uses it.
        return F.scaled_dot_product_attention(q, keys, values, scale=scale, is_causal=q_len > 1, enable_gqa=groups > 1)
    if mask is None and q_len > 1:
        mask = causal_mask(q_len, kv_len, q.device)
    if softcap:
        # Logit soft-capping (Gemma 2) has no SDPA form: eager math, as transformers does.
        scores = torch.matmul(q, expand_kv_heads(keys, groups).transpose(2, 3)) * scale
        scores = torch.tanh(scores / softcap) * softcap
        if mask is not None:
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, expand_kv_heads(values, groups))
    if mask is None:
        # One query over all keys: transformers' SDPA path uses grouped-query SDPA here.
        return F.scaled_dot_product_attention(q, keys, values, scale=scale, enable_gqa=groups > 1)
    return F.scaled_dot_product_attention(
        q, expand_kv_heads(keys, groups), expand_kv_heads(values, groups), attn_mask=mask, scale=scale
    )


class AttentionRuntime:
    """Owns the KV store and executes the attention ops of a captured graph.

    One instance per compiled model; ``specontext_compiler.runtime.context.activate`` makes it the one
    the ops talk to during a step.
    """

    def __init__(self, store: KVStore):
        self.store = store
        # Set per sequence by the engine: with no padding token, the mask transformers built is plain
        # causal (bar sliding windows shorter than the context), and SDPA's mask-free paths compute it faster.
        self.padding_free = False

    def reset(self, reserve_tokens: int, padding_free: bool) -> None:
        """Start a new batch of sequences."""
        self.store.reset(reserve_tokens)
        self.padding_free = padding_free

    def attention(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float,
        softcap: float,
        sliding_window: int = 0,
    ) -> torch.Tensor:
        keys, values = self.store.append(layer, k, v)
        if keys.device != q.device:
            keys, values = keys.to(q.device, non_blocking=True), values.to(q.device, non_blocking=True)
        if mask is not None and mask.shape[-1] != keys.shape[2]:
            raise RuntimeError(
                f"layer {layer}: mask covers {mask.shape[-1]} keys but the store holds {keys.shape[2]}: "
                "the step's attention_mask must span every stored token plus the new ones"
            )
        if self.padding_free and (not sliding_window or keys.shape[2] <= sliding_window):
            mask = None
        return dense_attention(q, keys, values, mask, scale, softcap)
