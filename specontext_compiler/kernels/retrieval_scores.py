"""Retrieval scoring: each KV group's attention mass on every past token, and the top-k per group.

The retrieval head ranks the context once per decode step: for each KV head g, the softmax attention
of its query group over the head's key cache, summed over the group (the torch definition is
:func:`specontext_compiler.retrieval.base.group_probabilities`). The Triton path reads every key once:
pass 1 computes the group's logits block by block (kept in float32, G values per token instead of D
key elements) with a running max and sum per query head and split; pass 2 merges the splits and turns
the logits into the group's summed probabilities. The top-k per group is ``torch.topk`` over that
(``retrieval_top_k``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .reference import retrieval_scores_reference

__all__ = ["retrieval_scores", "retrieval_scores_reference", "retrieval_top_k"]  # the reference lives in reference.py (no Triton)


@triton.jit
def _logits_kernel(
    Q, K, VALID, LOGITS, M_OUT, L_OUT,
    sq_b, sq_h, sk_b, sk_h, sk_t, sv_b, sl_b, sl_h,
    kv_heads, length, per_split, scale,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_VALID: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    b = (bh // kv_heads).to(tl.int64)
    h = (bh % kv_heads).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b * sq_b + (h * GROUP + g)[:, None] * sq_h + d[None, :],
                mask=(g < GROUP)[:, None] & (d < DIM)[None, :], other=0.0)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_G], tl.float32)
    start = split * per_split
    stop = tl.minimum(start + per_split, length)
    for offset in range(0, per_split, BLOCK_N):
        n = start + offset + tl.arange(0, BLOCK_N)
        live = n < stop
        if HAS_VALID:
            live = live & (tl.load(VALID + b * sv_b + n, mask=live, other=0) != 0)
        k = tl.load(K + b * sk_b + h * sk_h + n[:, None].to(tl.int64) * sk_t + d[None, :],
                    mask=live[:, None] & (d < DIM)[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(live[None, :], s, float("-inf"))
        tl.store(LOGITS + b * sl_b + (h * GROUP + g)[:, None] * sl_h + n[None, :], s,
                 mask=(g < GROUP)[:, None] & (n < stop)[None, :])
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        denom = denom * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m = m_new
    part = (bh.to(tl.int64) * splits + split) * BLOCK_G + g
    tl.store(M_OUT + part, m)
    tl.store(L_OUT + part, denom)


@triton.jit
def _probabilities_kernel(
    LOGITS, M_IN, L_IN, OUT, sl_b, sl_h, so_b, so_h, kv_heads, length, per_split, splits,
    GROUP: tl.constexpr, PART_G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Every split's (max, sum) of the (batch, KV head) in one [splits, G] load, then this split's logits
    # in [G, BLOCK_N] tiles: wide tiles keep enough bytes in flight (G real rows, not the dot's 16).
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // kv_heads).to(tl.int64)
    h = (bh % kv_heads).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    s = tl.arange(0, BLOCK_S)
    live = (s < splits)[:, None] & (g < GROUP)[None, :]
    part = (bh.to(tl.int64) * splits + s)[:, None] * PART_G + g[None, :]
    m_parts = tl.load(M_IN + part, mask=live, other=float("-inf"))
    m = tl.max(m_parts, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    denom = tl.sum(tl.load(L_IN + part, mask=live, other=0.0) * tl.exp(m_parts - m_safe[None, :]), 0)
    inverse = tl.where((g < GROUP) & (denom > 0), 1.0 / tl.where(denom > 0, denom, 1.0), 0.0)
    start = split * per_split
    stop = tl.minimum(start + per_split, length)
    for offset in range(0, per_split, BLOCK_N):
        n = start + offset + tl.arange(0, BLOCK_N)
        logits = tl.load(LOGITS + b * sl_b + (h * GROUP + g)[:, None] * sl_h + n[None, :],
                         mask=(g < GROUP)[:, None] & (n < stop)[None, :], other=float("-inf"))
        p = tl.exp(logits - m_safe[:, None]) * inverse[:, None]
        tl.store(OUT + b * so_b + h * so_h + n, tl.sum(p, 0), mask=n < stop)


@triton_op("specontext::retrieval_scores", mutates_args=("out",))
def _retrieval_scores(q: torch.Tensor, keys: torch.Tensor, key_valid: torch.Tensor | None, out: torch.Tensor,
                      scale: float) -> None:
    _launch(q, keys, key_valid, out, scale, wrap_triton)


#: GPU launch parameters: keys per block, warps and pipeline stages of the first pass; positions per tile
#: of the second (its loads carry G rows of float32 logits). From `benchmarks/kernels.py --scoring-only`.
GPU_CONFIG = {"block_n": 64, "num_warps": 4, "num_stages": 3, "probability_block": 512}


def _direct(kernel):
    return kernel


def _launch(q, keys, key_valid, out, scale, launcher) -> None:
    """Both passes; ``launcher``: ``wrap_triton`` inside the registered op, the kernel itself when eager."""
    batch, q_heads, dim = q.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    if length == 0:
        return
    logits = torch.empty(batch, q_heads, length, dtype=torch.float32, device=q.device)
    block_g = max(16, triton.next_power_of_2(group))
    block_d = max(16, triton.next_power_of_2(dim))
    on_gpu = q.device.type == "cuda"
    block_n = GPU_CONFIG["block_n"] if on_gpu else 32
    wanted = max(1, -(-528 // (batch * kv_heads))) if on_gpu else 2
    splits = max(1, min(wanted, -(-length // block_n)))
    per_split = block_n * -(-length // (splits * block_n))
    splits = -(-length // per_split)
    m = torch.empty(batch * kv_heads, splits, block_g, dtype=torch.float32, device=q.device)
    denom = torch.empty_like(m)
    valid = key_valid.view(torch.uint8) if key_valid is not None else m
    grid = (batch * kv_heads, splits)
    launcher(_logits_kernel)[grid](
        q, keys, valid, logits, m, denom,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        valid.stride(0) if key_valid is not None else 0, logits.stride(0), logits.stride(1),
        kv_heads, length, per_split, scale,
        GROUP=group, BLOCK_G=block_g, DIM=dim, BLOCK_D=block_d, BLOCK_N=block_n, HAS_VALID=key_valid is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **({"num_warps": GPU_CONFIG["num_warps"], "num_stages": GPU_CONFIG["num_stages"]} if on_gpu else {}),
    )
    launcher(_probabilities_kernel)[grid](
        logits, m, denom, out, logits.stride(0), logits.stride(1), out.stride(0), out.stride(1), kv_heads, length,
        per_split, splits, GROUP=group, PART_G=block_g, BLOCK_G=triton.next_power_of_2(group),
        BLOCK_S=triton.next_power_of_2(splits), BLOCK_N=min(GPU_CONFIG["probability_block"], triton.next_power_of_2(per_split)) if on_gpu else block_n,
    )


@_retrieval_scores.register_fake
def _(q, keys, key_valid, out, scale):
    return None


def retrieval_scores(q: torch.Tensor, keys: torch.Tensor, scale: float, key_valid: torch.Tensor | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton: each KV group's attention probabilities over ``keys`` summed over its query heads.

    q [B, Hq, D]; keys [B, Hkv, P, D] (last dimension contiguous); key_valid bool [B, P] or None.
    Returns float32 [B, Hkv, P] (a group of G heads sums to G over the valid keys), in ``out`` if given."""
    if q.dim() != 3 or keys.dim() != 4 or keys.shape[0] != q.shape[0] or keys.shape[3] != q.shape[2] \
            or q.shape[1] % keys.shape[1]:
        raise ValueError(f"expected q [B, Hq, D] and keys [B, Hkv, P, D] with Hkv dividing Hq; got "
                         f"{tuple(q.shape)} and {tuple(keys.shape)}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"q must be float32, float16 or bfloat16; got {q.dtype}")
    if key_valid is not None:
        if key_valid.dtype != torch.bool or key_valid.shape != (keys.shape[0], keys.shape[2]):
            raise ValueError(f"key_valid must be bool [B, P] = {(keys.shape[0], keys.shape[2])}; got "
                             f"{key_valid.dtype} {tuple(key_valid.shape)}")
        key_valid = key_valid.contiguous()
    if keys.stride(-1) != 1:
        raise ValueError("keys must be contiguous along the last dimension")
    shape = (keys.shape[0], keys.shape[1], keys.shape[2])
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=keys.device)
    elif out.shape != shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of shape {shape}")
    q = q.to(keys.dtype).contiguous()
    if type(q) is torch.Tensor and not torch.compiler.is_compiling():
        _launch(q, keys, key_valid, out, float(scale), _direct)
    else:  # traced: the registered op, opaque to the graph
        _retrieval_scores(q, keys, key_valid, out, float(scale))
    return out


def retrieval_top_k(q: torch.Tensor, keys: torch.Tensor, k: int, scale: float,
                    key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [B, Hkv, k]: each group's k highest-scoring positions (Triton scores + ``torch.topk``)."""
    return torch.topk(retrieval_scores(q, keys, scale, key_valid), k, dim=-1).indices
