"""One-row matrix products of a decode step: ``y = x @ weight.T (+ bias)`` for ``x`` of one row.

At batch 1 every projection of a decode step reads a weight matrix to multiply it with one vector, so
the step's floor is the weights' bytes over HBM bandwidth. cuBLAS tiles the output 64 rows at a time for
such products: the 8B shape's fused q/k/v weight (6,144 rows) then runs on 96 of the H200's 132 SMs and
reads at ~73% of HBM, and the o projection adds a split-K reduction kernel (docs/benchmarks.md). Here
each program owns ``block_n`` output rows (a few hundred programs, every SM busy), reads its rows of the
weight in ``[block_n, block_k]`` tiles through a pipelined loop, and keeps a float32 partial product per
element, summed once at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton


def matvec_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pure torch: x [..., K] (one row in all), weight [N, K], bias [N] or None -> [..., N]."""
    return torch.nn.functional.linear(x, weight, bias)


@triton.jit
def _matvec_kernel(X, W, BIAS, Y, rows, cols, stride_w,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = n < rows
    k = tl.arange(0, BLOCK_K)
    w_rows = W + n[:, None].to(tl.int64) * stride_w
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for start in range(0, cols, BLOCK_K):
        at = start + k
        inside = at < cols
        x = tl.load(X + at, mask=inside, other=0.0).to(tl.float32)
        w = tl.load(w_rows + at[None, :], mask=live[:, None] & inside[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(BIAS + n, mask=live, other=0.0).to(tl.float32)
    tl.store(Y + n, y.to(Y.dtype.element_ty), mask=live)


#: GPU launch parameters, from ``benchmarks/kernels.py --matvec-only`` (H200, bf16, the 8B shape's weights).
GPU_CONFIG = {"block_n": 16, "block_k": 512, "num_warps": 4, "num_stages": 4}
#: The Triton interpreter runs a program at a time: few, large blocks.
INTERPRETER_CONFIG = {"block_n": 64, "block_k": 64, "num_warps": 4, "num_stages": 1}


def _config(x: torch.Tensor, config: dict | None) -> dict:
    if config is not None:
        return config
    return GPU_CONFIG if x.is_cuda else INTERPRETER_CONFIG


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.numel() != x.shape[-1]:
        raise ValueError(f"matvec multiplies one row: x of shape {tuple(x.shape)} has {x.numel() // max(x.shape[-1], 1)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1] or weight.stride(1) != 1:
        raise ValueError(f"weight must be [N, {x.shape[-1]}] with unit stride along K; got {tuple(weight.shape)}, "
                         f"strides {weight.stride()}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}]; got {tuple(bias.shape)}")


def _launch(x, weight, bias, out, config, launcher) -> None:
    rows, cols = weight.shape
    grid = (triton.cdiv(rows, config["block_n"]),)
    launcher(_matvec_kernel)[grid](
        x, weight, x if bias is None else bias, out, rows, cols, weight.stride(0),
        BLOCK_N=config["block_n"], BLOCK_K=config["block_k"], HAS_BIAS=bias is not None,
        num_warps=config["num_warps"], num_stages=config["num_stages"])


@triton_op("specontext::matvec", mutates_args=())
def _matvec_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    _launch(x.contiguous(), weight, bias, out, _config(x, None), wrap_triton)
    return out


def matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           config: dict | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for an ``x`` of one row (any leading shape of one element), in one
    launch; ``config``: launch parameters (default: :data:`GPU_CONFIG` on CUDA, small grids in the
    interpreter)."""
    _check(x, weight, bias)
    if config is None:
        return _matvec_op(x, weight, bias)
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    _launch(x.contiguous(), weight, bias, out, config, lambda kernel: kernel)
    return out
