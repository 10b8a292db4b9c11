"""``schedule_prefetch``: a ``specontext::prefetch`` and a ``specontext::wait`` per sparse layer.

The paper's point 2: the step's indices exist before layer 0 runs, so every layer's selected KV can be
in flight while earlier layers compute. The pass builds a networkx DAG of the graph (data edges, plus
the ordering edges prefetch(l) -> wait(l) -> sparse_attention(l)), places each prefetch as *early* as
its input allows (right after its indices are produced, in layer order, so the side stream loads
layer 0 first) and each wait as *late* as possible (right before its layer's attention), then checks
that the node order is a topological order of that DAG.

Every sparse layer gets the pair, resident or offloaded: the runtime decides per step what a prefetch
moves (nothing for resident layers), so layers can migrate between tiers without recompiling.
"""

from __future__ import annotations

import networkx as nx
import torch
from torch.fx.passes.infra.pass_base import PassResult

from ..ops import is_prefetch_node, is_wait_node


def _sparse_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.specontext.sparse_attention.default]


def dependency_graph(gm: torch.fx.GraphModule) -> nx.DiGraph:
    """The graph's nodes with data edges (input -> user) and the prefetch/wait ordering edges."""
    dag = nx.DiGraph()
    for node in gm.graph.nodes:
        dag.add_node(node)
        for source in node.all_input_nodes:
            dag.add_edge(source, node)
    prefetches = {n.args[1]: n for n in gm.graph.nodes if is_prefetch_node(n)}
    waits = {n.args[0]: n for n in gm.graph.nodes if is_wait_node(n)}
    for node in _sparse_nodes(gm):
        layer = node.meta["specontext"].layer
        if layer in waits:
            dag.add_edge(waits[layer], node)
            if layer in prefetches:
                dag.add_edge(prefetches[layer], waits[layer])
    return dag


def check_schedule(gm: torch.fx.GraphModule) -> None:
    """Raise if the prefetch schedule is incomplete or the node order breaks a dependency."""
    dag = dependency_graph(gm)
    if not nx.is_directed_acyclic_graph(dag):
        raise ValueError("prefetch schedule has a cycle")
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    late = [(a.name, b.name) for a, b in dag.edges if order[a] >= order[b]]
    if late:
        raise ValueError(f"nodes run before what they depend on: {late[:5]}")
    prefetched = {n.args[1] for n in gm.graph.nodes if is_prefetch_node(n)}
    waited = {n.args[0] for n in gm.graph.nodes if is_wait_node(n)}
    for node in _sparse_nodes(gm):
        layer = node.meta["specontext"].layer
        if layer not in prefetched or layer not in waited:
            raise ValueError(f"sparse layer {layer} has no prefetch/wait pair")


def schedule_prefetch(gm: torch.fx.GraphModule) -> PassResult:
    sparse = sorted(_sparse_nodes(gm), key=lambda n: n.meta["specontext"].layer)
    if not sparse:
        return PassResult(gm, False)
    if any(is_prefetch_node(n) or is_wait_node(n) for n in gm.graph.nodes):
        raise ValueError("the graph already has prefetch/wait nodes")
    indices = {n.args[-1] for n in sparse}
    if len(indices) != 1:
        raise ValueError("sparse layers read different index tensors; prefetch expects one selection per step")
    (indices,) = indices
    # As early as possible: a prefetch's only input is the indices, so right after them, in layer order.
    anchor = indices
    for node in sparse:
        layer = node.meta["specontext"].layer
        with gm.graph.inserting_after(anchor):
            anchor = gm.graph.call_function(torch.ops.specontext.prefetch.default, (indices, layer))
        # As late as possible: immediately before the layer's attention.
        with gm.graph.inserting_before(node):
            gm.graph.call_function(torch.ops.specontext.wait.default, (layer,))
    check_schedule(gm)
    gm.recompile()
    return PassResult(gm, True)
