"""``sparsify_attention``: ``specontext::attention`` -> ``specontext::sparse_attention(..., indices)``.

Every layer's attention node gets the step's one selection (the ``specontext::retrieve`` output) as
its last argument; the annotations of ``annotate_attention`` move to the new node.
"""

from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_base import PassResult

from .insert_retrieval_head import retrieve_node


def sparsify_attention(gm: torch.fx.GraphModule) -> PassResult:
    indices = retrieve_node(gm)
    dense = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.specontext.attention.default]
    for node in dense:
        with gm.graph.inserting_after(node):
            sparse = gm.graph.call_function(torch.ops.specontext.sparse_attention.default, (*node.args, indices), node.kwargs)
        sparse.meta.update(node.meta)
        node.replace_all_uses_with(sparse)
        gm.graph.erase_node(node)
    if not dense:
        return PassResult(gm, False)
    gm.recompile()
    return PassResult(gm, True)
