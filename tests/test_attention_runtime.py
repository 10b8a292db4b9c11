"""The runtime's dense attention against a float64 reference, on random shapes and masks."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specontext_compiler.runtime.attention_runtime import AttentionRuntime, dense_attention
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
