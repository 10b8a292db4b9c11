"""What a retrieval head is to the runtime.

The runtime calls ``observe`` from every attention op (prefill chunks and decode steps) so a head can
keep its own key cache current, and ``score`` once per decode step, before layer 0, to rank the past
tokens for every layer. Per-layer baselines (Quest, oracle top-k) set ``per_layer`` and rank inside
each layer instead: they exist to be measured against, not to be fast.
"""

from __future__ import annotations

import torch

from ..kernels import on_triton_path, retrieval_scores


class RetrievalHead:
    """Base class: scores past tokens per target KV head."""

    #: True for policies that select inside each layer from that layer's own query.
    per_layer: bool = False
    name: str = "retrieval_head"
    #: Target decoder layers whose input hidden states the head is fed after every step (EAGLE-3).
    aux_layers: tuple[int, ...] = ()

    def reset(self, batch: int, reserve_tokens: int) -> None:
        """A new batch of sequences starts; drop all state."""

    def observe(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, keys: torch.Tensor, scale: float,
        key_valid: torch.Tensor | None = None,
    ) -> None:
        """Layer ``layer`` just ran on new tokens: q [B, Hq, T, D], their k [B, Hkv, T, D], all stored keys
        [B, Hkv, P, D], and which of those the last new token may attend to (bool [B, P]; None: all)."""

    def observe_step(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, aux_hidden: list[torch.Tensor]
    ) -> None:
        """A target step finished: its new tokens, the mask over all tokens, their positions, and the
        target's hidden states at ``aux_layers`` (empty unless the head asks for them)."""

    def snapshot(self) -> object:
        """The head's state between steps, for :meth:`restore` (a step that ran out of memory is
        retried from here). Tensors the head replaces rather than writes in place may be shared."""
        return None

    def restore(self, state: object) -> None:
        """Go back to a :meth:`snapshot` taken between steps."""

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: int) -> torch.Tensor:
        """float [B, Hkv, past]: how much each past token is wanted by the step feeding ``input_ids``."""
        raise NotImplementedError(f"{type(self).__name__} scores per layer (per_layer=True)")

    def score_layer(self, layer: int, q: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
        """Per-layer policies: float [B, Hkv, P] from the layer's query q [B, Hq, 1, D] and past keys."""
        raise NotImplementedError(f"{type(self).__name__} scores once per step (per_layer=False)")

    # -- fixed-shape decode (CUDA graphs, runtime/cuda_graph_decode.py) ------------------------------------
    #: Whether the head implements the three methods below: scoring every position of a fixed-size
    #: buffer, with the step's position held in a device tensor, so a decode step can be replayed.
    supports_static: bool = False

    def begin_static(self, capacity: int) -> None:
        """Decode steps from now on go through :meth:`observe_static` / :meth:`score_static` over
        ``capacity`` positions, until :meth:`end_static`."""
        raise NotImplementedError(f"{type(self).__name__} has no fixed-shape decode")

    def observe_static(self, layer: int, q: torch.Tensor, k: torch.Tensor, position: torch.Tensor) -> None:
        """:meth:`observe` for one new token whose position is the device scalar ``position``."""
        raise NotImplementedError(f"{type(self).__name__} has no fixed-shape decode")

    def score_static(self, key_valid: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """:meth:`score` over all ``capacity`` positions: float [B, Hkv, capacity]; ``key_valid`` bool
        [B, capacity] is False at padding and at every position not yet stored; ``input_ids`` [B, 1] the
        step's tokens."""
        raise NotImplementedError(f"{type(self).__name__} has no fixed-shape decode")

    def end_static(self, steps: int) -> None:
        """``steps`` fixed-shape steps ran since :meth:`begin_static`: bring the head's own counters up."""

    def static_snapshot(self) -> object:
        """Between fixed-shape steps: copies of what :meth:`observe_static` overwrites in place (keys at
        the step's own position need none), for :meth:`static_restore` after a step that failed part-way."""
        return None

    def static_restore(self, state: object) -> None:
        """Go back to a :meth:`static_snapshot`."""

    def cache_bytes_per_token(self) -> int:
        """GPU bytes the head keeps per context token and sequence (for the memory plan)."""
        return 0

    def parameter_count(self) -> int:
        """Parameters the head keeps for scoring (0 when it only reads the target's own tensors)."""
        return 0


def decoder_of(model):
    """The decoder stack of a causal LM (its ``layers``, ``rotary_emb``): ``get_decoder()`` where the model
    has it, else ``model.model``."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


class KeyCache:
    """A retrieval head's own keys over the context, [B, H, capacity, D]: reserved once per sequence,
    appended each step, grown in chunks past the reservation (the heads' twin of the runtime's KV store)."""

    def __init__(self, grow_chunk: int = 1024):
        self.grow_chunk = grow_chunk
        self.keys: torch.Tensor | None = None
        self.length = 0
        self.reserve = 0

    def reset(self, reserve_tokens: int) -> None:
        self.length = 0
        self.reserve = reserve_tokens

    def append(self, keys: torch.Tensor) -> None:
        """Store ``keys`` [B, H, T, D] after the ones held."""
        batch, heads, new, dim = keys.shape
        needed = self.length + new
        buffer = self.keys
        if buffer is None or buffer.shape[:2] != (batch, heads) or buffer.shape[3] != dim or buffer.shape[2] < needed:
            # The reservation exactly (as the KV store reserves: what the memory plan counts); whole chunks past it.
            capacity = self.reserve if needed <= self.reserve else self.grow_chunk * -(-needed // self.grow_chunk)
            grown = keys.new_empty(batch, heads, capacity, dim)
            if buffer is not None and self.length and buffer.shape[:2] == (batch, heads):
                grown[:, :, : self.length] = buffer[:, :, : self.length]
            self.keys = grown
        self.keys[:, :, self.length:needed] = keys
        self.length = needed

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` keys (later appends overwrite the rest)."""
        if length > self.length:
            raise ValueError(f"cannot truncate a key cache of {self.length} keys to {length}")
        self.length = length

    def reserve_for(self, capacity: int) -> torch.Tensor:
        """The buffer, grown to hold at least ``capacity`` keys (keeping those held): fixed-shape decode
        writes each step's key in place at a device-held position."""
        if self.keys is None:
            raise RuntimeError("retrieval head holds no keys: prefill must run first")
        if self.keys.shape[2] < capacity:
            grown = self.keys.new_empty(*self.keys.shape[:2], capacity, self.keys.shape[3])
            grown[:, :, : self.length] = self.keys[:, :, : self.length]
            self.keys = grown
        return self.keys

    def view(self, length: int, heads: list[int] | None = None) -> torch.Tensor:
        """The first ``length`` keys (of ``heads``, default all): [B, H, length, D]."""
        if self.length < length:
            raise RuntimeError(f"retrieval head holds {self.length} keys, needs {length}: prefill must run first")
        keys = self.keys if heads is None else self.keys[:, heads]
        return keys[:, :, :length]


def vote_for_groups(
    probs: torch.Tensor, heads: list[int], head_map: list[list[int]] | None, num_target_kv_heads: int
) -> torch.Tensor:
    """Draft-head attention [B, len(heads), P] -> scores per target KV group [B, Hkv, P].

    ``head_map[g]`` lists the draft heads (by their ids in ``heads``) that vote for target group g;
    without a map every head votes for every group.
    """
    if head_map is None:
        return probs.sum(1, keepdim=True).expand(-1, num_target_kv_heads, -1)
    position = {h: i for i, h in enumerate(heads)}
    return torch.stack([probs[:, [position[h] for h in group]].sum(1) for group in head_map], dim=1)


def group_probabilities(
    q: torch.Tensor, keys: torch.Tensor, scale: float, key_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention probabilities of one query per head, summed over each KV head's query group.

    q [B, Hq, D], keys [B, Hkv, P, D] -> [B, Hkv, P]; ``key_valid`` bool [B, P] masks padding out. Heads of one group share the selection, so a
    token's worth to the group is the attention mass its heads give it.
    """
    if on_triton_path(q, keys):
        return retrieval_scores(q, keys, scale, key_valid)  # the same function, fused (kernels/retrieval_scores.py)
    batch, q_heads, dim = q.shape
    kv_heads = keys.shape[1]
    grouped = q.view(batch, kv_heads, q_heads // kv_heads, dim).to(keys.dtype)
    logits = torch.matmul(grouped, keys.transpose(-1, -2)).float() * scale
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).sum(dim=2)
