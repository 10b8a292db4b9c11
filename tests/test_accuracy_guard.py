"""The accuracy guard (runtime/accuracy_guard.py): a head made to miss, and the guard restoring dense tokens."""

import pytest
import torch

import specontext
from specontext_compiler.config import GuardSettings
from specontext_compiler.runtime.accuracy_guard import AccuracyGuard
from specontext_compiler.retrieval import StreamingLLM
from test_cuda_graph_decode import poisoned  # noqa: F401 (a fixture: unwritten positions hold NaN)
from specontext.testing import padded_batch, peaked_llama, tiny_model

GENERATE = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)


class OldestTokens(StreamingLLM):
    """A head that misses on purpose: it ranks the oldest tokens first (recency reversed)."""

    name = "oldest"

    def score(self, input_ids, attention_mask, past):
        return -super().score(input_ids, attention_mask, past)

    def score_static(self, key_valid, input_ids):
        return -self._static_scores


def set_decode_mode(compiled, mode: str) -> None:
    """"eager", "fixed", or "fixed_lagged": fixed shape with the guard's checks read one step late (the
    GPU's default, forced here on the CPU: a miss takes back two steps and the loop redoes the first)."""
    compiled.engine.decode_mode = "fixed" if mode == "fixed_lagged" else mode
    compiled.engine.lag_guard_reads = mode == "fixed_lagged"


def compile_missing(guard, **options):
    # No sinks, no window, 4 of ~40 tokens, the oldest: far from the tokens the peaked attention picks.
    options = {"offload": "none", **options}
    return specontext.compile(peaked_llama(), "1GB", token_budget=5, sink_tokens=0, local_window=0,
                              draft=OldestTokens(), progress=False, guard=guard, **options)


@pytest.mark.parametrize("decode_mode", ["eager", "fixed", "fixed_lagged"])
def test_guard_restores_the_dense_tokens_of_a_head_that_misses(decode_mode, poisoned):
    ids, mask = padded_batch(96, [40, 33], seed=5)
    dense = specontext.compile(peaked_llama(), "1GB", token_budget=None, progress=False)
    expected = dense.generate(ids, attention_mask=mask, **GENERATE)
    unguarded = compile_missing(False)
    set_decode_mode(unguarded, decode_mode)
    assert not torch.equal(unguarded.generate(ids, attention_mask=mask, **GENERATE), expected)  # it does miss
    guarded = compile_missing(GuardSettings(threshold=0.6, hold_steps=0, check_every=1, dense_start=0))
    set_decode_mode(guarded, decode_mode)
    assert torch.equal(guarded.generate(ids, attention_mask=mask, **GENERATE), expected)
    stats = guarded.stats
    steps = stats["steps"]
    assert stats["guard_triggers"] == stats["guard_checks"] == stats["guard_dense_steps"] == steps
    assert stats["guard_max_coverage"] < 0.6
    assert stats["fixed_shape_steps"] == 0  # every fixed-shape step was taken back


def test_guard_holds_dense_then_selects_again():
    ids, mask = padded_batch(96, [40, 33], seed=5)
    guarded = compile_missing(GuardSettings(threshold=0.6, hold_steps=3, check_every=1, dense_start=0))
    guarded.generate(ids, attention_mask=mask, **GENERATE)
    stats = guarded.stats
    # 19 steps: a trigger (its redo) and 3 held steps, then the selection is tried again and misses.
    assert stats["guard_triggers"] == 5 and stats["guard_checks"] == 5
    assert stats["guard_dense_steps"] == 19


@pytest.mark.parametrize("decode_mode", ["eager", "fixed"])
def test_dense_start_gives_dense_tokens_first_then_selects(decode_mode, poisoned):
    """``dense_start=6``: the first 6 decode steps attend densely (the first 7 tokens are dense's: the
    first comes from prefill), then the head that misses selects; threshold 0 never triggers."""
    ids, mask = padded_batch(96, [40, 33], seed=5)
    dense = specontext.compile(peaked_llama(), "1GB", token_budget=None, progress=False)
    expected = dense.generate(ids, attention_mask=mask, **GENERATE)
    started = compile_missing(GuardSettings(threshold=0.0, dense_start=6))
    started.engine.decode_mode = decode_mode
    tokens = started.generate(ids, attention_mask=mask, **GENERATE)
    prompt = ids.shape[1]
    assert torch.equal(tokens[:, : prompt + 7], expected[:, : prompt + 7])
    assert not torch.equal(tokens, expected)
    stats = started.stats
    assert stats["guard_dense_steps"] == 6 and stats["guard_triggers"] == 0
    assert stats["fixed_shape_steps"] == (stats["steps"] - 6 if decode_mode == "fixed" else 0)
    again = started.generate(ids, attention_mask=mask, **GENERATE)  # every sequence starts dense
    assert torch.equal(again, tokens) and started.stats["guard_dense_steps"] == 6
    offloaded = compile_missing(GuardSettings(threshold=0.0, dense_start=6, layer=0), offload=[1])
    offloaded.generate(ids, attention_mask=mask, **GENERATE)  # dense steps would read layer 1 from the host
    assert offloaded.stats["guard_dense_steps"] == 0
    with pytest.raises(ValueError, match="dense_start must be a non-negative int"):
        GuardSettings(dense_start=-1)


