"""Asynchronous prefetch: the selected KV of offloaded layers, moved into their slots ahead of use.

The step's indices are known before layer 0 runs (one retrieval for every layer), so the graph issues
``specontext::prefetch(indices, layer)`` for every layer right after retrieval and
``specontext::wait(layer)`` right before each layer's sparse attention (the ``schedule_prefetch``
pass). On a GPU the loads run on a side stream, one event per layer (:mod:`.load_streams`): layer i's
attention waits for layer i's rows only, while the side stream keeps loading later layers. On a CPU-only
machine the same calls run synchronously, so tests exercise every path.

Each step loads only what the selection adds (elastic loading, :mod:`.slots`); rows come from the
layer's recent ring on the device when it holds them, otherwise from host memory (zero-copy Triton
gather on CUDA, :mod:`specontext_compiler.kernels.gather_rows`; the torch gather where Triton is missing).
"""

from __future__ import annotations

import torch

from ..kernels import TRITON_AVAILABLE, gather_from_host_or_ring, gather_rows_reference
from .kv_store import KVStore
from .load_streams import LoadStreams
from .slots import LoadPlan


def slot_validity(mapping: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """Bool [B, Hkv, S + 2]: the slots a step attends (mapping int64 [B, Hkv, S], -1 = empty; key_valid
    bool [B, P] over the positions the map may name): those holding a real token, never the scratch
    slot, always the new token's row."""
    batch, heads, _ = mapping.shape
    real = (mapping >= 0) & key_valid[:, None, :].expand(batch, heads, key_valid.shape[-1]).gather(2, mapping.clamp_min(0))
    tail = real.new_zeros(batch, heads, 2)
    tail[..., 1] = True
    return torch.cat([real, tail], dim=-1)


def row_sources(token: torch.Tensor, valid: torch.Tensor, in_ring: torch.Tensor, window: int) -> tuple[torch.Tensor, ...]:
    """(from host, from ring, ring row, source) of the rows to load: ``source`` is what the one-launch GPU
    gather reads (0 skip, 1 host, 2 ring)."""
    from_host, from_ring = valid & ~in_ring, valid & in_ring
    return from_host, from_ring, token % window, from_host.to(torch.int8) + 2 * from_ring.to(torch.int8)


def load_rows(store: KVStore, layer: int, slot, token, ring_rows, source, from_host, from_ring) -> None:
    """Load the listed rows of offloaded layer ``layer`` into its slots, from host memory or its ring."""
    entry, fast = store.layers[layer], store.fast[layer]
    if fast.slot_key.device.type == "cuda" and TRITON_AVAILABLE:
        # Triton, one launch for K and V from both sources: no host sync; zero-copy from pinned memory.
        gather_from_host_or_ring(entry.key, entry.value, fast.ring_key, fast.ring_value, fast.slot_key,
                                 fast.slot_value, token, ring_rows, source, slot)
        return
    for host, ring, slots in ((entry.key, fast.ring_key, fast.slot_key), (entry.value, fast.ring_value, fast.slot_value)):
        gather_rows_reference(host, token, from_host, slots, slot)
        gather_rows_reference(ring, ring_rows, from_ring, slots, slot)


class Prefetcher:
    """Applies each step's load plan to every offloaded layer and keeps the transfer counters."""

    def __init__(self, store: KVStore):
        self.store = store
        self.plan: LoadPlan | None = None
        self.slot_valid: torch.Tensor | None = None  # bool [B, Hkv, S + 2] for the step's attention
        self.loads = LoadStreams()
        self._prefetched: set[int] = set()
        self._waited: set[int] = set()
        self.reset_stats()

    def reset_stats(self) -> None:
        self.h2d_rows = 0  # tensors until read: summing on the device avoids a sync per layer
        self.full_reload_rows = 0
        self.kept = 0
        self.selected = 0
        self.loads.reset_timing()

    def counters(self) -> tuple:
        """The transfer counters, for :meth:`restore_counters` (each update makes a new value: no copy)."""
        return self.h2d_rows, self.full_reload_rows, self.kept, self.selected

    def restore_counters(self, counters: tuple) -> None:
        self.h2d_rows, self.full_reload_rows, self.kept, self.selected = counters

    @property
    def active(self) -> bool:
        return bool(self.store.offloaded)

    def begin_step(self, indices: torch.Tensor, key_valid: torch.Tensor, past: int) -> None:
        """A sparse step selected ``indices`` [B, Hkv, K] of ``past`` tokens (``key_valid`` [B, past])."""
        store = self.store
        previous = store.slot_map.token
        self.plan = store.slot_map.update(indices, past)
        for layer in store.offloaded:  # on the compute stream: a side stream reuses none of its cached blocks
            store.ensure_slots(layer, store.slot_map.slots)
        self._prefetched.clear()
        self._waited.clear()
        mapping = store.slot_map.token
        self.slot_valid = slot_validity(mapping, key_valid)
        if previous is not None:
            self.kept = self.kept + self.plan.kept.sum()
            self.selected += indices.numel()
        # Where each row comes from, the same for every offloaded layer (all hold `past` tokens and the
        # same ring span): computed once here, not per layer.
        self._from_host, self._from_ring, self._ring_rows, self._source = self._row_sources(self.plan.token, self.plan.valid)
        row_bytes = store.row_bytes(store.offloaded)
        self.h2d_rows = self.h2d_rows + self._from_host.sum() * row_bytes
        # A full reload brings the whole selection (even the window the ring holds) every step.
        self.full_reload_rows = self.full_reload_rows + (mapping >= 0).sum() * row_bytes
        # Loads may start once the step's indices exist and the previous step stopped reading slots.
        self.loads.fork(indices.device, reads=(self.plan.slot, self.plan.token, self._source, self._ring_rows))

    def prefetch(self, layer: int) -> None:
        """Start loading layer ``layer``'s missing rows into its slots."""
        if self.plan is None or not self.store.is_offloaded(layer) or layer in self._prefetched:
            return
        self._prefetched.add(layer)
        self.loads.load(layer, self.store.devices[layer], lambda: self._load(layer))

    def wait(self, layer: int) -> None:
        """Make the compute stream wait for layer ``layer``'s loads (and only those)."""
        if self.plan is None or not self.store.is_offloaded(layer) or layer in self._waited:
            return
        self._waited.add(layer)
        self.loads.join(layer, timed=True)

    def side_stream(self, device: torch.device) -> torch.cuda.Stream:
        """The device's side stream (loads, and the memory manager's moves to host memory)."""
        return self.loads.side_stream(device)

    def ensure(self, layer: int) -> None:
        """Before attention reads the slots: prefetch (if the graph did not) and wait."""
        self.prefetch(layer)
        self.wait(layer)

    def end_sequence(self) -> None:
        self.plan = None

    def _row_sources(self, token: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(from host, from ring, ring row, source) of rows to load: where each valid row comes from, the
        same for every offloaded layer (all hold the same tokens and ring span). ``source`` is what the
        one-launch GPU gather reads: 0 skip, 1 host, 2 ring."""
        in_ring = self.store.ring_holds(next(iter(self.store.offloaded)), token)
        return row_sources(token, valid, in_ring, self.store.window)

    def _full_plan(self) -> tuple[torch.Tensor, ...]:
        """(slot, token, ring row, source, from host, from ring) loading the whole slot map: for a layer
        that just moved to host memory, whose slots hold nothing yet."""
        mapping = self.store.slot_map.token
        batch, heads, slots = mapping.shape
        slot = torch.arange(slots, device=mapping.device).expand(batch, heads, slots).contiguous()
        token = mapping.clamp_min(0)
        from_host, from_ring, ring_rows, source = self._row_sources(token, mapping >= 0)
        return slot, token, ring_rows, source, from_host, from_ring

    def _load(self, layer: int) -> None:
        store, plan = self.store, self.plan  # the slots exist: begin_step made them
        rows = (plan.slot, plan.token, self._ring_rows, self._source, self._from_host, self._from_ring)
        if layer in store.unloaded_slots:
            store.unloaded_slots.discard(layer)
            rows = self._full_plan()
            from_host = rows[4]
            self.h2d_rows = self.h2d_rows + from_host.sum() * store.row_bytes((layer,))
        load_rows(store, layer, *rows)

    def stats(self) -> dict[str, float | int]:
        """Counters since the last reset: bytes moved host -> device, what full reloads would have moved,
        the share of each selection already in the slots, and the compute stream's stall on prefetches."""
        wait_ms = self.loads.wait_ms()
        return {
            "h2d_bytes": int(self.h2d_rows),
            "h2d_bytes_full_reload": int(self.full_reload_rows),
            "selection_overlap": float(self.kept) / self.selected if self.selected else 0.0,
            "prefetch_wait_ms": 0.0 if wait_ms is None else wait_ms,
        }
