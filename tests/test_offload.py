"""Tiered KV runtime: offloaded layers (host KV + device slots), elastic loading, the prefetch schedule.

Offloaded must equal resident and elastic loading must equal full reload; on this CPU-only machine both
tiers live in CPU memory and the same code runs synchronously.
"""

import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import specontext
from specontext_compiler.kernels.gather_rows import gather_from_host_or_ring, gather_rows_reference
from specontext_compiler.passes.schedule_prefetch import check_schedule
from specontext_compiler.runtime import step_transaction
from specontext_compiler.runtime.kv_store import KVStore
from specontext_compiler.runtime.slots import SlotMap
from specontext.testing import padded_batch, tiny_model

SPARSE = dict(token_budget=20, sink_tokens=2, local_window=4, progress=False)
POISON = 1e4  # finite, so a masked slot stays harmless, but large enough that an attended unloaded slot shows


# -- elastic loading ------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.data())
def test_slot_map_loads_exactly_what_the_selection_adds(data):
    batch, heads = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
    past = data.draw(st.integers(8, 40))
    elastic = data.draw(st.booleans())
    slot_map = SlotMap(elastic)
    slots = None  # a simulated slot buffer holding token ids; poisoned where nothing was loaded
    previous = None
    for _ in range(data.draw(st.integers(1, 5))):
        past += data.draw(st.integers(0, 3))
        k = data.draw(st.integers(1, 8))
        seed = data.draw(st.integers(0, 10_000))
        g = torch.Generator().manual_seed(seed)
        indices = torch.stack([torch.randperm(past, generator=g)[:k] for _ in range(batch * heads)]).view(batch, heads, k)
        indices = indices.sort(-1).values
        grew = k > slot_map.slots  # a larger selection grows the slots and reloads everything
        plan = slot_map.update(indices, past)
        if slots is None or slots.shape[-1] != slot_map.slots + 1:
            slots = torch.full((batch, heads, slot_map.slots + 1), -999)
        b, h, r = plan.valid.nonzero(as_tuple=True)
        slots[b, h, plan.slot[b, h, r]] = plan.token[b, h, r]
        mapping = slot_map.token
        for row in range(batch):
            for head in range(heads):
                held = mapping[row, head]
                assert sorted(held[held >= 0].tolist()) == indices[row, head].tolist()
                # every mapped slot holds (in the simulated buffer) the token the map says
                assert torch.equal(slots[row, head, :-1][held >= 0], held[held >= 0])
                new = set(indices[row, head].tolist())
                full = not elastic or previous is None or grew
                expected_loads = len(new) if full else len(new - set(previous[row, head].tolist()))
                assert int(plan.loads[row, head]) == expected_loads
        previous = indices


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("token_major", [False, True])
def test_triton_row_gather_matches_reference(dtype, token_major):
    g = torch.Generator().manual_seed(0)
    src = torch.randn(2, 3, 50, 16, generator=g).to(dtype)
    if token_major:  # an offloaded layer's host buffer: [T, B, H, D] storage seen as [B, H, T, D]
        src = src.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)
    src_index = torch.randint(0, 50, (2, 3, 12), generator=g)
    dst_index = torch.stack([torch.randperm(10, generator=g) for _ in range(6)]).view(2, 3, 10)
    dst_index = torch.cat([dst_index, torch.full((2, 3, 2), 10)], -1)  # two rows to the scratch slot
    valid = torch.rand(2, 3, 12, generator=g) < 0.7
    valid[..., 10:] = False
    expected = torch.full((2, 3, 11, 16), float("nan"), dtype=dtype)
    gather_rows_reference(src, src_index, valid, expected, dst_index)
    # The runtime's kernel with every row from host memory (source 1) or skipped (0); K and V in one launch.
    first, second = torch.full_like(expected, float("nan")), torch.full_like(expected, float("nan"))
    ring = torch.zeros(2, 3, 1, 16, dtype=dtype)
    gather_from_host_or_ring(src, -src, ring, ring.clone(), first, second, src_index, torch.zeros_like(src_index),
                             valid.to(torch.int8), dst_index)
    assert torch.equal(first.isnan(), expected.isnan())  # same rows written, the rest still poisoned
    written = ~expected.isnan()
    assert torch.equal(first[written], expected[written])
    b, h, r = valid.nonzero(as_tuple=True)
    assert torch.equal(first[b, h, dst_index[b, h, r]], src[b, h, src_index[b, h, r]])
    assert torch.equal(second.isnan(), expected.isnan()) and torch.equal(second[written], -expected[written])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_launch_gather_from_host_or_ring_matches_reference(dtype):
    g = torch.Generator().manual_seed(1)
    host_k = torch.randn(30, 2, 3, 8, generator=g).to(dtype).permute(1, 2, 0, 3)  # token-major host buffer
    host_v = torch.randn(30, 2, 3, 8, generator=g).to(dtype).permute(1, 2, 0, 3)
    ring_k, ring_v = torch.randn(2, 3, 5, 8, generator=g).to(dtype), torch.randn(2, 3, 5, 8, generator=g).to(dtype)
    rows = 9
    token = torch.randint(0, 30, (2, 3, rows), generator=g)
    ring_row = token % 5
    source = torch.randint(0, 3, (2, 3, rows), generator=g).to(torch.int8)
    slot = torch.stack([torch.randperm(rows, generator=g) for _ in range(6)]).view(2, 3, rows)
    token = token.transpose(0, 1).contiguous().transpose(0, 1)  # index tensors of any layout are accepted
    out_k, out_v = torch.full((2, 3, rows + 1, 8), float("nan"), dtype=dtype), torch.full((2, 3, rows + 1, 8), float("nan"), dtype=dtype)
    ref_k, ref_v = out_k.clone(), out_v.clone()
    gather_from_host_or_ring(host_k, host_v, ring_k, ring_v, out_k, out_v, token, ring_row, source, slot)
    for src_k, src_v, index, which in ((host_k, host_v, token, 1), (ring_k, ring_v, ring_row, 2)):
        gather_rows_reference(src_k, index, source == which, ref_k, slot)
        gather_rows_reference(src_v, index, source == which, ref_v, slot)
    for out, ref in ((out_k, ref_k), (out_v, ref_v)):
        assert torch.equal(out.isnan(), ref.isnan())  # skipped rows stay poisoned
        assert torch.equal(out[~ref.isnan()], ref[~ref.isnan()])


