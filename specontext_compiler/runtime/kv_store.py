"""The KV store: every layer's keys and values, owned by the runtime, outside the captured graph.

Each layer keeps one contiguous buffer per tensor, [B, Hkv, capacity, D], on the device of its *tier*
(the GPU for resident layers; offloaded layers get a CPU tier in the runtime issue). Buffers are
allocated once for the length the engine reserves (prompt + max new tokens) and only grow, in whole
chunks, when a caller appends past the reservation: no per-step allocation, no torch.cat.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

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
    """Per-layer KV buffers with a per-layer device (tier).

    Args:
        num_layers: number of attention layers.
        devices: the device of each layer's buffers (its tier), one per layer.
        dtype: storage dtype (the model's compute dtype).
        grow_chunk: capacity granularity in tokens when an append outgrows the reservation.
    """

    def __init__(self, num_layers: int, devices: list[torch.device], dtype: torch.dtype, grow_chunk: int = 1024):
        if len(devices) != num_layers:
            raise ValueError(f"devices has {len(devices)} entries, expected one per layer ({num_layers})")
        self.num_layers = num_layers
        self.devices = [torch.device(d) for d in devices]
        self.dtype = dtype
        self.grow_chunk = grow_chunk
        self.layers: list[LayerKV | None] = [None] * num_layers
        self._reserved_tokens = 0

    def reset(self, reserve_tokens: int = 0) -> None:
        """Forget every stored token; the next append sizes buffers for ``reserve_tokens``."""
        self._reserved_tokens = reserve_tokens
        for layer in self.layers:
            if layer is not None:
                layer.length = 0

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` tokens of every layer (buffers are kept; later appends overwrite)."""
        for layer in self.layers:
            if layer is not None:
                if layer.length < length:
                    raise ValueError(f"cannot truncate to {length} tokens: a layer holds {layer.length}")
                layer.length = length

    def length(self, layer: int) -> int:
        entry = self.layers[layer]
        return 0 if entry is None else entry.length

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' ``key``/``value`` ([B, Hkv, T, D]) after the layer's existing ones.

        Returns views of every stored key and value of the layer, [B, Hkv, length, D].
        """
        entry = self._ensure_capacity(layer, key, value)
        start, end = entry.length, entry.length + key.shape[2]
        entry.key[:, :, start:end].copy_(key)
        entry.value[:, :, start:end].copy_(value)
        entry.length = end
        return entry.key[:, :, :end], entry.value[:, :, :end]

    def _ensure_capacity(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> LayerKV:
        entry = self.layers[layer]
        batch, heads, new, _ = key.shape
        needed = (0 if entry is None else entry.length) + new
        fits = (
            entry is not None
            and entry.capacity >= needed
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
        capacity = max(needed, self._reserved_tokens)
        capacity = self.grow_chunk * math.ceil(capacity / self.grow_chunk)
        device = self.devices[layer]
        new_key = torch.empty(batch, heads, capacity, key.shape[3], dtype=self.dtype, device=device)
        new_value = torch.empty(batch, heads, capacity, value.shape[3], dtype=self.dtype, device=device)
        length = 0
        if entry is not None and entry.length:
            length = entry.length
            new_key[:, :, :length].copy_(entry.key[:, :, :length])
            new_value[:, :, :length].copy_(entry.value[:, :, :length])
            logger.debug("layer %d: KV buffer grown to %d tokens", layer, capacity)
        entry = LayerKV(new_key, new_value, length)
        self.layers[layer] = entry
        return entry

    def nbytes(self) -> int:
        """Bytes of valid KV over all layers."""
        return sum(layer.nbytes for layer in self.layers if layer is not None)

    def allocated_bytes(self) -> int:
        """Bytes of the buffers, reserved capacity included."""
        return sum(layer.key.nbytes + layer.value.nbytes for layer in self.layers if layer is not None)
