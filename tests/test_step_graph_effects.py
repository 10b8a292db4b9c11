"""The step graph states every effect of a step: the compilers keep each specontext node, and attention
computes from the selection the graph gives it.

prefetch and wait copy data and order streams without returning anything of use; they return an empty
tensor that the next op takes (ops.py), so dead-code elimination, torch.export's save/load and
AOTAutograd see retrieve -> prefetch -> wait -> sparse_attention as data edges.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

import specontext
from specontext_compiler.retrieval.base import RetrievalHead
from specontext.testing import padded_batch, tiny_model

GENERATE = dict(max_new_tokens=10, do_sample=False)


def specontext_nodes(graph: torch.fx.Graph) -> list[str]:
    return sorted(str(node.target) for node in graph.nodes
                  if node.op == "call_function" and str(node.target).startswith("specontext."))


def offloaded_model():
    return specontext.compile(tiny_model("llama", num_hidden_layers=3), "1GB", token_budget=16, offload="all",
                              progress=False)


def test_dead_code_elimination_and_export_round_trip_keep_every_specontext_node(tmp_path):
    compiled = offloaded_model()
    nodes = specontext_nodes(compiled.graph.graph)
    # one retrieve, and per layer a prefetch, a wait and a sparse attention
    assert nodes.count("specontext.retrieve.default") == 1
    for op in ("prefetch", "wait", "sparse_attention"):
        assert nodes.count(f"specontext.{op}.default") == 3
    program = compiled.step.program
    program.graph.eliminate_dead_code()
    assert specontext_nodes(program.graph) == nodes
    assert specontext_nodes(program.module().graph) == nodes  # what the engine runs
    loaded = torch.export.load(specontext.export(compiled, tmp_path / "artifact") / "step.pt2")
    assert specontext_nodes(loaded.graph) == nodes
    loaded.graph.eliminate_dead_code()
    assert specontext_nodes(loaded.graph) == nodes


def test_aot_autograd_forward_graph_keeps_every_specontext_node_and_the_tokens():
    """The fixed-shape step through AOTAutograd (the compile_decode_step path), a backend recording the
    forward graph it is given: every node there, prefetches in layer order before the first attention."""
    compiled = offloaded_model()
    ids, mask = padded_batch(96, [40, 27], seed=4)
    expected = compiled.generate(ids, attention_mask=mask, **GENERATE)  # eager steps
    forward_graphs = []

    def record(gm, example_inputs):
        forward_graphs.append(gm)
        return gm

    step = torch.compile(compiled.engine.step, backend=aot_autograd(fw_compiler=record), dynamic=False)

    def fixed_shape_step(**inputs):
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            return step(**inputs)

    compiled.engine.fixed_shape_step = fixed_shape_step
    compiled.engine.decode_mode = "fixed"
    try:
        tokens = compiled.generate(ids, attention_mask=mask, **GENERATE)
    finally:
        torch._dynamo.reset()
    assert compiled.stats["fixed_shape_steps"] > 0
    assert torch.equal(tokens, expected)
    assert len(forward_graphs) == 1
    graph = forward_graphs[0].graph
    assert specontext_nodes(graph) == specontext_nodes(compiled.graph.graph)
    names = [str(node.target) for node in graph.nodes if node.op == "call_function"]
    first_attention = names.index("specontext.sparse_attention.default")
    assert names[:first_attention].count("specontext.prefetch.default") == 3


class FixedPositions(RetrievalHead):
    """Wants exactly ``positions``: with no sinks and no window, the selection is those positions."""

    name = "fixed_positions"

    def __init__(self, positions):
        self.positions = torch.tensor(positions)

    def score(self, input_ids, attention_mask, past):
        scores = torch.zeros(input_ids.shape[0], 2, past)
        scores[:, :, self.positions] = 1.0
        return scores


POSITIONS = list(range(5, 13))


def first_positions(indices: torch.Tensor) -> torch.Tensor:
    """In place of the retrieval's output: POSITIONS for every row and KV head (dense steps pass through)."""
    if indices.shape[-1] != len(POSITIONS):
        return indices
    return torch.tensor(POSITIONS, device=indices.device).expand_as(indices).contiguous()


def replay(compiled, ids, continuation):
    compiled._check_budget(ids.shape[0], ids.shape[1], ids.shape[1] + continuation.shape[1])  # places the layers
    assert set(compiled.runtime.store.offloaded) == (set() if compiled.config.offload == "none" else {0, 1, 2})
    return compiled.engine.replay(ids, continuation)


@pytest.mark.parametrize("offload", ["none", "all"])
def test_attention_follows_the_selection_the_graph_feeds_it(offload):
    """Replace the retrieval's output in the graph with other positions: every layer's attention (resident:
    gathered rows; offloaded: the slots its prefetch filled) computes from them, giving what a head that
    selects those positions gives, and not what the graph's own retrieval selected."""
    options = dict(token_budget=len(POSITIONS) + 1, sink_tokens=0, local_window=0, offload=offload, progress=False)
    model = tiny_model("llama", num_hidden_layers=3)
    ids = torch.randint(3, 96, (1, 40), generator=torch.Generator().manual_seed(3))
    continuation = torch.randint(3, 96, (1, 4), generator=torch.Generator().manual_seed(4))
    default = specontext.compile(model, "1GB", **options)
    own = replay(default, ids, continuation)
    reference = replay(specontext.compile(model, "1GB", draft=FixedPositions(POSITIONS), **options), ids, continuation)
    edited = specontext.compile(model, "1GB", **options)
    graph = edited.engine.step.graph
    retrieve = next(node for node in graph.nodes if str(node.target) == "specontext.retrieve.default")
    with graph.inserting_after(retrieve):
        fed = graph.call_function(first_positions, (retrieve,))
    retrieve.replace_all_uses_with(fed, delete_user_cb=lambda user: user is not fed)
    edited.engine.step.recompile()
    loads = []
    begin_step = edited.runtime.prefetcher.begin_step
    edited.runtime.prefetcher.begin_step = lambda indices, *args: loads.append(indices.tolist()) or begin_step(indices, *args)
    followed = replay(edited, ids, continuation)
    torch.testing.assert_close(followed, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(followed, own, atol=1e-3)
    if offload == "all":  # one load plan per sparse step, for the positions fed
        assert loads == [[[POSITIONS] * 2]] * 3