@pytest.mark.parametrize("decode_mode", ["eager", "fixed", "fixed_lagged"])
def test_guard_measures_and_reads_one_step_in_n(decode_mode):
    ids, mask = padded_batch(96, [40, 33], seed=5)
    guarded = compile_missing(GuardSettings(threshold=0.6, hold_steps=0, check_every=4, dense_start=0))
    set_decode_mode(guarded, decode_mode)
    tokens = guarded.generate(ids, attention_mask=mask, **GENERATE)
    stats = guarded.stats  # 19 steps: reads after steps 4, 8, 12, 16, each redoing its step densely
    assert stats["guard_checks"] == stats["guard_triggers"] == stats["guard_dense_steps"] == 4
    assert stats["steps"] == 19
    if decode_mode == "fixed_lagged":  # read one step late: the same tokens as reading at once
        set_decode_mode(guarded, "fixed")
        assert torch.equal(guarded.generate(ids, attention_mask=mask, **GENERATE), tokens)
    if decode_mode != "eager":  # summed over the 5 decoders (each trigger ends one); none captures on the CPU
        assert stats["fixed_shape_steps"] == stats["fixed_shape_steps_not_replayed"] == 15
        assert stats["graph_captures"] == 0


def test_guard_keeps_a_selection_that_covers_the_attention():
    """A budget above the context: every step is dense, nothing measured; the oracle at a generous
    budget covers more than a low threshold: no trigger, the sparse tokens stay."""
    ids, mask = padded_batch(96, [40, 33], seed=5)
    oracle = specontext.compile(tiny_model("llama"), "1GB", token_budget=30, selection="oracle", offload="none",
                                progress=False, guard=GuardSettings(threshold=0.9, check_every=1, dense_start=0))
    sparse = specontext.compile(tiny_model("llama"), "1GB", token_budget=30, selection="oracle", offload="none",
                                progress=False, guard=False)
    assert torch.equal(oracle.generate(ids, attention_mask=mask, **GENERATE),
                       sparse.generate(ids, attention_mask=mask, **GENERATE))
    assert oracle.stats["guard_triggers"] == 0 and oracle.stats["guard_checks"] == oracle.stats["steps"]
    assert 0.9 < oracle.stats["guard_min_coverage"] <= oracle.stats["guard_mean_coverage"] <= 1.0


@pytest.mark.parametrize("seed", range(4))
def test_coverage_is_one_minus_the_mass_the_best_selection_of_its_size_holds_and_it_misses(seed):
    g = torch.Generator().manual_seed(seed)
    batch, kv_heads, groups, length, dim, size = 2, 2, 3, 50, 8, 7
    q = torch.randn(batch, kv_heads * groups, 1, dim, generator=g) * 3
    keys = torch.randn(batch, kv_heads, length, dim, generator=g)
    positions = torch.stack([torch.randperm(length, generator=g)[:size] for _ in range(batch * kv_heads)]).view(batch, kv_heads, size)
    guard = AccuracyGuard(GuardSettings(), layer=0)
    guard.measure(q, keys, 0.35, positions, None)
    # Reference, float64: each query head's softmax, summed over its group, as the selection shares it.
    logits = torch.einsum("bhd,btd->bht", q[:, :, 0].double().view(batch * kv_heads, groups, dim),
                          keys.double().view(batch * kv_heads, length, dim)) * 0.35
    mass = logits.softmax(-1).sum(1).view(batch, kv_heads, length)
    best = mass.sort(-1, descending=True).values[..., :size].sum(-1)
    missed = (best - mass.gather(2, positions).sum(-1)) / groups
    torch.testing.assert_close(guard.coverage.double(), 1 - missed.mean(1), rtol=0, atol=1e-5)
    # Attention spread evenly (equal keys): no selection of a given size holds less than the best one.
    guard.coverage = None
    guard.measure(q, keys[:, :, :1].expand(-1, -1, length, -1).contiguous(), 0.35, positions, None)
    torch.testing.assert_close(guard.coverage, torch.ones(batch), rtol=0, atol=1e-5)


