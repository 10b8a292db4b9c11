"""Bad input gets a clear error (naming the value and what is accepted) before any work starts."""

import pytest
import torch

import specontext
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def fast():
    return specontext.compile(tiny_model("llama", max_position_embeddings=64), "1GB", progress=False)


@pytest.mark.parametrize("budget", ["-1GB", "abc", "0", "24XB", ""])
def test_bad_budget(budget):
    with pytest.raises(ValueError, match="budget"):
        specontext.compile(tiny_model("llama"), budget)


def test_none_budget():
    with pytest.raises(TypeError, match="budget must be"):
        specontext.compile(tiny_model("llama"), None)


@pytest.mark.parametrize("token_budget, error", [(0, ValueError), (-1, ValueError), (1.5, ValueError), ("64", TypeError)])
def test_bad_token_budget(token_budget, error):
    with pytest.raises(error, match="token_budget"):
        specontext.compile(tiny_model("llama"), "1GB", token_budget=token_budget)


def test_budget_smaller_than_weights_says_what_is_needed():
    with pytest.raises(ValueError, match=r"needs at least .* weights .* budget is 1.0 KB"):
        specontext.compile(tiny_model("llama"), "1KB")


def test_budget_too_small_for_kv_at_generate():
    model = tiny_model("llama")
    weights = sum(p.numel() * 4 for p in model.parameters())
    fast = specontext.compile(model, weights + 10_000, progress=False)
    with pytest.raises(ValueError, match=r"needs at least .* for batch 4 x 200 tokens with every layer offloaded.*budget is"):
        fast.generate(torch.randint(3, 96, (4, 100)), max_new_tokens=100)


@pytest.mark.parametrize("model", [torch.nn.Linear(2, 2), "llama"])
def test_not_a_hf_model(model):
    with pytest.raises(TypeError, match="supported families"):
        specontext.compile(model, "1GB")


def test_unsupported_family_lists_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(TypeError, match=r"unsupported model GPT2LMHeadModel .*Llama"):
        specontext.compile(model, "1GB")


def test_non_causal_model():
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=16))
    with pytest.raises(TypeError, match="supported"):
        specontext.compile(model, "1GB")


def test_prompt_longer_than_max_positions(fast):
    with pytest.raises(ValueError, match=r"65 tokens is longer than .*max_position_embeddings \(64\)"):
        fast.generate(torch.randint(3, 96, (1, 65)), max_new_tokens=1)


@pytest.mark.parametrize("bad_id", [-1, 96, 10_000])
def test_token_ids_outside_vocab(fast, bad_id):
    ids = torch.randint(3, 96, (1, 5))
    ids[0, 2] = bad_id
    with pytest.raises(ValueError, match=rf"token id {bad_id} is outside the vocabulary; accepted ids are 0..95"):
        fast.generate(ids, max_new_tokens=1)


def test_empty_prompt(fast):
    with pytest.raises(ValueError, match="empty prompt"):
        fast.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=1)
    with pytest.raises(ValueError, match="empty prompt"):
        fast.generate(torch.ones(1, 3, dtype=torch.long), attention_mask=torch.zeros(1, 3, dtype=torch.long))


def test_mismatched_attention_mask(fast):
    with pytest.raises(ValueError, match=r"attention_mask shape \(1, 4\) does not match input_ids shape \(1, 5\)"):
        fast.generate(torch.ones(1, 5, dtype=torch.long), attention_mask=torch.ones(1, 4, dtype=torch.long))


def test_wrong_input_types(fast):
    with pytest.raises(TypeError, match="input_ids"):
        fast.generate([[1, 2, 3]])
    with pytest.raises(TypeError, match="integer token ids"):
        fast.generate(torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"shape \[batch, tokens\]"):
        fast.generate(torch.ones(3, dtype=torch.long))


def test_unknown_and_unsupported_generate_arguments(fast):
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(TypeError, match="unknown keyword"):
        fast.generate(ids, max_new_tokens=2, not_an_option=1)
    with pytest.raises(ValueError, match="num_beams=4 is not supported"):
        fast.generate(ids, max_new_tokens=2, num_beams=4)