# -- offloaded == resident ------------------------------------------------------------------------------
def generate(model, ids, mask, new=12, poison=True, **options):
    compiled = specontext.compile(model, "1GB", **SPARSE, **options)
    if poison:
        compiled.runtime.store.fill_value = POISON
    out = compiled.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                            return_dict_in_generate=True, output_logits=True)
    return compiled, out


@pytest.mark.parametrize("family", ["llama"])  # every family, random placements: tests/test_properties.py
def test_offloaded_equals_resident(family):
    model = tiny_model(family, num_hidden_layers=3)
    ids, mask = padded_batch(model.config.vocab_size, [60, 45], seed=3)
    _, reference = generate(model, ids, mask, offload="none", poison=False)
    for offload in ["all", [1], [0, 2]]:
        for elastic in [True, False]:
            compiled, out = generate(model, ids, mask, offload=offload, elastic=elastic)
            assert compiled.runtime.store.offloaded == frozenset(range(3) if offload == "all" else offload)
            assert torch.equal(out.sequences, reference.sequences), (offload, elastic)
            for a, b in zip(out.logits, reference.logits):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_offloaded_chunked_prefill_and_call_equal_resident():
    model = tiny_model("llama", num_hidden_layers=2)
    ids, mask = padded_batch(model.config.vocab_size, [70, 55], seed=5)
    resident = specontext.compile(model, "1GB", offload="none", prefill_chunk=16, **SPARSE)
    offloaded = specontext.compile(model, "1GB", offload="all", prefill_chunk=16, **SPARSE)
    torch.testing.assert_close(offloaded(ids, attention_mask=mask).logits, resident(ids, attention_mask=mask).logits,
                               atol=1e-5, rtol=1e-5)
    assert torch.equal(offloaded.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False),
                       resident.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False))


