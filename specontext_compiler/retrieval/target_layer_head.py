"""The retrieval head derived from the target model itself (``draft=None``).

Construction, chosen by measurement: the head is one target layer's attention, queried with that
layer's query of the *previous* token. Before layer 0 of step t runs, the previous step's query at
layer ``layer`` is known (the runtime recorded it), so one small product ranks the context for every
layer without waiting on any of them. The head keeps its own copy of that layer's keys (1/num_layers
of the K cache, 1/(2 num_layers) of the KV), filled by prefill and appended each step.

Which layer, measured on SmolLM2-135M-Instruct (30 layers), 8 code-word documents of ~2K tokens, token
budget 256 (4 sinks, 64-token window), 24 greedy tokens (docs/accuracy.md names the command):

| scoring layer | code word found (dense: 6/8) | attention-mass recall |
|---|---|---|
| 5 | 0/8 | 0.915 |
| 12 | 3/8 | 0.719 |
| 21 | 5/8 | 0.705 |
| 24 | 6/8 | 0.703 |
| 28 | 1/8 | 0.718 |
| oracle per-layer top-k / sinks + window only | 6/8 / 0/8 | 0.952 / 0.729 |

Early layers cover the most attention mass *on average*, but that mass is local and spread; the answer
depends on the deep heads that look the fact up, and layer 24 (5/6 of the depth) ranks the context the
way they do. The default is therefore 5/6 of the depth; ``retrieval_layer=`` overrides it and
:func:`specontext.calibrate` measures it for a given model (it picked layer 23 on SmolLM2).
"""

from __future__ import annotations

import torch

from .base import KeyCache, RetrievalHead, group_probabilities

DEFAULT_DEPTH = 5 / 6


def default_layer(num_layers: int) -> int:
    return round(DEFAULT_DEPTH * (num_layers - 1))


class TargetLayerHead(RetrievalHead):
    """Scores with layer ``layer`` of the target, using the previous token's query."""

    name = "target_layer"

    def __init__(self, layer: int, grow_chunk: int = 1024):
        self.layer = layer
        self.layers = (layer,)
        self.cache = KeyCache(grow_chunk)
        self.query: torch.Tensor | None = None
        self.scale = 1.0

    def reset(self, batch: int, reserve_tokens: int) -> None:
        self.cache.reset(reserve_tokens)
        self.query = None

    def observe(self, layer, q, k, keys, scale):
        if layer != self.layer:
            return
        self.cache.append(k)
        self.query = q[:, :, -1].clone()
        self.scale = scale

    def score(self, input_ids, attention_mask, past: int) -> torch.Tensor:
        if self.query is None:
            raise RuntimeError("retrieval head has no query yet: prefill must run first")
        return group_probabilities(self.query, self.cache.view(past), self.scale)
