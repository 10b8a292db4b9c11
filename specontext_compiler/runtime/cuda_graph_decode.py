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
for the whole sequence, a head with a fixed-shape scorer. Otherwise decoding stays eager. A step that
runs out of GPU memory (building the decoder, moving ring rows to host memory before a step, the
warm-up, the capture; a replay allocates nothing) puts back what it wrote in place, and the engine
abandons the decoder: the memory manager re-plans and the rest of the sequence decodes eagerly
(``GenerationEngine._fixed_shape_step``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import torch

from ..kernels import TRITON_AVAILABLE, in_cuda_graph_decode, on_triton_path
from ..kernels import sparse_decode_attention as triton_sparse_decode_attention
from ..retrieval.selection import resolve_token_budget, select_tokens, sink_positions
from .attention_runtime import AttentionRuntime, attend_positions, attend_slots, sticky_held
from . import step_transaction
from .load_streams import LoadStreams, dedicated_stream
from .prefetcher import load_rows, row_sources, slot_validity

logger = logging.getLogger(__name__)


class StaticDecodeRuntime:
    """The runtime the attention ops talk to inside a fixed-shape decode step (see the module docstring).

    Offloaded layers: the step's selection updates the shared slot map in place
    (``SlotMap.update_in_place``: only the tokens it adds are loaded), each offloaded layer's loads run
    on the side stream (``prefetch``; one event per layer, ``wait`` joins it back, so the capture forks
    from and joins the capturing stream: :class:`~.load_streams.LoadStreams`), rows come from pinned host
    memory or the layer's device ring, the new token enters the ring at ``position % window``, and
    attention reads the slots. Moving the ring's rows to host memory happens between steps, in
    :meth:`GraphDecoder.decode` (Python knows the length there). Transfer counters accumulate in device
    tensors.
    """

    def __init__(self, runtime: AttentionRuntime, capacity: int, budget: int, position: torch.Tensor):
        self.runtime = runtime
        self.store = runtime.store
        self.head = runtime.head
        self.sparse = runtime.sparse
        self.capacity = capacity
        self.budget = budget  # past tokens selected (the new token comes on top)
        self.position = position
        device = position.device
        self.at = torch.arange(capacity, device=device)
        self.key_valid: torch.Tensor | None = None
        self.sinks: torch.Tensor | None = None  # fixed from the first step on, or found at each step
        self.held: torch.Tensor | None = None  # sticky selection's mask of held tokens, rewritten each step
        self.h2d_bytes = torch.zeros((), dtype=torch.long, device=device)
        self.full_reload_bytes = torch.zeros((), dtype=torch.long, device=device)
        self.kept = torch.zeros((), dtype=torch.long, device=device)
        self.selections = 0  # index entries per step, for the selection-overlap counter
        self._prefetched: set[int] = set()
        # The process's side stream, with events of its own: the capture forks and joins them.
        self.loads = LoadStreams(captured=True)
        # Timing of the compute stream's waits on the loads (``GenerationEngine.time_graph_waits``): events
        # around each wait, recorded as graph nodes (external), so each replay times its own waits.
        self.time_waits = False
        # The accuracy guard's coverage, written in place by the steps it measures (``measuring``: the ones
        # the host reads it after; they replay a graph of their own).
        self.guard = runtime.guard if runtime.guard is not None and runtime.guard.layer is not None else None
        self.guard_coverage = torch.ones(0, device=device)
        self.measuring = False

    def counters(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The transfer counters the steps add to in place (bytes loaded, a full reload's bytes, kept)."""
        return self.h2d_bytes, self.full_reload_bytes, self.kept

    def begin(self, batch: int, kv_heads: int, mask: torch.Tensor) -> None:
        """Before the first step: the sink positions where every row has its sinks already (``mask``: the
        first step's [B, capacity] mask), slot buffers and the in-place slot map for the offloaded layers."""
        stored = self._stored(mask)
        if int(stored.sum(-1).min()) >= self.sparse.sink_tokens:  # (one synchronisation per sequence)
            self.sinks = sink_positions(stored, self.sparse.sink_tokens)
        store = self.store
        if self.guard is not None:
            self.guard_coverage = torch.ones(batch, device=self.position.device)
        if not store.offloaded:
            return
        shape = (batch, kv_heads, self.budget)
        self.started_empty = store.slot_map.token is None or tuple(store.slot_map.token.shape) != shape
        store.slot_map.begin_in_place(shape, self.position.device)
        if self.sparse.sticky_margin and store.slot_map.elastic:
            self.held = torch.zeros(batch, kv_heads, self.capacity + 1, dtype=torch.bool, device=self.position.device)
        for layer in store.offloaded:
            store.ensure_slots(layer, self.budget)
        if self.position.device.type == "cuda":
            self.loads.side_stream(self.position.device)  # made now, before any capture
        # Where the ring starts once the prompt is stored (the new tokens then move it along).
        self._ring_floor = max(store.ring_start(layer) for layer in store.offloaded)
        self._row_bytes = store.row_bytes(store.offloaded)

    def retrieve(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
        self.key_valid = self._stored(attention_mask)
        self.with_new = self.key_valid | (self.at == self.position)
        scores = self.head.score_static(self.key_valid, input_ids)
        # The slot map's buffer keeps its address (update_in_place), so a replay reads the previous step's.
        held = None if self.held is None else sticky_held(self.sparse, self.store, self.held.shape[:2], self.capacity,
                                                           out=self.held)
        indices = select_tokens(scores, self.key_valid, self.budget, self.sparse.sink_tokens,
                                self.sparse.local_window, past=self.position, sinks=self.sinks, held=held,
                                margin=self.sparse.sticky_margin)
        self.indices = indices  # the step's selection: the graph passes it to prefetch and attention
        # Whether each selected position is a stored token (None: no padding), once per step, not per layer. A
        # row with fewer tokens than the budget also picks padding (select_tokens ranks it above positions
        # not written yet, the new token's among them, so the fused kernel never reads the row it writes).
        self.selection_valid = None if self.runtime.padding_free else self._holds_token(indices, self.key_valid)
        self._positions = None
        if self.store.offloaded:
            self._plan_loads(indices)
        return indices

    def _stored(self, mask: torch.Tensor) -> torch.Tensor:
        """Bool [B, capacity]: the positions of ``mask`` [B, capacity] that hold a stored token (before
        ``position``, not padding)."""
        return mask.bool() & (self.at < self.position)

    def positions(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The selection and the new token [B, Hkv, K + 1], and which are real tokens (None: no padding):
        what a layer reads whose append is not fused into its attention kernel (built once per step)."""
        if self._positions is None:
            newest = self.position.view(1, 1, 1).expand(*self.indices.shape[:2], 1)
            positions = torch.cat([self.indices, newest], dim=-1)
            self._positions = (positions, None if self.runtime.padding_free else self._holds_token(positions))
        return self._positions

    def _holds_token(self, positions: torch.Tensor, stored: torch.Tensor | None = None) -> torch.Tensor:
        """Bool like ``positions`` [B, Hkv, N]: whether each is a stored token or the new one (not padding);
        ``stored`` [B, capacity]: which positions count (default: the stored ones and the new one)."""
        batch, kv_heads = positions.shape[:2]
        stored = self.with_new if stored is None else stored
        return stored[:, None, :].expand(batch, kv_heads, self.capacity).gather(2, positions)

    def _plan_loads(self, indices: torch.Tensor) -> None:
        store = self.store
        plan = store.slot_map.update_in_place(indices, self.capacity)
        mapping = store.slot_map.token
        self.slot_valid = slot_validity(mapping, self.key_valid)
        # The ring holds the last `window` positions but its oldest row, which this step's token overwrites
        # (``KVStore.ring_holds`` with the position on the device).
        first_in_ring = torch.clamp(self.position - store.window + 1, min=self._ring_floor)
        from_host, from_ring, ring_rows, source = row_sources(plan.token, plan.valid, plan.token >= first_in_ring,
                                                              store.window)
        self.plan = (plan.slot, plan.token, ring_rows, source, from_host, from_ring)
        self.h2d_bytes.add_(from_host.sum() * self._row_bytes)
        self.full_reload_bytes.add_((mapping >= 0).sum() * self._row_bytes)
        self.kept.add_(plan.kept.sum())
        self.selections = indices.numel()
        self._prefetched.clear()
        self.loads.fork(self.position.device)  # loads start once the indices exist (from the capturing stream)

    def _follows_retrieval(self, indices: torch.Tensor) -> None:
        if indices is not self.indices:
            raise ValueError("a fixed-shape decode step received a selection other than its retrieval's output; "
                             "only the eager step follows an edited selection")

    def prefetch(self, indices: torch.Tensor, layer: int) -> None:
        self._follows_retrieval(indices)
        if not self.store.is_offloaded(layer) or layer in self._prefetched:
            return
        self._prefetched.add(layer)
        self.loads.load(layer, self.position.device, lambda: load_rows(self.store, layer, *self.plan))

    def wait(self, layer: int) -> None:
        if self.store.is_offloaded(layer):
            self.loads.join(layer, timed=self.time_waits)  # join back

    def wait_ms(self) -> float | None:
        """The compute stream's stall on loads in the last step run (ms, all offloaded layers), when timed."""
        return self.loads.wait_ms(self.position.device)

    def join_side_stream(self) -> None:
        """The current stream waits for every load queued on the side stream so far. After a step that
        failed part-way: a capture cannot end with forked work not joined back, and the step's tensors
        that the loads read are freed to the current stream."""
        if self._prefetched:
            self.loads.join_all(self.position.device)

    def attention(self, layer, q, k, v, mask, scale, softcap, sliding_window=0, indices=None):
        self._follows_retrieval(indices)
        if self.store.is_offloaded(layer):
            return self._offloaded_attention(layer, q, k, v, scale, softcap)
        entry = self.store.layers[layer]
        self.head.observe_static(layer, q, k, self.position)
        measures = self.measuring and layer == self.guard.layer
        windowed = sliding_window and sliding_window < self.capacity  # exceeded already (``eligible``)
        if on_triton_path(q) and not measures and not windowed:
            # The append and the attention in one launch: the kernel stores the new K/V at ``position``.
            return triton_sparse_decode_attention(
                q[:, :, 0], entry.key, entry.value, self.indices, scale=scale, valid=self.selection_valid,
                softcap=softcap, new_k=k[:, :, 0].contiguous(), new_v=v[:, :, 0].contiguous(),
                position=self.position)[:, :, None]
        at = self.position.view(1)
        entry.key.index_copy_(2, at, k)
        entry.value.index_copy_(2, at, v)
        keys, values = entry.key[:, :, : self.capacity], entry.value[:, :, : self.capacity]
        batch, kv_heads = k.shape[:2]
        positions, valid = self.positions()
        if measures:
            self.guard.measure(q, keys, scale, positions, self.with_new, valid, out=self.guard_coverage)
        if windowed:  # the layer's last ``sliding_window`` positions
            window = (self.position - sliding_window + 1 + torch.arange(sliding_window, device=q.device)).clamp_min(0)
            positions = window.expand(batch, kv_heads, sliding_window)
            valid = self._holds_token(positions)
        return attend_positions(q, keys, values, positions, valid, scale, softcap)

    def _offloaded_attention(self, layer, q, k, v, scale, softcap):
        """Attention over the layer's slots (its selection) + the new token, whose K/V enter the ring."""
        store, fast = self.store, self.store.fast[layer]
        self.prefetch(self.indices, layer)  # a no-op where the graph's prefetch node ran it already
        self.wait(layer)  # the loads read the ring: they land before the new token takes its oldest row
        row = (self.position % store.window).view(1)
        fast.ring_key.index_copy_(2, row, k)
        fast.ring_value.index_copy_(2, row, v)
        self.head.observe_static(layer, q, k, self.position)
        return attend_slots(store, layer, q, k, v, self.slot_valid, scale, softcap)


def eligible(runtime: AttentionRuntime, total: int, capacity: int, sliding_windows: dict[int, int]) -> str | None:
    """Why decode steps from ``total`` tokens (the new one included) on cannot run at fixed shape; None if
    they can. ``sliding_windows``: layer -> window of the sliding-window layers."""
    sparse, store = runtime.sparse, runtime.store
    if sparse is None or not runtime.selection_enabled:
        return "dense attention"
    if isinstance(sparse.token_budget, float):
        return "a fractional token budget changes the selection's size every step"
    if total <= sparse.token_budget:
        return "the context is still within the token budget"
    if runtime.head is None or runtime.head.per_layer or not runtime.head.supports_static or runtime.head.aux_layers:
        return f"the {getattr(runtime.head, 'name', None)} head has no fixed-shape scorer"
    if runtime.resident_until or store.unloaded_slots:
        return "layers moving to host memory during the sequence"
    if store.offloaded and not store.slot_map.elastic:
        return "full reloads every step (elastic=False)"
    if store.offloaded and not TRITON_AVAILABLE and any(store.devices[layer].type == "cuda" for layer in store.offloaded):
        # The torch gather reads which rows to load on the host: a CUDA graph cannot capture that.
        return "offloaded layers on CUDA load through the Triton gather, and Triton is not installed"
    if any(total <= window < capacity for window in sliding_windows.values()):
        return "a sliding window will be exceeded during the sequence"
    if any(window < capacity and layer in store.offloaded for layer, window in sliding_windows.items()):
        return "an offloaded sliding-window layer (it reads its window, not the selection)"
    if runtime.observers or runtime.measure_recall:
        return "observers or recall measurement attached"
    if runtime.guard is not None and runtime.guard.holding:
        return "the accuracy guard holds dense attention"
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
        layer = runtime.store.layers[0]
        self.static.begin(batch, layer.key.shape[1], self.mask)
        self.use_graph = use_graph
        # Captured steps and their logits buffers, by whether the step measures the guard's coverage.
        self.graphs: dict[bool, torch.cuda.CUDAGraph] = {}
        self.logits: dict[bool, torch.Tensor] = {}
        self.warmed: set[bool] = set()
        self.steps = 0
        self.capture_seconds = 0.0
        self.captures = 0  # graphs captured, and steps run eagerly at fixed shape (on a GPU: warm-ups)
        self.unreplayed_steps = 0
        self.last_replayed = False  # whether the last step was a replay of a captured graph
        self._unreplayed = [False, False]  # whether each of the last two steps ran outside a graph
        self._checked_before = None  # the snapshot before the step whose guard check is read one step late

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
        next step overwrites).

        Raises ``torch.OutOfMemoryError`` from the ring rows' move to host memory (before the step), or
        from a step that allocates (every step on the CPU; the warm-up and the capture on a GPU: a replay
        allocates nothing) with what it wrote in place put back, for :meth:`abandon`."""
        # Ring rows due go to host memory first (a device temporary each): out of memory there, this step
        # has not run yet, and the sequence goes on eagerly from the same state.
        self.runtime.store.flush_due()
        self.input_ids.copy_(tokens)
        self.position_ids.copy_(position_ids)
        measuring = self.static.measuring = self.static.guard is not None and self.static.guard.check_due
        if measuring:  # what undo_step puts back; the transfers the step makes do happen: an undo keeps them
            self._before = step_transaction.begin_fixed_shape(self.static, counters=False)
        graph = self.graphs.get(measuring)
        unreplayed = self.unreplayed_steps
        if graph is not None:
            graph.replay()
            logits = self.logits[measuring]
        else:
            logits = self._allocating_step()
        self.last_replayed = graph is not None  # not a warm-up, nor the replay right after a capture
        self._unreplayed = [self._unreplayed[-1], self.unreplayed_steps != unreplayed]  # the last two steps'
        self.steps += 1
        self.runtime.attended_tokens.append(self.static.budget + 1)
        self.runtime.store.advance_in_place()
        return logits

    def _allocating_step(self) -> torch.Tensor:
        """A step run eagerly at fixed shape (on a GPU, the first: it warms up) or captured and replayed."""
        before = step_transaction.begin_fixed_shape(self.static)
        try:
            # The first step of each kind (measuring the guard's coverage or not) runs eagerly: it warms up
            # what the capture records.
            if not self.use_graph or self.static.measuring not in self.warmed:
                self.warmed.add(self.static.measuring)
                self.unreplayed_steps += 1
                return self._run()
            return self._capture_and_replay()
        except torch.OutOfMemoryError:
            # Keys, values and head keys written at the step's own position are rewritten by the retry.
            step_transaction.roll_back_fixed_shape(self.static, before)
            self.graphs.clear()
            raise

    def _capture_and_replay(self) -> torch.Tensor:
        """Capture the step once (its kernels do not run then), and replay it: the step runs. The steps that
        measure the guard's coverage get a graph of their own, sharing the first graph's memory pool (one
        of the two runs at a time)."""
        started = time.perf_counter()
        measuring = self.static.measuring
        side = dedicated_stream("capture", self.position.device)
        side.wait_stream(torch.cuda.current_stream(self.position.device))
        graph = torch.cuda.CUDAGraph()
        # Sharing the pool is safe here although the two replay in any order: no step reads another step's
        # intermediates (state that outlives a step lives in buffers made outside the capture), and a step's
        # logits, which the other graph's intermediates may overlap, are copied out before the next replay.
        pool = next(iter(self.graphs.values())).pool() if self.graphs else None
        with torch.cuda.graph(graph, pool=pool, stream=side):
            try:
                self.logits[measuring] = self._run()
            except torch.OutOfMemoryError:
                self.static.join_side_stream()  # else ending the capture fails, and hides this error
                raise
        torch.cuda.current_stream(self.position.device).wait_stream(side)
        self.graphs[measuring] = graph
        self.captures += 1
        self.capture_seconds += time.perf_counter() - started  # capture runs no kernel: no sync needed
        logger.info("captured a decode step: batch %d, %d positions%s", self.input_ids.shape[0], self.mask.shape[1],
                    ", measuring the guard's coverage" if measuring else "")
        graph.replay()
        return self.logits[measuring]

    def guard_missed(self, lagged: bool = False) -> bool:
        """Whether the accuracy guard finds that the step just run missed (reads its coverage). ``lagged``:
        a check starts instead (False), read by :meth:`earlier_step_missed` after the next step."""
        guard = self.static.guard
        if guard is None:
            return False
        missed = guard.missed(lagged)
        if guard.read_pending:
            self._checked_before = self._before
        return missed

    def earlier_step_missed(self) -> bool:
        """After a step: whether the step before it, whose guard check is pending, missed (waits for that
        step only; this one stays queued)."""
        return self.static.guard is not None and self.static.guard.pending_missed()

    def undo_step(self, steps: int = 1) -> None:
        """Take back the last ``steps`` steps (1: the step just run, which measured the guard's coverage; 2:
        that step and the one after it, when the check was read one step late) and end fixed-shape decode:
        the engine redoes the measured step eagerly and densely. The head's query goes back to before the
        measured step, the stored lengths to before its token (what the steps wrote at their positions is
        rewritten by the redo and the steps after it)."""
        step_transaction.roll_back_fixed_shape(self.static, self._before if steps == 1 else self._checked_before)
        self.steps -= steps
        self.unreplayed_steps -= sum(self._unreplayed[-steps:])
        del self.runtime.attended_tokens[-steps:]
        self.finish()
        store = self.runtime.store
        store.truncate(max(store.length(layer) for layer in range(store.num_layers)) - steps)

    def abandon(self) -> None:
        """Leave the rest of the sequence to eager steps (a step ran out of memory): count the steps that
        ran, as :meth:`finish` does, and let the slot map forget what the slots hold (the failed step
        may have rewritten it and loaded part of its selection): the next step reloads its selection."""
        self.finish()
        self.runtime.store.slot_map.reset()

    def finish(self) -> None:
        """Bring Python's counters up to the steps that ran: the head's caches, the transfer counters."""
        self.runtime.head.end_static(self.steps)
        static, prefetcher = self.static, self.runtime.prefetcher
        if self.runtime.store.offloaded:
            prefetcher.h2d_rows = prefetcher.h2d_rows + static.h2d_bytes
            prefetcher.full_reload_rows = prefetcher.full_reload_rows + static.full_reload_bytes
            prefetcher.kept = prefetcher.kept + static.kept
            prefetcher.selected += static.selections * (self.steps - int(static.started_empty))
        self.graphs.clear()


@dataclass
class DecoderTotals:
    """What a ``generate``'s fixed-shape decoders did, summed over the ones that ended early (a guard
    trigger, out of memory) and the one it ends with: ``stats``' fixed-shape counters."""

    steps: int = 0
    captures: int = 0  # graphs captured (one per kind of step a decoder ran: measuring the guard or not)
    unreplayed_steps: int = 0  # steps run at fixed shape outside a graph (on a GPU: each kind's warm-up)
    capture_seconds: float = 0.0

    def add(self, decoder: GraphDecoder) -> None:
        self.steps += decoder.steps
        self.captures += decoder.captures
        self.unreplayed_steps += decoder.unreplayed_steps
        self.capture_seconds += decoder.capture_seconds

    def with_decoder(self, decoder: GraphDecoder | None) -> DecoderTotals:
        totals = DecoderTotals(self.steps, self.captures, self.unreplayed_steps, self.capture_seconds)
        if decoder is not None:
            totals.add(decoder)
        return totals

    def stats(self) -> dict:
        return {"fixed_shape_steps": self.steps, "graph_captures": self.captures,
                "fixed_shape_steps_not_replayed": self.unreplayed_steps, "graph_capture_seconds": self.capture_seconds}
