"""Fixed-shape decode (what a CUDA graph replays) against the eager runtime, on the CPU."""

import pytest
import torch

import specontext
from specontext_compiler.runtime import cuda_graph_decode, step_timer
from specontext_compiler.retrieval.selection import select_tokens
from specontext.testing import TINY_FAMILIES, padded_batch, tiny_model

GENERATE = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)


@pytest.fixture
def poisoned(monkeypatch):
    """When fixed-shape decoding starts, every stored position past the sequence (KV store, host buffers
    of offloaded layers, the head's key cache) holds NaN, and empty slots of offloaded layers hold 1e4
    (finite: attention multiplies masked slots by zero): a read of anything not yet written shows."""
    original = cuda_graph_decode.GraphDecoder.__init__

    def init(self, step, runtime, attention_mask, capacity, use_graph):
        for entry in runtime.store.layers:
            entry.key[:, :, entry.length:] = float("nan")
            entry.value[:, :, entry.length:] = float("nan")
        for cache in getattr(runtime.head, "caches", {}).values():
            cache.reserve_for(capacity)[:, :, cache.length:] = float("nan")
        original(self, step, runtime, attention_mask, capacity, use_graph)
        if self.static.store.offloaded and self.static.started_empty:
            for fast in runtime.store.fast.values():
                fast.slot_key.fill_(1e4)
                fast.slot_value.fill_(1e4)

    monkeypatch.setattr(cuda_graph_decode.GraphDecoder, "__init__", init)


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_fixed_shape_decode_gives_the_eager_tokens(family, poisoned):
    model = tiny_model(family)
    compiled = specontext.compile(model, "1GB", token_budget=16, offload="none", local_window=4, progress=False)
    ids, mask = padded_batch(96, [40, 27], seed=4)
    expected = compiled.generate(ids, attention_mask=mask, **GENERATE)
    assert compiled.stats["fixed_shape_steps"] == 0  # eager is the CPU default
    compiled.engine.decode_mode = "fixed"
    tokens = compiled.generate(ids, attention_mask=mask, **GENERATE)
    assert compiled.stats["fixed_shape_steps"] == 23
    assert torch.equal(tokens, expected)
    assert compiled.stats["attended_tokens_per_step"] <= 16


def test_fixed_shape_decode_of_a_row_shorter_than_its_sinks_gives_the_eager_tokens(poisoned):
    """A row whose prompt has fewer real tokens than the sinks: its first new tokens become sinks as it
    decodes, so the sinks are found at each step there (elsewhere once per sequence)."""
    compiled = specontext.compile(tiny_model("llama"), "1GB", token_budget=16, offload="none", local_window=4,
                                  progress=False)
    ids, mask = padded_batch(96, [40, 2], seed=7)
    expected = compiled.generate(ids, attention_mask=mask, **GENERATE)
    compiled.engine.decode_mode = "fixed"
    assert torch.equal(compiled.generate(ids, attention_mask=mask, **GENERATE), expected)
    assert compiled.stats["fixed_shape_steps"] == 23


@pytest.mark.parametrize("options", [{}, {"lookbehind": 1, "prior_window": 4},
                                     {"combine": "union", "prior_from": 0.5}, {"query": "predicted"}])
def test_fixed_shape_decode_of_the_multi_layer_lookahead_head_gives_the_eager_tokens(poisoned, options):
    """The default head's shape on a deeper model: three scoring layers merged, lookahead 1 (2-layer tiny
    models round the default depths to one layer); and with its other options."""
    from specontext_compiler.retrieval import TargetLayerHead

    model = tiny_model("qwen3", num_hidden_layers=5)
    compiled = specontext.compile(model, "1GB", token_budget=14, offload="none", local_window=4, progress=False,
                                  draft=TargetLayerHead((2, 3, 4), lookahead=1, model=model, **options))
    ids, mask = padded_batch(96, [40, 33], seed=6)
    expected = compiled.generate(ids, attention_mask=mask, **GENERATE)
    compiled.engine.decode_mode = "fixed"
    assert torch.equal(compiled.generate(ids, attention_mask=mask, **GENERATE), expected)
    assert compiled.stats["fixed_shape_steps"] == 23


def test_fixed_shape_decode_streaming_head_and_no_padding(poisoned):
    model = tiny_model("llama")
    compiled = specontext.compile(model, "1GB", token_budget=12, selection="streaming", offload="none", progress=False)
    ids, mask = padded_batch(96, [30, 30], seed=2)
    expected = compiled.generate(ids, attention_mask=mask, **GENERATE)
    compiled.engine.decode_mode = "fixed"
    assert torch.equal(compiled.generate(ids, attention_mask=mask, **GENERATE), expected)
    assert compiled.stats["fixed_shape_steps"] == 23


