"""Resident layers leaving the GPU mid-sequence, on the memory manager's schedule.

The plan keeps some layers on the GPU only while the sequence is shorter than a length
(``resident_until``). Such a layer's host buffers are pinned while the prompt is prefilled
(:meth:`LayerMigration.pin_ahead`); in the steps before it must leave, its stored tokens are copied to
them in the background (:meth:`LayerMigration.advance`, on a side stream); between two steps it switches
over (:meth:`LayerMigration.to_host`): the last tokens copied, its ring filled from the GPU buffer, the
GPU buffer freed, and its slots filled by the next step's prefetch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from typing import TYPE_CHECKING

import torch

from ..planning.memory_model import MIGRATION_CHUNK
from .host_tier import HostTier

if TYPE_CHECKING:
    from .kv_store import KVStore, LayerKV

logger = logging.getLogger(__name__)


class LayerMigration:
    """The moves of one :class:`~.kv_store.KVStore`'s resident layers to host memory.

    Attributes:
        chunk: tokens per device-to-host copy (host storage is token-major, so each copy goes through a
            device temporary of this many tokens; the memory plan counts it).
    """

    def __init__(self, store: "KVStore"):
        self.store = weakref.proxy(store)  # the store owns this: no reference cycle keeping its buffers
        self.chunk = MIGRATION_CHUNK
        # Layers on their way to host memory: (host K, host V, tokens copied, copy done on the side stream).
        self._moving: dict[int, tuple] = {}
        self._host_buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # pinned ahead of a move

    def reset(self) -> None:
        """A new sequence: nothing on its way, nothing pinned ahead."""
        self._moving.clear()
        self._host_buffers.clear()

    def truncate(self, length: int) -> None:
        """The sequence is cut back to ``length`` tokens: rows copied past it are copied again."""
        for layer, (host_key, host_value, copied, done) in self._moving.items():
            self._moving[layer] = (host_key, host_value, min(copied, length), done)

    def pin_ahead(self, layer: int, entry: "LayerKV") -> None:
        """Pin the host buffers of a layer that will move mid-sequence now (pinning takes milliseconds per
        100 MB of CPU time, better spent in prefill than between decode steps)."""
        if layer not in self._host_buffers:
            self._host_buffers[layer] = self._host_buffers_like(layer, entry)

    def forget(self, layer: int) -> None:
        """The layer is in host memory now."""
        self._moving.pop(layer, None)
        self._host_buffers.pop(layer, None)

    def advance(self, layer: int, stream: "torch.cuda.Stream | None" = None, steps_left: int = 1) -> None:
        """Copy a resident layer that is about to move to host memory a share (1 / ``steps_left``) of its
        stored tokens not yet copied, on ``stream`` (a side stream: in the background of decoding), in
        :attr:`chunk`-token copies. Stored tokens are never rewritten, so copies can run steps before
        :meth:`to_host` switches the layer over."""
        store = self.store
        if layer in store.offloaded:
            return
        entry = store.layers[layer]
        if entry is None or entry.length == 0:
            return
        device = store.devices[layer]
        if layer in self._moving:
            host_key, host_value, copied, _ = self._moving[layer]
        else:
            host_key, host_value = self._host_buffers.pop(layer, None) or self._host_buffers_like(layer, entry)
            copied = 0
        end = copied + math.ceil((entry.length - copied) / max(1, steps_left))
        done = None
        if stream is not None:
            written = torch.cuda.Event()
            written.record(torch.cuda.current_stream(device))
            stream.wait_event(written)  # every append so far, then the copy
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            self._copy_to_host(entry, host_key, host_value, copied, end)
        if stream is not None:
            done = torch.cuda.Event()
            done.record(stream)
        self._moving[layer] = (host_key, host_value, end, done)

    def to_host(self, layer: int) -> None:
        """Switch a resident layer to host memory between two steps, nothing lost or repeated: the
        tokens :meth:`advance` has not copied yet are copied, the compute stream waits for the background
        copy, the ring gets the newest ``window`` tokens from the GPU buffer, and the GPU buffer is freed
        (the compute stream is ordered after its last reader, so the memory is reusable at once). The
        layer's slots are filled with the current selection by the next step's prefetch
        (``KVStore.unloaded_slots``)."""
        store = self.store
        if layer in store.offloaded:
            raise ValueError(f"layer {layer} is already offloaded")
        entry = store.layers[layer]
        if entry is not None and entry.length and layer not in self._moving:
            # At once: on the compute stream, which waits for the copy anyway and can reuse the blocks it
            # caches (a side stream's first allocation needs a new segment: none is left after an OOM).
            self.advance(layer, None, steps_left=1)
        tier = HostTier(store.window)
        if entry is None or entry.length == 0:
            store.switch_to_host(layer, tier, None)  # nothing stored yet: the next append allocates host memory
            return
        # Everything that allocates device memory comes before the store changes: a move that runs out of
        # memory leaves the layer resident, and the memory manager's retry can move it again.
        length = entry.length
        host_key, host_value, copied, done = self._moving[layer]
        if done is not None:
            torch.cuda.current_stream(store.devices[layer]).wait_event(done)
        self._copy_to_host(entry, host_key, host_value, copied, length)  # the few newest, on this stream
        # The ring: the newest tokens at position % window, trusted no further back than the other
        # offloaded layers' rings (one source mask serves every offloaded layer).
        others = [store.fast[o].ring_start for o in store.offloaded if store.layers[o] is not None]
        tier.fill_ring(entry.key, entry.value, max([length - store.window] + others + [0]), length)
        store.switch_to_host(layer, tier, (host_key.permute(1, 2, 0, 3), host_value.permute(1, 2, 0, 3), length))
        logger.info("layer %d: KV of %d tokens moved to host memory", layer, length)

    def _host_buffers_like(self, layer: int, entry: "LayerKV") -> tuple[torch.Tensor, torch.Tensor]:
        """Host buffers for a resident layer's whole reservation."""
        batch, heads, _, key_dim = entry.key.shape
        capacity = max(self.store.reserved_tokens, entry.length)
        return self.store.new_host_buffers(layer, capacity, batch, heads, key_dim, entry.value.shape[3])

    def _copy_to_host(self, entry: "LayerKV", host_key: torch.Tensor, host_value: torch.Tensor, start: int,
                      end: int) -> None:
        for begin in range(start, end, self.chunk):
            stop = min(begin + self.chunk, end)
            host_key[begin:stop].copy_(entry.key[:, :, begin:stop].permute(2, 0, 1, 3), non_blocking=True)
            host_value[begin:stop].copy_(entry.value[:, :, begin:stop].permute(2, 0, 1, 3), non_blocking=True)
