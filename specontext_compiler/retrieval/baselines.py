"""Selection baselines measured beside the retrieval head, with the same budget and selection rule.

* ``StreamingLLM``: attention sinks + the most recent tokens, nothing retrieved.
* ``QuestPages``: per layer, pages of ``page_size`` keys summarized by their element-wise min/max;
  a page's score is the upper bound of q.k over it (Quest, ICML'24); the best pages are kept whole.
* ``OracleTopK``: per layer, the target's true attention of the current query (an upper reference:
  it needs every layer's full K, which is what the method avoids reading).
"""

from __future__ import annotations

import torch

from .base import RetrievalHead, group_probabilities


class StreamingLLM(RetrievalHead):
    name = "streaming"

    def observe(self, layer, q, k, keys, scale, key_valid=None):
        self._shape = (k.shape[0], k.shape[1])
        self._device = k.device

    def score(self, input_ids, attention_mask, past: int) -> torch.Tensor:
        # Recency as the score: after the forced sinks, the top-k are the newest tokens.
        positions = torch.arange(past, device=self._device, dtype=torch.float32)
        return positions.expand(*self._shape, past)

    supports_static = True

    def begin_static(self, capacity: int) -> None:
        self._static_scores = torch.arange(capacity, device=self._device, dtype=torch.float32).expand(*self._shape, capacity)

    def observe_static(self, layer, q, k, position):
        pass

    def score_static(self, key_valid: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self._static_scores


class OracleTopK(RetrievalHead):
    name = "oracle"
    per_layer = True

    def score_layer(self, layer, q, keys, scale):
        return group_probabilities(q[:, :, -1], keys, scale)


class QuestPages(RetrievalHead):
    name = "quest"
    per_layer = True

    def __init__(self, page_size: int = 16):
        self.page_size = page_size

    def score_layer(self, layer, q, keys, scale):
        batch, kv_heads, past, dim = keys.shape
        pages = -(-past // self.page_size)
        padded = torch.nn.functional.pad(keys.float(), (0, 0, 0, pages * self.page_size - past), value=float("nan"))
        paged = padded.view(batch, kv_heads, pages, self.page_size, dim)
        kmin = paged.nan_to_num(float("inf")).amin(dim=3)
        kmax = paged.nan_to_num(float("-inf")).amax(dim=3)
        query = q[:, :, -1].float().view(batch, kv_heads, -1, dim)  # [B, Hkv, G, D]
        bound = torch.maximum(query[:, :, :, None, :] * kmin[:, :, None], query[:, :, :, None, :] * kmax[:, :, None])
        page_score = bound.sum(-1).amax(dim=2)  # [B, Hkv, pages]: the group's best head
        return page_score.repeat_interleave(self.page_size, dim=-1)[..., :past]
