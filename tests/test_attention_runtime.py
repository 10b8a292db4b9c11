"""The runtime's dense attention against a float64 reference, on random shapes and masks."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specontext_compiler.runtime.attention_runtime import AttentionRuntime, dense_attention, expansion_groups
from specontext_compiler.runtime.context import activate
from specontext_compiler.runtime.kv_store import KVStore


def reference(q, k, v, mask, scale, softcap=0.0):
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    # a fully-masked row (a padding query) has no defined output; callers compare valid rows only
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return probs @ v


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    groups=st.sampled_from([1, 2, 4, 7]),
    q_len=st.integers(1, 6),
    past=st.integers(0, 9),
    pad=st.integers(0, 3),
    softcap=st.sampled_from([0.0, 5.0]),
    seed=st.integers(0, 10_000),
)
def test_dense_attention_matches_float64(batch, kv_heads, groups, q_len, past, pad, softcap, seed):
    g = torch.Generator().manual_seed(seed)
    d = 8
    total = past + q_len
    q = torch.randn(batch, kv_heads * groups, q_len, d, generator=g)
    k = torch.randn(batch, kv_heads, total, d, generator=g)
    v = torch.randn(batch, kv_heads, total, d, generator=g)
    pad = min(pad, total - 1)
    key_ok = torch.ones(batch, total, dtype=torch.bool)
    key_ok[0, :pad] = False  # left padding on the first row
    causal = torch.arange(total)[None, :] <= (torch.arange(q_len)[:, None] + past)
    mask = (causal[None] & key_ok[:, None, :])[:, None]
    out = dense_attention(q, k, v, mask, d**-0.5, softcap)
    expected = reference(q, k, v, mask, d**-0.5, softcap)
    valid = mask.any(-1, keepdim=True).expand_as(expected)
    torch.testing.assert_close(out.double()[valid], expected[valid], rtol=1e-4, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 5),
    kv_heads=st.integers(1, 4),
    groups=st.sampled_from([1, 2, 3, 4]),
    q_len=st.integers(1, 7),
    past=st.integers(0, 12),
    padded=st.booleans(),
    softcap=st.sampled_from([0.0, 5.0]),
    limit_units=st.integers(0, 24),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 10_000),
)
def test_grouped_expansion_equals_the_whole_batch_exactly(batch, kv_heads, groups, q_len, past, padded, softcap,
                                                          limit_units, dtype, seed):
    """K/V expanded a group of rows (or of one row's KV heads) at a time gives every row exactly what the
    whole batch expanded at once gives it, padded or not, at limits from below one KV head's expansion
    to above the batch's. On one thread: the CPU's flash kernel computes a head on a worker thread
    differently from the first thread (1e-7 apart, measured), so with several threads no split of the
    work, the batch's own included, is exact; there the two agree to rounding."""
    g = torch.Generator().manual_seed(seed)
    d = 8
    total = past + q_len
    q = torch.randn(batch, kv_heads * groups, q_len, d, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, total, d, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, total, d, generator=g).to(dtype)
    mask = None  # padding-free: causal over the past (None with q_len == total is SDPA's causal mode, ungrouped)
    if padded:
        key_ok = torch.rand(batch, total, generator=g) > 0.3
        key_ok[:, -1] = True
        causal = torch.arange(total)[None, :] <= (torch.arange(q_len)[:, None] + past)
        mask = (causal[None] & key_ok[:, None, :])[:, None]
    head_bytes = groups * total * 2 * d * k.element_size()  # one KV head of one row, expanded
    limit = limit_units * head_bytes // 2  # half-units: limits between whole heads too
    whole = dense_attention(q, k, v, mask, d**-0.5, softcap, max_expanded_bytes=None)
    grouped = dense_attention(q, k, v, mask, d**-0.5, softcap, max_expanded_bytes=limit)
    torch.testing.assert_close(grouped, whole, rtol=1e-5, atol=1e-6 if dtype == torch.float32 else 1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = dense_attention(q, k, v, mask, d**-0.5, softcap, max_expanded_bytes=None)
        grouped = dense_attention(q, k, v, mask, d**-0.5, softcap, max_expanded_bytes=limit)
    finally:
        torch.set_num_threads(threads)
    if softcap:  # eager matmuls: BLAS blocks a batched product differently from a row's, even on one thread
        torch.testing.assert_close(grouped, whole, rtol=1e-5, atol=1e-6 if dtype == torch.float32 else 1e-2)
    else:  # SDPA computes each (row, head) on its own: bit for bit on one thread
        assert torch.equal(grouped, whole)
    rows, heads = expansion_groups(k, v, groups, limit)
    if groups > 1:  # what one call expands: within the limit, or one KV head of one row
        assert min(rows, batch) * min(heads, kv_heads) * head_bytes <= max(limit, head_bytes)
        assert rows == 1 or heads == kv_heads


def test_expansion_groups_split_rows_then_heads():
    k = torch.empty(6, 8, 1024, 128, dtype=torch.bfloat16)  # one KV head of one row, x4 query heads: 2 MiB
    assert expansion_groups(k, k, 4, 64 * 2**20) == (4, 8)  # rows of 16 MiB: four per call
    assert expansion_groups(k, k, 4, 8 * 2**20) == (1, 4)  # half a row per call
    assert expansion_groups(k, k, 4, 2**20) == (1, 1)  # one KV head, even over the limit
    assert expansion_groups(k, k, 1, 1) == (6, 8)  # no query groups: nothing expanded, one call
    assert expansion_groups(k, k, 4, None) == (6, 8)


def test_runtime_appends_then_attends_over_all_tokens():
    torch.manual_seed(0)
    runtime = AttentionRuntime(KVStore(1, ["cpu"], torch.float32))
    runtime.reset(16, padding_free=True)
    k_all, v_all = torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    q_all = torch.randn(1, 4, 7, 8)
    with activate(runtime):
        first = torch.ops.specontext.attention(q_all[:, :, :4], k_all[:, :, :4], v_all[:, :, :4], 0, None, 0.3, 0.0, 0)
        second = torch.ops.specontext.attention(q_all[:, :, 4:], k_all[:, :, 4:], v_all[:, :, 4:], 0, None, 0.3, 0.0, 0)
    causal = (torch.arange(7)[None, :] <= torch.arange(7)[:, None])[None, None]
    expected = reference(q_all, k_all, v_all, causal, 0.3)
    torch.testing.assert_close(torch.cat([first, second], 2).double(), expected, rtol=1e-4, atol=1e-5)


def test_op_outside_runtime_is_a_clear_error():
    import pytest

    q = torch.randn(1, 1, 1, 4)
    with pytest.raises(RuntimeError, match="outside a SpeContext runtime"):
        torch.ops.specontext.attention(q, q, q, 0, None, 1.0, 0.0, 0)
