"""The kernels' pure-torch definitions: what the runtime runs where the Triton kernels do not (the CPU, a
machine without Triton, the kernels switched off), and what the tests hold the kernels to.

No Triton import here: :mod:`specontext_compiler.kernels` imports this module on every machine, and the
kernel modules only where Triton is installed.
"""

from __future__ import annotations

import torch

__all__ = ["gather_rows_reference", "retrieval_scores_reference", "sparse_decode_attention_reference"]


def gather_rows_reference(src, src_index, valid, dst, dst_index) -> None:
    """src [B, H, N, D]; src_index/dst_index int64 [B, H, M]; valid bool [B, H, M]; dst [B, H, S, D].

    Rows with ``valid`` False are skipped (their indices may point anywhere).
    """
    batch, head, row = valid.nonzero(as_tuple=True)
    rows = src[batch.to(src.device), head.to(src.device), src_index[batch, head, row].to(src.device)]
    dst[batch, head, dst_index[batch, head, row]] = rows.to(dst.device)


def retrieval_scores_reference(q, keys, scale, key_valid=None):
    """Pure torch: q [B, Hq, D], keys [B, Hkv, P, D], key_valid bool [B, P] or None -> float32 (float64 for
    float64 inputs) [B, Hkv, P], each group's attention probabilities summed over its query heads."""
    batch, q_heads, dim = q.shape
    kv_heads = keys.shape[1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    grouped = q.view(batch, kv_heads, q_heads // kv_heads, dim).to(compute)
    logits = torch.matmul(grouped, keys.to(compute).transpose(-1, -2)) * scale
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).sum(dim=2)


def sparse_decode_attention_reference(q, k, v, indices=None, *, scale=None, valid=None, softcap=0.0):
    """Pure torch: q [B, Hq, D], k/v [B, Hkv, T, D], indices [B, Hkv, K] (None: every row), valid bool
    [B, Hkv, K] or None -> [B, Hq, Dv] in q's dtype (computed in float32, or float64 for float64 inputs)."""
    batch, q_heads, dim = q.shape
    kv_heads = k.shape[1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = dim ** -0.5 if scale is None else scale
    if indices is not None:
        index = indices.long()
        k = k.gather(2, index[..., None].expand(-1, -1, -1, k.shape[-1]))
        v = v.gather(2, index[..., None].expand(-1, -1, -1, v.shape[-1]))
    grouped = q.view(batch, kv_heads, q_heads // kv_heads, dim).to(compute)
    logits = torch.matmul(grouped, k.to(compute).transpose(-1, -2)) * scale  # [B, Hkv, G, K]
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if valid is not None:
        logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.matmul(probs, v.to(compute)).reshape(batch, q_heads, v.shape[-1]).to(q.dtype)
