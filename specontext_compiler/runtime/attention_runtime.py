"""What the attention nodes of a captured graph do when they run: store the new KV, then attend.

Dense (``specontext::attention``, prefill chunks, contexts within the token budget) attends over every
stored token; sparse (``specontext::sparse_attention`` in a decode step past the budget) attends over
the positions the step's one retrieval picked, per KV head, plus the new token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import DENSE_EXPANSION_BYTES
from ..kernels import on_triton_path
from ..kernels import sparse_decode_attention as triton_sparse_decode_attention
from ..retrieval.base import RetrievalHead, group_probabilities
from ..retrieval.selection import held_positions, resolve_token_budget, select_tokens
from .accuracy_guard import AccuracyGuard, guard_layer
from .kv_store import KVStore
from .prefetcher import Prefetcher


def expand_kv_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, Hkv * groups, T, D]: each KV head repeated for its query group."""
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """Boolean [1, 1, q_len, kv_len] mask with the queries aligned to the end of the keys."""
    offset = kv_len - q_len
    rows = torch.arange(q_len, device=device)[:, None] + offset
    return (torch.arange(kv_len, device=device)[None, :] <= rows)[None, None]


def _softcapped_attention(q, keys, values, mask, scale, softcap):
    """Eager attention with logit soft-capping (Gemma 2), as transformers computes it."""
    scores = torch.matmul(q, keys.transpose(2, 3)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, values)


def last_query_keys(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Bool [B, Tk]: the keys the last new token attends to, from a [B, 1, Tq, Tk] mask (None: all)."""
    if mask is None:
        return None
    row = mask[:, 0, -1]
    return row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2


def dense_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float = 0.0,
    max_expanded_bytes: int | None = DENSE_EXPANSION_BYTES,
) -> torch.Tensor:
    """Reference dense attention, numerically the same as transformers' sdpa/eager paths.

    q [B, Hq, Tq, D], keys/values [B, Hkv, Tk, D], mask boolean [B, 1, Tq, Tk] (True = attend) or an
    additive float mask, or None for causal attention aligned to the last key. Returns [B, Hq, Tq, Dv].

    Where K/V must be expanded to the query heads (a mask, soft-capping), that is done in groups of rows,
    or of one row's KV heads, whose expanded K/V take at most ``max_expanded_bytes`` (one KV head of one
    row where that alone is larger; None: the whole batch at once): :func:`expansion_groups`.
    """
    groups = q.shape[1] // keys.shape[1]
    q_len, kv_len = q.shape[2], keys.shape[2]
    if mask is None and q_len == kv_len and not softcap:
        # Fresh causal block: SDPA's own causal mode (its fast kernels), as transformers uses it.
        return F.scaled_dot_product_attention(q, keys, values, scale=scale, is_causal=q_len > 1, enable_gqa=groups > 1)
    if mask is None and q_len > 1:
        mask = causal_mask(q_len, kv_len, q.device)
    if mask is None and not softcap:
        # One query over all keys: transformers' SDPA path uses grouped-query SDPA here.
        return F.scaled_dot_product_attention(q, keys, values, scale=scale, enable_gqa=groups > 1)
    # With a mask, SDPA's enable_gqa falls back to its math kernel on CUDA (transformers' use_gqa_in_sdpa),
    # which holds every score: K/V are expanded instead, as transformers does, a bounded group at a time.
    rows, heads = expansion_groups(keys, values, groups, max_expanded_bytes)
    batch, kv_heads = keys.shape[:2]
    if rows >= batch and heads >= kv_heads:
        return _expanded_attention(q, keys, values, mask, scale, softcap, groups)
    out = q.new_empty(batch, q.shape[1], q_len, values.shape[-1])
    for row in range(0, batch, rows):
        batch_rows = slice(row, row + rows)
        for head in range(0, kv_heads, heads):
            kv = slice(head, head + heads)
            query_heads = slice(head * groups, (head + heads) * groups)
            part = mask if mask is None or mask.shape[0] == 1 else mask[batch_rows]
            if part is not None and part.shape[1] > 1:  # a per-head mask
                part = part[:, query_heads]
            out[batch_rows, query_heads] = _expanded_attention(
                q[batch_rows, query_heads], keys[batch_rows, kv], values[batch_rows, kv], part, scale, softcap, groups)
    return out


def expansion_groups(keys: torch.Tensor, values: torch.Tensor, groups: int, max_bytes: int | None) -> tuple[int, int]:
    """(rows, KV heads) per call of :func:`dense_attention`'s expanded path: whole rows while one row's K/V
    expanded to its ``groups`` query heads each fit in ``max_bytes``, else KV heads of one row (at least
    one). Without query groups nothing is expanded: the whole batch."""
    batch, kv_heads, kv_len = keys.shape[:3]
    if max_bytes is None or groups == 1:
        return batch, kv_heads
    head = groups * kv_len * (keys.shape[-1] * keys.element_size() + values.shape[-1] * values.element_size())
    if kv_heads * head <= max_bytes:
        return max(1, max_bytes // (kv_heads * head)), kv_heads
    return 1, max(1, max_bytes // head)


def _expanded_attention(q, keys, values, mask, scale, softcap, groups):
    keys, values = expand_kv_heads(keys, groups), expand_kv_heads(values, groups)
    if softcap:
        return _softcapped_attention(q, keys, values, mask, scale, softcap)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)


def sparse_decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    valid: torch.Tensor | None,
    scale: float,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Reference sparse-gather decode attention.

    q [B, Hq, 1, D]; keys/values [B, Hkv, T, D]; indices int64 [B, Hkv, K] positions on the token axis,
    shared by each KV head's query group; valid bool [B, Hkv, K] (False = padding) or None.
    Returns [B, Hq, 1, Dv].
    """
    batch, _, _, dim = q.shape
    kv_heads, selected = keys.shape[1], indices.shape[-1]
    k_sel = keys.gather(2, indices[..., None].expand(batch, kv_heads, selected, dim))
    v_sel = values.gather(2, indices[..., None].expand(batch, kv_heads, selected, values.shape[-1]))
    return grouped_decode_attention(q, k_sel, v_sel, valid, scale, softcap)


