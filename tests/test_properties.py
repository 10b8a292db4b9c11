"""The runtime's invariants as properties, over random tiny configs, prompts, budgets and placements.

Each example draws a family from the registry, a depth, a KV-head layout, a left-padded batch of random
prompts and the option under test, then compares two compiled models' greedy tokens (and logits):

* a sparse token budget >= the whole context equals dense attention;
* offloaded layers (any subset) equal resident ones;
* elastic loading equals reloading the whole selection every step;
* a prompt prefilled in chunks equals the prompt at once;
* a batch equals the same prompts run one by one;
* greedy decoding's two-stage argmax (CUDA's) picks argmax's token.

Examples are derandomized (CI sees the same ones every run); host buffers and slots of offloaded layers
are poisoned, so a read of anything unwritten shows.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import specontext
from specontext.testing import TINY_FAMILIES, padded_batch, tiny_model

EXAMPLES = settings(max_examples=5, deadline=None, derandomize=True)
NEW = 6
POISON = 1e4


@st.composite
def cases(draw, max_batch: int = 2, max_length: int = 40):
    family = draw(st.sampled_from(sorted(TINY_FAMILIES)))
    layers = draw(st.integers(1, 3))
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    model = tiny_model(family, seed=draw(st.integers(0, 3)), num_hidden_layers=layers, num_key_value_heads=kv_heads)
    lengths = draw(st.lists(st.integers(3, max_length), min_size=1, max_size=max_batch))
    ids, mask = padded_batch(model.config.vocab_size, lengths, seed=draw(st.integers(0, 100)))
    return model, ids, mask


def run(model, ids, mask, poison: bool = True, **options):
    options.setdefault("progress", False)
    compiled = specontext.compile(model, "1GB", **options)
    if poison:
        compiled.runtime.store.fill_value = POISON
    out = compiled.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                            pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    return compiled, out


def assert_same(out, reference, atol=1e-5):
    assert torch.equal(out.sequences, reference.sequences)
    for a, b in zip(out.logits, reference.logits):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


@EXAMPLES
@given(cases(), st.integers(0, 8), st.integers(0, 6))
def test_a_budget_covering_the_context_equals_dense(case, extra, sinks):
    model, ids, mask = case
    budget = ids.shape[1] + NEW + extra  # >= every step's context
    _, dense = run(model, ids, mask, token_budget=None)
    compiled, sparse = run(model, ids, mask, token_budget=budget, sink_tokens=sinks)
    assert_same(sparse, dense)


@EXAMPLES
@given(cases(), st.data())
def test_offloaded_layers_equal_resident_ones(case, data):
    model, ids, mask = case
    layers = model.config.num_hidden_layers
    offload = data.draw(st.lists(st.integers(0, layers - 1), min_size=1, unique=True), label="offload")
    sparse = dict(token_budget=data.draw(st.integers(4, 24), label="token_budget"),
                  local_window=data.draw(st.integers(0, 6), label="local_window"))
    _, resident = run(model, ids, mask, offload="none", **sparse)
    compiled, offloaded = run(model, ids, mask, offload=offload, **sparse)
    assert compiled.runtime.store.offloaded == frozenset(offload)
    assert_same(offloaded, resident)


@EXAMPLES
@given(cases(), st.integers(4, 24))
def test_elastic_loading_equals_full_reload(case, token_budget):
    model, ids, mask = case
    full_compiled, full = run(model, ids, mask, offload="all", elastic=False, token_budget=token_budget, local_window=2)
    compiled, elastic = run(model, ids, mask, offload="all", elastic=True, token_budget=token_budget, local_window=2)
    assert_same(elastic, full)
    assert compiled.stats["h2d_bytes"] <= full_compiled.stats["h2d_bytes"]
    assert compiled.stats["h2d_bytes_full_reload"] == full_compiled.stats["h2d_bytes_full_reload"]


@EXAMPLES
@given(cases(max_length=70), st.integers(1, 3), st.sampled_from([None, 8, 16]))
def test_prefill_in_chunks_equals_prefill_at_once(case, rows_per_step, token_budget):
    """Steps of 16 tokens per row (the smallest), or 32, 48 over one row: prompts up to 70 tokens take up to 5."""
    model, ids, mask = case
    _, whole = run(model, ids, mask, token_budget=token_budget)
    _, chunked = run(model, ids, mask, token_budget=token_budget, prefill_chunk=16 * rows_per_step)
    assert_same(chunked, whole, atol=1e-4)


@EXAMPLES
@given(cases(max_batch=3), st.sampled_from([None, 8, 16]), st.sampled_from(["none", "all"]))
def test_a_batch_equals_its_prompts_one_by_one(case, token_budget, offload):
    model, ids, mask = case
    compiled, batch = run(model, ids, mask, token_budget=token_budget, offload=offload)
    for row in range(ids.shape[0]):
        keep = mask[row].bool()
        alone = compiled.generate(ids[row : row + 1, keep], max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                  pad_token_id=0, return_dict_in_generate=True, output_logits=True)
        assert torch.equal(batch.sequences[row, ids.shape[1]:], alone.sequences[0, int(keep.sum()):]), row
        for a, b in zip(batch.logits, alone.logits):
            torch.testing.assert_close(a[row], b[0], atol=1e-4, rtol=1e-4)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.integers(1, 3), st.sampled_from([256 * 8, 256 * 9, 1187 * 8, 128256, 32001]), st.integers(1, 4),
       st.booleans(), st.integers(0, 2 ** 16))
def test_two_stage_greedy_equals_argmax(batch, vocab, levels, nan, seed):
    """The two-stage argmax that CUDA greedy decoding uses picks argmax's token, the first of equal
    maxima included (few distinct levels: many ties), and a NaN where argmax picks one; a vocabulary that
    no chunk length divides (32001) takes argmax itself. Run on the CPU: CUDA's max and argmax break ties
    and treat NaN by the same rule."""
    from specontext_compiler.runtime.sampling import greedy_tokens

    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (batch, vocab), generator=g).float()
    if nan:
        scores[0, int(torch.randint(0, vocab, (1,), generator=g))] = float("nan")
    assert torch.equal(greedy_tokens(scores, two_stage=True), torch.argmax(scores, dim=-1))


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
