"""``insert_retrieval_head``: one ``specontext::retrieve`` node per step, before any layer runs.

The paper's point 1: the retrieval head scores the context *once per decode step* and every layer
attends to what it picked, so no layer waits on a per-layer selection. The node reads the step's
``input_ids`` and ``attention_mask`` (placeholders of the exported step) and is placed right after
the graph's inputs, so prefetches that depend on its output can start before layer 0.
"""

from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_base import PassResult

from ..ops import is_retrieve_node
from .annotate_attention import attention_infos
from .fake_value import record_fake_value

GRAPH_META_KEY = "specontext_retrieve"


def _placeholder(gm: torch.fx.GraphModule, name: str) -> torch.fx.Node:
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.target == name:
            return node
    raise ValueError(f"the step graph has no {name!r} input: capture the model with specontext first")


def insert_retrieval_head(gm: torch.fx.GraphModule) -> PassResult:
    if any(is_retrieve_node(n) for n in gm.graph.nodes):
        raise ValueError("the graph already has a specontext::retrieve node; one per step is the design")
    infos = attention_infos(gm)
    kv_heads = {info.num_kv_heads for info in infos}
    if len(kv_heads) != 1:
        raise ValueError(f"layers have different KV head counts {sorted(kv_heads)}; one selection cannot serve them all")
    num_kv_heads = kv_heads.pop()
    input_ids = _placeholder(gm, "input_ids")
    attention_mask = _placeholder(gm, "attention_mask")
    # After the last placeholder: the earliest point where both inputs exist and FX keeps inputs first.
    last_input = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last_input):
        node = gm.graph.call_function(torch.ops.specontext.retrieve.default, (input_ids, attention_mask, num_kv_heads))
    record_fake_value(node, lambda ids, mask: torch.ops.specontext.retrieve.default(ids, mask, num_kv_heads),
                      input_ids, attention_mask)
    gm.meta[GRAPH_META_KEY] = node
    gm.recompile()
    return PassResult(gm, True)


def retrieve_node(gm: torch.fx.GraphModule) -> torch.fx.Node:
    nodes = [n for n in gm.graph.nodes if is_retrieve_node(n)]
    if len(nodes) != 1:
        raise ValueError(f"expected one specontext::retrieve node, found {len(nodes)}: run insert_retrieval_head first")
    return nodes[0]