def grouped_decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor | None,
    scale: float,
    softcap: float = 0.0,
) -> torch.Tensor:
    """One decode query per head over per-KV-head key sets (gathered rows, or an offloaded layer's
    slots, in any order): q [B, Hq, 1, D], keys/values [B, Hkv, K, D], valid bool [B, Hkv, K] or None."""
    batch, q_heads, _, dim = q.shape
    kv_heads = keys.shape[1]
    # The group's queries act as a query block against the group's keys.
    grouped = q.view(batch, kv_heads, q_heads // kv_heads, dim)
    mask = None if valid is None else valid[:, :, None, :]
    if softcap:
        out = _softcapped_attention(grouped, keys, values, mask, scale, softcap)
    else:
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(batch, q_heads, 1, values.shape[-1])


def attend_positions(q, keys, values, positions, valid, scale: float, softcap: float) -> torch.Tensor:
    """A decode step's attention over ``positions`` [B, Hkv, N] of ``keys``/``values`` (the selection and
    the new token), through the Triton kernel on its path, else the reference. Both runtimes' one call."""
    if on_triton_path(q):
        return triton_sparse_decode_attention(q[:, :, 0], keys, values, positions, scale=scale, valid=valid,
                                              softcap=softcap)[:, :, None]
    return sparse_decode_attention(q, keys, values, positions, valid, scale, softcap)


def attend_slots(store, layer: int, q, k, v, slot_valid, scale: float, softcap: float) -> torch.Tensor:
    """An offloaded layer's sparse attention: the new token's K/V ``k``/``v`` go to the slot after the
    selection's, then attention over every slot (``slot_valid``: which hold a token). Both runtimes' one
    call."""
    fast, slots = store.fast[layer], store.slot_map.slots
    fast.slot_key[:, :, slots + 1:].copy_(k)
    fast.slot_value[:, :, slots + 1:].copy_(v)
    if on_triton_path(q):
        return triton_sparse_decode_attention(q[:, :, 0], fast.slot_key, fast.slot_value, None, scale=scale,
                                              valid=slot_valid, softcap=softcap)[:, :, None]
    return grouped_decode_attention(q, fast.slot_key, fast.slot_value, slot_valid, scale, softcap)


@dataclass(frozen=True)
class SparseSettings:
    """How a sparse step selects: ``token_budget`` tokens = sinks + window + top-k (+ the new token);
    ``sticky_margin``: the score bonus of the tokens the offloaded layers' slots hold (0.0: off;
    retrieval/selection.py)."""

    token_budget: int | float
    sink_tokens: int = 4
    local_window: int = 64
    sticky_margin: float = 0.0


def sticky_held(sparse: SparseSettings, store: KVStore, shape: tuple[int, int], positions: int,
                out: torch.Tensor | None = None) -> torch.Tensor | None:
    """What sticky selection favours at a step over ``positions`` past positions: the tokens the slots of the
    offloaded layers hold (bool [B, Hkv, positions], written into ``out`` where given), or None where there
    is nothing to keep: the margin is 0, no layer is offloaded, loading is not elastic (every step reloads
    the whole selection), or the slots hold no selection of this batch. Both runtimes' one call."""
    slot_map = store.slot_map
    if not (sparse.sticky_margin and store.offloaded and slot_map.elastic and slot_map.token is not None
            and tuple(slot_map.token.shape[:2]) == tuple(shape)):
        return None
    return held_positions(slot_map.token, positions, out)


class AttentionRuntime:
    """Owns the KV store (and the retrieval head) and executes the attention ops of a captured graph.

    One instance per compiled model; ``specontext_compiler.runtime.context.activate`` makes it the one
    the ops talk to during a step.
    """

    def __init__(self, store: KVStore, sparse: SparseSettings | None = None, head: RetrievalHead | None = None):
        if (sparse is None) != (head is None):
            raise ValueError("sparse settings and a retrieval head go together")
        self._check_placement(store.offloaded, head)
        self.store = store
        self.resident_until: dict[int, int] = {}
        self.prefetcher = Prefetcher(store)
        self.sparse = sparse
        self.head = head
        # Set per sequence by the engine: with no padding token, the mask transformers built is plain
        # causal (bar sliding windows shorter than the context), and SDPA's mask-free paths compute it faster.
        self.padding_free = False
        # Dense attention with a mask expands K/V to the query heads in groups of at most this many bytes.
        self.expansion_bytes: int | None = DENSE_EXPANSION_BYTES
        self._sparse_step = False
        # Calibration switches selection off for a step to compute the dense reference in place.
        self.selection_enabled = True
        # Set by the engine while a prompt is prefilled: its chunks attend densely, a one-token chunk too
        # (the last chunk of a prompt one token past a multiple of the chunk size).
        self.prefilling = False
        self._key_valid: torch.Tensor | None = None
        self._indices: torch.Tensor | None = None  # this step's selection (retrieve's output)
        self._received: tuple[torch.Tensor, torch.Tensor] | None = None  # another selection a graph fed, checked
        self._loads_for: torch.Tensor | None = None  # the selection this step's loads follow
        self._budget = 0
        self.attended_tokens: list[int] = []
        # Diagnostics for benchmarks: per sparse step and layer, the share of the layer's true attention
        # mass (over all stored tokens) that the selection covers. Costs a dense read; off by default.
        self.measure_recall = False
        self.recall: list[tuple[int, float]] = []
        # Calibration hooks: called as observer(layer, q, keys, scale) after each layer stores its KV.
        self.observers: list = []
        # The accuracy guard (runtime/accuracy_guard.py; None: off), the layer it prefers, and the layers
        # it may measure (full attention: a sliding layer's window is not the context).
        self.guard: AccuracyGuard | None = None
        self.guard_preferred = 0
        self.guard_candidates: set[int] = set()

    @staticmethod
    def _check_placement(offloaded, head) -> None:
        if offloaded and head is not None and head.per_layer:
            raise ValueError(
                f"selection {head.name!r} selects per layer; offloaded layers share one selection per step: "
                "use the retrieval head or 'streaming', or offload='none'"
            )

    def place(self, offloaded: tuple[int, ...], resident_until: dict[int, int] | None = None) -> None:
        """Keep the full KV of layers ``offloaded`` in host memory from the next sequence on; layers of
        ``resident_until`` stay on the GPU for at most that many tokens (the memory manager moves them)."""
        self._check_placement(tuple(offloaded) + tuple(resident_until or ()), self.head)
        self.store.reset(0, offloaded)
        self.resident_until = dict(resident_until or {})

    def reset(self, reserve_tokens: int, padding_free: bool) -> None:
        """Start a new batch of sequences."""
        self.store.reset(reserve_tokens, resident_until=self.resident_until)
        self.prefetcher.end_sequence()
        self.padding_free = padding_free
        self._sparse_step = False
        self.attended_tokens = []
        self.recall = []
        if self.head is not None:
            self.head.reset(batch=0, reserve_tokens=reserve_tokens)
        if self.guard is not None:
            self.restart_guard()
            self.place_guard()

    def restart_guard(self) -> None:
        """The guard starts a sequence: no hold or coverage left, and its dense start unless layers start
        offloaded (their dense steps would read the whole KV over PCIe)."""
        self.guard.new_sequence(dense_start=not self.store.offloaded)

    def place_guard(self) -> None:
        """Measure on the full-attention layer nearest the preferred one whose KV is on the GPU now."""
        resident = {layer for layer in self.guard_candidates
                    if not self.store.is_offloaded(layer) and layer not in self.resident_until}
        self.guard.layer = guard_layer(self.guard_preferred, resident)

    # -- one retrieval per step ------------------------------------------------------------------------
    def retrieve(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
        batch, new = input_ids.shape
        total = attention_mask.shape[1]
        past = total - new
        budget = resolve_token_budget(self.sparse.token_budget, total) if self.sparse else total
        self._sparse_step = (self.sparse is not None and self.selection_enabled and not self.prefilling and new == 1
                             and total > budget and not (self.guard is not None and self.guard.holding))
        self.attended_tokens.append(budget if self._sparse_step else total)
        empty = torch.empty(batch, num_kv_heads, 0, dtype=torch.long, device=input_ids.device)
        self._indices, self._received, self._loads_for = empty, None, None
        if not self._sparse_step:
            return empty
        self._key_valid = attention_mask[:, :past].bool()
        self._budget = budget - 1  # the new token is always attended
        if self.head.per_layer:
            return empty
        scores = self.head.score(input_ids, attention_mask, past)
        held = sticky_held(self.sparse, self.store, (batch, num_kv_heads), past)
        self._indices = select_tokens(scores, self._key_valid, self._budget, self.sparse.sink_tokens,
                                      self.sparse.local_window, held=held, margin=self.sparse.sticky_margin)
        return self._indices

    def _selection(self, indices: torch.Tensor) -> torch.Tensor:
        """The selection a sparse op received. Retrieve's own output passes as it is; another tensor (a graph
        edited or loaded from disk computed it) must have its shape, and is clamped to the stored
        positions: the kernels read memory at these positions without checking them."""
        if indices is self._indices:
            return indices
        if self._received is not None and indices is self._received[0]:
            return self._received[1]
        expected = self._indices.shape
        if indices.dtype != torch.long or indices.shape != expected or indices.device != self._indices.device:
            raise ValueError(f"a sparse op received a selection of shape {tuple(indices.shape)}, {indices.dtype} on "
                             f"{indices.device}; accepted: int64 {tuple(expected)} on {self._indices.device}, as "
                             "specontext::retrieve returns")
        checked = indices.clamp(0, self._key_valid.shape[1] - 1)
        self._received = (indices, checked)
        return checked

    def _begin_loads(self, indices: torch.Tensor) -> None:
        """The step's loads follow ``indices`` (checked); one selection per step for every offloaded layer."""
        if self._loads_for is None:
            self.prefetcher.begin_step(indices, self._key_valid, self._key_valid.shape[1])
            self._loads_for = indices
        elif indices is not self._loads_for:
            raise ValueError("offloaded layers received different selections in one step; they share one slot "
                             "map, so every prefetch and sparse attention of a step must take the same indices")

    def prefetch(self, indices: torch.Tensor, layer: int) -> None:
        """Start moving layer ``layer``'s KV at ``indices`` to its slots (offloaded layers of sparse steps)."""
        if self._sparse_step and self.prefetcher.active and not self.head.per_layer:
            self._begin_loads(self._selection(indices))
            self.prefetcher.prefetch(layer)

    def wait(self, layer: int) -> None:
        """Layer ``layer``'s attention is next: its prefetch must have landed."""
        if self._sparse_step:
            self.prefetcher.wait(layer)

    def observe_step(self, input_ids, attention_mask, position_ids, aux_hidden: list[torch.Tensor]) -> None:
        """After a step: the retrieval head sees the step's tokens (and hidden states, if it asked)."""
        if self.head is not None:
            self.head.observe_step(input_ids, attention_mask, position_ids, aux_hidden)

    # -- attention -----------------------------------------------------------------------------------
    def attention(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float,
        softcap: float,
        sliding_window: int = 0,
        indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        total = self.store.length(layer) + k.shape[2]
        windowed = sliding_window and total > sliding_window  # a sliding layer reads only its window
        sparse = indices is not None and self._sparse_step and not windowed
        offloaded = self.store.is_offloaded(layer)
        if sparse and offloaded:
            self._begin_loads(self._selection(indices))  # (a no-op once the layer's prefetch ran)
            self.prefetcher.ensure(layer)  # loads land before this step's token enters the ring
        keys, values = self.store.append(layer, k, v)
        if mask is not None and mask.shape[-1] != total:
            raise RuntimeError(
                f"layer {layer}: mask covers {mask.shape[-1]} keys but the store holds {total}: "
                "the step's attention_mask must span every stored token plus the new ones"
            )
        if offloaded and (not sparse or self.observers or self.measure_recall):
            keys, values = self.store.staged(layer)  # everything, on the compute device
        elif offloaded:
            keys = values = None  # a sparse step of an offloaded layer reads its slots only
        elif keys.device != q.device:
            keys, values = keys.to(q.device, non_blocking=True), values.to(q.device, non_blocking=True)
        if self.head is not None:
            self.head.observe(layer, q, k, keys, scale, last_query_keys(mask))
        for observer in self.observers:
            observer(layer, q, keys, scale)
        if sparse and offloaded:
            return self._sparse_offloaded(layer, q, k, v, keys, scale, softcap)
        if sparse:
            return self._sparse(layer, q, keys, values, None if self.head.per_layer else self._selection(indices),
                                scale, softcap)
        if self.padding_free and (not sliding_window or total <= sliding_window):
            mask = None
        return dense_attention(q, keys, values, mask, scale, softcap, self.expansion_bytes)

    def _sparse_offloaded(self, layer, q, k, v, keys, scale, softcap):
        """Attention over the layer's slots (its selection, loaded by the prefetcher) + the new token."""
        if self.measure_recall:
            past = keys.shape[2] - 1
            positions = self.store.slot_map.token.clamp_min(0)
            newest = positions.new_full(positions.shape[:2] + (1,), past)
            key_valid = None if self.padding_free else torch.cat([self._key_valid, self._key_valid.new_ones(q.shape[0], 1)], -1)
            self._record_recall(layer, q, keys, torch.cat([positions, newest], -1), scale, key_valid,
                                torch.cat([self.store.slot_map.valid(), torch.ones_like(newest, dtype=torch.bool)], -1))
        return attend_slots(self.store, layer, q, k, v, self.prefetcher.slot_valid, scale, softcap)

    def _sparse(self, layer, q, keys, values, indices, scale, softcap):
        past = keys.shape[2] - 1
        if self.head.per_layer:
            scores = self.head.score_layer(layer, q, keys[:, :, :past], scale)
            indices = select_tokens(scores, self._key_valid, self._budget, self.sparse.sink_tokens, self.sparse.local_window)
        batch, kv_heads = indices.shape[:2]
        newest = torch.full((batch, kv_heads, 1), past, dtype=indices.dtype, device=indices.device)
        positions = torch.cat([indices, newest], dim=-1)
        # Key validity over past + the new token (None: no padding anywhere).
        key_valid = None if self.padding_free else torch.cat([self._key_valid, self._key_valid.new_ones(batch, 1)], dim=-1)
        valid = None if key_valid is None else key_valid[:, None, :].expand(batch, kv_heads, -1).gather(2, positions)
        if self.measure_recall:
            self._record_recall(layer, q, keys, positions, scale, key_valid)
        if self.guard is not None and layer == self.guard.layer and self.guard.check_due:
            self.guard.measure(q, keys, scale, positions, key_valid, valid)
        return attend_positions(q, keys, values, positions, valid, scale, softcap)

    def _record_recall(self, layer, q, keys, positions, scale, key_valid, counted=None):
        groups = q.shape[1] // keys.shape[1]
        mass = group_probabilities(q[:, :, -1], keys, scale, key_valid)  # [B, Hkv, T], summed over each group
        picked = mass.gather(2, positions)
        covered = (picked if counted is None else picked * counted).sum(-1) / groups
        self.recall.append((layer, float(covered.mean())))
