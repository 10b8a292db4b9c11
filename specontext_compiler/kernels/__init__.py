"""Triton kernels, each registered as a ``torch.library.triton_op`` (opaque to ``torch.compile``, with a
fake implementation) and each with a pure-torch reference:

* :func:`sparse_decode_attention` — decode attention over the K/V rows a selection names (split-K);
* :func:`gather_from_host_or_ring` — selected rows from pinned host memory (zero-copy) or the device
  ring into an offloaded layer's slots (elastic loading);
* :func:`retrieval_scores` / :func:`retrieval_top_k` — the retrieval head's per-group attention mass
  over its key cache, and the top-k per group.

On a CPU they run in the Triton interpreter (``TRITON_INTERPRET=1``, tests). The runtime's decode
attention and retrieval scoring use them on CUDA tensors in decode steps replayed from a CUDA graph
(runtime/cuda_graph_decode.py), and everywhere when switched on (``use_kernels(True)`` or
``SPECONTEXT_KERNELS=1``; ``False`` / ``=0``: never). Measured on the H100 (docs/kernels.md) they are
3-11x faster than the torch paths in GPU time, but Triton's per-launch CPU cost makes the eager decode
loop, which is launch-bound at batch 1, slower; a graph pays that cost once, at capture. The row gather
is always used on CUDA.
"""

import contextlib
import os

import torch

from .gather_rows import gather_from_host_or_ring, gather_rows_reference
from .retrieval_scores import retrieval_scores, retrieval_scores_reference, retrieval_top_k
from .sparse_decode_attention import sparse_decode_attention, sparse_decode_attention_reference

# True / False: always / never; None (the default): only in decode steps replayed from a CUDA graph, where
# Triton's per-launch CPU cost is paid once, at capture.
_enabled: bool | None = {"1": True, "0": False}.get(os.environ.get("SPECONTEXT_KERNELS", ""))
_in_graph = False


def use_kernels(enabled: bool | None) -> None:
    """Let the runtime use the Triton attention and scoring kernels on CUDA tensors: True (always), False
    (never: the torch paths), None (the default: in CUDA-graph decode steps only)."""
    global _enabled
    _enabled = None if enabled is None else bool(enabled)


@contextlib.contextmanager
def in_cuda_graph_decode():
    """Marks the steps a CUDA graph captures (and their eager warm-up): the kernels' default is on there."""
    global _in_graph
    previous, _in_graph = _in_graph, True
    try:
        yield
    finally:
        _in_graph = previous


def on_triton_path(*tensors: torch.Tensor) -> bool:
    """Whether the runtime runs these tensors through the Triton kernels."""
    enabled = _in_graph if _enabled is None else _enabled
    return enabled and all(t.is_cuda for t in tensors)


__all__ = [
    "in_cuda_graph_decode", "on_triton_path", "use_kernels",
    "gather_from_host_or_ring", "gather_rows_reference", "retrieval_scores", "retrieval_scores_reference",
    "retrieval_top_k", "sparse_decode_attention", "sparse_decode_attention_reference",
]
