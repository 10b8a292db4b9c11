"""Sparse attention: the reference gather path, the selection rule, the passes, and dense equivalence."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import specontext
from specontext_compiler.ops import is_attention_node, is_retrieve_node
from specontext_compiler.passes import insert_retrieval_head, run_passes, sparsify_attention
from specontext_compiler.passes.annotate_attention import annotate_attention
from specontext_compiler.retrieval.selection import resolve_token_budget, select_tokens, sink_positions
from specontext_compiler.runtime.attention_runtime import sparse_decode_attention
from specontext.testing import TINY_FAMILIES, padded_batch, tiny_model


def reference_sparse(q, keys, values, indices, valid, scale):
    """float64: each query head attends to its KV head's selected positions."""
    batch, q_heads, _, dim = q.shape
    kv_heads = keys.shape[1]
    groups = q_heads // kv_heads
    out = torch.zeros(batch, q_heads, 1, values.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            g = h // groups
            idx = indices[b, g]
            keep = valid[b, g] if valid is not None else torch.ones_like(idx, dtype=torch.bool)
            k = keys[b, g, idx][keep].double()
            v = values[b, g, idx][keep].double()
            p = torch.softmax(q[b, h, 0].double() @ k.T * scale, -1)
            out[b, h, 0] = p @ v
    return out


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    groups=st.sampled_from([1, 4, 7, 8]),
    length=st.integers(2, 40),
    selected=st.integers(1, 40),
    with_padding=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_sparse_decode_attention_matches_float64(batch, kv_heads, groups, length, selected, with_padding, seed):
    g = torch.Generator().manual_seed(seed)
    dim = 8
    selected = min(selected, length)
    q = torch.randn(batch, kv_heads * groups, 1, dim, generator=g)
    keys = torch.randn(batch, kv_heads, length, dim, generator=g)
    values = torch.randn(batch, kv_heads, length, dim, generator=g)
    indices = torch.stack([torch.randperm(length, generator=g)[:selected] for _ in range(batch * kv_heads)]).view(batch, kv_heads, selected)
    valid = None
    if with_padding:
        valid = torch.rand(batch, kv_heads, selected, generator=g) > 0.3
        valid[..., 0] = True  # at least one real token per row
    out = sparse_decode_attention(q, keys, values, indices, valid, dim**-0.5)
    torch.testing.assert_close(out.double(), reference_sparse(q, keys, values, indices, valid, dim**-0.5), rtol=1e-4, atol=1e-5)


def test_select_tokens_forces_sinks_and_window_and_skips_padding():
    scores = torch.zeros(1, 2, 20)
    scores[0, 0, 10] = 5.0
    scores[0, 1, 12] = 5.0
    scores[0, :, 3] = 100.0  # padding must lose whatever its score
    valid = torch.ones(1, 20, dtype=torch.bool)
    valid[0, :4] = False  # left padding
    picked = select_tokens(scores, valid, budget=6, sink_tokens=2, local_window=3)
    assert picked.shape == (1, 2, 6)
    assert picked[0, 0].tolist() == [4, 5, 10, 17, 18, 19]
    assert picked[0, 1].tolist() == [4, 5, 12, 17, 18, 19]
    assert sink_positions(valid, 2)[0].nonzero().flatten().tolist() == [4, 5]


def test_resolve_token_budget():
    assert resolve_token_budget(256, 10_000) == 256
    assert resolve_token_budget(0.1, 1001) == 101


@pytest.fixture(scope="module")
def sparse_graph():
    from specontext_compiler.capture import export_step, shadow_model

    step = export_step(shadow_model(tiny_model("llama", num_hidden_layers=3)), last_only=True)
    annotate_attention(step.graph_module)
    return step.graph_module


def test_insert_retrieval_head_adds_one_node_before_every_layer(sparse_graph):
    gm = sparse_graph
    insert_retrieval_head(gm)
    nodes = list(gm.graph.nodes)
    retrieve = [n for n in nodes if is_retrieve_node(n)]
    assert len(retrieve) == 1
    first_layer = min(nodes.index(n) for n in nodes if is_attention_node(n))
    assert nodes.index(retrieve[0]) < first_layer
    assert all(n.op == "placeholder" for n in nodes[: nodes.index(retrieve[0])])
    with pytest.raises(ValueError, match="already has"):
        insert_retrieval_head(gm)
    sparsify_attention(gm)
    attention = [n for n in gm.graph.nodes if is_attention_node(n)]
    assert len(attention) == 3
    assert all(n.target == torch.ops.specontext.sparse_attention.default and n.args[-1] is retrieve[0] for n in attention)
    assert all("specontext" in n.meta for n in attention)


def test_sparsify_without_retrieve_node_is_refused():
    from specontext_compiler.capture import export_step, shadow_model

    step = export_step(shadow_model(tiny_model("qwen2")), last_only=True)
    with pytest.raises(RuntimeError):
        # ordering constraint: sparsify_attention after insert_retrieval_head
        run_passes(step.graph_module, [annotate_attention, sparsify_attention, insert_retrieval_head])


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_budget_at_least_context_equals_dense(family):
    model = tiny_model(family)
    ids, mask = padded_batch(model.config.vocab_size, [30, 18], seed=5)
    dense = specontext.compile(model, "1GB", progress=False)
    sparse = specontext.compile(model, "1GB", token_budget=30 + 16, progress=False)
    ref = dense.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    out = sparse.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    assert torch.equal(ref, out)


def test_small_budget_keeps_sinks_then_newest():
    scores = torch.rand(1, 1, 30)
    valid = torch.ones(1, 30, dtype=torch.bool)
    picked = select_tokens(scores, valid, budget=5, sink_tokens=2, local_window=10)
    assert picked[0, 0].tolist() == [0, 1, 27, 28, 29]


def test_sparse_budget_limits_attended_tokens():
    model = tiny_model("qwen3")
    ids, mask = padded_batch(model.config.vocab_size, [60, 41], seed=7)
    sparse = specontext.compile(model, "1GB", token_budget=20, sink_tokens=2, local_window=4, progress=False)
    out = sparse.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 66)
    assert sparse.runtime.attended_tokens[1:] == [20] * 5  # every decode step read 20 tokens per head


def test_replay_teacher_forcing_reproduces_dense_generation():
    model = tiny_model("llama")
    dense = specontext.compile(model, "1GB", progress=False)
    ids = torch.randint(3, 96, (2, 30), generator=torch.Generator().manual_seed(3))
    out = dense.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, eos_token_id=None)
    forced = dense.replay(ids, out[:, 30:])
    assert forced.shape == (2, 8, 96)
    assert torch.equal(forced.argmax(-1), out[:, 30:])
    # a sparse model replays with its selection: attended tokens per decode step are the budget
    sparse = specontext.compile(model, "1GB", token_budget=16, sink_tokens=2, local_window=4, progress=False)
    sparse.replay(ids, out[:, 30:])
    assert sparse.runtime.attended_tokens[-7:] == [16] * 7
