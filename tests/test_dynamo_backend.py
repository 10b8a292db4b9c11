"""torch.compile(model, backend="specontext"): registration, dense equality, sparse selection."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import specontext  # noqa: F401  (registers the backend in this process)
from specontext_compiler.dynamo_backend import dynamo_attention, rewrite_attention
from specontext_compiler.retrieval.selection import select_tokens
from specontext.testing import TINY_FAMILIES, tiny_model


def test_the_backend_name_works_in_a_fresh_process_without_importing_specontext():
    code = textwrap.dedent("""
        import sys, torch
        import torch.nn.functional as F
        f = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), backend="specontext")
        q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
        torch.testing.assert_close(f(q, k, v), F.scaled_dot_product_attention(q, k, v))
        assert "specontext_compiler" in sys.modules  # loaded through the torch_dynamo_backends entry point
        import specontext  # importing afterwards must not register the name a second time
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_logits_match_eager_on_short_inputs(family):
    """Dense below the token budget: the compiled model's logits equal eager's (Inductor on the CPU)."""
    torch._dynamo.reset()
    model = tiny_model(family)
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
        compiled = torch.compile(model, backend="specontext", options={"token_budget": 2048})
        torch.testing.assert_close(compiled(ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_decode_past_the_budget_selects_sparsely():
    """A one-token step over more keys than the budget attends to sinks + window + the top-k past tokens
    of its own query (per KV group): equal to that computed by hand in float64, and not to dense."""
    g = torch.Generator().manual_seed(3)
    b, hq, hkv, length, d, budget = 2, 8, 2, 100, 16, 24
    q = torch.randn(b, hq, 1, d, generator=g)
    k, v = torch.randn(b, hkv, length, d, generator=g), torch.randn(b, hkv, length, d, generator=g)
    mask = torch.ones(b, 1, 1, length, dtype=torch.bool)
    mask[1, ..., :10] = False  # a left-padded row
    out = dynamo_attention(q, k, v, mask, False, None, True, budget, 2, 4)
    # by hand: scores = each group's summed attention probabilities of the step's query
    valid = mask[:, 0, 0]
    logits = torch.einsum("bgqd,bgtd->bgqt", q.double().view(b, hkv, hq // hkv, d), k.double()[:, :, :-1]) * d ** -0.5
    logits = logits.masked_fill(~valid[:, None, None, :-1], float("-inf"))
    scores = torch.softmax(logits, -1).sum(2).float()
    picked = select_tokens(scores, valid[:, :-1], budget - 1, 2, 4)
    positions = torch.cat([picked, torch.full((b, hkv, 1), length - 1)], -1)
    keep = torch.zeros(b, hkv, length, dtype=torch.bool).scatter_(2, positions, True) & valid[:, None, :]
    dense_logits = torch.einsum("bgqd,bgtd->bgqt", q.double().view(b, hkv, hq // hkv, d), k.double()) * d ** -0.5
    expected = torch.softmax(dense_logits.masked_fill(~keep[:, :, None, :], float("-inf")), -1) @ v.double()
    torch.testing.assert_close(out.double(), expected.reshape(b, hq, 1, d), atol=1e-5, rtol=1e-5)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert (out - dense).abs().max() > 1e-3  # the selection is visible


def test_compiled_generation_uses_the_sparse_op_and_matches_its_eager_graph():
    """A 40-token prompt with token_budget=16: decode steps go sparse; Inductor's result equals the
    same rewritten graph run eagerly, and every SDPA call was rewritten."""
    torch._dynamo.reset()
    ids = torch.randint(3, 96, (1, 40), generator=torch.Generator().manual_seed(2))
    rewritten = []

    def rewrite_only(gm, example_inputs, **_):
        rewritten.append(rewrite_attention(gm, {"token_budget": 16, "sink_tokens": 4, "local_window": 64}))
        assert not any(n.target is torch._C._nn.scaled_dot_product_attention for n in gm.graph.nodes)
        return gm.forward

    def generate(backend, **options):
        model = tiny_model("llama")  # generate() calls the compiled forward (the HF recipe)
        model.forward = torch.compile(model.forward, backend=backend, **options)
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=6, do_sample=False)

    eager_graph = generate(rewrite_only)
    torch._dynamo.reset()
    inductor = generate("specontext", options={"token_budget": 16})
    dense = tiny_model("llama").generate(ids, max_new_tokens=6, do_sample=False)
    assert rewritten and all(count == 2 for count in rewritten)  # both layers' SDPA calls, every graph
    assert torch.equal(inductor, eager_graph)
    assert dense.shape == inductor.shape


def test_bad_backend_options_are_refused():
    torch._dynamo.reset()
    f = torch.compile(lambda q: F.scaled_dot_product_attention(q, q, q), backend="specontext",
                      options={"token_budgett": 16})
    with pytest.raises(Exception, match="unknown option 'token_budgett'"):
        f(torch.randn(1, 1, 3, 4))
