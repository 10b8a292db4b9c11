"""Triton kernels, each registered as a ``torch.library.triton_op`` (opaque to ``torch.compile``, with a
fake implementation) and each with a pure-torch reference:

* :func:`sparse_decode_attention` — decode attention over the K/V rows a selection names (split-K);
* :func:`gather_from_host_or_ring` — selected rows from pinned host memory (zero-copy) or the device
  ring into an offloaded layer's slots (elastic loading);
* :func:`retrieval_scores` / :func:`retrieval_top_k` — the retrieval head's per-group attention mass
  over its key cache, and the top-k per group.

On a CPU they run in the Triton interpreter (``TRITON_INTERPRET=1``, tests). The runtime's decode
attention and retrieval scoring use them on CUDA tensors when switched on (``use_kernels(True)`` or
``SPECONTEXT_KERNELS=1``); off by default, because measured on the H100 (docs/kernels.md) they are
3-11x faster than the torch paths in GPU time but Triton's per-launch CPU cost makes the eager decode loop, which is
launch-bound at batch 1, slower. The row gather is always used on CUDA.
"""

import os

import torch

from .gather_rows import gather_from_host_or_ring, gather_rows_reference
from .retrieval_scores import retrieval_scores, retrieval_scores_reference, retrieval_top_k
from .sparse_decode_attention import sparse_decode_attention, sparse_decode_attention_reference

_enabled = os.environ.get("SPECONTEXT_KERNELS", "0") == "1"


def use_kernels(enabled: bool) -> None:
    """Let the runtime use the Triton attention and scoring kernels on CUDA tensors (True) or the torch
    paths (False, the default)."""
    global _enabled
    _enabled = bool(enabled)


def on_triton_path(*tensors: torch.Tensor) -> bool:
    """Whether the runtime runs these tensors through the Triton kernels."""
    return _enabled and all(t.is_cuda for t in tensors)


__all__ = [
    "on_triton_path", "use_kernels",
    "gather_from_host_or_ring", "gather_rows_reference", "retrieval_scores", "retrieval_scores_reference",
    "retrieval_top_k", "sparse_decode_attention", "sparse_decode_attention_reference",
]
