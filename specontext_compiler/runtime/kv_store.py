"""The KV store: every layer's keys and values, owned by the runtime, outside the captured graph.

Each layer keeps one contiguous buffer per tensor, [B, Hkv, capacity, D], on its *tier*: the compute
device for resident layers; host memory (pinned when the compute device is a GPU) for offloaded ones.
Buffers are allocated once for the length the engine reserves (prompt + max new tokens) and only grow,
in whole chunks, when a caller appends past the reservation: no per-step allocation, no torch.cat, no
per-step pinning.

An offloaded layer also keeps, on the compute device, a ring of its recent tokens and the slots of the
step's selection: its :class:`~.host_tier.HostTier`. A resident layer's buffer is all it has. Resident
layers that leave the GPU mid-sequence do so through the store's :class:`~.migration.LayerMigration`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .host_tier import HostTier, token_major
from .migration import LayerMigration
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
        self.reserved_tokens = 0
        self._staging: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._layer_reserve: dict[int, int] = {}  # resident layers sized for fewer tokens than the sequence
        self.unloaded_slots: set[int] = set()  # offloaded layers whose slots do not hold the slot map yet
        self.migration = LayerMigration(self)  # resident layers moving to host memory mid-sequence

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
        self.migration.reset()
        self.unloaded_slots.clear()
        self.reserved_tokens = reserve_tokens
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
        self.migration.truncate(length)
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
            self.fast[layer].append(entry.key, entry.value, key, value, start)
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
            capacity = max(length, self.reserved_tokens, 1)
            key_buffer = torch.empty(capacity, batch, heads, entry.key.shape[3], dtype=self.dtype, device=device)
            value_buffer = torch.empty(capacity, batch, heads, entry.value.shape[3], dtype=self.dtype, device=device)
            self._staging[device] = (key_buffer, value_buffer)
        self.flush(layer)
        key_buffer[:length].copy_(token_major(entry.key)[:length], non_blocking=True)
        value_buffer[:length].copy_(token_major(entry.value)[:length], non_blocking=True)
        return key_buffer[:length].permute(1, 2, 0, 3), value_buffer[:length].permute(1, 2, 0, 3)

    def switch_to_host(self, layer: int, tier: HostTier,
                       host: tuple[torch.Tensor, torch.Tensor, int] | None) -> None:
        """Layer ``layer`` keeps its KV in host memory from now on (a move, :mod:`.migration`): ``tier`` its
        ring and slots, ``host`` its (key, value, stored tokens) there as [B, Hkv, capacity, D] views (None:
        nothing stored yet; the next append allocates host memory). A layer moved with tokens stored is
        in :attr:`unloaded_slots`: the next step's prefetch fills its slots."""
        self._layer_reserve.pop(layer, None)
        self.migration.forget(layer)
        self.offloaded = self.offloaded | {layer}
        self.fast[layer] = tier
        if host is None:
            self.layers[layer] = None
            return
        key, value, length = host
        self.layers[layer] = LayerKV(key, value, length)
        self.unloaded_slots.add(layer)

    def new_host_buffers(self, layer: int, capacity: int, batch: int, heads: int, key_dim: int,
                          value_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-major [capacity, B, Hkv, D] host K/V buffers (a token's rows are one block), pinned when
        the layer computes on a GPU (asynchronous copies, zero-copy reads)."""
        pin = self.devices[layer].type == "cuda"
        return (torch.empty(capacity, batch, heads, key_dim, dtype=self.dtype, pin_memory=pin),
                torch.empty(capacity, batch, heads, value_dim, dtype=self.dtype, pin_memory=pin))

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
        reserve = self.reserved_tokens
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
            host_key, host_value = self.new_host_buffers(layer, capacity, batch, heads, key.shape[3], value.shape[3])
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
        if layer in self._layer_reserve and layer not in self.offloaded:
            self.migration.pin_ahead(layer, entry)  # it will move to host memory mid-sequence
        return entry

    def row_bytes(self, layers: Iterable[int]) -> int:
        """Bytes of one token's K and V rows (one head), summed over ``layers``: the transfer counters' unit."""
        entries = (self.layers[layer] for layer in layers)
        return sum(e.key.shape[-1] * e.key.element_size() + e.value.shape[-1] * e.value.element_size() for e in entries)

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
