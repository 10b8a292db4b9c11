"""Sparse-gather decode attention: one query per head over the K/V rows a selection names.

``sparse_decode_attention(q, k, v, indices)`` computes, for every batch row b and query head h of KV
group g = h // (Hq / Hkv),

    out[b, h] = softmax(scale * q[b, h] . k[b, g, indices[b, g]]^T) @ v[b, g, indices[b, g]]

without materialising the gathered rows: each program reads its rows straight from the KV cache (any
strides; the runtime's resident buffers, or an offloaded layer's slot buffers with ``indices=None``).
A KV head's whole query group is one [G, D] block against each block of gathered keys, so every K/V
row is read once per group, not once per query head. Split-K: the selection is cut into ``splits``
parts handled by separate programs (enough programs to fill the GPU at batch 1), each writing a partial
(running max, sum of exponentials, weighted V); a second kernel, one program per query head, merges them
(on Hopper and later launched early, programmatic dependent launch, so its launch overlaps the first
kernel); with one split the first kernel writes the output itself. Decode attention is
bandwidth-bound: the bytes are the selected rows, ``2 * B * Hkv * K * D * itemsize``.

``valid`` (bool [B, Hkv, K]) masks padded entries; ``softcap`` applies Gemma 2's logit soft-capping.
:func:`sparse_decode_attention_reference` is the float64-capable torch definition.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .reference import sparse_decode_attention_reference

__all__ = ["sparse_decode_attention", "sparse_decode_attention_reference"]  # the reference lives in reference.py (no Triton)


@triton.jit
def _partial_kernel(
    Q, K, V, IDX, VALID, M_OUT, L_OUT, ACC_OUT, OUT, NEW_K, NEW_V, POSITION,
    sq_b, sq_h, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, si_b, si_h, sm_b, sm_h, so_b, so_h, snk_b, snk_h, snv_b, snv_h,
    kv_heads, selected, per_split, scale, softcap,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, DIM: tl.constexpr, DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_VALID: tl.constexpr,
    SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, FINAL: tl.constexpr, PDL: tl.constexpr,
    HAS_NEW: tl.constexpr,
):
    if PDL:  # let the merge kernel's programs start now (they wait for this grid before reading)
        gdc_launch_dependents()
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // kv_heads).to(tl.int64)
    h = (bh % kv_heads).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * sq_b + (h * GROUP + g)[:, None] * sq_h + d[None, :],
                mask=(g < GROUP)[:, None] & (d < DIM)[None, :], other=0.0)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    if HAS_NEW:
        if split == 0:
            # The new token: split 0 starts from it and stores its K/V at POSITION for later steps (no
            # program of this launch reads that row: the selection holds past tokens only).
            k_new = tl.load(NEW_K + b * snk_b + h * snk_h + d, mask=d < DIM, other=0.0)
            v_new = tl.load(NEW_V + b * snv_b + h * snv_h + dv, mask=dv < DIM_V, other=0.0)
            s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale
            if SOFTCAP:
                s_new = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s_new / softcap) + 1.0))
            m = s_new
            denom = tl.full([BLOCK_G], 1.0, tl.float32)
            acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32) + v_new.to(tl.float32)[None, :]
            position = tl.load(POSITION).to(tl.int64)
            tl.store(K + b * sk_b + h * sk_h + position * sk_t + d, k_new, mask=d < DIM)
            tl.store(V + b * sv_b + h * sv_h + position * sv_t + dv, v_new, mask=dv < DIM_V)
    start = split * per_split
    stop = tl.minimum(start + per_split, selected)
    for offset in range(0, per_split, BLOCK_N):
        n = start + offset + tl.arange(0, BLOCK_N)
        live = n < stop
        if HAS_INDEX:
            row = tl.load(IDX + b * si_b + h * si_h + n, mask=live, other=0).to(tl.int64)
        else:
            row = n.to(tl.int64)
        if HAS_VALID:
            live = live & (tl.load(VALID + b * si_b + h * si_h + n, mask=live, other=0) != 0)
        k = tl.load(K + b * sk_b + h * sk_h + row[:, None] * sk_t + d[None, :],
                    mask=live[:, None] & (d < DIM)[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_G, BLOCK_N], float32
        if SOFTCAP:
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))  # tanh(s / cap) * cap
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no live key yet: keep exp() finite
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        v = tl.load(V + b * sv_b + h * sv_h + row[:, None] * sv_t + dv[None, :],
                    mask=live[:, None] & (dv < DIM_V)[None, :], other=0.0)
        denom = denom * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    real = g < GROUP  # padded query rows are never merged: not written
    if FINAL:  # one split: normalise and write the output, no merge launch
        out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
        tl.store(OUT + b * so_b + (h * GROUP + g)[:, None] * so_h + dv[None, :], out.to(OUT.dtype.element_ty),
                 mask=real[:, None] & (dv < DIM_V)[None, :])
    else:
        part = (b * sm_b + h * sm_h + split) * BLOCK_G + g
        tl.store(M_OUT + part, m, mask=real)
        tl.store(L_OUT + part, denom, mask=real)
        tl.store(ACC_OUT + part[:, None] * BLOCK_DV + dv[None, :], acc, mask=real[:, None])


@triton.jit
def _merge_kernel(
    M_IN, L_IN, ACC_IN, OUT, so_b, so_h, q_heads, splits,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
    PDL: tl.constexpr,
):
    # One program per query head: its partials of every split, BLOCK_S splits per load.
    if PDL:  # launched early (programmatic dependent launch): wait until every partial is written
        gdc_wait()
    bq = tl.program_id(0)
    b = (bq // q_heads).to(tl.int64)
    head = bq % q_heads
    bh = b * (q_heads // GROUP) + head // GROUP  # the head's (batch, KV head) row of partials
    g = head % GROUP
    dv = tl.arange(0, BLOCK_DV)
    m = tl.full([1], float("-inf"), tl.float32)
    denom = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_DV], tl.float32)
    for first in range(0, splits, BLOCK_S):
        s = first + tl.arange(0, BLOCK_S)
        live = s < splits
        part = (bh * splits + s) * BLOCK_G + g
        m_part = tl.load(M_IN + part, mask=live, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(m_part, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        weight = tl.exp(m_part - m_safe)
        scale_old = tl.exp(m - m_safe)
        denom = denom * scale_old + tl.sum(tl.load(L_IN + part, mask=live, other=0.0) * weight, 0)
        block = tl.load(ACC_IN + part[:, None] * BLOCK_DV + dv[None, :], mask=live[:, None], other=0.0)
        acc = acc * scale_old + tl.sum(block * weight[:, None], 0)
        m = m_new
    out = acc / tl.where(denom > 0, denom, 1.0)
    tl.store(OUT + b * so_b + head * so_h + dv, out.to(OUT.dtype.element_ty), mask=dv < DIM_V)


#: GPU launch parameters: rows per block (with several splits; with one), programs to aim for (split-K),
#: warps, pipeline stages; the merge: launched early (programmatic dependent launch), splits read per
#: load, warps (one load of up to 64 splits by one warp measured fastest: the merge is latency-bound).
#: From the H100 sweeps (`benchmarks/kernels.py`, docs/kernels.md); merging in the first kernel instead (the
#: last program of each KV head, counted by an atomic) measured slower on the H200 (docs/kernels.md).
GPU_CONFIG = {"block_n": 32, "block_n_one_split": 64, "programs": 528, "num_warps": 4, "num_stages": 3, "pdl": True,
              "merge_splits_per_load": 64, "merge_warps": 1}


def _splits(batch_heads: int, selected: int, block_n: int, device: torch.device) -> int:
    """At most ``GPU_CONFIG["programs"]`` programs (one wave on the GPU: a second, partial wave costs
    more than it adds), parts no smaller than one block; no split where only two would fit (measured: two
    halve each program's rows but add the merge launch, 34.1 vs 29.5 us at B=32, K=512); on the CPU (the
    Triton interpreter, tests) two, so the split merge is still exercised."""
    if device.type != "cuda":
        return max(1, min(2, -(-selected // block_n)))
    wanted = GPU_CONFIG["programs"] // batch_heads
    return 1 if wanted <= 2 else min(wanted, -(-selected // block_n))


def _direct(kernel):
    return kernel


_CAPABILITY: dict[torch.device, tuple[int, int]] = {}


def _has_pdl(device: torch.device) -> bool:
    if device not in _CAPABILITY:
        _CAPABILITY[device] = torch.cuda.get_device_capability(device)
    return GPU_CONFIG["pdl"] and _CAPABILITY[device][0] >= 9


_WORKSPACE: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, batch: int, kv_heads: int, splits: int, block_g: int, block_dv: int):
    """The split partials (running max, sum, weighted V), kept per shape: no allocation per call (and
    fixed addresses for CUDA graphs). Reuse is ordered by the stream, like every kernel's."""
    key = (device, batch, kv_heads, splits, block_g, block_dv)
    if key not in _WORKSPACE:
        m = torch.empty(batch, kv_heads, splits, block_g, dtype=torch.float32, device=device)
        _WORKSPACE[key] = (m, torch.empty_like(m), torch.empty(*m.shape, block_dv, dtype=torch.float32, device=device))
    return _WORKSPACE[key]


