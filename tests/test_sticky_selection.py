"""Sticky selection (``sticky_margin``): held tokens get a score bonus before the top-k.

The rule against a reference written from its definition (hypothesis), the held mask against a set
reference, margin 0 against today's selection, and the runtime: it applies only with offloaded layers and
elastic loading, the fixed-shape step follows it as the eager one does (tests/test_cuda_graph_decode.py),
and it loads less on a workload where near-ties change the selection.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import specontext
from specontext_compiler.retrieval.selection import held_positions, select_tokens, sink_positions
from specontext.testing import padded_batch, tiny_model

GENERATE = dict(max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0)


@st.composite
def selection_cases(draw):
    batch, heads = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    positions = draw(st.integers(4, 40))
    sinks, window = draw(st.integers(0, 3)), draw(st.integers(0, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    key_valid = torch.ones(batch, positions, dtype=torch.bool)
    pad = draw(st.integers(0, positions - 2))  # left padding on the first row
    key_valid[0, :pad] = False
    budget = draw(st.integers(1, int(key_valid.sum(-1).min())))  # never past the valid tokens
    # Scores and margin on a grid of quarters: exact in float32, and ties are common (the rule must hold
    # whichever tied token the top-k keeps).
    scores = torch.randint(0, 17, (batch, heads, positions), generator=g).float() / 4
    held = torch.rand(batch, heads, positions, generator=g) < draw(st.floats(0.0, 1.0))
    margin = draw(st.integers(0, 16)) / 4
    return scores, key_valid, budget, sinks, window, held, margin


@settings(max_examples=200, deadline=None)
@given(selection_cases())
def test_a_held_token_is_dropped_only_for_one_better_by_more_than_the_margin(case):
    scores, key_valid, budget, sinks, window, held, margin = case
    plain = select_tokens(scores, key_valid, budget, sinks, window)
    sticky = select_tokens(scores, key_valid, budget, sinks, window, held=held, margin=margin)
    assert sticky.shape == plain.shape
    assert torch.equal(sticky, sticky.sort(-1).values)
    positions = scores.shape[-1]
    sink = sink_positions(key_valid, sinks)
    forced = sink | (torch.arange(positions) >= positions - window)
    for row in range(scores.shape[0]):
        for head in range(scores.shape[1]):
            chosen, chosen_plain = set(sticky[row, head].tolist()), set(plain[row, head].tolist())
            assert len(chosen) == sticky.shape[-1]  # no position twice
            # Sinks and window: the same as without stickiness (a budget below the sinks keeps any of them:
            # they tie).
            if budget >= int(sink[row].sum()):
                assert {p for p in chosen if forced[row, p]} == {p for p in chosen_plain if forced[row, p]}
            else:
                assert all(sink[row, p] for p in chosen)
            candidates = [p for p in range(positions) if key_valid[row, p] and not forced[row, p]]
            picked = [p for p in candidates if p in chosen]
            assert len(picked) == sum(p in chosen_plain for p in candidates)
            if not picked:
                continue
            s = scores[row, head].tolist()
            kth = sorted((s[p] for p in candidates), reverse=True)[len(picked) - 1]  # the plain top-k's last
            for p in picked:  # in the plain top-k (up to ties), or held and within the margin of it
                assert s[p] >= kth or (held[row, head, p] and s[p] >= kth - margin), (p, s[p], kth)
            for dropped in (p for p in candidates if p not in chosen and held[row, head, p]):
                for p in picked:  # every token kept in its place beats it by the margin, or is held itself
                    assert s[p] + margin * bool(held[row, head, p]) >= s[dropped] + margin


@settings(max_examples=60, deadline=None)
@given(selection_cases())
def test_margin_zero_is_todays_selection(case):
    scores, key_valid, budget, sinks, window, held, _ = case
    assert torch.equal(select_tokens(scores, key_valid, budget, sinks, window, held=held, margin=0.0),
                       select_tokens(scores, key_valid, budget, sinks, window))


def test_select_tokens_refuses_a_negative_margin():
    scores, valid = torch.zeros(1, 1, 8), torch.ones(1, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="sticky_margin must be a finite float >= 0.0 .*; got -1.0"):
        select_tokens(scores, valid, 4, 0, 0, held=torch.ones(1, 1, 8, dtype=torch.bool), margin=-1.0)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 12), st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_held_positions_is_the_slot_maps_set(batch, heads, slots, positions, seed):
    g = torch.Generator().manual_seed(seed)
    # Empty slots (-1) and positions the step does not cover (>= positions) count as not held.
    mapping = torch.randint(-1, positions + 3, (batch, heads, slots), generator=g)
    out = torch.ones(batch, heads, positions + 1, dtype=torch.bool)  # stale contents: must be cleared
    for held in (held_positions(mapping, positions), held_positions(mapping, positions, out=out)):
        assert held.shape == (batch, heads, positions)
        for row in range(batch):
            for head in range(heads):
                expected = {p for p in mapping[row, head].tolist() if 0 <= p < positions}
                assert set(held[row, head].nonzero().flatten().tolist()) == expected
    assert out.data_ptr() == held_positions(mapping, positions, out=out).data_ptr()  # written in place


def test_held_positions_refuses_a_buffer_of_another_shape():
    with pytest.raises(ValueError, match=r"out must be bool \(1, 2, 9\); got torch.bool \(1, 2, 8\)"):
        held_positions(torch.zeros(1, 2, 3, dtype=torch.long), 8, out=torch.zeros(1, 2, 8, dtype=torch.bool))


# -- the runtime ------------------------------------------------------------------------------------------
def run(margin: float, **options):
    compiled = specontext.compile(tiny_model("llama"), "1GB", token_budget=16, local_window=4, progress=False,
                                  sticky_margin=margin, **options)
    ids, mask = padded_batch(96, [40, 27], seed=4)
    tokens = compiled.generate(ids, attention_mask=mask, **GENERATE)
    return tokens, compiled.stats, compiled


def test_sticky_selection_loads_less_on_offloaded_layers():
    """Random weights change most of the selection every step on near-ties (overlap ~0.6 here): a margin keeps
    held tokens through them, so fewer rows cross to the GPU."""
    _, plain, _ = run(0.0, offload="all")
    moved = {}
    for margin in (0.01, 0.1):
        _, stats, compiled = run(margin, offload="all")
        assert compiled.runtime.sparse.sticky_margin == margin
        moved[margin] = stats["h2d_bytes"]
        assert stats["selection_overlap"] > plain["selection_overlap"]
        assert stats["h2d_bytes_full_reload"] == plain["h2d_bytes_full_reload"]  # the same selection size
    assert 0 < moved[0.1] <= moved[0.01] < plain["h2d_bytes"]


def test_margin_zero_gives_todays_tokens_and_transfers(monkeypatch):
    tokens, stats, _ = run(0.0, offload="all")
    # today's path: no held mask at all, whatever the margin says
    from specontext_compiler.runtime import attention_runtime
    monkeypatch.setattr(attention_runtime, "sticky_held", lambda *args, **kwargs: None)
    compiled = specontext.compile(tiny_model("llama"), "1GB", token_budget=16, local_window=4, progress=False,
                                  offload="all")
    assert compiled.config.sticky_margin == 0.0  # off by default
    ids, mask = padded_batch(96, [40, 27], seed=4)
    assert torch.equal(compiled.generate(ids, attention_mask=mask, **GENERATE), tokens)
    for counter in ("h2d_bytes", "h2d_bytes_full_reload", "selection_overlap"):
        assert compiled.stats[counter] == stats[counter]


@pytest.mark.parametrize("options", [dict(offload="none"), dict(offload="all", elastic=False)])
def test_nothing_is_held_without_offloaded_layers_or_elastic_loading(options):
    """Resident layers hold no slots, and full reloads load everything anyway: the margin changes nothing."""
    plain, plain_stats, _ = run(0.0, **options)
    sticky, sticky_stats, _ = run(1.0, **options)
    assert torch.equal(sticky, plain)
    assert sticky_stats["h2d_bytes"] == plain_stats["h2d_bytes"]


def test_a_margin_changes_the_selection_where_layers_are_offloaded():
    """The counterpart of the test above: the same margin on offloaded layers does change what is selected
    (so that test can fail)."""
    _, plain, _ = run(0.0, offload="all")
    _, sticky, _ = run(1.0, offload="all")
    assert sticky["selection_overlap"] > plain["selection_overlap"]
