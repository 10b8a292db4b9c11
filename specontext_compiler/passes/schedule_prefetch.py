"""``schedule_prefetch``: a ``specontext::prefetch`` and a ``specontext::wait`` per sparse layer.

The paper's point 2: the step's indices exist before layer 0 runs, so every layer's selected KV can be
in flight while earlier layers compute. Each sparse layer gets ``issued = prefetch(indices, layer)``,
``ready = wait(issued, layer)`` and ``sparse_attention(..., indices, ready)``: data edges, so dead-code
elimination, ``torch.export`` and AOTAutograd keep the pair and its order (ops/ explains why). The pass
places each prefetch as *early* as its input allows (right after the indices are produced, in layer
order, so the side stream loads layer 0 first) and each wait as *late* as possible (right before its
layer's attention), then checks the wiring and that the node order is a topological order.

Every sparse layer gets the pair, resident or offloaded: the runtime decides per step what a prefetch
moves (nothing for resident layers), so layers can migrate between tiers without recompiling.
"""

from __future__ import annotations

import networkx as nx
import torch
from torch.fx.passes.infra.pass_base import PassResult

from ..ops import is_prefetch_node, is_wait_node
from .fake_value import record_fake_value


def _sparse_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.specontext.sparse_attention.default]


def dependency_graph(gm: torch.fx.GraphModule) -> nx.DiGraph:
    """The graph's nodes and data edges (input -> user)."""
    dag = nx.DiGraph()
    for node in gm.graph.nodes:
        dag.add_node(node)
        for source in node.all_input_nodes:
            dag.add_edge(source, node)
    return dag


def check_schedule(gm: torch.fx.GraphModule) -> None:
    """Raise if a sparse layer lacks its prefetch -> wait -> attention chain or the node order breaks a
    dependency."""
    dag = dependency_graph(gm)
    if not nx.is_directed_acyclic_graph(dag):
        raise ValueError("prefetch schedule has a cycle")
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    late = [(a.name, b.name) for a, b in dag.edges if order[a] >= order[b]]
    if late:
        raise ValueError(f"nodes run before what they depend on: {late[:5]}")
    for node in _sparse_nodes(gm):
        layer = node.meta["specontext"].layer
        ready = node.args[9] if len(node.args) > 9 else node.kwargs.get("ready")
        issued = ready.args[0] if isinstance(ready, torch.fx.Node) and is_wait_node(ready) else None
        if not (issued is not None and ready.args[1] == layer and is_prefetch_node(issued)
                and issued.args[1] == layer and issued.args[0] is node.args[8]):
            raise ValueError(f"sparse layer {layer} has no prefetch/wait pair feeding its attention")


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
            anchor = issued = gm.graph.call_function(torch.ops.specontext.prefetch.default, (indices, layer))
        # As late as possible: immediately before the layer's attention, which takes its output.
        with gm.graph.inserting_before(node):
            ready = gm.graph.call_function(torch.ops.specontext.wait.default, (issued, layer))
        node.args = (*node.args[:9], ready)
        for token in (issued, ready):  # the empty tensor each op returns
            record_fake_value(token, lambda selection: selection.new_empty(0), indices)
    check_schedule(gm)
    gm.recompile()
    return PassResult(gm, True)