@pytest.mark.parametrize("family, offload, sticky_margin", [
    ("llama", "all", 0.0), ("llama", [1], 0.0), ("qwen3", "all", 0.0), ("gemma2", [1], 0.0),
    ("llama", "all", 0.01), ("qwen3", [0], 0.01),
])
def test_fixed_shape_decode_of_offloaded_layers_gives_the_eager_tokens(family, offload, sticky_margin, poisoned):
    """Offloaded layers: in-place slot map, elastic loads from host memory and the ring, ring rows moved
    to host memory between steps; a window of 4 (the ring is flushed every 2 steps) over 40 steps. With a
    sticky margin, the held mask comes from the in-place slot map (a buffer the step rewrites)."""
    model = tiny_model(family)
    compiled = specontext.compile(model, "1GB", token_budget=16, offload=offload, local_window=4, progress=False,
                                  sticky_margin=sticky_margin)
    ids, mask = padded_batch(96, [40, 27], seed=4)
    settings = dict(GENERATE, max_new_tokens=40, min_new_tokens=40)
    expected = compiled.generate(ids, attention_mask=mask, **settings)
    eager_stats = dict(compiled.stats)
    compiled.engine.decode_mode = "fixed"
    tokens = compiled.generate(ids, attention_mask=mask, **settings)
    assert compiled.stats["fixed_shape_steps"] == 39
    assert torch.equal(tokens, expected)
    for counter in ("h2d_bytes", "h2d_bytes_full_reload", "selection_overlap"):  # the same transfers
        assert compiled.stats[counter] == pytest.approx(eager_stats[counter]), counter
    assert 0 < compiled.stats["h2d_bytes"] < compiled.stats["h2d_bytes_full_reload"]


@pytest.mark.parametrize("options, why", [
    (dict(token_budget=0.5), "fractional"),
    (dict(token_budget=16, offload="all", elastic=False), "elastic=False"),
    (dict(token_budget=None), "dense"),
    (dict(token_budget=16, selection="quest"), "fixed-shape scorer"),
])
def test_steps_that_cannot_be_fixed_stay_eager(options, why):
    compiled = specontext.compile(tiny_model("llama"), "1GB", progress=False, **{"offload": "none", **options})
    ids, mask = padded_batch(96, [40, 27], seed=4)
    expected = compiled.generate(ids, attention_mask=mask, **GENERATE)
    compiled.engine.decode_mode = "fixed"
    assert torch.equal(compiled.generate(ids, attention_mask=mask, **GENERATE), expected)
    assert compiled.stats["fixed_shape_steps"] == 0
    total = ids.shape[1] + 1
    assert why in cuda_graph_decode.eligible(compiled.runtime, total, total + 23, {})


def test_offloaded_sliding_window_layers_stay_eager():
    """Gemma 2's layer 0 slides over 8 tokens: offloaded, it would read its window, not the selection."""
    compiled = specontext.compile(tiny_model("gemma2"), "1GB", token_budget=16, offload="all", progress=False)
    ids, mask = padded_batch(96, [40, 27], seed=4)
    expected = compiled.generate(ids, attention_mask=mask, **GENERATE)
    compiled.engine.decode_mode = "fixed"
    assert torch.equal(compiled.generate(ids, attention_mask=mask, **GENERATE), expected)
    assert compiled.stats["fixed_shape_steps"] == 0


def test_static_selection_matches_the_eager_selection():
    """Over a longer buffer whose tail is not stored yet, the same positions are picked."""
    torch.manual_seed(0)
    batch, heads, past, capacity = 3, 2, 50, 80
    scores = torch.rand(batch, heads, capacity)
    key_valid = torch.rand(batch, past) > 0.2
    key_valid[:, -8:] = True
    expected = select_tokens(scores[..., :past], key_valid, 20, 4, 6)
    padded = torch.cat([key_valid, torch.zeros(batch, capacity - past, dtype=torch.bool)], -1)
    got = select_tokens(scores, padded, 20, 4, 6, past=torch.tensor(past))
    assert torch.equal(got, expected)


def test_bad_decode_mode_is_refused():
    compiled = specontext.compile(tiny_model("llama"), "1GB", token_budget=16, progress=False)
    compiled.engine.decode_mode = "fast"
    with pytest.raises(ValueError, match="decode_mode='fast'"):
        compiled.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=2)


def test_compile_decode_step_runs_the_fixed_shape_step_through_inductor(poisoned):
    # compile_decode_step=True: the same tokens as the eager runtime, from Inductor's code (on the CPU its
    # C++ backend; on a GPU its Triton kernels, then captured in the CUDA graph: benchmarks/e2e.py checks).
    from torch._dynamo.utils import counters

    model = tiny_model("llama")
    compiled = specontext.compile(model, "1GB", token_budget=16, offload="all", local_window=4, progress=False,
                                  compile_decode_step=True)
    ids, mask = padded_batch(96, [40, 27], seed=4)
    expected = compiled.generate(ids, attention_mask=mask, **GENERATE)
    compiled.engine.decode_mode = "fixed"
    calls = []
    compiled_step = compiled.engine.fixed_shape_step
    compiled.engine.fixed_shape_step = lambda **inputs: calls.append(1) or compiled_step(**inputs)
    counters.clear()
    tokens = compiled.generate(ids, attention_mask=mask, **GENERATE)
    assert len(calls) == compiled.stats["fixed_shape_steps"] == 23
    assert torch.equal(tokens, expected)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]  # the whole step, one graph
    assert compiled.stats["compile_seconds"] > 0
    # Another batch size and another capacity (prompt + new tokens): the compiled step serves them as is.
    ids, mask = padded_batch(96, [44, 31, 38], seed=5)
    compiled.engine.decode_mode = "eager"
    expected = compiled.generate(ids, attention_mask=mask, **{**GENERATE, "max_new_tokens": 17, "min_new_tokens": 17})
    compiled.engine.decode_mode = "fixed"
    counters.clear()
    tokens = compiled.generate(ids, attention_mask=mask, **{**GENERATE, "max_new_tokens": 17, "min_new_tokens": 17})
    assert torch.equal(tokens, expected) and compiled.stats["fixed_shape_steps"] == 16
    assert not counters["frames"]["ok"] and compiled.stats["compile_seconds"] == 0  # nothing recompiled