def test_elastic_loading_moves_less_than_full_reload_and_counts_it():
    model = tiny_model("llama", num_hidden_layers=2)
    ids, mask = padded_batch(model.config.vocab_size, [80], seed=7)
    elastic, out_e = generate(model, ids, mask, new=24, offload="all", elastic=True)
    full, out_f = generate(model, ids, mask, new=24, offload="all", elastic=False)
    assert torch.equal(out_e.sequences, out_f.sequences)
    se, sf = elastic.stats, full.stats
    # a full reload moves the whole selection; elastic=False moves all of it but the recent ring's share
    assert 0 < sf["h2d_bytes"] < sf["h2d_bytes_full_reload"]
    assert se["h2d_bytes_full_reload"] == sf["h2d_bytes_full_reload"]
    assert 0 < se["h2d_bytes"] < sf["h2d_bytes"]
    assert 0 < se["selection_overlap"] <= 1 and se["selection_overlap"] == pytest.approx(sf["selection_overlap"])
    assert se["prefetch_wait_ms"] == 0.0  # CPU: loads run synchronously
    resident, _ = generate(model, ids, mask, new=24, offload="none")
    assert resident.stats["h2d_bytes"] == 0


def test_per_layer_baselines_cannot_offload():
    model = tiny_model("llama")
    ids, mask = padded_batch(model.config.vocab_size, [40], seed=1)
    compiled = specontext.compile(model, "1GB", selection="quest", offload="all", **SPARSE)
    with pytest.raises(ValueError, match="selects per layer"):
        compiled.generate(ids, attention_mask=mask, max_new_tokens=2)


# -- the prefetch schedule -------------------------------------------------------------------------------
def test_schedule_prefetch_places_prefetches_early_and_waits_late():
    model = specontext.compile(tiny_model("llama", num_hidden_layers=3), "1GB", **SPARSE)
    nodes = list(model.graph.graph.nodes)
    names = [n.target.name() if n.op == "call_function" and hasattr(n.target, "name") else "" for n in nodes]
    retrieve = names.index("specontext::retrieve")
    # all prefetches right after the retrieval, in layer order
    assert names[retrieve + 1:retrieve + 4] == ["specontext::prefetch"] * 3
    assert [nodes[retrieve + 1 + i].args[1] for i in range(3)] == [0, 1, 2]
    # each wait immediately before its layer's attention, which takes its output
    for i, name in enumerate(names):
        if name == "specontext::sparse_attention":
            assert names[i - 1] == "specontext::wait" and nodes[i - 1].args[1] == nodes[i].meta["specontext"].layer
            assert nodes[i].args[9] is nodes[i - 1]
    check_schedule(model.graph)
    # a wait moved after its attention breaks the schedule
    graph = model.graph.graph
    wait = next(n for n in graph.nodes if names[nodes.index(n)] == "specontext::wait")
    attention = wait.next
    attention.append(wait)
    with pytest.raises(ValueError, match="run before"):
        check_schedule(model.graph)


# -- placement and the memory manager ---------------------------------------------------------------------
CHUNK = 8  # tokens per copy of a moving layer: its device temporary stays small next to tiny contexts


def budget_with_migrations(model, prompt, total, workspace=None, batch=1):
    """The smallest budget (in steps of one layer-token of KV) whose plan moves layers out mid-decode."""
    probe = specontext.compile(model, "1GB", offload="auto", **SPARSE)
    probe.runtime.store.migration.chunk = CHUNK
    if workspace is not None:
        probe.memory.workspace = workspace
    memory = probe.memory.model(total)
    step = probe.kv_bytes_per_token // len(probe.layers)
    low, high = memory.peak(batch, total, 0, prompt=prompt), memory.peak(batch, total, len(probe.layers), prompt=prompt)
    for budget in range(low, high + 1, step):
        until = memory.schedule(batch, prompt, total, budget)
        if until and any(prompt < tokens < total for tokens in until):
            return budget, until
    raise AssertionError("no budget moves layers mid-sequence")


