"""The KV store: every layer's keys and values, owned by the runtime, outside the captured graph.

Each layer keeps one contiguous buffer per tensor, [B, Hkv, capacity, D], on its *tier*: the compute
device for resident layers; host memory (pinned when the compute device is a GPU) for offloaded ones.
Buffers are allocated once for the length the engine reserves (prompt + max new tokens) and only grow,
in whole chunks, when a caller appends past the reservation: no per-step allocation, no torch.cat, no
per-step pinning.

An offloaded layer also keeps on the compute device (its :class:`FastTier`):

* a ring of its most recent ``window`` tokens (position p at p % window): the recent window is
  attended every step, so it is served from there, never over PCIe;
* slot buffers [B, Hkv, S + 2, D]: S slots for the selected tokens (filled by elastic loading), one
  scratch slot (index S) for padded no-op loads, and the new token's row (index S + 1).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch

from ..planning.memory_model import MIGRATION_CHUNK
from .slots import SlotMap

logger = logging.getLogger(__name__)


def token_major(kv: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, T, D] -> its [T, B, Hkv, D] view (contiguous for an offloaded layer's host buffer)."""
    return kv.permute(2, 0, 1, 3)


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


@dataclass
class FastTier:
    """An offloaded layer's compute-device buffers: the recent-token ring and the slots."""

    ring_key: torch.Tensor | None = None
    ring_value: torch.Tensor | None = None
    slot_key: torch.Tensor | None = None
    slot_value: torch.Tensor | None = None

    @property
    def slots(self) -> int:
        return 0 if self.slot_key is None else self.slot_key.shape[2] - 2


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
        self.fast: dict[int, FastTier] = {layer: FastTier() for layer in self.offloaded}
        self.slot_map = SlotMap(elastic)  # what every offloaded layer's slots hold
        self.layers: list[LayerKV | None] = [None] * num_layers
        self._reserved_tokens = 0
        self._ring_start = [0] * num_layers  # the oldest position each ring holds valid data for
        self._flushed = [0] * num_layers  # positions [0, flushed) of an offloaded layer are in host memory
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
            self.fast = {layer: self.fast.get(layer, FastTier()) for layer in self.offloaded}
            if not self.offloaded:
                self._staging.clear()
        self._moving.clear()
        self.unloaded_slots.clear()
        self._host_buffers.clear()
        self._reserved_tokens = reserve_tokens
        self._layer_reserve = dict(resident_until or {})
        self._ring_start = [0] * self.num_layers
        self._flushed = [0] * self.num_layers
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
        self._ring_start = [length] * self.num_layers
        self._flushed = [min(flushed, length) for flushed in self._flushed]
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
                self._flushed[layer] = end
            elif self._flush_due(layer, start):  # decode: the new token stays in the ring
                self.flush(layer)
            self._write_ring(layer, key, value, start)
        else:
            entry.key[:, :, start:end].copy_(key)
            entry.value[:, :, start:end].copy_(value)
        entry.length = end
        return entry.key[:, :, :end], entry.value[:, :, :end]

    def _write_ring(self, layer: int, key: torch.Tensor, value: torch.Tensor, start: int) -> None:
        fast = self.fast[layer]
        batch, heads, new, dim = key.shape
        if fast.ring_key is None or fast.ring_key.shape[:2] != (batch, heads):  # both made, then kept (as slots)
            fast.ring_key, fast.ring_value = (key.new_empty(batch, heads, self.window, dim),
                                              value.new_empty(batch, heads, self.window, value.shape[3]))
        keep = min(new, self.window)  # only the last `window` of the new tokens can stay
        if new == 1:  # a decode step: one row, no index tensor
            fast.ring_key[:, :, start % self.window].copy_(key[:, :, 0])
            fast.ring_value[:, :, start % self.window].copy_(value[:, :, 0])
        else:
            positions = torch.arange(start + new - keep, start + new, device=key.device) % self.window
            fast.ring_key.index_copy_(2, positions, key[:, :, new - keep:])
            fast.ring_value.index_copy_(2, positions, value[:, :, new - keep:])
        self._ring_holds_up_to(layer, start + new)

    def _ring_holds_up_to(self, layer: int, end: int) -> None:
        """The ring now holds tokens up to ``end``: its oldest valid position moves along."""
        self._ring_start[layer] = max(self._ring_start[layer], end - self.window)

    def _flush_due(self, layer: int, stored: int) -> bool:
        """Whether the ring's tokens not yet in host memory (of ``stored``) go there now: every window/2
        steps, in one copy, long before the ring overwrites them."""
        return stored - self._flushed[layer] >= max(1, self.window // 2)

    def ring_start(self, layer: int) -> int:
        """The oldest position the layer's ring holds valid data for."""
        return self._ring_start[layer]

    def advance_in_place(self) -> None:
        """A fixed-shape decode step (runtime/cuda_graph_decode.py) wrote one token per layer in place (a
        resident buffer, or an offloaded layer's ring): count it. Nothing here allocates: the ring rows
        go to host memory before the next step (:meth:`flush_due`)."""
        for layer, entry in enumerate(self.layers):
            entry.length += 1
            if layer in self.offloaded:
                self._ring_holds_up_to(layer, entry.length)

    def flush_due(self) -> None:
        """Move offloaded layers' ring rows to host memory on the schedule :meth:`append` keeps (every
        window/2 tokens, long before the ring overwrites them)."""
        for layer in self.offloaded:
            if self._flush_due(layer, self.layers[layer].length):
                self.flush(layer)

    def flush(self, layer: int) -> None:
        """Copy an offloaded layer's tokens that only its ring holds to host memory (asynchronously)."""
        entry = self.layers[layer]
        start, end = self._flushed[layer], 0 if entry is None else entry.length
        if entry is None or start >= end:
            return
        fast = self.fast[layer]
        position = start
        while position < end:  # at most two contiguous runs of the ring
            row = position % self.window
            count = min(end - position, self.window - row)
            for ring, host in ((fast.ring_key, entry.key), (fast.ring_value, entry.value)):
                token_major(host)[position:position + count].copy_(token_major(ring)[row:row + count], non_blocking=True)
            position += count
        self._flushed[layer] = end

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
        fast = FastTier()
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
        batch, heads, _, dim = entry.key.shape
        others = [self._ring_start[o] for o in self.offloaded if self.layers[o] is not None]
        first = max([length - self.window] + others + [0])
        positions = torch.arange(first, length, device=device) % self.window
        fast.ring_key = entry.key.new_empty(batch, heads, self.window, dim)
        fast.ring_value = entry.value.new_empty(batch, heads, self.window, entry.value.shape[3])
        fast.ring_key.index_copy_(2, positions, entry.key[:, :, first:length])
        fast.ring_value.index_copy_(2, positions, entry.value[:, :, first:length])
        del self._moving[layer]
        self._switch_to_host(layer, fast)
        self._ring_start[layer] = first
        self._flushed[layer] = length
        self.layers[layer] = LayerKV(host_key.permute(1, 2, 0, 3), host_value.permute(1, 2, 0, 3), length)
        self.unloaded_slots.add(layer)
        logger.info("layer %d: KV of %d tokens moved to host memory", layer, length)

    def _switch_to_host(self, layer: int, fast: FastTier) -> None:
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

    def ensure_slots(self, layer: int, slots: int) -> FastTier:
        """Slot buffers of at least ``slots`` slots for an offloaded layer (grown, contents dropped)."""
        fast = self.fast[layer]
        entry = self.layers[layer]
        if fast.slot_key is None or fast.slots < slots or fast.slot_key.shape[:2] != entry.key.shape[:2]:
            device = self.devices[layer]
            batch, heads = entry.key.shape[:2]
            # Filled once, never left as garbage: attention masks unused slots, but 0 x NaN is still NaN.
            # Both made before either is kept: running out of memory in between leaves the old pair.
            key = torch.full((batch, heads, slots + 2, entry.key.shape[3]), self.fill_value, dtype=self.dtype, device=device)
            value = torch.full((batch, heads, slots + 2, entry.value.shape[3]), self.fill_value, dtype=self.dtype, device=device)
            fast.slot_key, fast.slot_value = key, value
        return fast

    def ring_holds(self, layer: int, positions: torch.Tensor) -> torch.Tensor:
        """Bool mask: which of ``positions`` the layer's recent ring holds."""
        # The oldest row is left out: the step's own token is about to overwrite it in the ring.
        return positions >= max(self._ring_start[layer], self.layers[layer].length - self.window + 1)

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
        for fast in self.fast.values():
            for tensor in (fast.ring_key, fast.ring_value, fast.slot_key, fast.slot_value):
                total += 0 if tensor is None else tensor.nbytes
        return total + sum(k.nbytes + v.nbytes for k, v in self._staging.values())
