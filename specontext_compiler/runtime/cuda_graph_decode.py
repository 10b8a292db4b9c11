"""Decode steps with every shape fixed, replayed from a CUDA graph.

An eager decode step spends most of its time launching kernels (docs/kernels.md: ~45 ms per step for
an 8B model at 32K, against a few ms of GPU work), and a CUDA graph removes that cost, but it replays
the kernels it recorded: the same shapes, the same buffers, and no Python in between. The eager runtime
decides in Python from the stored length (views of the first ``length`` tokens, a ``past``-wide score
row), so a captured step uses :class:`StaticDecodeRuntime` instead:

* the new token's position is a device scalar (``position``), incremented by the step itself;
* the step's inputs are fixed buffers: one token per row, its position, and a ``[B, capacity]`` mask
  (capacity = prompt + max new tokens, the length the KV store reserved);
* each layer writes its new K/V in place at ``position`` and attends over the selection (``K`` fixed
  by an integer token budget) plus the new token; sliding-window layers over their last ``window``
  positions; the retrieval head scores all ``capacity`` positions with the ones not stored yet masked
  (``RetrievalHead.score_static``), which ranks the stored ones as the eager step does.

:class:`GraphDecoder` owns those buffers, runs the first fixed-shape step eagerly (warm-up: it is a real
step), captures the next and replays it for the rest of the sequence, with the Triton attention and
scoring kernels (their launch cost is paid once, at capture); on the CPU it runs every step
eagerly through the same code (the tests compare it with the eager runtime). Python's bookkeeping (the
stored lengths, the head's counters) is brought up after the steps, by ``finish``.

It engages once a step's decisions stay fixed for the rest of the sequence (``eligible``): sparse
steps with an integer budget, every sliding window already exceeded, every layer resident on the GPU
for the whole sequence, a head with a fixed-shape scorer. Otherwise decoding stays eager.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from ..kernels import in_cuda_graph_decode, on_triton_path
from ..kernels import sparse_decode_attention as triton_sparse_decode_attention
from ..retrieval.selection import resolve_token_budget, sink_positions
from .attention_runtime import AttentionRuntime, sparse_decode_attention

logger = logging.getLogger(__name__)


def select_tokens_static(scores: torch.Tensor, key_valid: torch.Tensor, budget: int, sink_tokens: int,
                         local_window: int, position: torch.Tensor) -> torch.Tensor:
    """``select_tokens`` over a fixed number of positions, the past ending at the device scalar ``position``:
    ``key_valid`` is already False from ``position`` on. int64 [B, Hkv, budget], sorted."""
    capacity = scores.shape[-1]
    ranked = scores.double()
    if local_window:
        at = torch.arange(capacity, device=scores.device)
        window = (at >= position - local_window) & (at < position)
        ranked = torch.where(window, 1e12 + at.double(), ranked)
    ranked = ranked.masked_fill(sink_positions(key_valid, sink_tokens)[:, None, :], 1e13)
    ranked = ranked.masked_fill(~key_valid[:, None, :], float("-inf"))
    return ranked.topk(budget, dim=-1, sorted=False).indices.sort(dim=-1).values


class StaticDecodeRuntime:
    """The runtime the attention ops talk to inside a fixed-shape decode step (see the module docstring)."""

    def __init__(self, runtime: AttentionRuntime, capacity: int, budget: int, position: torch.Tensor):
        self.runtime = runtime
        self.store = runtime.store
        self.head = runtime.head
        self.sparse = runtime.sparse
        self.capacity = capacity
        self.budget = budget  # past tokens selected (the new token comes on top)
        self.position = position
        self.at = torch.arange(capacity, device=position.device)
        self.key_valid: torch.Tensor | None = None

    def retrieve(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
        self.key_valid = attention_mask.bool() & (self.at < self.position)
        self.with_new = self.key_valid | (self.at == self.position)
        scores = self.head.score_static(self.key_valid)
        return select_tokens_static(scores, self.key_valid, self.budget, self.sparse.sink_tokens,
                                    self.sparse.local_window, self.position)

    def prefetch(self, layer: int) -> None:
        pass  # every layer is resident (``eligible``)

    def wait(self, layer: int) -> None:
        pass

    def attention(self, layer, q, k, v, mask, scale, softcap, sliding_window=0, indices=None):
        entry = self.store.layers[layer]
        at = self.position.view(1)
        entry.key.index_copy_(2, at, k)
        entry.value.index_copy_(2, at, v)
        keys, values = entry.key[:, :, : self.capacity], entry.value[:, :, : self.capacity]
        self.head.observe_static(layer, q, k, self.position)
        batch, kv_heads = k.shape[:2]
        if sliding_window and sliding_window < self.capacity:  # exceeded already (``eligible``): the window
            window = (self.position - sliding_window + 1 + torch.arange(sliding_window, device=q.device)).clamp_min(0)
            positions = window.expand(batch, kv_heads, sliding_window)
        else:
            newest = self.position.view(1, 1, 1).expand(batch, kv_heads, 1)
            positions = torch.cat([indices, newest], dim=-1)
        valid = None
        if not self.runtime.padding_free or sliding_window:
            valid = self.with_new[:, None, :].expand(batch, kv_heads, self.capacity).gather(2, positions)
        if on_triton_path(q):
            return triton_sparse_decode_attention(q[:, :, 0], keys, values, positions, scale=scale, valid=valid,
                                                  softcap=softcap)[:, :, None]
        return sparse_decode_attention(q, keys, values, positions, valid, scale, softcap)


def eligible(runtime: AttentionRuntime, total: int, capacity: int, sliding_windows: list[int]) -> str | None:
    """Why decode steps from ``total`` tokens (the new one included) on cannot run at fixed shape; None if
    they can."""
    sparse, store = runtime.sparse, runtime.store
    if sparse is None or not runtime.selection_enabled:
        return "dense attention"
    if isinstance(sparse.token_budget, float):
        return "a fractional token budget changes the selection's size every step"
    if total <= sparse.token_budget:
        return "the context is still within the token budget"
    if runtime.head is None or runtime.head.per_layer or not runtime.head.supports_static or runtime.head.aux_layers:
        return f"the {getattr(runtime.head, 'name', None)} head has no fixed-shape scorer"
    if store.offloaded or runtime.resident_until:
        return "layers offloaded or moving to host memory"
    if any(total <= window < capacity for window in sliding_windows):
        return "a sliding window will be exceeded during the sequence"
    if runtime.observers or runtime.measure_recall:
        return "observers or recall measurement attached"
    if any(entry is None or entry.capacity < capacity for entry in store.layers):
        return "the KV store reserved fewer tokens than the sequence needs"
    return None


class GraphDecoder:
    """Fixed-shape decode for one sequence batch: buffers, warm-up, capture, replay (module docstring).

    Args:
        step: the captured step (called with input_ids, attention_mask, position_ids).
        runtime: the eager runtime whose store and head the steps write.
        attention_mask: [B, T] mask of the sequence so far, the new token included.
        capacity: positions of the fixed buffers (prompt + max new tokens).
        use_graph: capture and replay a CUDA graph (False: run every step eagerly at fixed shape).
    """

    def __init__(self, step, runtime: AttentionRuntime, attention_mask: torch.Tensor, capacity: int, use_graph: bool):
        device = attention_mask.device
        batch, total = attention_mask.shape
        self.step = step
        self.runtime = runtime
        self.position = torch.full((), total - 1, dtype=torch.long, device=device)
        self.input_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.mask = torch.zeros(batch, capacity, dtype=attention_mask.dtype, device=device)
        self.mask[:, :total] = attention_mask
        budget = resolve_token_budget(runtime.sparse.token_budget, total) - 1
        self.static = StaticDecodeRuntime(runtime, capacity, budget, self.position)
        runtime.head.begin_static(capacity)
        self.use_graph = use_graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.steps = 0
        self.capture_seconds = 0.0

    def _run(self) -> torch.Tensor:
        from .context import activate

        scope = in_cuda_graph_decode() if self.use_graph else contextlib.nullcontext()
        with activate(self.static), scope:
            out = self.step(input_ids=self.input_ids, attention_mask=self.mask, position_ids=self.position_ids)
        logits = out[0] if isinstance(out, tuple) else out
        self.position.add_(1)
        self.mask.index_fill_(1, self.position.clamp(max=self.mask.shape[1] - 1).view(1), 1)
        return logits

    def decode(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """One step for ``tokens`` [B, 1] at ``position_ids`` [B, 1]; returns logits [B, 1, V] (a buffer the
        next step overwrites)."""
        self.input_ids.copy_(tokens)
        self.position_ids.copy_(position_ids)
        self.steps += 1
        self.runtime.attended_tokens.append(self.static.budget + 1)
        if not self.use_graph or self.steps == 1:  # on a GPU, the first step warms up (it runs eagerly)
            return self._run()
        if self.graph is None:
            started = time.perf_counter()
            side = torch.cuda.Stream(self.position.device)
            side.wait_stream(torch.cuda.current_stream(self.position.device))
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=side):
                self.logits = self._run()
            torch.cuda.current_stream(self.position.device).wait_stream(side)
            self.capture_seconds = time.perf_counter() - started  # capture runs no kernel: no sync needed
            logger.info("captured a decode step: batch %d, %d positions", self.input_ids.shape[0], self.mask.shape[1])
        self.graph.replay()
        return self.logits

    def finish(self) -> None:
        """Bring Python's counters up to the steps that ran: stored lengths and the head's caches."""
        for entry in self.runtime.store.layers:
            entry.length += self.steps
        self.runtime.head.end_static(self.steps)
        self.graph = None