def test_auto_offloads_when_the_budget_is_tight_and_still_matches():
    model = tiny_model("llama", num_hidden_layers=4)
    ids, mask = padded_batch(model.config.vocab_size, [90], seed=2)
    reference = specontext.compile(model, "1GB", offload="none", **SPARSE)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    total = 90 + 10
    memory = reference.memory.model(total)
    # room for 2 resident layers at the final length, not 3: layers 2 and 3 end in host memory (the plan
    # may keep them on the GPU for the prompt and move them out as the sequence grows)
    budget = memory.peak(1, total, 2, prompt=90)
    assert memory.peak(1, total, 3, prompt=90) > budget
    tight = specontext.compile(model, budget, offload="auto", **SPARSE)
    tight.runtime.store.fill_value = POISON
    out = tight.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert tight.runtime.store.offloaded == frozenset({2, 3})
    assert torch.equal(out, expected)
    assert tight.placement.peak_bytes <= budget
    with pytest.raises(ValueError, match=r"needs at least .*with 4 of 4 layers' KV on the GPU.*offload='auto'"):
        specontext.compile(model, budget, offload="none", **SPARSE).generate(ids, attention_mask=mask, max_new_tokens=10)
    with pytest.raises(ValueError, match="needs at least .* with every layer offloaded"):
        specontext.compile(model, memory.peak(1, total, 0, prompt=90) - 1, offload="auto", **SPARSE).generate(
            ids, attention_mask=mask, max_new_tokens=10)


