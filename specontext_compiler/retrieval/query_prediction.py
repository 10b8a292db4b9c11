"""The current token's query at a scoring layer, predicted before any layer of the step runs.

The draft-free head ranks the context with its scoring layers' queries, but at the start of a decode step
only the *previous* token's queries exist: the current token's come out of those layers, after the step
has to know what it attends to. The paper's head gets a current query from a small draft model fed with
the target's hidden states; this one fits, per sequence, how the target itself turns one query into the
next:

    q_t = W [q_{t-1} ; q_emb(x_t) ; 1]        (per query head, before rotary position embedding)

where ``q_emb(x_t)`` is the scoring layer's own query projection of the current token's input embedding
(what the layer would ask if its residual stream held only the token). ``W`` (2D + 1 inputs, D outputs per
head) is a ridge regression over the prompt's consecutive positions, accumulated while prefill runs and
solved once before the first sparse step; it shrinks towards ``q_t = q_{t-1}`` (the head's previous
behaviour) where the prompt says little. Nothing is trained offline and nothing is shipped: the fit costs
one small Gram matrix per head and sequence and one extra query projection per scoring layer and token.

Queries reach the head after rotary position embedding; the fit and the prediction work on unrotated
queries (positions from the attention mask, as ``prompt_position_ids``), and the predicted query is rotated
to the current position. docs/accuracy.md has the measurements that chose this form.
"""

from __future__ import annotations

import torch

from .base import decoder_of
from .eagle3 import rotate_half

#: Ridge strength, relative to the mean diagonal of each head's Gram matrix (measured: docs/accuracy.md).
DEFAULT_RIDGE = 1e-2


