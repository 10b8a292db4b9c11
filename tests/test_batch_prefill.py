"""A prefill step feeds ``prefill_chunk`` tokens over the whole batch; a batch the memory plan does not
admit is refused before any work, naming the largest one it admits."""

import pytest
import torch

import specontext
from specontext.testing import padded_batch, tiny_model
from specontext_compiler.runtime.engine import prefill_row_chunk

NEW = 12


@pytest.mark.parametrize("prefill_chunk, batch, per_row", [
    (2048, 1, 2048), (2048, 3, 672), (2048, 24, 80), (2048, 32, 64), (2048, 200, 16), (100, 1, 96), (16, 8, 16),
])
def test_rows_share_the_chunk_in_multiples_of_16(prefill_chunk, batch, per_row):
    assert prefill_row_chunk(prefill_chunk, batch) == per_row


def run(model, ids, mask, prefill_chunk, forward=True):
    compiled = specontext.compile(model, "1GB", token_budget=24, prefill_chunk=prefill_chunk, progress=False)
    steps = []
    run_step = compiled.engine.run_step
    compiled.engine.run_step = lambda step, input_ids, *a: steps.append(input_ids.shape[1]) or run_step(step, input_ids, *a)
    out = compiled.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                            pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    prefill_steps = steps[:len(steps) - (NEW - 1)]  # then one decode step per new token but the last
    logits = compiled(ids, attention_mask=mask).logits if forward else None  # every position's, same chunks
    return out, logits, prefill_steps


def test_batch_of_8_equals_chunks_per_row_and_one_shot_prefill():
    """Batch 8 at prefill_chunk 256: 32 tokens of every row per step (5 steps for 150 tokens). The same
    tokens, and logits to rounding, as 256 tokens of every row per step (what prefill_chunk meant per row
    before) and as the whole prompt in one step."""
    model = tiny_model("llama", num_hidden_layers=3)
    ids, mask = padded_batch(model.config.vocab_size, [150, 97, 140, 33, 150, 121, 64, 149], seed=4)
    shared, shared_logits, steps = run(model, ids, mask, 256)
    assert steps == [32, 32, 32, 32, 22]
    for prefill_chunk, expected_steps in ((256 * 8, [150]), (4096, [150])):
        other, other_logits, other_steps = run(model, ids, mask, prefill_chunk)
        assert other_steps == expected_steps
        assert torch.equal(shared.sequences, other.sequences), prefill_chunk
        for a, b in zip(shared.logits, other.logits):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        valid = mask.bool()
        torch.testing.assert_close(shared_logits[valid], other_logits[valid], atol=1e-5, rtol=1e-5)
    # and per-row chunks of 32, as an unbatched run of each row takes them: every row the same alone
    for row in (0, 3):
        keep = mask[row].bool()
        alone, _, _ = run(model, ids[row:row + 1, keep], None, 32, forward=False)
        assert torch.equal(alone.sequences[0, int(keep.sum()):], shared.sequences[row, ids.shape[1]:]), row


def test_a_batch_past_the_largest_is_refused_before_prefill_naming_the_largest():
    model = tiny_model("llama")
    prompt, new = 40, 8
    probe = specontext.compile(model, "1GB", progress=False)
    # room for 3 sequences growing from 40 to 48 tokens, with every layer's KV on the GPU
    budget = probe.memory.model(prompt + new).peak(3, prompt + new, 2, prompt + new, prompt=prompt)
    compiled = specontext.compile(model, budget, offload="none", progress=False)
    assert compiled.memory.max_batch(prompt, prompt + new) == 3
    prefilled = []
    prefill = compiled.engine.prefill
    compiled.engine.prefill = lambda *args: prefilled.append(args) or prefill(*args)
    ids = torch.randint(3, 96, (4, prompt), generator=torch.Generator().manual_seed(0))
    with pytest.raises(specontext.BudgetError, match="for batch 4 x 48 tokens .*; the largest batch it admits for a "
                                                     "40-token prompt growing to 48 tokens is 3$"):
        compiled.generate(ids, max_new_tokens=new, min_new_tokens=new)
    assert not prefilled  # refused before any work
    out = compiled.generate(ids[:3], max_new_tokens=new, min_new_tokens=new, do_sample=False)
    assert out.shape == (3, prompt + new) and len(prefilled) == 1 and compiled.memory.retries == 0
    # offload="auto" plans for layers' KV in host memory too, and names its own largest batch
    auto = specontext.compile(model, budget, progress=False)
    largest = auto.memory.max_batch(prompt, prompt + new)
    assert largest >= 3
    with pytest.raises(specontext.BudgetError, match=f"the largest batch it admits for a 40-token prompt growing to "
                                                     f"48 tokens is {largest}$"):
        auto.generate(torch.randint(3, 96, (largest + 1, prompt)), max_new_tokens=new, min_new_tokens=new)


def test_a_batch_past_the_host_budget_is_refused_before_prefill():
    """``host_budget``: the offloaded layers' K/V must fit host memory too; a batch past it is refused before
    any work, naming the host bytes and the largest batch both budgets admit, which then runs."""
    model = tiny_model("llama")
    prompt, new = 40, 8
    end = prompt + new
    layer_token = specontext.compile(model, "1GB", progress=False).kv_bytes_per_token // 2
    host = 3 * end * layer_token  # one layer of three sequences in host memory
    compiled = specontext.compile(model, "1GB", offload=[1], host_budget=host, progress=False)
    assert compiled.memory.max_batch(prompt, end) == 3
    prefilled = []
    prefill = compiled.engine.prefill
    compiled.engine.prefill = lambda *args: prefilled.append(args) or prefill(*args)
    ids = torch.randint(3, 96, (4, prompt), generator=torch.Generator().manual_seed(0))
    with pytest.raises(specontext.BudgetError, match=r"batch 4 x 48 tokens needs .* of host memory for the KV of the 1 "
                                                     r"layers .*; host_budget is .*: the largest batch both admit for a "
                                                     r"40-token prompt growing to 48 tokens is 3$"):
        compiled.generate(ids, max_new_tokens=new, min_new_tokens=new)
    assert not prefilled
    out = compiled.generate(ids[:3], max_new_tokens=new, min_new_tokens=new, do_sample=False)
    assert out.shape == (3, end) and len(prefilled) == 1
    # without host_budget nothing bounds host memory
    assert specontext.compile(model, "1GB", progress=False).memory.host_budget_bytes is None
    with pytest.raises(ValueError, match="budget"):
        specontext.compile(model, "1GB", host_budget="plenty")
