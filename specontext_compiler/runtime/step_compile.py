"""The fixed-shape decode step through Inductor, compiled once for sizes that change.

Inductor fuses the elementwise operators between the matrix products (8B at 32K on an H200: ~1,400 kernels
per step down to ~600; docs/benchmarks.md). The matrix products stay cuBLAS's: with coordinate-descent
tuning Inductor rewrites one-row products as tuned Triton reductions, whose speed varied from machine to
machine (5.68 against 5.48 ms per step at batch 1 on 2026-12-04).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

#: Inductor's options for the fixed-shape decode step on CUDA: a batch-1 step launches ~530 kernels, so
#: launch latency counts. Programmatic dependent launch lets a kernel start while the one before it
#: drains; combo kernels merge independent small kernels into one launch (docs/benchmarks.md).
CUDA_INDUCTOR_OPTIONS = {"triton.enable_pdl": True, "combo_kernels": True}


def compile_fixed_shape_step(step: Callable[..., torch.Tensor], device: torch.device, inductor_options: dict | None,
                             on_compile: Callable[[float], None]) -> Callable[..., torch.Tensor]:
    """``step`` under ``torch.compile``, called with keyword inputs as the fixed-shape decoder calls it;
    ``on_compile(seconds)`` after each call that compiled.

    The batch size and the capacity (the mask's width) are compiled as dynamic sizes from the first call,
    so a new prompt length or batch size reuses the compiled code: one compilation for batch 1 (which
    Dynamo specializes) and one for every larger batch. Inductor's caches on disk (FX graph, AOTAutograd,
    autotuning) let a later process skip most of the work. ``inductor_options``: Inductor's options
    (``{"coordinate_descent_tuning": True}`` measures the tuned reductions; None: :data:`CUDA_INDUCTOR_OPTIONS`
    on CUDA, Inductor's defaults elsewhere)."""
    options = inductor_options
    if options is None:
        options = dict(CUDA_INDUCTOR_OPTIONS) if device.type == "cuda" else {}
    compiled = torch.compile(step, options=options)

    def fixed_shape_step(**inputs):
        for tensor in inputs.values():  # [B, 1] token and position, [B, capacity] mask
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        torch._dynamo.maybe_mark_dynamic(inputs["attention_mask"], 1)
        compiles = torch._dynamo.utils.counters["frames"]["ok"]
        started = time.perf_counter()
        # The selection's width is data-dependent to the tracer (an unbacked size, as at export): without
        # this Dynamo breaks the step in two at the retrieval and Inductor never sees it whole.
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            logits = compiled(**inputs)
        if torch._dynamo.utils.counters["frames"]["ok"] != compiles:  # this call compiled (a new shape)
            on_compile(time.perf_counter() - started)
        return logits

    return fixed_shape_step
