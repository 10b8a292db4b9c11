"""From scores to the tokens a step attends to: sinks + the recent window + the top-k of the rest.

Shared by every retrieval head and baseline, so they differ only in how they score.

Sticky selection (``sticky_margin``): before the top-k, the tokens the offloaded layers' slots already
hold get ``margin`` added to their score, so a held token is dropped only for one that beats it by more
than the margin, and a near-tie no longer costs a host-to-GPU load (SGLang's HiSparse keeps its hits the
same way). The margin is in the scores' units. Every head here scores with attention *probabilities*
(mass summed over a KV group's query heads; the draft-free head: the prefill prior + 8 x the scoring
layers' mass, docs/accuracy.md), not logits, so the margin is an absolute tolerance in attention mass:
each held token kept over a better one costs at most ``margin`` of score mass. Sinks and the window
rank above every score either way.
"""

from __future__ import annotations

import math

import torch

from ..config import check_sticky_margin


def resolve_token_budget(token_budget: int | float, context: int) -> int:
    """Tokens attended at a context of ``context`` tokens (a float budget is a fraction of it)."""
    if isinstance(token_budget, float):
        return max(1, math.ceil(token_budget * context))
    return token_budget


_WINDOW_RANK = 2.0 ** 100
_SINK_RANK = 2.0 ** 110


def sink_positions(key_valid: torch.Tensor, sink_tokens: int) -> torch.Tensor:
    """Bool [B, P]: the first ``sink_tokens`` real (non-padding) positions of each row."""
    rank = key_valid.long().cumsum(-1) - 1
    return key_valid & (rank < sink_tokens)


def held_positions(mapping: torch.Tensor, positions: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [B, Hkv, positions]: which positions the slot map ``mapping`` (int64 [B, Hkv, S], -1 = empty)
    holds; entries outside [0, positions) count as empty.

    ``out``: a bool [B, Hkv, positions + 1] buffer to write (a fixed-shape step's, so a CUDA graph can
    capture the scatter: no allocation, no host sync); the extra column takes the empty entries.
    """
    batch, heads, _ = mapping.shape
    if out is None:
        out = torch.zeros(batch, heads, positions + 1, dtype=torch.bool, device=mapping.device)
    elif out.shape != (batch, heads, positions + 1) or out.dtype != torch.bool:
        raise ValueError(f"out must be bool {(batch, heads, positions + 1)}; got {out.dtype} {tuple(out.shape)}")
    else:
        out.zero_()
    target = torch.where((mapping >= 0) & (mapping < positions), mapping, positions)
    out.scatter_(2, target, True)
    return out[..., :positions]


def select_tokens(
    scores: torch.Tensor, key_valid: torch.Tensor, budget: int, sink_tokens: int, local_window: int,
    past: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
    held: torch.Tensor | None = None, margin: float = 0.0,
) -> torch.Tensor:
    """Pick ``budget`` past positions per (row, KV head): sinks and window first, then the best scores.

    When the budget is smaller than sinks + window, sinks win, then the newest tokens.

    Args:
        scores: float [B, Hkv, P] over the P past tokens (higher = more wanted).
        key_valid: bool [B, P], False at padding.
        budget: past tokens to keep (the new token comes on top).
        past: where the past ends, as a device scalar, when the rows are longer than the past (a
            fixed-shape decode step: ``key_valid`` is False from ``past`` on); None: P.
        sinks: ``sink_positions(key_valid, sink_tokens)`` where the caller knows it already (fixed-shape
            decode, once every row has its sinks: they stay the same from step to step).
        held: bool [B, Hkv, P], the tokens the offloaded layers' slots hold (:func:`held_positions`), or
            None; each gets ``margin`` (>= 0, the scores' units) on its score before the top-k (module
            docstring: sticky selection). Sinks and window are unaffected.
    Returns:
        int64 [B, Hkv, budget] positions, sorted ascending (gathers read memory in order).
    """
    batch, heads, positions = scores.shape
    budget = min(budget, positions)
    end = positions if past is None else past
    # Ranks in the scores' precision (float32 but for float64 scores: top-k's radix select takes half the
    # passes): scores stay below 2^100, the window ranks above them by recency (2^100 * (1 + recency / 2^23),
    # exact for recency < 2^23), sinks above all; invalid positions below every score.
    rank_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    ranked = scores.to(rank_dtype)
    if held is not None:
        # Added in the rank precision: in half precision a small margin would round away next to the score.
        ranked = ranked + held.to(rank_dtype) * check_sticky_margin(margin)
    at = torch.arange(positions, device=scores.device, dtype=rank_dtype)
    if local_window:
        ranked = torch.where(at >= end - local_window, _WINDOW_RANK * (1 + at / 2 ** 23), ranked)
    sinks = sink_positions(key_valid, sink_tokens) if sinks is None else sinks
    ranked = ranked.masked_fill(sinks[:, None, :], _SINK_RANK)
    if past is None:
        ranked = ranked.masked_fill(~key_valid[:, None, :], float("-inf"))
    else:
        # A row with fewer tokens than the budget also picks invalid positions (masked by attention): its
        # padding first, which holds stored values, before the positions not written yet, which may hold
        # anything (NaN times a zero weight is still NaN on the torch path).
        fill = torch.full_like(at, float("-inf")).masked_fill(at < end, -_WINDOW_RANK)
        ranked = torch.where(key_valid[:, None, :], ranked, fill)
    indices = ranked.topk(budget, dim=-1, sorted=False).indices
    return indices.sort(dim=-1).values
