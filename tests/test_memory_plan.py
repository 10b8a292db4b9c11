"""The memory model's terms against hand-computed values, and the planner's invariants on random configs."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig

import specontext
from specontext_compiler.planning.memory_model import ModelShape, memory_terms
from specontext.testing import tiny_model

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)


def test_terms_match_hand_computed_values():
    shape = ModelShape.from_config(LlamaConfig(**LLAMA_8B), torch.bfloat16)
    # Llama-3.1-8B: 8,030,261,248 parameters (the published count), bf16
    assert shape.weight_bytes == 8_030_261_248 * 2
    assert shape.kv_layer_token_bytes == 2 * 8 * 128 * 2  # K and V, 8 KV heads of 128, bf16: 4 KiB
    terms = {t.name: t for t in memory_terms(shape, token_budget=2048, window=65, prefill_chunk=2048, workspace=1000)}
    b, length, resident = 2, 32768, 10
    kv = 4096
    assert terms["kv_resident"].bytes(b, length, resident) == resident * b * length * kv
    assert terms["slots"].bytes(b, length, resident) == (32 - resident) * b * (2048 + 2) * kv
    assert terms["ring"].bytes(b, length, resident) == (32 - resident) * b * 65 * kv
    assert terms["staging"].bytes(b, length, resident) == b * length * kv
    assert terms["staging"].bytes(b, length, 32) == 0  # nothing offloaded, nothing staged
    # the draft-free head: its 3 scoring layers' keys, each layer's float32 prior [Hkv] and their mean
    prior = 32 * 8 * 4
    assert terms["retrieval_head"].bytes(b, length, resident) == b * length * (3 * kv // 2 + prior + 8 * 4)
    assert terms["logits"].bytes(b, length, resident) == b * 128256 * (2 + 4)
    assert terms["workspace"].bytes(b, length, resident) == 1000
    for batch in (2, 16, 200):
        tokens = max(2048, 16 * batch)  # a prefill step: 2048 tokens over the batch, at least 16 per row
        held = tokens * length + batch * length * (8 + prior)  # mask, position ids, the head's replaced prior
        mlp = tokens * (4096 + 4 * 14336) * 2
        expanded = min(batch * 8 * (2 * 4 * length * 128 * 2), max(256 * 2**20, 2 * 4 * length * 128 * 2))
        attention = tokens * (4096 + 4 * 4096 + 3 * 1024) * 2 + max(batch * length * (32 * 8 + 2 * 8 * 4),
                                                                      tokens * length * 3 + expanded)
        assert terms["prefill_activations"].bytes(batch, length, resident) == held + max(mlp, attention), batch
        # a decode step: the loop's token ids and mask, one token, and the largest of a dense step (expanded
        # K/V, the mask's copies), the sparse gather and the head's scoring (the prior's stacked mean)
        expanded = min(batch * 8 * (2 * 4 * (length + 1) * 128 * 2), max(256 * 2**20, 2 * 4 * (length + 1) * 128 * 2))
        gather = 2 * batch * 8 * 2049 * 128 * 2
        scoring = batch * length * max(prior + 8 * 4, 32 * 8 + 3 * 8 * 4)
        decode = 32 * batch * length + batch * (4096 + 4 * 14336) * 2 + max(
            expanded + batch * length * 4, gather, scoring)
        assert terms["decode_activations"].bytes(batch, length, resident) == decode, batch
    assert terms["slots"].bytes(b, 1000, resident) == (32 - resident) * b * (1000 + 2) * kv  # selection <= context
    assert str(terms["kv_resident"]).startswith("kv_resident = 4096*B*L*n")  # printable, named expressions


@settings(max_examples=50, deadline=None)
@given(st.integers(16, 65536), st.integers(1, 4096), st.integers(1, 200_000))
def test_prefill_step_tokens_bound_what_the_engine_feeds(prefill_chunk, batch, prompt):
    """The model's tokens per prefill step never fall as the batch grows, bound every step the engine
    feeds (``prefill_row_chunk`` per row), by less than 16 tokens a row, exactly where the chunk splits
    into rows of a multiple of 16."""
    from specontext_compiler.planning.memory_model import prefill_step_tokens
    from specontext_compiler.runtime.engine import prefill_row_chunk

    bound = int(prefill_step_tokens(batch, prefill_chunk, prompt))
    fed = batch * min(prompt, prefill_row_chunk(prefill_chunk, batch))
    assert fed <= bound < fed + 16 * batch
    assert bound <= int(prefill_step_tokens(batch + 1, prefill_chunk, prompt))
    if prefill_chunk % (16 * batch) == 0 and prompt >= prefill_chunk // batch:
        assert fed == bound


def test_weights_of_a_loaded_model_are_its_actual_bytes():
    model = tiny_model("llama")
    shape = ModelShape.from_model(model)
    tensors = list(model.parameters()) + list(model.buffers())  # buffers too (rotary frequencies)
    assert shape.weight_bytes == sum(t.numel() * t.element_size() for t in tensors)
    assert shape.dtype_bytes == 4


@st.composite
def configs(draw):
    kv_heads = draw(st.sampled_from([1, 2, 4, 8]))
    groups = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([64, 128]))
    return LlamaConfig(hidden_size=kv_heads * groups * head_dim, intermediate_size=draw(st.integers(256, 20000)),
                       num_hidden_layers=draw(st.integers(1, 48)), num_attention_heads=kv_heads * groups,
                       num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=draw(st.integers(1000, 200000)))


@settings(max_examples=30, deadline=None)
@given(configs(), st.integers(1, 4), st.integers(256, 200_000), st.floats(2.0, 200.0), st.sampled_from([None, 512, 2048]))
def test_plans_fit_the_budget_and_only_lose_layers_as_context_and_batch_grow(config, batch, context, budget_gb, token_budget):
    budget = int(budget_gb * 1e9)
    try:
        plan = specontext.plan_memory(config, budget, context, batch=batch, token_budget=token_budget)
    except ValueError as error:
        assert "needs at least" in str(error)
        return
    assert plan.peak_bytes <= budget
    assert plan.gpu_layers + plan.cpu_layers == list(range(config.num_hidden_layers))
    model = plan.model
    layers = config.num_hidden_layers
    # the solver's n is the largest that fits
    assert plan.resident == layers or model.peak(batch, context, plan.resident + 1) > budget
    # n never grows with the context or the batch
    for longer in (context + 1, context * 2):
        more = model.resident_layers(batch, longer, budget)
        assert more is None or more <= plan.resident
    wider = model.resident_layers(batch + 1, context, budget)
    assert wider is None or wider <= plan.resident
    # thresholds: increasing lengths, decreasing n, and n just past each equals the solver's answer
    lengths = [length for length, _ in plan.thresholds]
    assert lengths == sorted(lengths)
    for length, count in plan.thresholds:
        assert model.resident_layers(batch, length + 1, budget) == count
        assert (model.resident_layers(batch, length, budget) or 0) > (count if count is not None else -1)


@settings(max_examples=30, deadline=None)
@given(configs(), st.integers(1, 4), st.integers(256, 100_000), st.floats(0.05, 0.95), st.floats(2.0, 100.0))
def test_a_growing_sequence_is_planned_within_the_budget_at_every_length(config, batch, context, share, budget_gb):
    """With ``prompt``: layers resident throughout first, then layers that leave one at a time (strictly
    decreasing lengths); at every length the buffers actually reserved + the terms + one migration fit."""
    budget = int(budget_gb * 1e9)
    prompt = max(1, int(context * share))
    try:
        plan = specontext.plan_memory(config, budget, context, batch=batch, prompt=prompt)
    except ValueError as error:
        assert "needs at least" in str(error)
        return
    until, model = plan.resident_until, plan.model
    assert until == sorted(until, reverse=True)
    assert sum(1 for tokens in until if tokens == context) == plan.resident and plan.peak_bytes <= budget
    leaving = [tokens for tokens in until if prompt <= tokens < context]
    assert len(set(leaving)) == len(leaving)
    if not plan.staged:  # no staging buffer only if no dense step (prefill, context <= 2048) runs offloaded
        assert all(tokens == context or tokens >= max(prompt, 2048) for tokens in until)
    margin = model.migration_bytes(batch, context)
    for length in sorted({prompt, (prompt + context) // 2, context - 1, context, *leaving}):
        if not prompt <= length <= context:
            continue
        resident = [tokens for tokens in until if tokens >= length]
        peak = model.peak(batch, length, len(resident), context, resident, prompt, plan.staged)
        assert peak + (margin if length in leaving else 0) <= budget, (length, resident)  # a move's transient


def test_impossible_budget_says_what_it_needs_and_where_it_goes():
    with pytest.raises(ValueError, match=r"needs at least 17\.\d GB .*weights 16\.1 GB.*budget is 10\.0 GB"):
        specontext.plan_memory(LlamaConfig(**LLAMA_8B), "10GB", 8192)
    with pytest.raises(ValueError, match="context must be a positive int"):
        specontext.plan_memory(LlamaConfig(**LLAMA_8B), "24GB", 0)
    with pytest.raises(TypeError, match="config or model"):
        specontext.plan_memory("llama", "24GB", 8192)


@pytest.mark.parametrize("prompt", [None, 32760])
def test_the_largest_batch_fits_and_one_more_does_not(prompt):
    config = LlamaConfig(**LLAMA_8B)
    plan = specontext.plan_memory(config, "135GB", 32768, batch="max", prompt=prompt, dtype=torch.bfloat16)
    largest = plan.batch
    assert largest > 1 and plan.peak_bytes <= plan.budget_bytes
    assert f"largest batch the budget admits: {largest} (batch {largest + 1} needs" in plan.table()
    assert plan.next_batch_peak > plan.budget_bytes and json.loads(plan.to_json())["largest_batch"]
    assert specontext.plan_memory(config, "135GB", 32768, batch=largest, prompt=prompt, dtype=torch.bfloat16).peak_bytes \
        == plan.peak_bytes
    shape = "32768 tokens" if prompt is None else "a 32760-token prompt growing to 32768 tokens"
    with pytest.raises(specontext.BudgetError, match=f"the largest batch it admits for {shape} is {largest}$"):
        specontext.plan_memory(config, "135GB", 32768, batch=largest + 1, prompt=prompt, dtype=torch.bfloat16)
    # what a batch leaves in host memory: the offloaded layers' K/V
    assert plan.host_bytes == (32 - plan.resident) * largest * 32768 * 4096


@pytest.mark.parametrize("prompt", [None, 2048])
def test_a_host_budget_bounds_the_largest_batch_and_refuses_past_it(prompt):
    """Offloading lets the GPU budget admit batches whose KV the host cannot hold: with ``host_budget`` the
    largest batch keeps the offloaded layers' K/V within it, and a batch past it is refused, named."""
    config = LlamaConfig(**LLAMA_8B)
    plan = lambda batch, **kw: specontext.plan_memory(config, "135GB", 34816, batch=batch, prompt=prompt,  # noqa: E731
                                                      dtype=torch.bfloat16, **kw)
    unbounded = plan("max")
    assert unbounded.host_bytes > 120e9  # the GPU budget alone admits more than a 128 GiB host holds
    host = plan("max", host_budget="120GB")
    largest = host.batch
    assert 1 < largest < unbounded.batch and host.host_bytes <= 120e9 < plan(largest + 1).host_bytes
    assert host.host_budget == 120 * 10**9 and json.loads(host.to_json())["host_budget"] == 120 * 10**9
    assert f"largest batch the GPU and host budgets admit: {largest} (limited by the host budget)" in host.table()
    assert host.next_batch_peak is None and json.loads(host.to_json())["largest_batch"]
    assert plan(largest, host_budget="120GB").host_bytes == host.host_bytes
    with pytest.raises(specontext.BudgetError, match=rf"batch {largest + 1} x 34816 tokens needs .* of host memory .*"
                                                     rf"host budget is 120\.0 GB: the largest batch both admit .* is {largest}$"):
        plan(largest + 1, host_budget="120GB")
    with pytest.raises(ValueError, match="budget"):
        plan(2, host_budget="lots")