@pytest.mark.parametrize("decode_mode", ["eager", "fixed"])
def test_layers_move_to_host_memory_as_the_sequence_grows_without_losing_a_token(decode_mode):
    """A budget whose plan keeps some layers on the GPU for only part of a 90 + 80 token sequence: the
    manager copies each to host memory in the background and switches it over mid-decode (ring from its
    GPU buffer, slots reloaded from host memory; slots poisoned); tokens equal the all-resident run. In
    "fixed" mode the steps after the last move run at fixed shape (they did not: the runtime kept its own
    copy of the moves to come, never emptied)."""
    model = tiny_model("llama", num_hidden_layers=4)
    ids, mask = padded_batch(model.config.vocab_size, [90], seed=2)
    new = 80
    expected = specontext.compile(model, "1GB", offload="none", **SPARSE).generate(
        ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    budget, planned = budget_with_migrations(model, 90, 90 + new)
    compiled = specontext.compile(model, budget, offload="auto", **SPARSE)
    compiled.engine.decode_mode = decode_mode
    compiled.runtime.store.fill_value = POISON
    compiled.runtime.store.migration.chunk = CHUNK
    out = compiled.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    moves = sorted((tokens, layer) for layer, tokens in enumerate(planned) if 90 <= tokens < 90 + new)
    assert moves and sorted(compiled.memory.migrated) == moves  # each moved when the sequence passed its length
    assert compiled.runtime.store.offloaded == frozenset(layer for layer, tokens in enumerate(planned) if tokens < 90 + new)
    assert compiled.runtime.resident_until == {}
    if decode_mode == "fixed":
        assert 0 < compiled.stats["fixed_shape_steps"] < 90 + new - moves[-1][0]
    assert torch.equal(out, expected)


def test_out_of_memory_mid_step_rolls_back_replans_and_retries():
    """An out-of-memory error inside a decode step (after the retrieval head's layer stored its key):
    the step is undone, the margin doubles, layers leave the GPU at once, and the step runs again."""
    model = tiny_model("llama", num_hidden_layers=4)
    ids, mask = padded_batch(model.config.vocab_size, [90], seed=2)
    new = 80
    expected = specontext.compile(model, "1GB", offload="none", **SPARSE).generate(
        ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    probe = specontext.compile(model, "1GB", **SPARSE)
    workspace = 40 * probe.kv_bytes_per_token
    # A budget planned with twice the margin: with the first margin more layers stay on the GPU longer;
    # after the injected out-of-memory error at 95 tokens, the re-plan has no room for some of them.
    budget, _ = budget_with_migrations(model, 90, 90 + new, workspace=2 * workspace)
    compiled = specontext.compile(model, budget, offload="auto", **SPARSE)
    compiled.memory.workspace = workspace
    compiled.runtime.store.fill_value = POISON
    compiled.runtime.store.migration.chunk = CHUNK
    first = compiled.memory.model(90 + new).schedule(1, 90, 90 + new, budget)
    compiled.memory.workspace = 2 * workspace
    replanned = compiled.memory.model(90 + new).schedule(1, 95, 90 + new, budget, prompt=90)
    compiled.memory.workspace = workspace
    leave_at_once = {layer for layer in range(4) if first[layer] >= 96 and replanned[layer] < 95}
    assert leave_at_once, (first, replanned)
    failed = []

    def run_out_of_memory(layer, q, keys, scale):
        if layer == 2 and q.shape[2] == 1 and keys.shape[2] == 96 and not failed:
            held = torch.empty(64)  # what the failed step allocated: freed before the retry
            failed.append(weakref.ref(held))
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")

    compiled.runtime.observers.append(run_out_of_memory)
    replan = compiled.memory._replan_after_out_of_memory

    def replan_once_the_step_is_gone(*args):
        assert failed[0]() is None, "the failed step's tensors outlive it (its frames hold them)"
        return replan(*args)

    compiled.memory._replan_after_out_of_memory = replan_once_the_step_is_gone
    out = compiled.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    assert failed and compiled.memory.retries == 1 and compiled.memory.workspace == 2 * workspace
    # The placement's peak is the re-plan's: the doubled margin, and the layers resident at the end.
    model_after = compiled.memory.model(90 + new)
    until = [0 if compiled.runtime.store.is_offloaded(layer) else 90 + new for layer in range(4)]
    assert compiled.memory.placement.peak_bytes == model_after.peak(
        1, 90 + new, until.count(90 + new), 90 + new, prompt=90, staged=model_after.staged(until, 90, 90 + new))
    assert compiled.memory.placement.peak_bytes <= budget
    assert {layer for length, layer in compiled.memory.migrated if length == 95} == leave_at_once
    assert torch.equal(out, expected)


@pytest.mark.parametrize("where", ["switching over", "making its slots"])
def test_out_of_memory_while_a_layer_moves_to_host_memory_retries_the_move(where, monkeypatch):
    """A layer planned to leave mid-sequence runs out of memory while it switches over (its newest tokens
    copied, its ring not made yet), or at its first offloaded step between making its key and value slots:
    the layer stays as it was, the step is retried after a re-plan, and the tokens and logits are those of
    an all-resident run."""
    model = tiny_model("llama", num_hidden_layers=4)
    ids, mask = padded_batch(model.config.vocab_size, [90], seed=2)
    new = 80
    settings = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                    return_dict_in_generate=True, output_logits=True)
    expected = specontext.compile(model, "1GB", offload="none", **SPARSE).generate(ids, attention_mask=mask, **settings)
    workspace = 40 * specontext.compile(model, "1GB", **SPARSE).kv_bytes_per_token
    budget, planned = budget_with_migrations(model, 90, 90 + new, workspace=2 * workspace)
    compiled = specontext.compile(model, budget, offload="auto", **SPARSE)
    compiled.memory.workspace = workspace  # the re-plan's doubled margin still fits the budget
    compiled.runtime.store.fill_value = POISON
    compiled.runtime.store.migration.chunk = CHUNK
    store, inside, failed = compiled.runtime.store, [], []
    owner, method, then_owner, then = {
        "switching over": (store.migration, "to_host", store.migration, "_copy_to_host"),
        "making its slots": (store, "ensure_slots", torch, "full")}[where]
    outer = getattr(owner, method)

    def watched(*args):
        inside.append(0)
        try:
            return outer(*args)
        finally:
            inside.pop()

    inner = getattr(then_owner, then)

    def fails_once(*args, **kwargs):
        result = inner(*args, **kwargs)
        if inside and not failed:  # the first copy (the second buffer: slots) is made, the rest is not
            inside[-1] += 1
            if where == "switching over" or inside[-1] == 2:
                failed.append(1)
                raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return result

    setattr(owner, method, watched)
    monkeypatch.setattr(then_owner, then, fails_once)
    out = compiled.generate(ids, attention_mask=mask, **settings)
    assert failed and compiled.memory.retries == 1
    assert torch.equal(out.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(expected.logits), atol=1e-5, rtol=0)


@pytest.mark.parametrize("where", ["building the decoder", "the third step's loads", "the third step's last layer",
                                   "ring rows due before the third step"])
def test_out_of_memory_in_fixed_shape_decode_replans_and_decodes_eagerly(where, monkeypatch):
    """Fixed-shape decode (what a CUDA graph replays; run eagerly here) with layers 2 and 3 offloaded runs
    out of memory while its decoder is built; or in its third step once the slot map holds the new
    selection but before layer 3's slots are loaded; or at layer 3, after layer 2 wrote its K/V and the
    head's key and query in place. What the step wrote is put back or forgotten (slots poisoned), the decoder is
    abandoned, the manager re-plans with twice the margin (more layers leave the GPU), and the rest
    decodes eagerly: the tokens of a run that never failed."""
    from specontext_compiler.runtime import cuda_graph_decode

    model = tiny_model("llama", num_hidden_layers=4)
    ids, mask = padded_batch(model.config.vocab_size, [90], seed=2)
    new = 40
    settings = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                    return_dict_in_generate=True, output_logits=True)
    reference = specontext.compile(model, "1GB", offload="none", **SPARSE)
    expected = reference.generate(ids, attention_mask=mask, **settings)
    workspace = 40 * reference.kv_bytes_per_token
    reference.memory.workspace = workspace
    budget = reference.memory.model(90 + new).peak(1, 90 + new, 2, prompt=90)  # layers 2, 3 offloaded
    compiled = specontext.compile(model, budget, offload="auto", **SPARSE)
    compiled.memory.workspace = workspace
    compiled.engine.decode_mode = "fixed"
    compiled.runtime.store.fill_value = POISON
    assert compiled.runtime.head.layers == (2,)  # the layer whose query the head keeps
    method = {"building the decoder": "begin", "the third step's loads": "prefetch",
              "the third step's last layer": "attention", "ring rows due before the third step": "flush_due"}[where]
    owner = KVStore if method == "flush_due" else cuda_graph_decode.StaticDecodeRuntime
    original = getattr(owner, method)
    calls, failed = [], []

    def run_out_of_memory(self, *args, **kwargs):
        layer = args[1] if method == "prefetch" else args[0] if args else 3  # prefetch(indices, layer)
        if method == "prefetch" and layer in self._prefetched:  # attention's call, once the graph's ran
            return original(self, *args, **kwargs)
        calls.append(layer)
        if method == "begin" or calls.count(3) == 3:
            if method == "flush_due":  # one layer's rows moved, the other's not
                self.flush(2)
            held = torch.empty(64)  # what the failed step allocated: freed before the re-plan
            failed.append(weakref.ref(held))
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, method, run_out_of_memory)
    # The transfer counters after the two fixed-shape steps that ran; the failed step's must not stay.
    counted = []
    decode = cuda_graph_decode.GraphDecoder.decode

    def decode_and_count(self, *args):
        logits = decode(self, *args)
        counted.append(int(self.static.h2d_bytes))
        return logits

    abandon = cuda_graph_decode.GraphDecoder.abandon

    def abandon_and_check(self):
        assert int(self.static.h2d_bytes) == counted[-1], "the failed step's loads are still counted"
        return abandon(self)

    monkeypatch.setattr(cuda_graph_decode.GraphDecoder, "decode", decode_and_count)
    monkeypatch.setattr(cuda_graph_decode.GraphDecoder, "abandon", abandon_and_check)
    recover = compiled.memory.recover

    def recover_once_the_step_is_gone(*args, **kwargs):
        assert failed and failed[0]() is None, "the failed step's tensors outlive it (its frames hold them)"
        return recover(*args, **kwargs)

    compiled.memory.recover = recover_once_the_step_is_gone
    out = compiled.generate(ids, attention_mask=mask, **settings)
    assert compiled.placement.offloaded == (2, 3)
    assert len(failed) == 1 and compiled.stats["fixed_shape_abandoned"]
    assert compiled.stats["fixed_shape_steps"] == (0 if method == "begin" else 2)
    assert compiled.stats["steps"] == new - 1
    assert compiled.memory.retries == 1 and compiled.memory.workspace == 2 * workspace
    assert len(compiled.runtime.store.offloaded) > 2  # the re-plan moved layers out
    assert torch.equal(out.sequences, expected.sequences)
    # Logits too: stale slots may leave the tokens alone but not the logits (they differ by ~3e-2).
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(expected.logits), atol=1e-5, rtol=0)


