"""The real SmolLM2-135M-Instruct on a ~2K-token document: SpeContext against transformers."""

import torch

import specontext
from specontext.testing import code_word_document


def test_greedy_identical_to_hf_on_2k_prompt(smollm2, smollm2_compiled):
    model, tokenizer = smollm2
    ids, word = code_word_document(tokenizer, target_tokens=2000, code_word="TORNADO", depth=0.5)
    assert 1900 <= ids.shape[1] <= 2100
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=24, do_sample=False)
    out = smollm2_compiled.generate(ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(ref, out)
    assert word in tokenizer.decode(out[0, ids.shape[1]:]).upper()
    stats = smollm2_compiled.stats
    assert stats["kv_bytes"] == smollm2_compiled.kv_bytes_per_token * (out.shape[1] - 1)


def test_call_logits_within_1e4_of_hf_with_chunked_prefill(smollm2):
    model, tokenizer = smollm2
    ids, _ = code_word_document(tokenizer, target_tokens=1200, code_word="GLACIER", depth=0.3, seed=1)
    with torch.no_grad():
        ref = model(ids).logits
    # prefill in chunks of 512 must equal prefill at once
    chunked = specontext.compile(model, "24GB", prefill_chunk=512, progress=False)
    out = chunked(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_left_padded_batch_matches_hf(smollm2, smollm2_compiled):
    model, tokenizer = smollm2
    a, _ = code_word_document(tokenizer, target_tokens=300, code_word="CACTUS", seed=2)
    b, _ = code_word_document(tokenizer, target_tokens=200, code_word="FALCON", seed=3)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = a.shape[1]
    ids = torch.full((2, width), pad, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    ids[0], mask[0] = a[0], 1
    ids[1, width - b.shape[1]:], mask[1, width - b.shape[1]:] = b[0], 1
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=pad)
    out = smollm2_compiled.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=pad)
    assert torch.equal(ref, out)


def test_the_converted_gguf_cache_loads_what_the_gguf_file_holds(smollm2, monkeypatch):
    """load_model keeps a GGUF file converted to safetensors + JSON (models._converted_gguf); what it loads
    from there equals what transformers reads from the GGUF file itself."""
    from specontext_compiler.models import gguf_cache_root, load_model

    model, tokenizer = smollm2
    assert gguf_cache_root() is not None
    monkeypatch.setenv("SPECONTEXT_CACHE", "")  # no cache: straight from the GGUF file
    assert gguf_cache_root() is None
    direct, direct_tokenizer = load_model("smollm2")
    cached, loaded = model.state_dict(), direct.state_dict()
    assert cached.keys() == loaded.keys()
    assert all(torch.equal(cached[name], loaded[name]) for name in cached)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Naïve café: 2+2?\n\tok"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == direct_tokenizer.apply_chat_template([{"role": "user", "content": "Naïve café: 2+2?\n\tok"}],
                                                        tokenize=False, add_generation_prompt=True)
    assert tokenizer(text)["input_ids"] == direct_tokenizer(text)["input_ids"]
    where = {"quantization_config": None, "_name_or_path": None}  # the GGUF's, and the folder read
    assert model.config.to_dict() | where == direct.config.to_dict() | where
