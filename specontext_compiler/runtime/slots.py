"""Elastic loading: which token each GPU slot holds, and what a new selection must load.

Offloaded layers attend over *slots*: a fixed [B, Hkv, S, D] buffer per layer holding the selected
tokens' K/V in no particular order (attention does not care about order). Consecutive decode steps
select mostly the same tokens, so a step loads only the tokens its selection adds, into the slots of
the tokens it drops. One retrieval serves every layer, so the slot-to-token map and the load list are
computed once per step here and every offloaded layer applies the same list to its own slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LoadPlan:
    """The rows one step loads into every offloaded layer's slots.

    ``slot``/``token`` int64 [B, Hkv, M]: load token ``token`` into slot ``slot`` where ``valid``; rows
    past the real count point at the scratch slot (index S) so the shapes stay static. ``loads`` is the
    number of valid rows, ``kept`` the number of selected tokens already in a slot (both [B, Hkv]).
    """

    slot: torch.Tensor
    token: torch.Tensor
    valid: torch.Tensor
    loads: torch.Tensor
    kept: torch.Tensor


class SlotMap:
    """Slot-to-token map of the offloaded layers, shared by all of them.

    The slot count S follows the selection size: a larger selection (a fractional token budget on a
    growing context) grows S and reloads everything once.

    Args:
        elastic: load only what changed (True) or reload the whole selection every step (False).
    """

    def __init__(self, elastic: bool = True):
        self.elastic = elastic
        self.slots = 0
        self.token: torch.Tensor | None = None  # int64 [B, Hkv, S], -1 = empty

    def reset(self) -> None:
        """Forget what the slots hold (a new sequence, or the store was truncated)."""
        self.token = None

    def valid(self) -> torch.Tensor:
        """Bool [B, Hkv, S]: slots holding a token of the current selection."""
        return self.token >= 0

    def update(self, indices: torch.Tensor, past: int) -> LoadPlan:
        """Make the slots hold exactly ``indices`` (int64 [B, Hkv, K] past positions, unique per row).

        Returns the rows to load; after it the map is the new one.
        """
        batch, heads, selected = indices.shape
        old = self.token
        if selected > self.slots:
            self.slots, old = selected, None
        if old is None or old.shape[:2] != (batch, heads):
            return self._full_reload(indices)
        return self._elastic_update(indices, old, past, self.elastic)

    def update_in_place(self, indices: torch.Tensor, positions: int) -> LoadPlan:
        """:meth:`update` at fixed shapes (a step replayed from a CUDA graph): ``positions`` bounds every
        index (the buffer capacity, not the stored length), the map is rewritten in place (an empty slot
        holds -1, so a first step loads the whole selection, as a full reload would), and elastic loading
        is always on."""
        if self.token is None or self.token.shape != indices.shape:
            raise RuntimeError(f"the slot map holds {None if self.token is None else tuple(self.token.shape)}; "
                               f"fixed-shape steps select {tuple(indices.shape)}: start it with begin_in_place")
        buffer = self.token
        plan = self._elastic_update(indices, buffer, positions, elastic=True)
        buffer.copy_(self.token)
        self.token = buffer
        return plan

    def begin_in_place(self, shape: tuple[int, int, int], device: torch.device) -> None:
        """Give the map a buffer of ``shape`` that :meth:`update_in_place` keeps rewriting (its current
        contents, or empty slots)."""
        if self.token is None or tuple(self.token.shape) != tuple(shape):
            self.slots = shape[-1]
            self.token = torch.full(shape, -1, dtype=torch.long, device=device)
        else:
            self.token = self.token.clone()

    def _elastic_update(self, indices: torch.Tensor, old: torch.Tensor, past: int, elastic: bool) -> LoadPlan:
        batch, heads, selected = indices.shape
        device = indices.device
        # A dense bitmap over positions [0, past] (past = "no token") answers "in the old/new set" per row.
        in_new = torch.zeros(batch, heads, past + 1, dtype=torch.bool, device=device).scatter_(2, indices, True)
        old_pos = torch.where((old >= 0) & (old < past), old, past)
        in_old = torch.zeros_like(in_new).scatter_(2, old_pos, True)
        in_new[..., past] = False
        in_old[..., past] = False
        keep = in_new.gather(2, old_pos)  # [B, Hkv, S]: the slot's token stays selected
        if not elastic:
            plan = self._full_reload(indices)
            plan.kept = keep.sum(-1)  # still measured: what elastic loading would have kept
            return plan
        missing = in_new & ~in_old  # tokens to load
        loads = missing.sum(-1)
        # The first `loads` entries of each ordering are the missing tokens / the free slots (stable sorts
        # keep positions ascending, so host reads go in address order).
        token = torch.sort(missing.to(torch.uint8), dim=-1, descending=True, stable=True).indices[..., :selected]
        free = torch.sort((~keep).to(torch.uint8), dim=-1, descending=True, stable=True).indices[..., :selected]
        valid = torch.arange(selected, device=device) < loads[..., None]
        slot = torch.where(valid, free, self.slots)
        token = torch.where(valid, token, 0)
        mapping = torch.cat([torch.where(keep, old, -1), old.new_full((batch, heads, 1), -1)], dim=-1)
        mapping.scatter_(2, slot, torch.where(valid, token, -1))
        self.token = mapping[..., : self.slots]
        return LoadPlan(slot, token, valid, loads, keep.sum(-1))

    def _full_reload(self, indices: torch.Tensor) -> LoadPlan:
        batch, heads, selected = indices.shape
        mapping = indices.new_full((batch, heads, self.slots), -1)
        mapping[..., :selected] = indices
        self.token = mapping
        slot = torch.arange(selected, device=indices.device).expand(batch, heads, selected).contiguous()
        valid = torch.ones(batch, heads, selected, dtype=torch.bool, device=indices.device)
        loads = torch.full((batch, heads), selected, device=indices.device)
        return LoadPlan(slot, indices, valid, loads, torch.zeros_like(loads))