@triton_op("specontext::sparse_decode_attention", mutates_args=("out",))
def _sparse_decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor | None, valid: torch.Tensor | None,
    out: torch.Tensor, scale: float, softcap: float, splits: int,
) -> None:
    _launch(q, k, v, indices, valid, out, scale, softcap, splits, wrap_triton)


@triton_op("specontext::sparse_decode_attention_appending", mutates_args=("k", "v", "out"))
def _sparse_decode_attention_appending(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor | None,
    new_k: torch.Tensor, new_v: torch.Tensor, position: torch.Tensor, out: torch.Tensor, scale: float,
    softcap: float, splits: int,
) -> None:
    _launch(q, k, v, indices, valid, out, scale, softcap, splits, wrap_triton, (new_k, new_v, position))


def _launch(q, k, v, indices, valid, out, scale, softcap, splits, launcher, new=None) -> None:
    """Both kernels; ``launcher`` is ``wrap_triton`` inside the registered op (traceable) or the kernel
    itself on the eager path (no dispatcher in between: decode calls this once per layer per step)."""
    batch, q_heads, dim = q.shape
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    dim_v = v.shape[-1]
    selected = k.shape[2] if indices is None else indices.shape[-1]
    if selected == 0 and new is None:
        out.zero_()
        return
    block_g = max(16, triton.next_power_of_2(group))
    block_d, block_dv = max(16, triton.next_power_of_2(dim)), max(16, triton.next_power_of_2(dim_v))
    on_gpu = q.device.type == "cuda"
    block_n = GPU_CONFIG["block_n"] if on_gpu else 16
    splits = max(1, splits or _splits(batch * kv_heads, selected, block_n, q.device))
    if splits == 1 and on_gpu:  # one program walks all K rows: longer blocks keep more bytes in flight
        block_n = GPU_CONFIG["block_n_one_split"]
    per_split = block_n * max(1, -(-selected // (splits * block_n)))
    splits = max(1, -(-selected // per_split))
    m, denom, acc = _workspace(q.device, batch, kv_heads, splits, block_g, block_dv)
    # Programmatic dependent launch (Hopper and later, direct launches): the merge kernel's launch and
    # start overlap the first kernel instead of following it (a few us of a ~30 us call).
    pdl = splits > 1 and launcher is _direct and on_gpu and _has_pdl(q.device)
    block_s = min(GPU_CONFIG["merge_splits_per_load"], triton.next_power_of_2(splits)) if on_gpu else 16
    index = indices if indices is not None else m  # unused when HAS_INDEX is False
    new_k, new_v, position = new if new is not None else (m, m, m)  # unused when HAS_NEW is False
    mask = valid.view(torch.uint8) if valid is not None else m
    if indices is not None and valid is not None and valid.stride() != indices.stride():
        raise ValueError("valid and indices must share strides")
    launcher(_partial_kernel)[(batch * kv_heads, splits)](
        q, k, v, index, mask, m, denom, acc, out, new_k, new_v, position,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        index.stride(0) if indices is not None else (mask.stride(0) if valid is not None else 0),
        index.stride(1) if indices is not None else (mask.stride(1) if valid is not None else 0),
        m.stride(0) // block_g, m.stride(1) // block_g, out.stride(0), out.stride(1),
        new_k.stride(0), new_k.stride(1), new_v.stride(0), new_v.stride(1),
        kv_heads, selected, per_split, scale, softcap,
        GROUP=group, BLOCK_G=block_g, DIM=dim, DIM_V=dim_v, BLOCK_D=block_d, BLOCK_DV=block_dv, BLOCK_N=block_n,
        HAS_INDEX=indices is not None, HAS_VALID=valid is not None, SOFTCAP=bool(softcap),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", FINAL=splits == 1, PDL=pdl,
        HAS_NEW=new is not None,
        num_warps=GPU_CONFIG["num_warps"] if on_gpu else 4, num_stages=GPU_CONFIG["num_stages"] if on_gpu else 1,
    )
    if splits == 1:
        return
    launcher(_merge_kernel)[(batch * q_heads,)](
        m, denom, acc, out, out.stride(0), out.stride(1), q_heads, splits,
        GROUP=group, BLOCK_G=block_g, DIM_V=dim_v, BLOCK_DV=block_dv, PDL=pdl,
        BLOCK_S=block_s,
        num_warps=GPU_CONFIG["merge_warps"] if on_gpu else 4, **({"launch_pdl": True} if pdl else {}),
    )


@_sparse_decode_attention.register_fake
def _(q, k, v, indices, valid, out, scale, softcap, splits):
    return None


@_sparse_decode_attention_appending.register_fake
def _(q, k, v, indices, valid, new_k, new_v, position, out, scale, softcap, splits):
    return None


def sparse_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor | None,
    *,
    scale: float | None = None,
    valid: torch.Tensor | None = None,
    softcap: float = 0.0,
    splits: int = 0,
    out: torch.Tensor | None = None,
    new_k: torch.Tensor | None = None,
    new_v: torch.Tensor | None = None,
    position: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton sparse-gather decode attention (see the module docstring).

    q [B, Hq, D]; k/v [B, Hkv, T, D] (last dimension contiguous); indices int32/int64 [B, Hkv, K]
    positions on the token axis, shared by each KV head's query group (None: all T rows, for slot
    buffers); valid bool [B, Hkv, K] (or [B, Hkv, T] with no indices) or None; ``splits`` (0: chosen to
    fill the GPU); ``out``: a contiguous [B, Hq, Dv] buffer to write (default: a new one). Returns it.

    With ``new_k``/``new_v`` [B, Hkv, D] and ``position`` (an int64 scalar tensor on the device), the new
    token is attended too, and stored in ``k``/``v`` at ``position`` by the same launch (a decode step's
    append and attention in one kernel); ``indices`` must not name ``position`` (the selection holds past
    tokens), which the kernel cannot check without a synchronisation.
    """
    if q.dim() != 3 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected q [B, Hq, D] and k/v [B, Hkv, T, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    batch, q_heads, dim = q.shape
    if k.shape[0] != batch or k.shape[3] != dim or v.shape[:3] != k.shape[:3] or q_heads % k.shape[1]:
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "(Hq must be a multiple of Hkv)")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one of float32, float16, bfloat16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if indices is not None:
        if indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"indices must be int32 or int64; got {indices.dtype}")
        if indices.shape[:2] != k.shape[:2]:
            raise ValueError(f"indices {tuple(indices.shape)} must be [B, Hkv, K] for k {tuple(k.shape)}")
        indices = indices.contiguous()
    width = k.shape[2] if indices is None else indices.shape[2]
    if valid is not None:
        if valid.dtype != torch.bool or valid.shape != (*k.shape[:2], width):
            raise ValueError(f"valid must be bool [B, Hkv, {width}]; got {valid.dtype} {tuple(valid.shape)}")
        valid = valid.contiguous()
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("k and v rows must be contiguous along the last dimension")
    new = None
    if new_k is not None or new_v is not None or position is not None:
        if new_k is None or new_v is None or position is None or indices is None:
            raise ValueError("new_k, new_v and position go together, with indices")
        if new_k.shape != (batch, k.shape[1], dim) or new_v.shape != (batch, k.shape[1], v.shape[-1]):
            raise ValueError(f"new_k/new_v must be [B, Hkv, D] = {(batch, k.shape[1], dim)}; got "
                             f"{tuple(new_k.shape)}, {tuple(new_v.shape)}")
        if new_k.dtype != k.dtype or new_v.dtype != k.dtype or new_k.stride(-1) != 1 or new_v.stride(-1) != 1:
            raise ValueError(f"new_k/new_v must be {k.dtype} with contiguous rows")
        if position.dtype != torch.long or position.dim() != 0 or position.device != k.device:
            raise ValueError(f"position must be an int64 scalar tensor on {k.device}; got {position.dtype} "
                             f"{tuple(position.shape)} on {position.device}")
        new = (new_k, new_v, position)
    q = q.contiguous()
    scale = dim ** -0.5 if scale is None else float(scale)
    if out is None:
        out = q.new_empty(batch, q_heads, v.shape[-1])
    elif out.shape != (batch, q_heads, v.shape[-1]) or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {q.dtype} tensor of shape {(batch, q_heads, v.shape[-1])}")
    if type(q) is torch.Tensor and not torch.compiler.is_compiling():
        _launch(q, k, v, indices, valid, out, scale, float(softcap), int(splits), _direct, new)
    elif new is not None:  # traced (torch.compile, export): the registered ops, opaque to the graph
        _sparse_decode_attention_appending(q, k, v, indices, valid, *new, out, scale, float(softcap), int(splits))
    else:
        _sparse_decode_attention(q, k, v, indices, valid, out, scale, float(softcap), int(splits))
    return out