def test_cli_plan_host_budget(capsys):
    from specontext_compiler.cli import main

    assert main(["plan", "--model", "llama-3.1-8b", "--budget", "135GB", "--context", "34816", "--prompt", "2048",
                 "--max-batch", "--host-budget", "120GB"]) == 0
    largest = specontext.plan_memory(LlamaConfig(**LLAMA_8B), "135GB", 34816, batch="max", prompt=2048,
                                     dtype=torch.bfloat16, host_budget="120GB").batch
    assert f"largest batch the GPU and host budgets admit: {largest}" in capsys.readouterr().out
    assert main(["plan", "--model", "llama-3.1-8b", "--budget", "135GB", "--context", "34816", "--prompt", "2048",
                 "--batch", str(largest + 1), "--host-budget", "120GB"]) == 2
    assert "of host memory" in capsys.readouterr().err


def test_largest_batch_with_every_layer_on_the_gpu_matches_the_plan():
    """A fixed placement (every layer resident): the largest batch whose peak fits, checked one by one."""
    config = LlamaConfig(**LLAMA_8B)
    plan = specontext.plan_memory(config, "135GB", 32768, prompt=32760, dtype=torch.bfloat16)
    model, budget = plan.model, plan.budget_bytes
    largest = model.max_batch(32768, budget, 32760, resident=32)
    fits = [model.peak(batch, 32768, 32, 32768, prompt=32760) <= budget for batch in range(1, largest + 30)]
    assert fits == [True] * largest + [False] * 29


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 5000))
def test_largest_batch_search_is_exact_for_a_threshold(threshold):
    from specontext_compiler.planning.planner import largest_batch

    calls = []
    assert largest_batch(lambda batch: calls.append(batch) or batch <= threshold) == threshold
    assert len(calls) <= 2 * max(1, threshold).bit_length() + 2  # doubling, then bisection


