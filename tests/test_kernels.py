"""Triton kernels in the interpreter (TRITON_INTERPRET=1, set by `make test`) against float64 torch
references: random shapes, odd T and K, GQA ratios 1, 4, 7, 8, outputs poisoned before each call."""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specontext_compiler.kernels import (
    retrieval_scores,
    retrieval_scores_reference,
    retrieval_top_k,
    sparse_decode_attention,
    sparse_decode_attention_reference,
)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels need a GPU or TRITON_INTERPRET=1",
)
POISON = float("nan")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


@st.composite
def attention_case(draw):
    ratio = draw(st.sampled_from([1, 4, 7, 8]))
    kv_heads = draw(st.integers(1, 2))
    return dict(
        batch=draw(st.integers(1, 2)), kv_heads=kv_heads, q_heads=kv_heads * ratio,
        length=draw(st.integers(1, 70)), dim=draw(st.sampled_from([16, 32, 48, 64])),
        dtype=draw(st.sampled_from([torch.float32, torch.float16])), seed=draw(st.integers(0, 2**16)),
        masked=draw(st.booleans()), index_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        splits=draw(st.sampled_from([0, 1, 3])),
    )


@settings(max_examples=25, deadline=None)
@given(attention_case(), st.data())
def test_sparse_decode_attention_matches_float64(case, data):
    g = torch.Generator().manual_seed(case["seed"])
    b, hq, hkv, t, d, dtype = (case[k] for k in ("batch", "q_heads", "kv_heads", "length", "dim", "dtype"))
    selected = data.draw(st.integers(1, t))
    q = torch.randn(b, hq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, t, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, t, d, generator=g).to(dtype)
    indices = torch.stack([torch.stack([torch.randperm(t, generator=g)[:selected] for _ in range(hkv)]) for _ in range(b)])
    valid = None
    if case["masked"]:
        valid = torch.rand(b, hkv, selected, generator=g) > 0.3
        valid[..., 0] = True  # every group attends to something
    out = torch.full((b, hq, d), POISON, dtype=dtype)
    result = sparse_decode_attention(q, k, v, indices.to(case["index_dtype"]), valid=valid, splits=case["splits"], out=out)
    assert result is out and not out.isnan().any()
    ref = sparse_decode_attention_reference(q.double(), k.double(), v.double(), indices, valid=valid)
    assert relative_error(out, ref) < (1e-4 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("ratio", [1, 4, 7, 8])
def test_slot_buffers_without_indices_and_soft_capping(ratio):
    """The runtime's slot buffers: every row, a validity mask (unused slots hold a huge poison value),
    and Gemma 2's logit soft-capping."""
    g = torch.Generator().manual_seed(ratio)
    b, hkv, slots, d = 2, 2, 37, 32
    q = torch.randn(b, hkv * ratio, d, generator=g)
    k = torch.randn(b, hkv, slots, d, generator=g)
    v = torch.randn(b, hkv, slots, d, generator=g)
    valid = torch.rand(b, hkv, slots, generator=g) > 0.4
    valid[..., -1] = True
    k[~valid], v[~valid] = 1e4, 1e4  # what an unloaded slot holds: masked, it must not matter
    for softcap in (0.0, 20.0):
        out = torch.full((b, hkv * ratio, d), POISON)
        sparse_decode_attention(q, k, v, None, valid=valid, softcap=softcap, out=out)
        ref = sparse_decode_attention_reference(q.double(), k.double(), v.double(), None, valid=valid, softcap=softcap)
        assert relative_error(out, ref) < 1e-4


def test_many_splits_merge_in_chunks():
    """More splits than the merge reads at once (16): the merge's running rescale across chunks."""
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(1, 4, 16, generator=g), torch.randn(1, 1, 400, 16, generator=g), torch.randn(1, 1, 400, 16, generator=g)
    indices = torch.randperm(400, generator=g)[:350].view(1, 1, 350)
    out = sparse_decode_attention(q, k, v, indices, splits=21, out=torch.full((1, 4, 16), POISON))
    assert relative_error(out, sparse_decode_attention_reference(q.double(), k.double(), v.double(), indices)) < 1e-4


@pytest.mark.parametrize("splits", [1, 3])
def test_new_token_is_attended_and_stored_by_the_same_launch(splits):
    """A decode step's append + attention in one kernel: the output is attention over the selection and the
    new token, and the new K/V land at ``position`` of the caches, every other row untouched."""
    g = torch.Generator().manual_seed(splits)
    b, hkv, t, d = 2, 2, 80, 32
    q = torch.randn(b, 4 * hkv, d, generator=g)
    k, v = torch.randn(b, hkv, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g)
    new_k, new_v = torch.randn(b, hkv, d, generator=g), torch.randn(b, hkv, d, generator=g)
    position = torch.tensor(60)
    indices = torch.stack([torch.stack([torch.randperm(60, generator=g)[:37] for _ in range(hkv)]) for _ in range(b)])
    valid = torch.rand(b, hkv, 37, generator=g) > 0.3
    expected_k, expected_v = k.clone(), v.clone()
    expected_k[:, :, 60], expected_v[:, :, 60] = new_k, new_v
    with_new = torch.cat([indices, indices.new_full((b, hkv, 1), 60)], -1)
    ref = sparse_decode_attention_reference(q.double(), expected_k.double(), expected_v.double(), with_new,
                                            valid=torch.cat([valid, valid.new_ones(b, hkv, 1)], -1))
    k[:, :, 60], v[:, :, 60] = POISON, POISON  # the row the launch writes: unwritten, it would show
    out = sparse_decode_attention(q, k, v, indices, valid=valid, splits=splits, out=torch.full((b, 4 * hkv, d), POISON),
                                  new_k=new_k, new_v=new_v, position=position)
    assert relative_error(out, ref) < 1e-4
    assert torch.equal(k, expected_k) and torch.equal(v, expected_v)


def test_sparse_decode_attention_reads_strided_caches():
    """The KV store's buffers are views with spare capacity ([B, Hkv, capacity, D] sliced to the length)."""
    g = torch.Generator().manual_seed(1)
    cache_k, cache_v = torch.randn(2, 2, 90, 16, generator=g), torch.randn(2, 2, 90, 16, generator=g)
    k, v = cache_k[:, :, :61], cache_v[:, :, :61]
    q = torch.randn(2, 8, 16, generator=g)
    indices = torch.randint(0, 61, (2, 2, 23), generator=g)
    out = sparse_decode_attention(q, k, v, indices)
    assert relative_error(out, sparse_decode_attention_reference(q.double(), k.double(), v.double(), indices)) < 1e-4


def test_bad_inputs_are_refused_before_launch():
    q, k = torch.randn(1, 4, 16), torch.randn(1, 2, 10, 16)
    with pytest.raises(TypeError, match="int32 or int64"):
        sparse_decode_attention(q, k, k, torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="multiple of Hkv"):
        sparse_decode_attention(torch.randn(1, 3, 16), k, k, None)
    with pytest.raises(ValueError, match="valid must be bool"):
        sparse_decode_attention(q, k, k, None, valid=torch.ones(1, 2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="float32, float16, bfloat16"):
        sparse_decode_attention(q.double(), k.double(), k.double(), None)
    indices, new = torch.zeros(1, 2, 3, dtype=torch.long), torch.randn(1, 2, 16)
    with pytest.raises(ValueError, match="go together"):
        sparse_decode_attention(q, k, k, indices, new_k=new, new_v=new)
    with pytest.raises(ValueError, match="int64 scalar"):
        sparse_decode_attention(q, k, k, indices, new_k=new, new_v=new, position=torch.tensor([3]))
    with pytest.raises(ValueError, match="key_valid must be bool"):
        retrieval_scores(q, k, 0.25, torch.ones(1, 3, dtype=torch.bool))


@settings(max_examples=20, deadline=None)
@given(st.sampled_from([1, 4, 7, 8]), st.integers(1, 2), st.integers(1, 2), st.integers(1, 150),
       st.sampled_from([16, 64]), st.sampled_from([torch.float32, torch.float16]), st.booleans(), st.integers(0, 2**16))
def test_retrieval_scores_match_float64(ratio, kv_heads, batch, length, dim, dtype, masked, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * ratio, dim, generator=g).to(dtype)
    keys = torch.randn(batch, kv_heads, length, dim, generator=g).to(dtype)
    key_valid = None
    if masked:
        key_valid = torch.rand(batch, length, generator=g) > 0.3
        key_valid[:, 0] = True
    out = torch.full((batch, kv_heads, length), POISON)
    retrieval_scores(q, keys, dim ** -0.5, key_valid, out=out)
    ref = retrieval_scores_reference(q.double(), keys.double(), dim ** -0.5, key_valid)
    assert not out.isnan().any()
    assert relative_error(out, ref) < (1e-4 if dtype == torch.float32 else 2e-3)
    torch.testing.assert_close(out.sum(-1).double(), torch.full((batch, kv_heads), float(ratio), dtype=torch.float64),
                               rtol=1e-3, atol=1e-3)  # each group's heads sum to one each


def test_retrieval_top_k_picks_the_highest_scores():
    g = torch.Generator().manual_seed(3)
    q, keys = torch.randn(1, 8, 32, generator=g), torch.randn(1, 2, 200, 32, generator=g)
    top = retrieval_top_k(q, keys, 16, 32 ** -0.5)
    expected = torch.topk(retrieval_scores_reference(q.double(), keys.double(), 32 ** -0.5), 16, dim=-1).indices
    assert torch.equal(top.sort(-1).values, expected.sort(-1).values)


def test_kernels_are_opaque_custom_ops_with_fake_implementations():
    """torch.compile / export see one node per kernel (FakeTensor shapes, no Triton tracing)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k = torch.empty(2, 8, 64), torch.empty(2, 2, 100, 64)
        out = torch.empty(2, 8, 64)
        torch.ops.specontext.sparse_decode_attention(q, k, k, torch.empty(2, 2, 10, dtype=torch.long), None, out,
                                                     0.125, 0.0, 0)
        scores = torch.empty(2, 2, 100)
        torch.ops.specontext.retrieval_scores(q, k, None, scores, 0.125)
    assert out.shape == (2, 8, 64) and scores.shape == (2, 2, 100)


def test_registered_ops_compute_what_the_eager_path_computes():
    """The eager path launches the kernels directly; the registered ops (what a traced graph calls) run
    the same launches through wrap_triton."""
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(1, 8, 32, generator=g), torch.randn(1, 2, 40, 32, generator=g), torch.randn(1, 2, 40, 32, generator=g)
    indices = torch.randint(0, 40, (1, 2, 17), generator=g)
    eager = sparse_decode_attention(q, k, v, indices)
    out = torch.full_like(eager, POISON)
    torch.ops.specontext.sparse_decode_attention(q, k, v, indices, None, out, 32 ** -0.5, 0.0, 0)
    torch.testing.assert_close(out, eager)
    scores = torch.full((1, 2, 40), POISON)
    torch.ops.specontext.retrieval_scores(q, k, None, scores, 0.25)
    torch.testing.assert_close(scores, retrieval_scores(q, k, 0.25))
