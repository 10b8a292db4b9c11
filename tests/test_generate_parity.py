"""specontext.compile(...).generate / __call__ against transformers on tiny random models of every family."""

import pytest
import torch
from transformers import TextIteratorStreamer  # noqa: F401  (streamer API is checked with a recorder below)

import specontext
from specontext.testing import TINY_FAMILIES, padded_batch, tiny_model

FAMILIES = sorted(TINY_FAMILIES)


def reference_model(family):
    model = tiny_model(family)
    if family == "gemma2":
        # Gemma 2's logit soft-capping exists only in transformers' eager path: that is its definition.
        model.set_attn_implementation("eager")
    return model


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    model = reference_model(request.param)
    # 32 tokens a prefill step over a batch of 2: 16 of each row (the smallest step), prompts over 2 steps
    return request.param, model, specontext.compile(model, "1GB", prefill_chunk=32, progress=False)


def test_greedy_tokens_identical_on_padded_batch(pair):
    family, model, fast = pair
    ids, mask = padded_batch(model.config.vocab_size, [37, 21], seed=1)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    out = fast.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    assert torch.equal(ref, out), family
    assert fast.stats["steps"] == out.shape[1] - ids.shape[1] - 1


def test_call_logits_match_hf(pair):
    _, model, fast = pair
    ids, mask = padded_batch(model.config.vocab_size, [35, 19], seed=2)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    out = fast(ids, attention_mask=mask).logits
    assert out.shape == ref.shape
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-4, rtol=0)


def test_sampling_with_seed_matches_hf_per_step(pair):
    _, model, fast = pair
    ids, mask = padded_batch(model.config.vocab_size, [9, 5], seed=3)
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
                  return_dict_in_generate=True, output_logits=True, output_scores=True)
    torch.manual_seed(1234)
    ref = model.generate(ids, attention_mask=mask, **kwargs)
    torch.manual_seed(1234)
    out = fast.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(ref.sequences, out.sequences)
    assert len(out.logits) == len(ref.logits)
    for step_ref, step_out in zip(ref.logits, out.logits):
        torch.testing.assert_close(step_out, step_ref, atol=1e-4, rtol=0)
    for step_ref, step_out in zip(ref.scores, out.scores):
        torch.testing.assert_close(step_out, step_ref, atol=1e-4, rtol=0)


def test_sampling_with_transformers_defaults_matches_hf(pair):
    """Only do_sample=True: transformers 5.x fills the unset fields with its model-agnostic defaults (top_k 50)."""
    _, model, fast = pair
    ids, mask = padded_batch(model.config.vocab_size, [9, 5], seed=3)
    kwargs = dict(max_new_tokens=10, do_sample=True, return_dict_in_generate=True, output_scores=True)
    torch.manual_seed(99)
    ref = model.generate(ids, attention_mask=mask, **kwargs)
    torch.manual_seed(99)
    out = fast.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(ref.sequences, out.sequences)
    for step_ref, step_out in zip(ref.scores, out.scores, strict=True):  # top 50 of the 96 tokens kept, the rest -inf
        torch.testing.assert_close(step_out, step_ref, atol=1e-4, rtol=0)
    assert int(torch.isfinite(out.scores[0][0]).sum()) == 50


def test_family_registry_covers_every_supported_family():
    assert set(TINY_FAMILIES) == set(specontext.SUPPORTED_FAMILIES)


def test_eos_pad_and_min_new_tokens():
    model = tiny_model("llama")
    ids, mask = padded_batch(model.config.vocab_size, [8, 4], seed=4)
    with torch.no_grad():
        first = model(ids, attention_mask=mask).logits[:, -1].argmax(-1)
    eos = int(first[0])  # row 0 stops at once; row 1 goes on and row 0 is padded
    fast = specontext.compile(model, "1GB", progress=False)
    for kwargs in (dict(eos_token_id=eos, pad_token_id=0), dict(eos_token_id=eos, pad_token_id=0, min_new_tokens=5)):
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, **kwargs)
        out = fast.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, **kwargs)
        assert torch.equal(ref, out), kwargs


