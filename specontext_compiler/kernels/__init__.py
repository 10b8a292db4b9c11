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

Triton is optional (pyproject installs it on Linux only): without it the kernel modules are not imported
(no ``triton_op`` is registered), :func:`on_triton_path` is always False so the runtime takes the torch
paths (:mod:`.reference`, ``attention_runtime``, ``retrieval/base``), one log line at import says so, and
the kernel functions and ``use_kernels(True)`` raise ``ImportError`` naming the package to install.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from typing import Callable, NoReturn

import torch

from .reference import gather_rows_reference, retrieval_scores_reference, sparse_decode_attention_reference

logger = logging.getLogger(__name__)

INSTALL_TRITON = "pip install triton (Linux; the kernels run on NVIDIA GPUs)"


def _import_triton() -> str | None:
    """None where Triton imports, else why not (not installed: macOS, Windows, CPU-only installs; or broken)."""
    try:
        importlib.import_module("triton")
    except ImportError as error:
        return str(error)
    return None


_triton_missing = _import_triton()
#: Whether Triton imported, so the kernels exist (registered as ``torch.library.triton_op``).
TRITON_AVAILABLE: bool = _triton_missing is None


def _needs_triton(name: str) -> Callable[..., NoReturn]:
    """Stands in for the kernel ``name`` without Triton: the runtime never calls it (``on_triton_path`` is
    False), a direct call is told what to install."""

    def unavailable(*args, **kwargs) -> NoReturn:
        raise ImportError(f"specontext_compiler.kernels.{name} is a Triton kernel and Triton is not available "
                          f"({_triton_missing}); install it: {INSTALL_TRITON}")

    unavailable.__name__ = unavailable.__qualname__ = name
    return unavailable


# True / False: always / never; None (the default): only in decode steps replayed from a CUDA graph, where
# Triton's per-launch CPU cost is paid once, at capture.
_enabled: bool | None = {"1": True, "0": False}.get(os.environ.get("SPECONTEXT_KERNELS", ""))
_in_graph = False

if TRITON_AVAILABLE:
    from .gather_rows import gather_from_host_or_ring
    from .retrieval_scores import retrieval_scores, retrieval_top_k
    from .sparse_decode_attention import sparse_decode_attention
else:
    gather_from_host_or_ring = _needs_triton("gather_from_host_or_ring")
    retrieval_scores = _needs_triton("retrieval_scores")
    retrieval_top_k = _needs_triton("retrieval_top_k")
    sparse_decode_attention = _needs_triton("sparse_decode_attention")
    # Once, at import. A warning where kernels are lost (a CUDA build of torch, or SPECONTEXT_KERNELS=1
    # asked for them); on a CPU-only torch nothing is lost (the kernels are for CUDA tensors): info.
    _asked = _enabled is True
    _enabled = None
    logger.log(
        logging.WARNING if _asked or torch.backends.cuda.is_built() else logging.INFO,
        "Triton is not available (%s): the Triton kernels are off and the pure-torch paths run%s; to use "
        "them: %s", _triton_missing, " (SPECONTEXT_KERNELS=1 is ignored)" if _asked else "", INSTALL_TRITON,
    )


def use_kernels(enabled: bool | None) -> None:
    """Let the runtime use the Triton attention and scoring kernels on CUDA tensors: True (always), False
    (never: the torch paths), None (the default: in CUDA-graph decode steps only). True without Triton
    raises ``ImportError`` naming the package to install."""
    global _enabled
    if enabled and not TRITON_AVAILABLE:
        raise ImportError(f"use_kernels(True) needs Triton, which is not available ({_triton_missing}); "
                          f"install it: {INSTALL_TRITON}")
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
    return TRITON_AVAILABLE and enabled and all(t.is_cuda for t in tensors)


__all__ = [
    "TRITON_AVAILABLE", "in_cuda_graph_decode", "on_triton_path", "use_kernels",
    "gather_from_host_or_ring", "gather_rows_reference", "retrieval_scores", "retrieval_scores_reference",
    "retrieval_top_k", "sparse_decode_attention", "sparse_decode_attention_reference",
]
