"""The memory model: every GPU memory term of a compiled model as a sympy expression of the batch B,
the context length L and the number n of layers whose KV stays on the GPU.

Each term is named, printable (``str(term)``) and evaluable (``term.bytes(batch, length, resident)``).
The inputs are read off the model or its config (:class:`ModelShape`); the activation terms follow
what the runtime allocates (docs/architecture.md, runtime): a prefill chunk's hidden states, MLP
intermediates, its causal mask and the query-group expansion of K/V in dense attention; a decode
step's sparse gather; the last position's logits. The workspace margin is a constant until it is
measured on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch

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


def memory_terms(
    shape: ModelShape,
    token_budget: int | None = 2048,
    window: int = 65,
    prefill_chunk: int = 2048,
    workspace: int = DEFAULT_WORKSPACE,
    head_key_bytes_per_token: int | None = None,
    head_parameter_bytes: int = 0,
) -> list[MemoryTerm]:
    """Every term of the GPU peak as a function of (B, L, n). ``token_budget=None`` is dense attention
    (no slots); ``head_key_bytes_per_token``: what the retrieval head keeps per token and sequence
    (default: the draft-free head's copy of one layer's keys); ``head_parameter_bytes``: a draft head's
    own weights (the draft-free head has none)."""
    N = shape.num_layers
    kv = shape.kv_layer_token_bytes
    size = shape.dtype_bytes
    head_key = kv // 2 if head_key_bytes_per_token is None else head_key_bytes_per_token
    offloaded = N - n
    selected = L if token_budget is None else sympy.Min(token_budget, L)
    chunk = sympy.Min(prefill_chunk, L)
    any_offloaded = sympy.Min(1, N - n)  # 1 while any layer is offloaded (n is at most N)
    hidden, inter = shape.hidden_size, shape.intermediate_size
    q_width = shape.num_q_heads * shape.head_dim
    terms = [
        MemoryTerm("weights", sympy.Integer(shape.weight_bytes), "parameters and buffers, in their dtypes"),
        MemoryTerm("retrieval_head", sympy.Integer(0) if token_budget is None else head_parameter_bytes + B * L * head_key,
                   "the retrieval head's key cache (the draft-free head: its scoring layers' keys)"),
        MemoryTerm("kv_resident", n * B * L * kv, "full K/V of the GPU-resident layers"),
        MemoryTerm("slots", sympy.Integer(0) if token_budget is None else offloaded * B * (selected + 2) * kv,
                   "offloaded layers' slot buffers: the selection, a scratch row, the new token"),
        MemoryTerm("ring", offloaded * B * window * kv, "offloaded layers' recent-window rings"),
        MemoryTerm("staging", any_offloaded * B * L * kv, "one offloaded layer's K/V staged for dense steps"),
        MemoryTerm(
            "prefill_activations",
            B * chunk * (4 * hidden + 3 * inter + 2 * q_width) * size  # residual, norm, q/attn out; MLP gate/up/act
            + B * chunk * L * (1 + size)  # the chunk's boolean causal mask, and SDPA's additive copy of it
            + 2 * B * shape.num_q_heads * L * shape.head_dim * size,  # K/V expanded to the query heads
            "one prefill chunk",
        ),
        MemoryTerm("decode_activations", B * (4 * hidden + 3 * inter + 2 * q_width) * size
                   + 2 * B * shape.num_q_heads * (selected + 1) * shape.head_dim * size, "one decode step"),
        MemoryTerm("logits", B * shape.vocab_size * (size + 4), "last position's logits and their float32 copy"),
        MemoryTerm("workspace", sympy.Integer(workspace), "allocator fragmentation and library workspaces"),
    ]
    return terms


def peak_expression(terms: list[MemoryTerm]) -> sympy.Expr:
    """Peak = everything held + the larger of the prefill and decode activations."""
    held = [t.expr for t in terms if t.name not in ("prefill_activations", "decode_activations")]
    by_name = {t.name: t.expr for t in terms}
    return sympy.Add(*held) + sympy.Max(by_name["prefill_activations"], by_name["decode_activations"])