def test_out_of_memory_in_fixed_shape_decode_with_a_fixed_placement_is_raised(monkeypatch):
    from specontext_compiler.runtime import cuda_graph_decode

    compiled = specontext.compile(tiny_model("llama", num_hidden_layers=2), "1GB", offload="none", **SPARSE)
    compiled.engine.decode_mode = "fixed"

    def attention(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")

    monkeypatch.setattr(cuda_graph_decode.StaticDecodeRuntime, "attention", attention)
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        compiled.generate(torch.randint(3, 90, (1, 30)), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                          pad_token_id=0)
    assert compiled.engine.fixed_shape_abandoned and compiled.engine.decoder is None
    assert compiled.memory.retries == 0  # nothing re-planned


def test_rollback_puts_the_transfer_counters_back():
    """A step rolled back after running out of memory had counted its loads; the retry counts them again."""
    compiled = specontext.compile(tiny_model("llama"), "1GB", offload="all", **SPARSE)
    compiled.generate(torch.randint(3, 90, (1, 40)), max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    runtime, prefetcher = compiled.runtime, compiled.runtime.prefetcher
    state = step_transaction.begin(runtime)
    before = prefetcher.stats()
    assert before["h2d_bytes"] > 0
    prefetcher.h2d_rows = prefetcher.h2d_rows + 512
    prefetcher.full_reload_rows = prefetcher.full_reload_rows + 1024
    prefetcher.kept, prefetcher.selected = prefetcher.kept + 3, prefetcher.selected + 40
    step_transaction.roll_back(runtime, state)
    assert prefetcher.stats() == before


def test_out_of_memory_with_a_fixed_placement_is_raised():
    model = tiny_model("llama", num_hidden_layers=2)
    compiled = specontext.compile(model, "1GB", offload="none", **SPARSE)

    def run_out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")

    compiled.runtime.observers.append(run_out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        compiled.generate(torch.randint(3, 90, (1, 30)), max_new_tokens=2)


@pytest.mark.parametrize("bad", ["some", 3, [0, 0]])
def test_bad_offload_options(bad):
    with pytest.raises((ValueError, TypeError), match="offload"):
        specontext.compile(tiny_model("llama"), "1GB", offload=bad, **SPARSE)


# -- SmolLM2 (the CPU acceptance) ----------------------------------------------------------------
def test_smollm2_offload_modes_and_elastic_loading_give_identical_tokens(smollm2):
    """~1.5K tokens, token_budget=128, 32 decode steps: offload none / all / auto (a budget that forces
    some layers out), elastic on and off, all the same tokens; elastic moves <= 50% of a full reload."""
    from specontext.testing import code_word_document

    model, tokenizer = smollm2
    ids, _ = code_word_document(tokenizer, target_tokens=1500, code_word="FALCON", depth=0.4, seed=4)
    options = dict(token_budget=128, progress=False)
    reference = specontext.compile(model, "24GB", offload="none", **options)
    expected = reference.generate(ids, max_new_tokens=33, min_new_tokens=33, do_sample=False)
    layers = len(reference.layers)
    tight = reference.memory.model(ids.shape[1] + 33).peak(1, ids.shape[1] + 33, layers // 2)  # half fit
    moved = {}
    for offload, budget, elastic in [("all", "24GB", True), ("all", "24GB", False), ("auto", tight, True)]:
        compiled = specontext.compile(model, budget, offload=offload, elastic=elastic, **options)
        compiled.runtime.store.fill_value = POISON
        out = compiled.generate(ids, max_new_tokens=33, min_new_tokens=33, do_sample=False)
        assert torch.equal(out, expected), (offload, elastic)
        offloaded = compiled.runtime.store.offloaded
        assert offloaded == frozenset(range(layers)) if offload == "all" else 0 < len(offloaded) < layers
        stats = compiled.stats
        assert stats["steps"] == 32
        moved[(offload, elastic)] = (stats["h2d_bytes"], stats["h2d_bytes_full_reload"])
    elastic_bytes, full_reload = moved[("all", True)]
    assert elastic_bytes <= 0.5 * full_reload, moved
    assert elastic_bytes < moved[("all", False)][0] < full_reload


def test_offloaded_without_a_local_window_equals_resident():
    """local_window=0: the newest past token is still served from the ring, older ones from host memory."""
    model = tiny_model("llama", num_hidden_layers=2)
    ids, mask = padded_batch(model.config.vocab_size, [50, 38], seed=9)
    options = dict(token_budget=12, sink_tokens=1, local_window=0, progress=False)
    expected = specontext.compile(model, "1GB", offload="none", **options).generate(
        ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    compiled = specontext.compile(model, "1GB", offload="all", **options)
    compiled.runtime.store.fill_value = POISON
    assert torch.equal(compiled.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False), expected)
