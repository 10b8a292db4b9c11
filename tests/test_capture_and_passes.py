"""Capture (export with one attention node per layer) and the pass pipeline, each on a tiny graph."""

import pytest
import torch
from torch.fx.passes.infra.pass_base import PassResult
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from specontext_compiler.capture import ATTN_IMPLEMENTATION, export_step, shadow_model
from specontext_compiler.ops import is_attention_node
from specontext_compiler.passes import annotate_attention, attention_infos, run_passes
from specontext.testing import tiny_model


def test_attention_and_mask_functions_registered():
    assert ATTN_IMPLEMENTATION in AttentionInterface._global_mapping
    # without the mask function, transformers would hand padded batches no mask at all
    assert ATTN_IMPLEMENTATION in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping


@pytest.fixture(scope="module")
def exported():
    model = tiny_model("qwen3", num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2)
    return export_step(shadow_model(model), last_only=True)


def test_one_attention_node_per_layer(exported):
    nodes = [n for n in exported.graph_module.graph.nodes if is_attention_node(n)]
    assert [n.args[3] for n in nodes] == [0, 1, 2]
    # no KV cache in the graph: the inputs are the parameters/buffers and the three step inputs
    user_inputs = exported.program.graph_signature.user_inputs
    assert len(user_inputs) == 3


def test_dynamic_batch_and_length(exported):
    from specontext_compiler.runtime.attention_runtime import AttentionRuntime
    from specontext_compiler.runtime.context import activate
    from specontext_compiler.runtime.kv_store import KVStore

    step = exported.program.module()
    runtime = AttentionRuntime(KVStore(3, ["cpu"] * 3, torch.float32))
    for batch, length in ((1, 1), (3, 17)):
        runtime.reset(length, padding_free=True)
        with torch.no_grad(), activate(runtime):
            logits = step(
                input_ids=torch.randint(3, 96, (batch, length)),
                attention_mask=torch.ones(batch, length, dtype=torch.long),
                position_ids=torch.arange(length).expand(batch, length),
            )
        assert logits.shape == (batch, 1, 96)


def test_annotate_attention_records_layout(exported):
    gm = exported.graph_module
    result = annotate_attention(gm)
    assert isinstance(result, PassResult) and result.modified
    infos = attention_infos(gm)
    assert [i.layer for i in infos] == [0, 1, 2]
    assert {(i.num_q_heads, i.num_kv_heads, i.head_dim, i.group_size) for i in infos} == {(6, 2, 16, 3)}


def test_annotate_attention_rejects_graph_without_attention():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no specontext::attention node"):
        annotate_attention(gm)


def test_annotate_attention_rejects_duplicate_layer(exported):
    gm = exported.graph_module
    node = next(n for n in gm.graph.nodes if is_attention_node(n) and n.args[3] == 1)
    args = list(node.args)
    args[3] = 0
    node.args = tuple(args)
    try:
        with pytest.raises(ValueError, match="two attention nodes claim layer 0"):
            annotate_attention(gm)
    finally:
        args[3] = 1
        node.args = tuple(args)


def test_pipeline_runs_in_order_and_checks_graph(exported):
    seen = []

    def after(gm):
        seen.append(len(attention_infos(gm)))
        return PassResult(gm, False)

    result = run_passes(exported.graph_module, [annotate_attention, after])
    assert seen == [3] and result.modified
    with pytest.raises(RuntimeError):
        # the ordering constraint: a pass that reads annotations may not run before annotate_attention
        run_passes(exported.graph_module, [after, annotate_attention])
