"""The retrieval head derived from the target model itself (``draft=None``).

A token's score is

    prior (every layer's attention from the prompt's last token, averaged over layers)
    + query_weight x sum over the scoring layers L of (L's attention from the *previous* token's query)

summed over each KV group's query heads, and with ``lookahead`` each position also receives the score
of the one before it (the previous token found what it copied; the current token copies what follows).
Both parts exist before layer 0 of a decode step runs: the prior is computed once, during prefill, from
the attention rows the prefill computes anyway; the previous step's queries at the scoring layers were
recorded by the runtime. So one small product ranks the context for every layer without waiting on any
of them. The head keeps its own copy of the scoring layers' keys, filled by prefill and appended each step.

Why these parts (docs/accuracy.md has the measurements and commands): one layer cannot do both jobs
(early layers cover most of the attention mass, which is static and taken once as the prior; deep layers
find what the step needs); the deep part's mass is small next to the prior's, so it is weighted up (8x);
three layers at 0.72-0.8 of the depth with lookahead 1 matched oracle top-k on the RULER-style suite's
fit split (2K, 6% budget: 66.7 like oracle, where the earlier single layer at 5/6 of the depth without
lookahead scored 44.4). On models with sliding-window layers the scoring layers move to full-attention ones.

``retrieval_layer=`` picks the scoring layer(s) (default :func:`default_layers`) and
:func:`specontext.calibrate` measures them for a given model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import KeyCache, RetrievalHead, group_probabilities
from .query_prediction import QueryPredictor

#: Where the default scoring layers sit, as fractions of the depth (see the module docstring).
DEFAULT_DEPTHS = (0.72, 0.76, 0.8)
#: Weight of the scoring layers' attention against the prefill prior (measured; module docstring).
DEFAULT_QUERY_WEIGHT = 8.0
#: Positions after each scored one that share its score (measured; module docstring).
DEFAULT_LOOKAHEAD = 1


def default_layers(num_layers: int, layer_types: Sequence[str] | None = None) -> tuple[int, ...]:
    """The draft-free head's scoring layers for a model of ``num_layers`` layers: at 0.72, 0.76 and 0.8 of
    the depth (SmolLM2's 30 layers: 21, 22, 23; fewer where the depth rounds two to one).

    ``layer_types`` (the config's, e.g. Gemma 3's ``"sliding_attention"`` / ``"full_attention"``): each
    layer moves to the nearest full-attention layer (the deeper one on a tie). A sliding-window layer is
    trained to look at its window only, so its attention says nothing about the far context the selection
    is for (Gemma-3-270M's 18 layers: 12, 13, 14 -> 11, 17).
    """
    layers = {round(depth * (num_layers - 1)) for depth in DEFAULT_DEPTHS}
    full = [index for index, kind in enumerate(layer_types or ()) if kind == "full_attention"]
    if layer_types is not None and full and len(full) < num_layers:
        layers = {min(full, key=lambda candidate: (abs(candidate - layer), -candidate)) for layer in layers}
    return tuple(sorted(layers))


def window_probabilities(
    q: torch.Tensor, keys: torch.Tensor, scale: float, key_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """The attention of the last W queries (q [B, Hq, W, D], the newest last, causal among themselves),
    averaged over them and summed over each KV group's heads: [B, Hkv, P]. W = 1 is
    :func:`group_probabilities`. One query at a time, so memory stays that of one query's attention."""
    window, positions = q.shape[2], keys.shape[2]
    total = 0
    for row in range(window):
        valid = key_valid
        if row < window - 1:  # an earlier query sees its own position and everything before it
            valid = torch.arange(positions, device=keys.device) < positions - window + row + 1
            valid = valid.expand(keys.shape[0], positions) if key_valid is None else key_valid & valid
        total = total + group_probabilities(q[:, :, row], keys, scale, valid)
    return total / window


#: How the prior and the scoring layers' part make one score (``TargetLayerHead(combine=...)``).
COMBINE = ("sum", "union")
#: Which query of each scoring layer ranks a step: the previous token's, or the current token's as
#: :mod:`.query_prediction` predicts it from the previous one and the current token.
QUERIES = ("previous", "predicted")


def _ranks(scores: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
    """Rank of each position along the last axis, 0 for the highest score: ties go to the earlier position
    and invalid positions come last, so a fixed-shape step (more positions, the unwritten ones invalid)
    ranks the stored tokens as the eager step does."""
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid[:, None, :], float("-inf"))
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return ranks


class TargetLayerHead(RetrievalHead):
    """Scores with the target's own attention: a prefill prior plus the previous token's query at ``layers``.

    Score of a past token for KV group g = (with ``prefill_prior``) the attention mass the group's query
    heads gave it from the prompt's last token, averaged over all layers, + ``query_weight`` x the mass
    the group's heads of each scoring layer gave it from the previous token.

    ``lookahead`` / ``lookbehind``: positions after / before each scored one that also receive its score;
    ``prior_window``: how many of the prompt's last queries the prior averages (1: the last one);
    ``prior_from``: the prior averages the layers from this fraction of the depth on (0: all);
    ``combine``: "sum" (prior + weight x query part) or "union" (the two rankings interleaved: a position
    ranks by the better of its two ranks, the query part's first on a tie, so each part fills about half
    the budget); ``query``: "previous" (the previous token's query, as recorded) or "predicted" (the current
    token's, predicted by a per-sequence fit; needs ``model``, the target). The defaults are the measured
    choice; the other values lost or tied on the suite (docs/accuracy.md).
    """

    name = "target_layer"

    def __init__(
        self,
        layers: int | Sequence[int],
        prefill_prior: bool = True,
        query_weight: float = DEFAULT_QUERY_WEIGHT,
        lookahead: int = DEFAULT_LOOKAHEAD,
        grow_chunk: int = 1024,
        prior_window: int = 1,
        lookbehind: int = 0,
        prior_from: float = 0.0,
        combine: str = "sum",
        query: str = "previous",
        model=None,
    ):
        layers = (layers,) if isinstance(layers, int) else tuple(layers)
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"scoring layers must be distinct layer indices; got {layers!r}")
        if not query_weight > 0:
            raise ValueError(f"query_weight must be positive; got {query_weight!r}")
        if not isinstance(lookahead, int) or lookahead < 0:
            raise ValueError(f"lookahead must be a non-negative int; got {lookahead!r}")
        for name, value, least in (("prior_window", prior_window, 1), ("lookbehind", lookbehind, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be an int >= {least}; got {value!r}")
        if not 0.0 <= prior_from < 1.0:
            raise ValueError(f"prior_from must be a fraction of the depth in [0, 1); got {prior_from!r}")
        if combine not in COMBINE:
            raise ValueError(f"combine must be one of {', '.join(map(repr, COMBINE))}; got {combine!r}")
        if query not in QUERIES:
            raise ValueError(f"query must be one of {', '.join(map(repr, QUERIES))}; got {query!r}")
        if query == "predicted" and model is None:
            raise ValueError("query='predicted' needs model= (the target, whose query projections it reuses)")
        self.query = query
        self.predictors = {layer: QueryPredictor(model, layer) for layer in layers} if query == "predicted" else {}
        self._pending: dict[int, torch.Tensor] = {}  # a step's queries, until observe_step brings its tokens
        self.layers = layers
        self.prior_from = float(prior_from)
        self.combine = combine
        self.lookahead = lookahead
        self.lookbehind = lookbehind
        self.prior_window = prior_window
        self.prefill_prior = prefill_prior
        self.query_weight = float(query_weight) if prefill_prior else 1.0  # alone, a weight changes no ranking
        self.caches = {layer: KeyCache(grow_chunk) for layer in layers}
        self.queries: dict[int, torch.Tensor] = {}
        self.scales: dict[int, float] = {}
        self.prior_parts: dict[int, torch.Tensor] = {}  # per layer [B, Hkv, P]: the prompt's last query's attention
        self._prior: torch.Tensor | None = None

    def reset(self, batch: int, reserve_tokens: int) -> None:
        for cache in self.caches.values():
            cache.reset(reserve_tokens)
        self.queries = {}
        self.prior_parts = {}
        self._prior = None
        self._pending = {}
        for predictor in self.predictors.values():
            predictor.reset()

    def snapshot(self):
        return ({layer: cache.length for layer, cache in self.caches.items()}, dict(self.queries),
                dict(self.prior_parts), self._prior,
                {layer: predictor.state() for layer, predictor in self.predictors.items()})

    def restore(self, state) -> None:
        lengths, queries, prior_parts, prior, predictors = state
        for layer, length in lengths.items():
            self.caches[layer].truncate(length)
        self.queries, self.prior_parts, self._prior = dict(queries), dict(prior_parts), prior
        self._pending = {}
        for layer, predictor_state in predictors.items():
            self.predictors[layer].set_state(predictor_state)

    def observe(self, layer, q, k, keys, scale, key_valid=None):
        if self.prefill_prior and (q.shape[2] > 1 or layer not in self.prior_parts):
            # Prefill (or a one-token prompt): the last query's attention over everything stored. Decode
            # steps leave the prior alone; they would have to read every layer's keys to update it.
            self.prior_parts[layer] = window_probabilities(q[:, :, -self.prior_window:], keys, scale, key_valid)
            self._prior = None
        cache = self.caches.get(layer)
        if cache is None:
            return
        cache.append(k)
        self.queries[layer] = q[:, :, -1].clone()
        self.scales[layer] = scale
        if layer in self.predictors and self.predictors[layer].weights is None:
            self._pending[layer] = q

    def observe_step(self, input_ids, attention_mask, position_ids, aux_hidden) -> None:
        """The predictors fit on each step's consecutive queries until the first sparse step solves them."""
        new = input_ids.shape[1]
        for layer, q in self._pending.items():
            self.predictors[layer].accumulate(q, input_ids, attention_mask[:, -new:], position_ids)
        self._pending = {}

    def _step_queries(self, input_ids: torch.Tensor, positions: torch.Tensor) -> dict[int, torch.Tensor]:
        """The query each scoring layer ranks with: the previous token's, or the current one's predicted
        (``positions`` [B]: where the current tokens sit)."""
        if not self.predictors:
            return self.queries
        for predictor in self.predictors.values():
            predictor.solve()
        return {layer: self.predictors[layer].predict(self.queries[layer], input_ids, positions).to(query.dtype)
                for layer, query in self.queries.items()}

    def prior(self, past: int) -> torch.Tensor:
        """[B, Hkv, past]: the prefill attention averaged over layers (0 for tokens generated since)."""
        prior = self._prior_source()[..., :past]
        return torch.nn.functional.pad(prior, (0, past - prior.shape[-1]))

    def score(self, input_ids, attention_mask, past: int) -> torch.Tensor:
        if len(self.queries) != len(self.layers):
            raise RuntimeError("retrieval head has no query yet: prefill must run first")
        keys = {layer: self.caches[layer].view(past) for layer in self.layers}
        key_valid = attention_mask[:, :past].bool()
        queries = self._step_queries(input_ids, key_valid.sum(-1))
        return self._scores(queries, keys, key_valid, self.prior(past) if self.prefill_prior else None)

    def _scores(self, queries: dict[int, torch.Tensor], keys: dict[int, torch.Tensor], key_valid: torch.Tensor,
                prior: torch.Tensor | None) -> torch.Tensor:
        """The one scoring path (eager steps over the stored keys, fixed-shape steps over a fixed capacity
        with the unwritten positions masked): the scoring layers' attention from their last query, spread
        by lookahead/lookbehind, weighted, plus the prior."""
        scores = 0
        for layer in self.layers:
            scores = scores + group_probabilities(queries[layer], keys[layer], self.scales[layer], key_valid)
        scores = self.query_weight * self._look_ahead(scores)
        if prior is None:
            return scores
        if self.combine == "union":
            # Rank k of either list scores -2k, the query part's first (-2k), then the prior's (-2k - 1): every
            # position a distinct score, so the selection has no ties to break differently at another shape.
            by_query, by_prior = _ranks(scores, key_valid), _ranks(prior, key_valid)
            return -(2 * torch.minimum(by_query, by_prior) + (by_prior < by_query)).to(scores.dtype)
        return scores + prior

    def _look_ahead(self, scores: torch.Tensor) -> torch.Tensor:
        """Each position also gets the scores of the ``lookahead`` positions before it: the previous token's
        query found what that token copied; the current token copies what comes next."""
        shifted = scores
        for shift in range(1, self.lookahead + 1):
            shifted = shifted + torch.nn.functional.pad(scores[..., :-shift], (shift, 0))
        for shift in range(1, self.lookbehind + 1):  # and the positions before it (a needle's key, say)
            shifted = shifted + torch.nn.functional.pad(scores[..., shift:], (0, shift))
        return shifted

    # -- fixed-shape decode: the same scores over a fixed number of positions ----------------------------------
    supports_static = True

    def begin_static(self, capacity: int) -> None:
        if len(self.queries) != len(self.layers):
            raise RuntimeError("retrieval head has no query yet: prefill must run first")
        self._static_keys = {layer: self.caches[layer].reserve_for(capacity)[:, :, :capacity] for layer in self.layers}
        self.queries = {layer: query.clone() for layer, query in self.queries.items()}  # written in place from now on
        for predictor in self.predictors.values():
            predictor.solve()
        if self.prefill_prior:
            stored = self._prior_source()
            self._static_prior = torch.nn.functional.pad(stored, (0, capacity - stored.shape[-1]))

    def _prior_source(self) -> torch.Tensor:
        if self._prior is None:
            depth = max(self.prior_parts) + 1
            parts = [part for layer, part in self.prior_parts.items() if layer >= self.prior_from * depth]
            self._prior = torch.stack(parts).mean(0)
        return self._prior

    def observe_static(self, layer, q, k, position):
        if layer in self._static_keys:
            self._static_keys[layer].index_copy_(2, position.view(1), k)
            self.queries[layer].copy_(q[:, :, -1])

    def score_static(self, key_valid: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        queries = self._step_queries(input_ids, key_valid.sum(-1))
        return self._scores(queries, self._static_keys, key_valid, self._static_prior if self.prefill_prior else None)

    def end_static(self, steps: int) -> None:
        for cache in self.caches.values():
            cache.length += steps

    def static_snapshot(self):
        return {layer: query.clone() for layer, query in self.queries.items()}

    def static_restore(self, state) -> None:
        for layer, query in state.items():
            self.queries[layer].copy_(query)
