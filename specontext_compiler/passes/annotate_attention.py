"""``annotate_attention``: find the attention nodes and record what later passes need to know.

Each ``specontext::attention`` node gets ``node.meta["specontext"]``, an :class:`AttentionInfo`
with its layer index and head layout, read from the node's arguments and fake-tensor shapes.
The graph module gets ``gm.meta["specontext_attention"]``: the nodes' infos in layer order.
A graph with no attention node, or with two nodes for one layer, is rejected: every later pass
relies on exactly one node per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx.passes.infra.pass_base import PassResult

from ..ops import is_attention_node

META_KEY = "specontext"
GRAPH_META_KEY = "specontext_attention"


@dataclass(frozen=True)
class AttentionInfo:
    """Layout of one attention node."""

    layer: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    value_dim: int
    sliding_window: int = 0  # the layer's attention window in tokens (0: full attention)

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1: MHA, num_q_heads: MQA, in between: GQA)."""
        return self.num_q_heads // self.num_kv_heads


def _shape(node: torch.fx.Node) -> torch.Size:
    value = node.meta.get("val")
    if value is None:
        raise ValueError(f"node {node.name} has no fake value: annotate an exported graph (torch.export)")
    return value.shape


def _argument(node: torch.fx.Node, index: int, name: str):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


def annotate_attention(gm: torch.fx.GraphModule) -> PassResult:
    infos: dict[int, AttentionInfo] = {}
    for node in gm.graph.nodes:
        if not is_attention_node(node):
            continue
        q, k, v, layer = node.args[:4]
        q_shape, k_shape, v_shape = _shape(q), _shape(k), _shape(v)
        info = AttentionInfo(
            layer=int(layer),
            num_q_heads=int(q_shape[1]),
            num_kv_heads=int(k_shape[1]),
            head_dim=int(q_shape[3]),
            value_dim=int(v_shape[3]),
            sliding_window=int(_argument(node, 7, "sliding_window") or 0),
        )
        if info.num_q_heads % info.num_kv_heads:
            raise ValueError(f"layer {info.layer}: {info.num_q_heads} query heads are not a multiple of {info.num_kv_heads} KV heads")
        if info.layer in infos:
            raise ValueError(f"two attention nodes claim layer {info.layer}; expected one per layer")
        infos[info.layer] = info
        node.meta[META_KEY] = info
    if not infos:
        raise ValueError("no specontext::attention node in the graph: capture the model with specontext first")
    layers = sorted(infos)
    if layers != list(range(len(layers))):
        raise ValueError(f"attention layers {layers} are not 0..{len(layers) - 1}")
    gm.meta[GRAPH_META_KEY] = [infos[i] for i in layers]
    return PassResult(gm, True)


def attention_infos(gm: torch.fx.GraphModule) -> list[AttentionInfo]:
    """The per-layer infos recorded by :func:`annotate_attention`."""
    try:
        return gm.meta[GRAPH_META_KEY]
    except KeyError:
        raise ValueError("the graph was not annotated: run the annotate_attention pass first") from None
