"""An offloaded layer's compute-device side: the ring of its recent tokens and the slots of its selection.

Its full KV lives in host memory (the store's :class:`~.kv_store.LayerKV`, token-major, pinned on a GPU
machine); on the compute device it keeps:

* a ring of its most recent ``window`` tokens (position p at p % window): the recent window is
  attended every step, so it is served from there, never over PCIe. New decode tokens enter the ring
  and go to host memory every window/2 tokens in one copy (:meth:`HostTier.flush`), long before the ring
  overwrites them;
* slot buffers [B, Hkv, S + 2, D]: S slots for the selected tokens (filled by elastic loading), one
  scratch slot (index S) for padded no-op loads, and the new token's row (index S + 1).
"""

from __future__ import annotations

import torch


def token_major(kv: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, T, D] -> its [T, B, Hkv, D] view (contiguous for an offloaded layer's host buffer)."""
    return kv.permute(2, 0, 1, 3)


class HostTier:
    """One offloaded layer's ring and slots, and which of its positions are in host memory already.

    Attributes:
        window: positions the ring holds (at least 2: it always serves the newest past token).
        ring_start: the oldest position the ring holds valid data for.
        flushed: positions [0, flushed) are in host memory.
    """

    def __init__(self, window: int, ring_start: int = 0, flushed: int = 0):
        self.window = window
        self.ring_start = ring_start
        self.flushed = flushed
        self.ring_key: torch.Tensor | None = None
        self.ring_value: torch.Tensor | None = None
        self.slot_key: torch.Tensor | None = None
        self.slot_value: torch.Tensor | None = None

    @property
    def slots(self) -> int:
        return 0 if self.slot_key is None else self.slot_key.shape[2] - 2

    def restart(self, length: int = 0) -> None:
        """A new sequence (``length`` 0) or one cut back to ``length`` tokens: nothing in the ring is
        trusted, and host memory holds no more than ``length``."""
        self.ring_start = length
        self.flushed = min(self.flushed, length)

    def append(self, host_key: torch.Tensor, host_value: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               start: int) -> None:
        """New tokens ``key``/``value`` [B, Hkv, T, D] at positions start...: a prefill chunk goes straight to
        the host buffers (after what the ring holds back), a decode token stays in the ring (rows due go
        to host memory first); the ring keeps the last ``window`` either way."""
        end = start + key.shape[2]
        if key.shape[2] > 1:
            self.flush(host_key, host_value, start)
            # Token-major host memory: the chunk is one contiguous block, so the device-to-host copy into
            # pinned memory is a single asynchronous DMA (readers are ordered after it).
            token_major(host_key)[start:end].copy_(key.permute(2, 0, 1, 3), non_blocking=True)
            token_major(host_value)[start:end].copy_(value.permute(2, 0, 1, 3), non_blocking=True)
            self.flushed = end
        elif self.flush_due(start):
            self.flush(host_key, host_value, start)
        self.write_ring(key, value, start)

    def write_ring(self, key: torch.Tensor, value: torch.Tensor, start: int) -> None:
        """The last ``window`` of the new tokens ([B, Hkv, T, D], at positions start...) into the ring."""
        batch, heads, new, dim = key.shape
        if self.ring_key is None or self.ring_key.shape[:2] != (batch, heads):  # both made, then kept
            self.ring_key, self.ring_value = (key.new_empty(batch, heads, self.window, dim),
                                              value.new_empty(batch, heads, self.window, value.shape[3]))
        keep = min(new, self.window)
        if new == 1:  # a decode step: one row, no index tensor
            self.ring_key[:, :, start % self.window].copy_(key[:, :, 0])
            self.ring_value[:, :, start % self.window].copy_(value[:, :, 0])
        else:
            positions = torch.arange(start + new - keep, start + new, device=key.device) % self.window
            self.ring_key.index_copy_(2, positions, key[:, :, new - keep:])
            self.ring_value.index_copy_(2, positions, value[:, :, new - keep:])
        self.holds_up_to(start + new)

    def fill_ring(self, key: torch.Tensor, value: torch.Tensor, first: int, length: int) -> None:
        """The ring from a resident buffer's positions [first, length) (a layer moving to host memory)."""
        batch, heads, _, dim = key.shape
        positions = torch.arange(first, length, device=key.device) % self.window
        self.ring_key = key.new_empty(batch, heads, self.window, dim)
        self.ring_value = value.new_empty(batch, heads, self.window, value.shape[3])
        self.ring_key.index_copy_(2, positions, key[:, :, first:length])
        self.ring_value.index_copy_(2, positions, value[:, :, first:length])
        self.ring_start, self.flushed = first, length

    def holds_up_to(self, end: int) -> None:
        """The ring now holds tokens up to ``end``: its oldest valid position moves along."""
        self.ring_start = max(self.ring_start, end - self.window)

    def flush_due(self, stored: int) -> bool:
        """Whether the ring's tokens not yet in host memory (of ``stored``) go there now."""
        return stored - self.flushed >= max(1, self.window // 2)

    def flush(self, host_key: torch.Tensor, host_value: torch.Tensor, end: int) -> None:
        """Copy the tokens up to ``end`` that only the ring holds to host memory (asynchronously)."""
        position = self.flushed
        while position < end:  # at most two contiguous runs of the ring
            row = position % self.window
            count = min(end - position, self.window - row)
            for ring, host in ((self.ring_key, host_key), (self.ring_value, host_value)):
                token_major(host)[position:position + count].copy_(token_major(ring)[row:row + count],
                                                                   non_blocking=True)
            position += count
        self.flushed = max(self.flushed, end)

    def ring_holds(self, positions: torch.Tensor, length: int) -> torch.Tensor:
        """Bool mask: which of ``positions`` the ring holds, of ``length`` stored tokens. The oldest row is
        left out: the step's own token is about to overwrite it."""
        return positions >= max(self.ring_start, length - self.window + 1)

    def ensure_slots(self, like_key: torch.Tensor, like_value: torch.Tensor, slots: int, device: torch.device,
                     fill_value: float) -> None:
        """Slot buffers of at least ``slots`` slots, batch and heads as ``like_key`` (grown, contents dropped)."""
        if self.slot_key is None or self.slots < slots or self.slot_key.shape[:2] != like_key.shape[:2]:
            batch, heads = like_key.shape[:2]
            # Filled once, never left as garbage: attention masks unused slots, but 0 x NaN is still NaN.
            # Both made before either is kept: running out of memory in between leaves the old pair.
            key = torch.full((batch, heads, slots + 2, like_key.shape[3]), fill_value, dtype=like_key.dtype,
                             device=device)
            value = torch.full((batch, heads, slots + 2, like_value.shape[3]), fill_value, dtype=like_value.dtype,
                               device=device)
            self.slot_key, self.slot_value = key, value

    def device_bytes(self) -> int:
        return sum(t.nbytes for t in (self.ring_key, self.ring_value, self.slot_key, self.slot_value) if t is not None)