@pytest.mark.parametrize("lagged", [False, True])
@pytest.mark.parametrize("stop_after", [1, 3])
def test_generation_stops_once_every_row_has_ended(stop_after, lagged, monkeypatch):
    # On a GPU the stop check is read one step late (engine.LaggedStopCheck; forced here on the CPU): the
    # sequences and the streamed tokens must still end where transformers ends them, with no trailing
    # column of padding.
    from specontext_compiler.runtime import engine

    init = engine.LaggedStopCheck.__init__

    def lag(self, device):
        init(self, device)
        self.lagged = lagged

    monkeypatch.setattr(engine.LaggedStopCheck, "__init__", lag)
    model = tiny_model("llama")
    ids, mask = padded_batch(model.config.vocab_size, [8, 8], seed=6)
    ids, mask = ids[:1], mask[:1]
    free = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None)
    eos = int(free[0, 8 + stop_after - 1])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    fast = specontext.compile(model, "1GB", progress=False)
    streamer = RecordingStreamer()
    out = fast.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                        pad_token_id=0, streamer=streamer)
    assert torch.equal(ref, out)
    assert out.shape[1] <= 8 + stop_after
    assert torch.equal(torch.cat([c.view(-1) for c in streamer.chunks[1:]]), out[0, 8:])
    assert fast.stats["steps"] == out.shape[1] - 8 - 1 + lagged  # lagged: one step past the EOS


class RecordingStreamer:
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended = True


def test_streamer_receives_prompt_then_each_token():
    model = tiny_model("qwen3")
    fast = specontext.compile(model, "1GB", progress=False)
    ids = torch.randint(3, 96, (1, 10))
    streamer = RecordingStreamer()
    out = fast.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, streamer=streamer)
    assert streamer.ended
    assert torch.equal(streamer.chunks[0], ids)
    assert torch.equal(torch.cat([c.view(-1) for c in streamer.chunks[1:]]), out[0, 10:])


def test_generation_config_and_max_length_default():
    from transformers import GenerationConfig

    model = tiny_model("mistral")
    fast = specontext.compile(model, "1GB", progress=False)
    ids = torch.randint(3, 96, (2, 6))
    config = GenerationConfig(max_new_tokens=7, do_sample=False, eos_token_id=None)
    ref = model.generate(ids, generation_config=config)
    out = fast.generate(ids, generation_config=config)
    assert torch.equal(ref, out) and out.shape[1] == 13
    # neither max_new_tokens nor max_length: transformers' default of 20 new tokens applies
    ref = model.generate(ids, do_sample=False, eos_token_id=None)
    out = fast.generate(ids, do_sample=False, eos_token_id=None)
    assert torch.equal(ref, out) and out.shape[1] == 6 + 20


def test_user_model_is_not_mutated():
    model = tiny_model("llama")
    before = model.config.to_dict()
    implementation = model.config._attn_implementation
    fast = specontext.compile(model, "1GB", progress=False)
    fast.generate(torch.randint(3, 96, (1, 5)), max_new_tokens=3, do_sample=False)
    assert model.config._attn_implementation == implementation
    assert model.config.to_dict() == before
    # weights are shared, not copied
    assert fast.model.get_input_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_stats_counters():
    model = tiny_model("qwen2")
    fast = specontext.compile(model, "1GB", progress=False)
    fast.generate(torch.randint(3, 96, (2, 12)), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    stats = fast.stats
    assert stats["steps"] == 4 and stats["new_tokens"] == 5 and stats["batch"] == 2
    assert stats["prefill_seconds"] > 0 and stats["decode_seconds"] > 0 and stats["tokens_per_s"] > 0
    config = model.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4
    # the last token's KV is never written: it is not fed back
    assert stats["kv_bytes"] == per_token * 2 * (12 + 4)


def test_renormalized_scores_without_invalid_values_and_max_time_match_hf(pair):
    _, model, fast = pair
    ids, mask = padded_batch(model.config.vocab_size, [9, 5], seed=3)
    kwargs = dict(max_new_tokens=6, do_sample=True, top_k=10, renormalize_logits=True, remove_invalid_values=True,
                  return_dict_in_generate=True, output_scores=True)
    torch.manual_seed(7)
    ref = model.generate(ids, attention_mask=mask, **kwargs)
    torch.manual_seed(7)
    out = fast.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(ref.sequences, out.sequences)
    for step_ref, step_out in zip(ref.scores, out.scores, strict=True):  # log-probabilities: logsumexp 0 per row
        torch.testing.assert_close(step_out, step_ref, atol=1e-4, rtol=0)
    # max_time=0: every row is done after the first new token, as in transformers (MaxTimeCriteria).
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, max_time=0.0, do_sample=False)
    out = fast.generate(ids, attention_mask=mask, max_new_tokens=6, max_time=0.0, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 1 and torch.equal(out, ref)