def test_guard_replay_redoes_missed_steps():
    ids, _ = padded_batch(96, [40], seed=6)
    continuation = torch.randint(3, 96, (1, 12))
    dense = specontext.compile(peaked_llama(), "1GB", token_budget=None, progress=False)
    guarded = compile_missing(GuardSettings(threshold=0.6, hold_steps=0, check_every=1, dense_start=0))
    torch.testing.assert_close(guarded.replay(ids, continuation), dense.replay(ids, continuation))


def test_guard_is_on_by_default_and_measures_a_resident_full_attention_layer(monkeypatch):
    monkeypatch.setattr("specontext_compiler.config.DEFAULT_GUARD", True)
    compiled = specontext.compile(tiny_model("llama"), "1GB", token_budget=16, offload=[1], progress=False)
    ids, mask = padded_batch(96, [40], seed=5)
    compiled.generate(ids, attention_mask=mask, **GENERATE)
    assert compiled.runtime.guard is not None and compiled.runtime.guard.layer == 0  # layer 1 is offloaded
    assert compiled.stats["guard_checks"] > 0


@pytest.mark.parametrize("guard, error, match", [
    ("yes", TypeError, "guard must be True, False or a GuardSettings"),
    (GuardSettings.__new__(GuardSettings), None, None),
])
def test_bad_guard_options_are_refused(guard, error, match):
    if error is None:
        for bad, message in [(dict(threshold=1.0), "threshold"), (dict(threshold=-0.1), "threshold"),
                             (dict(hold_steps=-1), "hold_steps"), (dict(hold_steps=1.5), "hold_steps"),
                             (dict(layer=-2), "layer"), (dict(check_every=0), "check_every")]:
            with pytest.raises(ValueError, match=message):
                GuardSettings(**bad)
        with pytest.raises(ValueError, match="guard layer 9"):
            specontext.compile(tiny_model("llama"), "1GB", progress=False, guard=GuardSettings(layer=9))
        return
    with pytest.raises(error, match=match):
        specontext.compile(tiny_model("llama"), "1GB", progress=False, guard=guard)


def test_a_check_read_one_step_late_survives_an_out_of_memory_step(monkeypatch):
    """The step after a measured one runs out of GPU memory with the measured step's check still unread:
    the check is read then, its miss takes the measured step back and the loop redoes it densely."""
    from specontext_compiler.runtime import cuda_graph_decode

    ids, mask = padded_batch(96, [40, 33], seed=5)
    expected = specontext.compile(peaked_llama(), "1GB", token_budget=None, progress=False).generate(
        ids, attention_mask=mask, **GENERATE)
    decode, calls = cuda_graph_decode.GraphDecoder.decode, []

    def failing_second_step(self, tokens, position_ids):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return decode(self, tokens, position_ids)

    monkeypatch.setattr(cuda_graph_decode.GraphDecoder, "decode", failing_second_step)
    guarded = compile_missing(GuardSettings(threshold=0.6, hold_steps=0, check_every=1, dense_start=0), offload="auto")
    set_decode_mode(guarded, "fixed_lagged")
    monkeypatch.setattr(guarded.engine.memory, "recover", lambda failure, length: None)  # nothing to re-plan here
    assert torch.equal(guarded.generate(ids, attention_mask=mask, **GENERATE), expected)
    stats = guarded.stats
    assert stats["fixed_shape_abandoned"] and stats["guard_checks"] == stats["guard_triggers"] == stats["steps"]
    assert not guarded.runtime.guard.read_pending


def test_seeded_sampling_draws_the_same_tokens_when_checks_are_read_one_step_late():
    """A step taken back by a check read one step late puts the sampling generator back too."""
    ids, mask = padded_batch(96, [40, 33], seed=5)
    tokens = {}
    for mode in ("fixed", "fixed_lagged"):
        guarded = compile_missing(GuardSettings(threshold=0.6, hold_steps=0, check_every=1, dense_start=0))
        set_decode_mode(guarded, mode)
        torch.manual_seed(0)
        tokens[mode] = guarded.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=True, pad_token_id=0)
        assert guarded.stats["guard_triggers"] > 0
    assert torch.equal(tokens["fixed"], tokens["fixed_lagged"])
