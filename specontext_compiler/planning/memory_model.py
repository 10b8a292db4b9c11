"""The memory model: every GPU memory term of a compiled model as a sympy expression of the batch B,
the context length L and the number n of layers whose KV stays on the GPU.

Each term is named, printable (``str(term)``) and evaluable (``term.bytes(batch, length, resident)``).
The inputs are read off the model or its config (:class:`ModelShape`); the activation terms follow
what the runtime allocates (docs/architecture.md, runtime; :func:`memory_terms`): a prefill step of
``prefill_chunk`` tokens over the batch, its mask, and dense attention's K/V expanded in groups of
bounded size; a decode step's head scoring or sparse gather; the last position's logits. The
workspace margin (512 MiB) was measured on the GPU (docs/memory.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch

from ..config import DEFAULT_PREFILL_CHUNK, DENSE_EXPANSION_BYTES, MIN_PREFILL_CHUNK

#: Batch, context length (prompt + generated tokens), and GPU-resident layers.
B, L, n = sympy.symbols("B L n", integer=True, nonnegative=True)

#: Tokens per device-to-host copy when the runtime moves a layer to host memory (its device temporary).
MIGRATION_CHUNK = 2048

DEFAULT_WORKSPACE = 512 * 2**20  # bytes; CUDA context excluded (torch.cuda.max_memory_allocated does not see it)


@dataclass(frozen=True)
class ModelShape:
    """What the memory terms need to know about a model."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int
    weight_bytes: int

    @classmethod
    def from_config(cls, config, dtype: torch.dtype | None = None, weight_bytes: int | None = None) -> "ModelShape":
        """From a transformers config; weights estimated from the config unless ``weight_bytes`` is given."""
        from .footprint import head_dim, num_kv_heads

        dtype = dtype or getattr(config, "dtype", None) or torch.bfloat16
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        size = torch.empty((), dtype=dtype).element_size()
        shape = cls(
            num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size, vocab_size=config.vocab_size,
            num_q_heads=config.num_attention_heads, num_kv_heads=num_kv_heads(config), head_dim=head_dim(config),
            dtype_bytes=size, weight_bytes=0,
        )
        if weight_bytes is None:
            weight_bytes = shape.estimated_parameters(bool(getattr(config, "tie_word_embeddings", False))) * size
        return cls(**{**shape.__dict__, "weight_bytes": int(weight_bytes)})

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "ModelShape":
        """From a loaded model: the weights are its actual parameters and buffers, in their dtypes."""
        from .footprint import weight_bytes

        dtype = model.get_input_embeddings().weight.dtype
        return cls.from_config(model.config, dtype, weight_bytes(model))

    def estimated_parameters(self, tied_embeddings: bool) -> int:
        """Parameters of a Llama-style decoder (attention, gated MLP, two norms per layer, final norm)."""
        h, q, kv = self.hidden_size, self.num_q_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h
        mlp = 3 * h * self.intermediate_size
        per_layer = attention + mlp + 2 * h
        embeddings = self.vocab_size * h * (1 if tied_embeddings else 2)
        return self.num_layers * per_layer + embeddings + h

    @property
    def kv_layer_token_bytes(self) -> int:
        """K and V of one token in one layer, one sequence."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes


@dataclass(frozen=True)
class MemoryTerm:
    """One named term of the GPU memory, in bytes."""

    name: str
    expr: sympy.Expr
    what: str

    def bytes(self, batch: int, length: int, resident: int) -> int:
        return int(self.expr.subs({B: batch, L: length, n: resident}))

    def __str__(self) -> str:
        return f"{self.name} = {self.expr}  ({self.what})"


@dataclass(frozen=True)
class HeadCost:
    """What a retrieval head costs on the GPU, per context token and sequence: ``held`` (its caches, kept
    for the whole sequence), ``replaced`` (what a prefill step replaces while the step's rollback snapshot
    keeps the old copy), ``observe`` (transient, while a prefill step's layer shows it its keys) and
    ``score`` (transient, while a decode step's scoring runs); and its own weights, ``parameters``."""

    held: int
    replaced: int = 0
    observe: int = 0
    score: int = 0
    parameters: int = 0


def one_layer_scores_bytes(shape: ModelShape) -> int:
    """Per context token and sequence, one layer's float32 attention of one query per head over every key,
    summed per KV group (``retrieval.base.group_probabilities`` on the torch path; the accuracy guard's
    exact attention): logits and softmax [B, Hq, L], the sum [B, Hkv, L] and a running total."""
    return shape.num_q_heads * 8 + 2 * shape.num_kv_heads * 4


def target_layer_head_cost(shape: ModelShape, layers: int, prefill_prior: bool = True) -> HeadCost:
    """The draft-free head (retrieval/target_layer_head.py) with ``layers`` scoring layers: their keys,
    and with the prefill prior each layer's float32 attention of the prompt's last token [B, Hkv, P] and,
    from the first sparse step, their mean (made from the stacked per-layer parts). Each prefill step
    computes the prior anew, and the step's snapshot (runtime/step_transaction.py) keeps the last one
    until the step ends. A decode step's scores: one layer's attention at a time
    (:func:`one_layer_scores_bytes`) while the prior, padded to the step's length, waits to be added."""
    kv_heads = shape.num_kv_heads
    prior = shape.num_layers * kv_heads * 4 if prefill_prior else 0
    mean = kv_heads * 4 if prefill_prior else 0
    return HeadCost(held=layers * shape.kv_layer_token_bytes // 2 + prior + mean, replaced=prior,
                    observe=one_layer_scores_bytes(shape),
                    score=max(prior + mean, one_layer_scores_bytes(shape) + kv_heads * 4))


def default_head_cost(shape: ModelShape, layer_types=None) -> HeadCost:
    """The head ``compile`` builds when not given one: the draft-free head at its default layers (a
    config's ``layer_types`` moves them to full-attention layers, which may merge two)."""
    from ..retrieval.target_layer_head import default_layers

    return target_layer_head_cost(shape, len(default_layers(shape.num_layers, layer_types)))


def prefill_step_tokens(batch: sympy.Expr | int, prefill_chunk: int, length: sympy.Expr | int) -> sympy.Expr:
    """Tokens one prefill step feeds over the batch (``runtime.engine.prefill_row_chunk``: ``prefill_chunk``
    over the rows, a multiple of 16 per row, at least 16), as a bound that never falls as the batch grows:
    at most ``max(prefill_chunk, 16 B)`` and the whole prompt ``B L``; exact where ``prefill_chunk / B`` is
    a multiple of 16, over by less than 16 B tokens otherwise."""
    return sympy.Min(batch * length, sympy.Max(prefill_chunk, MIN_PREFILL_CHUNK * batch))


def expansion_bound(shape: ModelShape, batch: sympy.Expr | int, length: sympy.Expr | int, limit: int | None) -> sympy.Expr:
    """Bytes of K/V that dense attention with a mask expands to the query heads at once
    (``runtime.attention_runtime.expansion_groups``): at most ``limit`` (or one KV head of one row where
    that is larger) and the whole batch's; none without query groups."""
    groups = shape.num_q_heads // shape.num_kv_heads
    if groups == 1:
        return sympy.Integer(0)
    head = 2 * groups * length * shape.head_dim * shape.dtype_bytes  # one KV head of one row, K and V
    whole = batch * shape.num_kv_heads * head
    return whole if limit is None else sympy.Min(whole, sympy.Max(limit, head))


def memory_terms(
    shape: ModelShape,
    token_budget: int | None = 2048,
    window: int = 65,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    workspace: int = DEFAULT_WORKSPACE,
    head: HeadCost | None = None,
    expansion_bytes: int | None = DENSE_EXPANSION_BYTES,
) -> list[MemoryTerm]:
    """Every term of the GPU peak as a function of (B, L, n). ``token_budget=None`` is dense attention
    (no slots, no head); ``head``: the retrieval head's cost (default: the draft-free head's,
    :func:`default_head_cost`); ``expansion_bytes``: dense attention's bound on expanded K/V (None: none).

    Activations are per phase, each phase what is live at its fullest point (measured on the CPU against
    the allocator, tests/test_memory_measured.py): a prefill step's MLP (the residual, the fused gate/up
    product, its activation and the gated product) or its attention (the residual, q/k/v, the rotated
    q/k, the output and a rotation temporary; the head's scoring of the layer, or SDPA's additive mask
    and the expanded K/V), with the step's boolean mask held throughout; a decode step's head scoring or
    its sparse gather or a dense step's expansion (within the budget, or the guard's). The RMSNorm's float32
    temporaries stay below the MLP's for every supported shape (intermediate >= hidden).
    """
    N = shape.num_layers
    kv = shape.kv_layer_token_bytes
    size = shape.dtype_bytes
    if token_budget is None:
        head = HeadCost(held=0)
    elif head is None:
        head = default_head_cost(shape)
    offloaded = N - n
    selected = L if token_budget is None else sympy.Min(token_budget, L)
    any_offloaded = sympy.Min(1, N - n)  # 1 while any layer is offloaded (n is at most N)
    hidden, inter = shape.hidden_size, shape.intermediate_size
    q_width, kv_width = shape.num_q_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    tokens = prefill_step_tokens(B, prefill_chunk, L)
    # Held through a prefill step: its boolean mask [B, 1, chunk, L] (built once per step), the prompt's
    # int64 position ids, and the head's state the step replaces.
    step_held = tokens * L + B * L * (8 + head.replaced)
    mlp = tokens * (hidden + 4 * inter) * size
    attention = tokens * (hidden + 4 * q_width + 3 * kv_width) * size + sympy.Max(
        B * L * head.observe, tokens * L * (1 + size) + expansion_bound(shape, B, L, expansion_bytes))
    # Decode steps attend densely over the whole context within the token budget, in dense mode and while
    # the accuracy guard holds (a masked batch expands K/V); a sparse step gathers the selection; the
    # head's scoring and the guard's exact attention of one layer read every key in float32.
    dense_step = expansion_bound(shape, B, L + 1, expansion_bytes) + B * L * (2 + size)  # and the mask's copies
    gather = 2 * B * shape.num_kv_heads * (selected + 1) * shape.head_dim * size
    decode_steps = dense_step if token_budget is None else sympy.Max(
        dense_step, gather, B * L * max(head.score, one_layer_scores_bytes(shape)))
    # The loop's int64 token ids and attention mask [B, L], this step's and the last (a late check may
    # take a step back), and one token's activations (its MLP, or its attention's q/k/v and copies).
    decode = 4 * B * L * 8 + B * (hidden + max(4 * inter, 4 * q_width + 3 * kv_width)) * size + decode_steps
    terms = [
        MemoryTerm("weights", sympy.Integer(shape.weight_bytes), "parameters and buffers, in their dtypes"),
        MemoryTerm("retrieval_head", sympy.Integer(0) if token_budget is None else head.parameters + B * L * head.held,
                   "the retrieval head's caches (the draft-free head: its scoring layers' keys, the prefill prior)"),
        MemoryTerm("kv_resident", n * B * L * kv, "full K/V of the GPU-resident layers"),
        MemoryTerm("slots", sympy.Integer(0) if token_budget is None else offloaded * B * (selected + 2) * kv,
                   "offloaded layers' slot buffers: the selection, a scratch row, the new token"),
        MemoryTerm("ring", offloaded * B * window * kv, "offloaded layers' recent-window rings"),
        MemoryTerm("staging", any_offloaded * B * L * kv, "one offloaded layer's K/V staged for dense steps"),
        MemoryTerm("prefill_activations", step_held + sympy.Max(mlp, attention),
                   "one prefill step: its mask, and its MLP or its attention (mask copies, K/V expanded in bounded groups)"),
        MemoryTerm("decode_activations", decode,
                   "one decode step: the head's scoring or the sparse gather (within the budget: dense attention)"),
        MemoryTerm("logits", B * shape.vocab_size * (size + 4), "last position's logits and their float32 copy"),
        MemoryTerm("workspace", sympy.Integer(workspace), "allocator fragmentation and library workspaces"),
    ]
    return terms


def peak_expression(terms: list[MemoryTerm]) -> sympy.Expr:
    """Peak = everything held + the larger of the prefill and decode activations."""
    held = [t.expr for t in terms if t.name not in ("prefill_activations", "decode_activations")]
    by_name = {t.name: t.expr for t in terms}
    return sympy.Add(*held) + sympy.Max(by_name["prefill_activations"], by_name["decode_activations"])
