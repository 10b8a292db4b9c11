"""``torch.compile(model, backend="specontext")``: speculative-context sparsity inside Dynamo's graphs.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so the name works in a
fresh process without importing specontext; :func:`register` (called when specontext is imported)
adds it otherwise, and neither path registers it twice.

What the backend does with each FX graph Dynamo hands it: every ``scaled_dot_product_attention`` call
becomes one ``specontext::dynamo_attention`` op (opaque to Inductor), and the rest of the graph goes to
Inductor. The op attends densely while the keys fit the token budget (prefill, short contexts) and,
for a one-token decode step over more keys than that, over sinks + the recent window + the top-k past
tokens per KV group (``token_budget`` in all), ranked by the step's own query in that layer.

What it does not do, compared with :func:`specontext.compile`: the KV cache stays in the model's own HF
cache object, so there is no offload, no elastic loading and no prefetch; there is no cross-layer
retrieval head (each layer ranks with its own query, which reads every key: the selection matches
the sparse semantics but does not save the bandwidth the compiled runtime saves); no memory plan.
Options: ``torch.compile(model, backend="specontext", options={"token_budget": 2048, "sink_tokens":
4, "local_window": 64})``.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .retrieval.base import group_probabilities
from .retrieval.selection import select_tokens
from .runtime.attention_runtime import last_query_keys, sparse_decode_attention

logger = logging.getLogger(__name__)

NAME = "specontext"
DEFAULT_OPTIONS = {"token_budget": 2048, "sink_tokens": 4, "local_window": 64}


@torch.library.custom_op("specontext::dynamo_attention", mutates_args=())
def dynamo_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool,
    scale: float | None, enable_gqa: bool, token_budget: int, sink_tokens: int, local_window: int,
) -> torch.Tensor:
    """SDPA's arguments (q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D]) plus the sparse settings."""
    # Contiguous, as the fake implementation says (SDPA's own output may come back transposed).
    return _attention(q, k, v, attn_mask, is_causal, scale, enable_gqa, token_budget, sink_tokens,
                      local_window).contiguous()


def _attention(q, k, v, attn_mask, is_causal, scale, enable_gqa, token_budget, sink_tokens, local_window):
    batch, _, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if q_len != 1 or kv_len <= token_budget:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=enable_gqa)
    scale = dim ** -0.5 if scale is None else scale
    key_valid = torch.ones(batch, kv_len, dtype=torch.bool, device=q.device)
    if attn_mask is not None:
        key_valid = last_query_keys(attn_mask.expand(batch, -1, 1, kv_len))
    past = kv_len - 1  # the newest key is the step's own token: always attended
    scores = group_probabilities(q[:, :, 0], k[:, :, :past], scale, key_valid[:, :past])
    indices = select_tokens(scores, key_valid[:, :past], token_budget - 1, sink_tokens, local_window)
    positions = torch.cat([indices, indices.new_full((batch, kv_heads, 1), past)], dim=-1)
    valid = key_valid[:, None, :].expand(batch, kv_heads, kv_len).gather(2, positions)
    return sparse_decode_attention(q, k, v, positions, valid, scale)  # the runtime's torch path


@dynamo_attention.register_fake
def _(q, k, v, attn_mask, is_causal, scale, enable_gqa, token_budget, sink_tokens, local_window):
    return q.new_empty(*q.shape[:3], v.shape[-1])


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, *settings = inputs
    ctx.save_for_backward(q, k, v)
    ctx.attn_mask, ctx.settings = attn_mask, settings


def _backward(ctx, grad):
    # Recompute with autograd on (the selection is a constant of the step; gather and SDPA differentiate).
    q, k, v = ctx.saved_tensors
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        out = _attention(*inputs, ctx.attn_mask, *ctx.settings)
        grads = torch.autograd.grad(out, inputs, grad)
    return (*grads, None, None, None, None, None, None, None)


dynamo_attention.register_autograd(_backward, setup_context=_setup_context)


_SDPA = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention)


def rewrite_attention(gm: torch.fx.GraphModule, options: dict) -> int:
    """Replace every SDPA call of ``gm`` with ``specontext::dynamo_attention``; returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _SDPA:
            continue
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        args = dict(zip(names, node.args))
        args.update(node.kwargs)
        if args.get("dropout_p", 0.0):
            continue  # training-time dropout: leave SDPA alone
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.specontext.dynamo_attention.default, (
                args["query"], args["key"], args["value"], args.get("attn_mask"), bool(args.get("is_causal", False)),
                args.get("scale"), bool(args.get("enable_gqa", False)), options["token_budget"],
                options["sink_tokens"], options["local_window"],
            ))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    gm.graph.lint()
    gm.recompile()
    return count


def _check_options(options: dict | None) -> dict:
    merged = dict(DEFAULT_OPTIONS)
    for key, value in (options or {}).items():
        if key == "tensor_parallel":  # the backend rewrites attention in the caller's graphs; it does not shard
            raise ValueError("option 'tensor_parallel' is not one of backend 'specontext''s: it rewrites attention in "
                             "the graphs Dynamo hands it and shards nothing; for tensor parallelism use "
                             "specontext.compile(model, budget, tensor_parallel=N) under torchrun; accepted: "
                             f"{', '.join(DEFAULT_OPTIONS)}")
        if key not in DEFAULT_OPTIONS:
            raise ValueError(f"unknown option {key!r} for backend 'specontext'; accepted: {', '.join(DEFAULT_OPTIONS)}")
        minimum = 1 if key == "token_budget" else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"option {key}={value!r} must be an int >= {minimum}")
        merged[key] = value
    return merged


def specontext_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, **_):
    """The Dynamo backend: SDPA calls -> ``specontext::dynamo_attention``, then Inductor."""
    settings = _check_options(options)
    count = rewrite_attention(gm, settings)
    logger.info("backend 'specontext': %d attention calls rewritten (token budget %d)", count, settings["token_budget"])
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def register() -> None:
    """Make ``backend="specontext"`` known to Dynamo in this process (no-op if it already is)."""
    from torch._dynamo.backends import registry

    # Registered already, or known through the entry point (Dynamo registers that itself when it loads it;
    # registering here too would be a duplicate: loading the entry point imports this package).
    if NAME in registry._COMPILER_FNS or registry._BACKENDS.get(NAME) is not None:
        return
    registry.register_backend(compiler_fn=specontext_backend, name=NAME)

