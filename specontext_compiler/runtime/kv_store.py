"""The KV store: every layer's keys and values, owned by the runtime, outside the captured graph.

Each layer keeps one contiguous buffer per tensor, [B, Hkv, capacity, D], on its *tier*: the compute
device for resident layers; host memory (pinned when the compute device is a GPU) for offloaded ones.
Buffers are allocated once for the length the engine reserves (prompt + max new tokens) and only grow,
in whole chunks, when a caller appends past the reservation: no per-step allocation, no torch.cat, no
per-step pinning.

An offloaded layer also keeps, on the compute device, a ring of its recent tokens and the slots of the
step's selection: its :class:`~.host_tier.HostTier`. A resident layer's buffer is all it has. Layers move
from the GPU to host memory mid-sequence here too (:meth:`KVStore.advance_migration`,
:meth:`KVStore.migrate_to_host`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch

from ..planning.memory_model import MIGRATION_CHUNK
from .host_tier import HostTier, token_major
from .slots import SlotMap

logger = logging.getLogger(__name__)


@dataclass
class LayerKV:
    """One layer's stored keys/values; positions [0, length) along dim 2 are valid."""

    key: torch.Tensor
    value: torch.Tensor
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.key.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes of the valid part (what a dense step reads)."""
        per_token = self.key[:, :, :1].nbytes + self.value[:, :, :1].nbytes
        return per_token * self.length


class KVStore:
    """Per-layer KV buffers with a per-layer tier.

    Args:
        num_layers: number of attention layers.
        devices: the compute device of each layer, one per layer.
        dtype: storage dtype (the model's compute dtype).
        grow_chunk: capacity granularity in tokens when an append outgrows the reservation.
        offloaded: layers whose full KV lives in host memory.
        window: recent tokens an offloaded layer also keeps on its compute device (at least 2).
        elastic: offloaded layers load only the tokens a step's selection adds (see :mod:`.slots`).
        fill_value: what new slot buffers hold before any load (tests use a large finite value, so an
            attended slot that was never loaded changes the output visibly).
    """

    def __init__(
        self,
        num_layers: int,
        devices: list[torch.device],
        dtype: torch.dtype,
        grow_chunk: int = 1024,
        offloaded: tuple[int, ...] | list[int] = (),
        window: int = 1,
        elastic: bool = True,
        fill_value: float = 0.0,
    ):
        if len(devices) != num_layers:
            raise ValueError(f"devices has {len(devices)} entries, expected one per layer ({num_layers})")
        bad = [layer for layer in offloaded if not 0 <= layer < num_layers]
        if bad:
            raise ValueError(f"offloaded layers {bad} are not in 0..{num_layers - 1}")
        self.num_layers = num_layers
        self.devices = [torch.device(d) for d in devices]
        self.dtype = dtype
        self.grow_chunk = grow_chunk
        self.window = max(2, window)  # >= 2: the ring always serves the newest past token
        self.fill_value = fill_value
        self.offloaded = frozenset(offloaded)
        self.fast: dict[int, HostTier] = {layer: HostTier(self.window) for layer in self.offloaded}
        self.slot_map = SlotMap(elastic)  # what every offloaded layer's slots hold
        self.layers: list[LayerKV | None] = [None] * num_layers
        self._reserved_tokens = 0
        self._staging: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._layer_reserve: dict[int, int] = {}  # resident layers sized for fewer tokens than the sequence
        # Layers on their way to host memory: (host K, host V, tokens copied, copy done on the side stream).
        self._moving: dict[int, tuple] = {}
        self.unloaded_slots: set[int] = set()  # offloaded layers whose slots do not hold the slot map yet
        self._host_buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # pinned ahead of a move
        self.migration_chunk = MIGRATION_CHUNK  # tokens per device-to-host copy of a moving layer

    def is_offloaded(self, layer: int) -> bool:
        return layer in self.offloaded

    def tier_device(self, layer: int) -> torch.device:
        """Where the layer's full KV lives."""
        return torch.device("cpu") if layer in self.offloaded else self.devices[layer]

    def reset(self, reserve_tokens: int = 0, offloaded: tuple[int, ...] | None = None,
              resident_until: dict[int, int] | None = None) -> None:
        """Forget every stored token; the next append sizes buffers for ``reserve_tokens``. ``offloaded``
        (None: unchanged) re-places layers; a layer changing tier gets new buffers on its next append.
        ``resident_until``: resident layers that will move to host memory once the sequence passes that
        many tokens (the memory manager's schedule); their GPU buffers are sized for exactly that many."""
        if offloaded is not None and frozenset(offloaded) != self.offloaded:
            bad = [layer for layer in offloaded if not 0 <= layer < self.num_layers]
            if bad:
                raise ValueError(f"offloaded layers {bad} are not in 0..{self.num_layers - 1}")
            for layer in frozenset(offloaded) ^ self.offloaded:
                self.layers[layer] = None
            self.offloaded = frozenset(offloaded)
            self.fast = {layer: self.fast.get(layer) or HostTier(self.window) for layer in self.offloaded}
            if not self.offloaded:
                self._staging.clear()
        self._moving.clear()
        self.unloaded_slots.clear()
        self._host_buffers.clear()
        self._reserved_tokens = reserve_tokens
        self._layer_reserve = dict(resident_until or {})
        for tier in self.fast.values():
            tier.restart()
        self.slot_map.reset()
        for layer in self.layers:
            if layer is not None:
                layer.length = 0

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` tokens of every layer (buffers are kept; later appends overwrite)."""
        for layer in self.offloaded:
            self.flush(layer)  # the ring is about to be distrusted: its tokens go to host memory first
        for layer in self.layers:
            if layer is not None:
                if layer.length < length:
                    raise ValueError(f"cannot truncate to {length} tokens: a layer holds {layer.length}")
                layer.length = length
        for layer, (host_key, host_value, copied, done) in self._moving.items():
            self._moving[layer] = (host_key, host_value, min(copied, length), done)  # copy those rows again
        # Ring slots past `length` will be overwritten by different tokens: trust none of the ring.
        for tier in self.fast.values():
            tier.restart(length)
        self.slot_map.reset()

    def length(self, layer: int) -> int:
        entry = self.layers[layer]
        return 0 if entry is None else entry.length

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' ``key``/``value`` ([B, Hkv, T, D]) after the layer's existing ones.

        Returns views of every stored key and value of the layer, [B, Hkv, length, D].
        """
        entry = self._ensure_capacity(layer, key, value)
        start, end = entry.length, entry.length + key.shape[2]
        if layer in self.offloaded:
            if key.shape[2] > 1:  # a prefill chunk: straight to host memory (after what the ring holds back)
                self.flush(layer)
                # Token-major host memory: the chunk is one contiguous block, so the device-to-host copy
                # into pinned memory is a single asynchronous DMA (readers are ordered after it).
                token_major(entry.key)[start:end].copy_(key.permute(2, 0, 1, 3), non_blocking=True)
                token_major(entry.value)[start:end].copy_(value.permute(2, 0, 1, 3), non_blocking=True)
                self.fast[layer].flushed = end
            elif self.fast[layer].flush_due(start):  # decode: the new token stays in the ring
                self.flush(layer)
            self.fast[layer].write_ring(key, value, start)
        else:
            entry.key[:, :, start:end].copy_(key)
            entry.value[:, :, start:end].copy_(value)
        entry.length = end
        return entry.key[:, :, :end], entry.value[:, :, :end]

    def ring_start(self, layer: int) -> int:
        """The oldest position the layer's ring holds valid data for."""
        return self.fast[layer].ring_start

    def advance_in_place(self) -> None:
        """A fixed-shape decode step (runtime/cuda_graph_decode.py) wrote one token per layer in place (a
        resident buffer, or an offloaded layer's ring): count it. Nothing here allocates: the ring rows
        go to host memory before the next step (:meth:`flush_due`)."""
        for layer, entry in enumerate(self.layers):
            entry.length += 1
            if layer in self.offloaded:
                self.fast[layer].holds_up_to(entry.length)

    def flush_due(self) -> None:
        """Move offloaded layers' ring rows to host memory on the schedule :meth:`append` keeps (every
        window/2 tokens, long before the ring overwrites them)."""
        for layer in self.offloaded:
            if self.fast[layer].flush_due(self.layers[layer].length):
                self.flush(layer)

    def flush(self, layer: int) -> None:
        """Copy an offloaded layer's tokens that only its ring holds to host memory (asynchronously)."""
        entry = self.layers[layer]
        if entry is not None:
            self.fast[layer].flush(entry.key, entry.value, entry.length)

    def staged(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored K/V of an offloaded layer on its compute device, as [B, Hkv, L, D] views (dense
        steps: prefill chunks, contexts within the token budget). One token-major staging buffer per
        device, reused by every layer; the host-to-device copy is one contiguous block."""
        entry = self.layers[layer]
        device = self.devices[layer]
        length = entry.length
        batch, heads = entry.key.shape[:2]
        key_buffer, value_buffer = self._staging.get(device, (None, None))
        if key_buffer is None or key_buffer.shape[1:3] != (batch, heads) or key_buffer.shape[0] < length or \
                key_buffer.shape[3] != entry.key.shape[3] or value_buffer.shape[3] != entry.value.shape[3]:
            capacity = max(length, self._reserved_tokens, 1)
            key_buffer = torch.empty(capacity, batch, heads, entry.key.shape[3], dtype=self.dtype, device=device)
            value_buffer = torch.empty(capacity, batch, heads, entry.value.shape[3], dtype=self.dtype, device=device)
            self._staging[device] = (key_buffer, value_buffer)
        self.flush(layer)
        key_buffer[:length].copy_(token_major(entry.key)[:length], non_blocking=True)
        value_buffer[:length].copy_(token_major(entry.value)[:length], non_blocking=True)
        return key_buffer[:length].permute(1, 2, 0, 3), value_buffer[:length].permute(1, 2, 0, 3)

    def advance_migration(self, layer: int, stream: "torch.cuda.Stream | None" = None, steps_left: int = 1) -> None:
        """Copy a resident layer that is about to move to host memory a share (1 / ``steps_left``) of its
        stored tokens not yet copied, on ``stream`` (a side stream: in the background of decoding), in
        ``migration_chunk``-token copies (host storage is token-major, so each copy goes through a small
        device temporary). Stored tokens are never rewritten, so copies can run steps before
        :meth:`migrate_to_host` switches the layer over."""
        if layer in self.offloaded:
            return
        entry = self.layers[layer]
        if entry is None or entry.length == 0:
            return
        device = self.devices[layer]
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

    def migrate_to_host(self, layer: int) -> None:
        """Switch a resident layer to host memory between two steps, nothing lost or repeated: the
        tokens :meth:`advance_migration` has not copied yet are copied, the
        compute stream waits for the background copy, the ring gets the newest ``window`` tokens from
        the GPU buffer, and the GPU buffer is freed (the compute stream is ordered after its last
        reader, so the memory is reusable at once). The layer's slots are filled with the current
        selection by the next step's prefetch (:attr:`unloaded_slots`)."""
        if layer in self.offloaded:
            raise ValueError(f"layer {layer} is already offloaded")
        entry = self.layers[layer]
        if entry is not None and entry.length and layer not in self._moving:
            # At once: on the compute stream, which waits for the copy anyway and can reuse the blocks it
            # caches (a side stream's first allocation needs a new segment: none is left after an OOM).
            self.advance_migration(layer, None, steps_left=1)
        fast = HostTier(self.window)
        if entry is None or entry.length == 0:
            self._switch_to_host(layer, fast)
            self.layers[layer] = None  # nothing stored yet: the next append allocates host memory
            self._moving.pop(layer, None)
            return
        # Everything that allocates device memory comes before the store changes: a move that runs out of
        # memory leaves the layer resident, and the memory manager's retry can move it again.
        length = entry.length
        device = self.devices[layer]
        host_key, host_value, copied, done = self._moving[layer]
        if done is not None:
            torch.cuda.current_stream(device).wait_event(done)
        self._copy_to_host(entry, host_key, host_value, copied, length)  # the few newest, on this stream
        # The ring: the newest tokens at position % window, trusted no further back than the other
        # offloaded layers' rings (one source mask serves every offloaded layer).
        others = [self.fast[o].ring_start for o in self.offloaded if self.layers[o] is not None]
        fast.fill_ring(entry.key, entry.value, max([length - self.window] + others + [0]), length)
        del self._moving[layer]
        self._switch_to_host(layer, fast)
        self.layers[layer] = LayerKV(host_key.permute(1, 2, 0, 3), host_value.permute(1, 2, 0, 3), length)
        self.unloaded_slots.add(layer)
        logger.info("layer %d: KV of %d tokens moved to host memory", layer, length)

    def _switch_to_host(self, layer: int, fast: HostTier) -> None:
        self._layer_reserve.pop(layer, None)
        self._host_buffers.pop(layer, None)
        self.offloaded = self.offloaded | {layer}
        self.fast[layer] = fast

    def _new_host_buffers(self, layer: int, capacity: int, batch: int, heads: int, key_dim: int,
                          value_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-major [capacity, B, Hkv, D] host K/V buffers (a token's rows are one block), pinned when
        the layer computes on a GPU (asynchronous copies, zero-copy reads)."""
        pin = self.devices[layer].type == "cuda"
        return (torch.empty(capacity, batch, heads, key_dim, dtype=self.dtype, pin_memory=pin),
                torch.empty(capacity, batch, heads, value_dim, dtype=self.dtype, pin_memory=pin))

    def _host_buffers_like(self, layer: int, entry: LayerKV) -> tuple[torch.Tensor, torch.Tensor]:
        """Host buffers for a resident layer's whole reservation, to move it to host memory."""
        batch, heads, _, key_dim = entry.key.shape
        capacity = max(self._reserved_tokens, entry.length)
        return self._new_host_buffers(layer, capacity, batch, heads, key_dim, entry.value.shape[3])

    def _copy_to_host(self, entry: LayerKV, host_key: torch.Tensor, host_value: torch.Tensor, start: int, end: int) -> None:
        for begin in range(start, end, self.migration_chunk):
            stop = min(begin + self.migration_chunk, end)
            host_key[begin:stop].copy_(entry.key[:, :, begin:stop].permute(2, 0, 1, 3), non_blocking=True)
            host_value[begin:stop].copy_(entry.value[:, :, begin:stop].permute(2, 0, 1, 3), non_blocking=True)

    def ensure_slots(self, layer: int, slots: int) -> HostTier:
        """Slot buffers of at least ``slots`` slots for an offloaded layer (grown, contents dropped)."""
        fast, entry = self.fast[layer], self.layers[layer]
        fast.ensure_slots(entry.key, entry.value, slots, self.devices[layer], self.fill_value)
        return fast

    def ring_holds(self, layer: int, positions: torch.Tensor) -> torch.Tensor:
        """Bool mask: which of ``positions`` the layer's recent ring holds."""
        return self.fast[layer].ring_holds(positions, self.layers[layer].length)

    def _ensure_capacity(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> LayerKV:
        entry = self.layers[layer]
        batch, heads, new, _ = key.shape
        needed = (0 if entry is None else entry.length) + new
        reserve = self._reserved_tokens
        if layer not in self.offloaded:
            reserve = self._layer_reserve.get(layer, reserve)
        # A buffer kept from an earlier sequence serves this one only if it holds this one's reservation
        # too: fixed-shape decode needs the whole sequence in the buffer it starts with.
        fits = (
            entry is not None
            and entry.capacity >= max(needed, reserve)
            and entry.key.shape[:2] == (batch, heads)
            and entry.key.shape[3] == key.shape[3]
            and entry.value.shape[3] == value.shape[3]
        )
        if fits:
            return entry
        if entry is not None and entry.length and entry.key.shape[:2] != (batch, heads):
            raise RuntimeError(
                f"layer {layer}: append of batch {batch} x {heads} heads onto a stored batch of "
                f"{tuple(entry.key.shape[:2])}: reset the store between sequences"
            )
        # The reservation exactly (the memory plan counts it); past it, whole chunks.
        capacity = reserve if needed <= reserve else self.grow_chunk * math.ceil(needed / self.grow_chunk)
        device = self.tier_device(layer)
        if layer in self.offloaded:
            # Host tier: token-major storage seen as [B, Hkv, capacity, D], pinned once here.
            host_key, host_value = self._new_host_buffers(layer, capacity, batch, heads, key.shape[3], value.shape[3])
            new_key, new_value = host_key.permute(1, 2, 0, 3), host_value.permute(1, 2, 0, 3)
        else:
            new_key = torch.empty(batch, heads, capacity, key.shape[3], dtype=self.dtype, device=device)
            new_value = torch.empty(batch, heads, capacity, value.shape[3], dtype=self.dtype, device=device)
        length = 0
        if entry is not None and entry.length:
            length = entry.length
            if layer in self.offloaded and self.devices[layer].type == "cuda":
                torch.cuda.synchronize(self.devices[layer])  # host reads: pending device-to-host copies first
            new_key[:, :, :length].copy_(entry.key[:, :, :length])
            new_value[:, :, :length].copy_(entry.value[:, :, :length])
            logger.debug("layer %d: KV buffer grown to %d tokens", layer, capacity)
        entry = LayerKV(new_key, new_value, length)
        self.layers[layer] = entry
        if layer in self._layer_reserve and layer not in self.offloaded and layer not in self._host_buffers:
            # It will move to host memory mid-sequence: pin its host buffers now (pinning takes
            # milliseconds per 100 MB of CPU time, better spent in prefill than between decode steps).
            self._host_buffers[layer] = self._host_buffers_like(layer, entry)
        return entry

    def nbytes(self) -> int:
        """Bytes of valid KV over all layers."""
        return sum(layer.nbytes for layer in self.layers if layer is not None)

    def allocated_bytes(self) -> int:
        """Bytes of the full-KV buffers (both tiers), reserved capacity included."""
        return sum(layer.key.nbytes + layer.value.nbytes for layer in self.layers if layer is not None)

    def device_bytes(self) -> int:
        """Bytes the store holds on compute devices: resident layers, rings, slots, staging."""
        total = sum(
            layer.key.nbytes + layer.value.nbytes
            for index, layer in enumerate(self.layers)
            if layer is not None and index not in self.offloaded
        )
        total += sum(fast.device_bytes() for fast in self.fast.values())
        return total + sum(k.nbytes + v.nbytes for k, v in self._staging.values())