def test_compile_decode_step_must_be_a_bool():
    with pytest.raises(TypeError, match=r"compile_decode_step must be True, False or None \(None: on CUDA\); got 'yes'"):
        specontext.compile(tiny_model("llama"), "1GB", compile_decode_step="yes")


def test_a_longer_generate_after_a_shorter_one_decodes_at_fixed_shape_throughout():
    # The KV buffers kept from the shorter call hold the new prompt but not its new tokens: the store
    # reallocates for the new reservation, or fixed-shape decode would refuse every step of the call.
    compiled = specontext.compile(tiny_model("llama"), "1GB", token_budget=16, offload="none", local_window=4,
                                  progress=False, guard=False)
    compiled.engine.decode_mode = "fixed"
    ids, mask = padded_batch(96, [40], seed=1)
    for new_tokens in (20, 21, 30):
        compiled.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0)
        assert compiled.stats["fixed_shape_steps"] == compiled.stats["steps"] == new_tokens - 1


def test_cuda_graph_false_decodes_every_step_eagerly():
    # The compile option that turns fixed-shape (CUDA-graph) decode off, rather than setting engine.decode_mode.
    default = specontext.compile(tiny_model("llama"), "1GB", token_budget=16, progress=False)
    off = specontext.compile(tiny_model("llama"), "1GB", token_budget=16, progress=False, cuda_graph=False)
    assert off.engine.decode_mode == "eager" and default.engine.decode_mode == ("graph" if torch.cuda.is_available() else "eager")
    ids, mask = padded_batch(96, [40], seed=2)
    off.generate(ids, attention_mask=mask, **GENERATE)
    assert off.stats["fixed_shape_steps"] == 0


def test_the_capacity_is_aligned_so_that_a_new_prompt_length_reuses_kernels_and_buffers(poisoned):
    """prompt + max_new_tokens is reserved rounded up to 16 tokens (Triton specializes integer arguments such
    as the mask's row stride on divisibility by 16); the padding positions are poisoned and masked, and a
    second length within the same 16 keeps the buffers."""
    from specontext_compiler.runtime.engine import reserved_tokens

    assert [reserved_tokens(n) for n in (1, 16, 17, 32799)] == [16, 16, 32, 32800]
    compiled = specontext.compile(tiny_model("llama"), "1GB", token_budget=16, offload="none", local_window=4,
                                  progress=False)
    compiled.engine.decode_mode = "fixed"
    ids, mask = padded_batch(96, [40, 27], seed=4)
    for length, new_tokens in ((40, 19), (38, 24)):  # 59 and 62 tokens: 64 reserved for both
        expected = specontext.compile(tiny_model("llama"), "1GB", token_budget=16, offload="none", local_window=4,
                                      progress=False).generate(ids[:, :length], attention_mask=mask[:, :length],
                                                               max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                               do_sample=False, pad_token_id=0)
        tokens = compiled.generate(ids[:, :length], attention_mask=mask[:, :length], max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        assert torch.equal(tokens, expected)
        assert compiled.engine.decoder.mask.shape[1] == 64
        assert compiled.stats["fixed_shape_steps"] == new_tokens - 1
        buffers = [entry.key.data_ptr() for entry in compiled.runtime.store.layers]
        if length == 38:
            assert buffers == first_buffers
        first_buffers = buffers
        assert {entry.capacity for entry in compiled.runtime.store.layers} == {64}


def test_the_step_timer_averages_the_intervals_that_follow_replayed_steps():
    """engine.time_steps on a GPU: an event at each step's start and one after the last; the intervals of
    warm-up and capture steps are left out (fake events here: the CPU has none)."""

    class At:
        def __init__(self, ms):
            self.ms = ms

        def elapsed_time(self, end):
            return end.ms - self.ms

    timer = step_timer.StepTimer(True)
    timer.events = [At(t) for t in (0.0, 9.0, 15.0, 20.0, 26.0, 30.0)]  # 5 steps
    timer.replayed = [False, False, True, True, True]  # a warm-up, a capture, three replays
    assert timer.stats() == {"replayed_steps_timed": 3, "replayed_step_ms": 5.0}
    assert step_timer.StepTimer(False).stats() == {}