def test_plan_outputs(tmp_path):
    plan = specontext.plan_memory(LlamaConfig(**LLAMA_8B), "24GB", 131072, dtype=torch.bfloat16)
    assert 0 < plan.resident < 32 and plan.thresholds
    text = plan.table()
    assert "kv_resident" in text and "peak" in text and f"{plan.resident} of 32" in text
    payload = json.loads(plan.to_json())
    assert payload["peak_bytes"] == plan.peak_bytes and payload["gpu_layers"] == plan.gpu_layers
    assert set(payload["expressions"]) == set(payload["terms"])
    # a budget with room for layer 9 until 98,304 tokens of a sequence growing from 65,536 to 131,072
    end, prompt, leave = 131072, 65536, 98304
    model = plan.model
    budget = model.peak(1, leave, 10, end, [end] * 9 + [leave], prompt) + model.migration_bytes(1, end)
    growing = specontext.plan_memory(LlamaConfig(**LLAMA_8B), budget, end, dtype=torch.bfloat16, prompt=prompt)
    assert growing.resident == 9 and growing.resident_until[9] == leave and (leave, 9) in growing.migrations
    assert f"past {leave} tokens: layer 9 moves to host memory" in growing.table()
    assert json.loads(growing.to_json())["resident_until"] == growing.resident_until
    plan.plot(tmp_path / "plan.png")
    assert (tmp_path / "plan.png").stat().st_size > 10_000