def rotate(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotary position embedding of q [B, H, T, D] with cos/sin [B, T, R] (R <= D: the first R dimensions
    rotate, as partial-rotary models do), or its inverse. Tables that carry an attention scaling (cos^2 +
    sin^2 != 1) are undone exactly."""
    rot = cos.shape[-1]
    cos, sin = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)
    turned, kept = q[..., :rot], q[..., rot:]
    if inverse:
        turned = (turned * cos - rotate_half(turned) * sin) / (cos * cos + sin * sin)
    else:
        turned = turned * cos + rotate_half(turned) * sin
    return torch.cat((turned, kept), dim=-1)


class EmbeddingQuery:
    """``q_emb``: one layer's query projection (after its input norm) of token embeddings, [B, Hq, T, D]."""

    def __init__(self, model, layer: int):
        block = decoder_of(model).layers[layer]
        attention = block.self_attn
        self.embed = model.get_input_embeddings()
        self.norm = block.input_layernorm
        self.heads = model.config.num_attention_heads
        if hasattr(attention, "q_proj"):
            self.project = attention.q_proj
            self.width = None
        elif hasattr(attention, "qkv_proj"):  # Phi-3 fuses q/k/v: the queries are the first rows
            self.project = attention.qkv_proj
            self.width = attention.head_dim * self.heads
        else:
            raise TypeError(f"{type(attention).__name__} has neither q_proj nor qkv_proj: the predicted query needs "
                            "the layer's query projection; use query='previous'")

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch, tokens = input_ids.shape
        out = self.project(self.norm(self.embed(input_ids)))
        if self.width is not None:
            out = out[..., : self.width]
        return out.view(batch, tokens, self.heads, -1).transpose(1, 2)


class RotaryTables:
    """cos/sin [B, T, R] at given positions, from the model's own rotary module (its scaling included)."""

    def __init__(self, model, layer: int):
        self.rotary = decoder_of(model).rotary_emb
        layer_types = getattr(model.config, "layer_types", None)
        # Gemma 3 keeps one table per attention type and takes the type as an argument.
        self.layer_type = layer_types[layer] if layer_types and hasattr(self.rotary, "layer_types") else None

    @torch.no_grad()
    def __call__(self, like: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.layer_type is None:
            return self.rotary(like, positions)
        return self.rotary(like, positions, self.layer_type)


class QueryPredictor:
    """One scoring layer's per-sequence fit of ``q_t`` from ``(q_{t-1}, q_emb(x_t))`` (module docstring).

    ``accumulate`` takes a prefill chunk's rotated queries; ``solve`` turns the sums into weights;
    ``predict`` gives the current token's rotated query from the previous one. Tensors are replaced, never
    written in place, so a snapshot of the attributes restores the state.
    """

    def __init__(self, model, layer: int, ridge: float = DEFAULT_RIDGE):
        if not ridge > 0:
            raise ValueError(f"ridge must be positive; got {ridge!r}")
        self.ridge = float(ridge)
        self.embedding_query = EmbeddingQuery(model, layer)
        self.rotary = RotaryTables(model, layer)
        self.reset()

    def reset(self) -> None:
        self.gram: torch.Tensor | None = None  # [B, Hq, F, F], F = 2D + 1
        self.cross: torch.Tensor | None = None  # [B, Hq, F, D]
        self.last: torch.Tensor | None = None  # [B, Hq, D]: the last unrotated query seen (the next pair's input)
        self.last_valid: torch.Tensor | None = None  # [B]
        self.weights: torch.Tensor | None = None  # [B, Hq, F, D] once solved

    def state(self) -> tuple:
        return self.gram, self.cross, self.last, self.last_valid, self.weights

    def set_state(self, state: tuple) -> None:
        self.gram, self.cross, self.last, self.last_valid, self.weights = state

    def _features(self, previous: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, Hq, T, 2D + 1]: previous unrotated queries, the embedding queries of ``input_ids``, and 1."""
        embedded = self.embedding_query(input_ids).to(torch.float32)
        ones = previous.new_ones(*previous.shape[:-1], 1)
        return torch.cat([previous, embedded, ones], dim=-1)

    def accumulate(self, q: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   position_ids: torch.Tensor) -> None:
        """A prefill chunk: rotated queries q [B, Hq, T, D] of tokens ``input_ids`` [B, T] at ``position_ids``;
        ``attention_mask`` [B, T] marks real tokens. Each pair of consecutive real tokens is one sample."""
        if self.weights is not None:
            return  # solved: decode steps do not refit
        cos, sin = self.rotary(q, position_ids)
        unrotated = rotate(q.float(), cos.float(), sin.float(), inverse=True)
        valid = attention_mask.bool()
        batch, heads, _, dim = unrotated.shape
        if self.last is None:
            self.last = unrotated.new_zeros(batch, heads, dim)
            self.last_valid = torch.zeros(batch, dtype=torch.bool, device=q.device)
            self.gram = unrotated.new_zeros(batch, heads, 2 * dim + 1, 2 * dim + 1)
            self.cross = unrotated.new_zeros(batch, heads, 2 * dim + 1, dim)
        previous = torch.cat([self.last[:, :, None], unrotated[:, :, :-1]], dim=2)
        previous_valid = torch.cat([self.last_valid[:, None], valid[:, :-1]], dim=1)
        weight = (valid & previous_valid).to(torch.float32)[:, None, :, None]  # [B, 1, T, 1]
        features = self._features(previous, input_ids) * weight
        self.gram = self.gram + features.transpose(-1, -2) @ features
        self.cross = self.cross + features.transpose(-1, -2) @ (unrotated * weight)
        self.last = torch.where(valid[:, -1, None, None], unrotated[:, :, -1], self.last)
        self.last_valid = self.last_valid | valid[:, -1]

    def solve(self) -> None:
        """Ridge regression towards ``q_t = q_{t-1}``: (G + lambda I) W = C + lambda W0."""
        if self.weights is not None or self.gram is None:
            return
        features, dim = self.gram.shape[-1], self.cross.shape[-1]
        eye = torch.eye(features, device=self.gram.device, dtype=self.gram.dtype)
        scale = self.gram.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
        ridge = self.ridge * scale + 1e-6
        prior = eye[:, :dim]  # the previous query passes through
        self.weights = torch.linalg.solve(self.gram + ridge * eye, self.cross + ridge * prior)
        self.gram = self.cross = None

    def predict(self, previous: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The current token's rotated query [B, Hq, D] from the previous token's rotated query [B, Hq, D],
        the current tokens ``input_ids`` [B, 1] and their positions [B] (the previous one is one less)."""
        if self.weights is None:
            raise RuntimeError("the query predictor has not been fitted: prefill must run first")
        both = torch.stack([positions - 1, positions], dim=1).clamp_min(0)  # [B, 2]
        cos, sin = self.rotary(previous, both)
        unrotated = rotate(previous[:, :, None].float(), cos[:, :1].float(), sin[:, :1].float(), inverse=True)
        features = self._features(unrotated, input_ids)  # [B, Hq, 1, F]
        predicted = features @ self.weights  # [B, Hq, 1, D]
        return rotate(predicted, cos[:, 1:].float(), sin[:, 1:].float())[:, :, 0]
