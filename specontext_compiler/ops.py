"""The opaque custom ops that captured graphs are made of.

Every attention call of a captured model is one ``specontext::attention`` node. The op is opaque to
``torch.export`` and to the passes: its fake implementation only gives the output shape, and its real
implementation hands the call to the *active runtime* (see :mod:`specontext_compiler.runtime.context`),
which owns the KV cache. That is why the cache never appears in the graph: a node receives the new
tokens' q/k/v, the runtime appends k/v to its store and attends over everything stored so far.

Layouts (the same as ``F.scaled_dot_product_attention``):

* ``q``: [B, Hq, Tq, D] (after RoPE and any q-norm)
* ``k``, ``v``: [B, Hkv, Tq, D], the keys/values of the *new* tokens only
* ``mask``: boolean [B, 1, Tq, Tpast + Tq] (True = attend) built by transformers' mask interface, or None
  for a plain causal mask
* ``scale``: softmax scale; ``softcap``: logit soft-capping (0 = none); ``sliding_window``: the layer's
  attention window in tokens (0 = full attention), already applied in ``mask``
* output: [B, Hq, Tq, Dv]
"""

from __future__ import annotations

import torch

from .runtime.context import active_runtime

LIBRARY = "specontext"


@torch.library.custom_op(f"{LIBRARY}::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: int,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float,
    sliding_window: int,
) -> torch.Tensor:
    """Dense attention of ``q`` over the layer's stored KV plus the new ``k``/``v``."""
    return active_runtime().attention(layer, q, k, v, mask, scale, softcap, sliding_window)


@attention.register_fake
def _attention_fake(q, k, v, layer, mask, scale, softcap, sliding_window):
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])


@torch.library.custom_op(f"{LIBRARY}::retrieve", mutates_args=())
def retrieve(input_ids: torch.Tensor, attention_mask: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """The step's token selection, once for all layers: int64 [B, Hkv, K] positions of past tokens.

    The retrieval head scores every stored token before layer 0 runs. K = 0 means "attend to
    everything" (prefill chunks, and contexts within the token budget).
    """
    return active_runtime().retrieve(input_ids, attention_mask, num_kv_heads)


@retrieve.register_fake
def _retrieve_fake(input_ids, attention_mask, num_kv_heads):
    selected = torch.library.get_ctx().new_dynamic_size()
    return input_ids.new_empty(input_ids.shape[0], num_kv_heads, selected, dtype=torch.long)


@torch.library.custom_op(f"{LIBRARY}::sparse_attention", mutates_args=())
def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: int,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float,
    sliding_window: int,
    indices: torch.Tensor,
    ready: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``q`` over the past tokens at ``indices`` (per KV head) plus the new tokens.

    ``indices`` is the selection attention computes from (an offloaded layer: the one its prefetch
    loaded); ``ready`` is the layer's ``wait`` output, so the graph orders load -> wait -> attention.
    """
    return active_runtime().attention(layer, q, k, v, mask, scale, softcap, sliding_window, indices)


@sparse_attention.register_fake
def _sparse_attention_fake(q, k, v, layer, mask, scale, softcap, sliding_window, indices, ready=None):
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])


ATTENTION_OPS = (torch.ops.specontext.attention.default, torch.ops.specontext.sparse_attention.default)


def is_attention_node(node: torch.fx.Node) -> bool:
    """True for a ``call_function`` node of ``specontext::attention`` or ``specontext::sparse_attention``."""
    return node.op == "call_function" and node.target in ATTENTION_OPS


def is_retrieve_node(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target == torch.ops.specontext.retrieve.default


# prefetch and wait return an empty tensor that the next op takes as input: they have side effects (copies
# into the layer's slots, a stream join) that no output shows, and an op whose output nobody reads is dead
# code to FX, AOTAutograd and Inductor. With the edges retrieve -> prefetch -> wait -> sparse_attention the
# graph states the order the runtime needs, and every compiler keeps it.
@torch.library.custom_op(f"{LIBRARY}::prefetch", mutates_args=())
def prefetch(indices: torch.Tensor, layer: int) -> torch.Tensor:
    """Start moving layer ``layer``'s KV at ``indices`` (the step's selection) into its GPU slots; returns
    the token ``wait`` takes (an empty tensor).

    Asynchronous on a GPU (a side stream); nothing moves for GPU-resident layers and dense steps.
    """
    active_runtime().prefetch(indices, layer)
    return indices.new_empty(0)


@prefetch.register_fake
def _prefetch_fake(indices, layer):
    return indices.new_empty(0)


@torch.library.custom_op(f"{LIBRARY}::wait", mutates_args=())
def wait(issued: torch.Tensor, layer: int) -> torch.Tensor:
    """Layer ``layer``'s sparse attention is next: the compute stream waits for its loads (``issued``:
    the layer's ``prefetch`` output); returns the token its attention takes (an empty tensor)."""
    active_runtime().wait(layer)
    return issued.new_empty(0)


@wait.register_fake
def _wait_fake(issued, layer):
    return issued.new_empty(0)


def is_prefetch_node(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target == torch.ops.specontext.prefetch.default


def is_wait_node(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target == torch.ops.specontext.wait.default