def test_cli_plan(tmp_path, capsys):
    from specontext_compiler.cli import main

    png = tmp_path / "plan.png"
    assert main(["plan", "--model", "qwen3-8b", "--budget", "24GB", "--context", "131072", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "GPU-resident layers" in out and "of 36" in out and png.is_file()
    LlamaConfig(**LLAMA_8B).save_pretrained(tmp_path / "cfg")
    assert main(["plan", "--model", str(tmp_path / "cfg"), "--budget", "80GB", "--context", "8192", "--batch", "4"]) == 0
    assert "32 of 32" in capsys.readouterr().out
    assert main(["plan", "--model", "llama-3.1-8b", "--budget", "23.9GB", "--context", "131072", "--prompt", "65536"]) == 0
    assert "growing from a 65536-token prompt" in capsys.readouterr().out
    assert main(["plan", "--model", "llama-3.1-8b", "--budget", "10GB", "--context", "8192"]) == 2
    assert "needs at least" in capsys.readouterr().err
    assert main(["plan", "--model", "llama-3.1-8b", "--budget", "135GB", "--context", "18432", "--prompt", "2048",
                 "--max-batch"]) == 0
    out = capsys.readouterr().out
    largest = specontext.plan_memory(LlamaConfig(**LLAMA_8B), "135GB", 18432, batch="max", prompt=2048,
                                     dtype=torch.bfloat16).batch
    assert f"largest batch the budget admits: {largest} " in out and f"memory plan: batch {largest} x 18432" in out
    with pytest.raises(SystemExit):  # argparse: one or the other
        main(["plan", "--model", "llama-3.1-8b", "--budget", "24GB", "--context", "8192", "--batch", "2", "--max-batch"])
    assert "not allowed with argument" in capsys.readouterr().err
