"""generate's ``logits_processor``, ``stopping_criteria`` and ``stop_strings`` against transformers' generate.

transformers (5.x) applies the processors to each step's scores before the token is chosen (the config's
processors, the caller's merged into them, then the sampling warpers), and the criteria after the token is
appended, on the whole sequence so far: ``unfinished & ~criteria(sequences, scores)``; finished rows then
get pad tokens when any criterion has an ``eos_token_id``.
"""

from __future__ import annotations

import logging
import string

import pytest
import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
)
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

import specontext
from specontext_compiler.config import GuardSettings
from specontext_compiler.runtime import engine
from test_accuracy_guard import compile_missing, set_decode_mode
from test_generate_parity import RecordingStreamer
from specontext.testing import padded_batch, peaked_llama, tiny_model


class BanToken(LogitsProcessor):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores):
        return scores.masked_fill(torch.arange(scores.shape[-1], device=scores.device) == self.token, -float("inf"))


class ForceToken(LogitsProcessor):
    """Forces ``token`` as the token at sequence length ``at`` (every row)."""

    def __init__(self, token: int, at: int):
        self.token, self.at = token, at

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] != self.at:
            return scores
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.token] = 0.0
        return forced


class StopOnToken(StoppingCriteria):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


class StopRowAt(StoppingCriteria):
    """Row ``row`` is done once the sequences are ``length`` long."""

    def __init__(self, row: int, length: int):
        self.row, self.length = row, length

    def __call__(self, input_ids, scores, **kwargs):
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        done[self.row] = input_ids.shape[1] >= self.length
        return done


class RecordsScores(StoppingCriteria):
    """Never stops; records what it is handed as ``scores`` (None, or how many steps' scores)."""

    def __init__(self):
        self.seen = []

    def __call__(self, input_ids, scores, **kwargs):
        self.seen.append(None if scores is None else len(scores))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    return model, specontext.compile(model, "1GB", progress=False)


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def char_tokenizer():
    """A character-level tokenizer of the tiny models' 96 ids (a few multi-character tokens, so that a stop
    string can end inside a token), with no files: StopStringCriteria reads its vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for token in list(string.ascii_lowercase) + [" ", ".", ",", "!", "st", "op", "stop", "the", "ing", "an", "er", "on"]:
        vocab[token] = len(vocab)
    while len(vocab) < 96:
        vocab[f"w{len(vocab)}"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def both(model, fast, ids, mask, seed=None, **kwargs):
    """(transformers' output, SpeContext's) for the same arguments (and the same seed, when sampling)."""
    outputs = []
    for generate in (model.generate, fast.generate):
        if seed is not None:
            torch.manual_seed(seed)
        outputs.append(generate(ids, attention_mask=mask, **kwargs))
    return outputs


def lag_stop_check(monkeypatch, lagged: bool) -> None:
    """The stop check read one step late, as on a GPU (engine.LaggedStopCheck), or at once."""
    init = engine.LaggedStopCheck.__init__

    def patched(self, device):
        init(self, device)
        self.lagged = lagged

    monkeypatch.setattr(engine.LaggedStopCheck, "__init__", patched)


# -- logits processors ---------------------------------------------------------------------------------

def test_custom_processors_give_hf_greedy_tokens(llama):
    model, fast = llama
    ids, mask = padded_batch(96, [9, 5], seed=3)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    banned, forced = int(free[0, 11]), int(free[1, 14])
    for processors in ([BanToken(banned)], [ForceToken(forced, at=12)], [BanToken(banned), ForceToken(forced, at=12)]):
        ref, out = both(model, fast, ids, mask, max_new_tokens=12, do_sample=False,
                        logits_processor=LogitsProcessorList(processors))
        assert torch.equal(ref, out), processors
        assert not torch.equal(out, free)  # the processor changed the tokens
    assert (out[:, 9:] != banned).all() and (out[:, 12] == forced).all()


def test_custom_processor_gives_hf_sampled_tokens_and_scores(llama):
    model, fast = llama
    ids, mask = padded_batch(96, [9, 5], seed=3)
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_k=20, return_dict_in_generate=True,
                  output_scores=True, logits_processor=LogitsProcessorList([BanToken(7), ForceToken(11, at=13)]))
    ref, out = both(model, fast, ids, mask, seed=1234, **kwargs)
    assert torch.equal(ref.sequences, out.sequences)
    assert (out.sequences[:, 13] == 11).all()
    for step_ref, step_out in zip(ref.scores, out.scores, strict=True):
        torch.testing.assert_close(step_out, step_ref, atol=1e-4, rtol=0)


def test_a_custom_processor_of_a_config_made_type_follows_hf(llama, caplog):
    """transformers 5.x (``_merge_criteria_processor_list``) does not raise on a duplicate: a custom processor
    of a type the config creates replaces it, with a warning. The sampling warpers are added after that
    merge, so a custom TemperatureLogitsWarper is applied as well as the config's temperature."""
    model, fast = llama
    ids, mask = padded_batch(96, [9, 5], seed=3)
    custom = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(penalty=3.0)])
    with caplog.at_level(logging.WARNING, logger="specontext_compiler.runtime.sampling"):
        ref, out = both(model, fast, ids, mask, max_new_tokens=12, do_sample=False, repetition_penalty=1.1,
                        logits_processor=custom)
    assert torch.equal(ref, out)
    assert "custom logits processor of type RepetitionPenaltyLogitsProcessor" in caplog.text
    config_only = fast.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, repetition_penalty=1.1)
    assert not torch.equal(out, config_only)  # the custom penalty, not the config's
    # top_k given explicitly (0: no top-k warper), so that only the two temperature warpers differ.
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=0.7, top_k=0, return_dict_in_generate=True,
                  output_scores=True, logits_processor=LogitsProcessorList([TemperatureLogitsWarper(0.5)]))
    ref, out = both(model, fast, ids, mask, seed=7, **kwargs)
    assert torch.equal(ref.sequences, out.sequences)
    for step_ref, step_out in zip(ref.scores, out.scores, strict=True):
        torch.testing.assert_close(step_out, step_ref, atol=1e-4, rtol=0)


# -- stopping criteria ---------------------------------------------------------------------------------

@pytest.mark.parametrize("lagged", [False, True])
def test_custom_criteria_stop_and_pad_rows_as_hf(llama, lagged, monkeypatch):
    """Rows stop where transformers stops them, at batch 3 with padding; finished rows are padded when there
    is an EOS criterion (the config's eos_token_id) and keep their own tokens without one."""
    lag_stop_check(monkeypatch, lagged)
    model, fast = llama
    ids, mask = padded_batch(96, [9, 5, 7], seed=3)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None)
    stop_token = int(free[1, 12])
    for eos in ({}, {"eos_token_id": None}):
        criteria = StoppingCriteriaList([StopOnToken(stop_token), StopRowAt(2, 15)])
        streamer = RecordingStreamer()
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, stopping_criteria=criteria, **eos)
        out = fast.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, stopping_criteria=criteria,
                            streamer=streamer, **eos)
        assert torch.equal(ref, out), eos
        assert torch.equal(torch.cat([c.view(-1) for c in streamer.chunks[1:]]), out[:, 9:].T.reshape(-1))
        padded = (out[1, 13:] == 0).all() and (out[2, 15:] == 0).all()
        assert bool(padded) == ("eos_token_id" not in eos), eos
    # Every row stopped: the sequences end there, with no column of padding after it.
    criteria = StoppingCriteriaList([StopRowAt(0, 12), StopRowAt(1, 14), StopRowAt(2, 13)])
    ref, out = both(model, fast, ids, mask, max_new_tokens=12, do_sample=False, stopping_criteria=criteria)
    assert torch.equal(ref, out) and out.shape[1] == 14
    assert fast.stats["steps"] == 14 - 9 - 1 + lagged  # lagged: one step past the end, as for EOS


def test_criteria_get_the_scores_hf_gives_them(llama):
    model, fast = llama
    ids, mask = padded_batch(96, [9, 5], seed=3)
    for extra in ({}, {"return_dict_in_generate": True, "output_scores": True}):
        ref_criteria, out_criteria = RecordsScores(), RecordsScores()
        model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                       stopping_criteria=StoppingCriteriaList([ref_criteria]), **extra)
        fast.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                      stopping_criteria=StoppingCriteriaList([out_criteria]), **extra)
        assert out_criteria.seen == ref_criteria.seen, extra


def test_custom_criteria_of_config_made_types_follow_hf(llama):
    """A custom EosTokenCriteria or MaxLengthCriteria replaces generate's own (transformers 5.x)."""
    model, fast = llama
    ids, mask = padded_batch(96, [9, 5], seed=3)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None)
    eos = int(free[0, 12])
    for criteria in ([EosTokenCriteria(eos_token_id=eos)], [MaxLengthCriteria(max_length=15)]):
        ref, out = both(model, fast, ids, mask, max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=0,
                        stopping_criteria=StoppingCriteriaList(criteria))
        assert torch.equal(ref, out), criteria
        assert not torch.equal(out, free)


def test_generate_without_criteria_keeps_its_fast_path(llama):
    """No criteria beyond EOS and length: nothing is evaluated per step beyond the EOS check."""
    from specontext_compiler.runtime.sampling import resolve_generation_config

    _, fast = llama
    settings = resolve_generation_config(fast.generation_config, None, 5, {"max_new_tokens": 4})
    assert len(settings.stopping_criteria) == 0 and settings.check_eos and settings.pad_finished
    settings = resolve_generation_config(fast.generation_config, None, 5, {"max_new_tokens": 4, "eos_token_id": None})
    assert len(settings.stopping_criteria) == 0 and not settings.check_eos and not settings.pad_finished


# -- stop strings ----------------------------------------------------------------------------------------

def test_stop_strings_give_hf_output(llama, tokenizer):
    model, fast = llama
    ids, mask = padded_batch(96, [9, 5], seed=3)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None)
    # A string the free run writes: row 1's 4th and 5th new tokens, the end of the 5th cut off.
    text = tokenizer.decode(free[1, 12:14])[:-1]
    for stop_strings in (text, [text, "zzzz"]):
        ref, out = both(model, fast, ids, mask, max_new_tokens=12, do_sample=False, stop_strings=stop_strings,
                        tokenizer=tokenizer)
        assert torch.equal(ref, out), stop_strings
        assert (out[1, 14:] == 0).all()  # row 1 stopped, then padded (the config's eos_token_id is set)


def test_stop_strings_need_a_tokenizer_as_in_hf(llama):
    model, fast = llama
    ids = torch.randint(3, 96, (1, 5))
    with pytest.raises(ValueError) as ref:
        model.generate(ids, max_new_tokens=3, stop_strings=["stop"])
    with pytest.raises(ValueError, match="must pass the model's tokenizer to the `tokenizer` argument") as out:
        fast.generate(ids, max_new_tokens=3, stop_strings=["stop"])
    assert str(out.value) == str(ref.value)


def test_unknown_keyword_is_refused_by_name(llama):
    _, fast = llama
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) \['stop_string'\]; accepted: .*stopping_criteria"):
        fast.generate(torch.randint(3, 96, (1, 5)), max_new_tokens=3, stop_string="x")


# -- fixed-shape decode and the accuracy guard's redo ------------------------------------------------------

def test_fixed_shape_decode_gives_the_eager_tokens_with_processors_and_criteria(tokenizer):
    compiled = specontext.compile(tiny_model("llama"), "1GB", token_budget=16, offload="none", local_window=4,
                                  progress=False)
    ids, mask = padded_batch(96, [40, 27], seed=4)
    free = compiled.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    ban = LogitsProcessorList([BanToken(int(free[0, 45]))])
    banned = compiled.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, logits_processor=ban)
    assert not torch.equal(banned, free)
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, logits_processor=ban,
                  stopping_criteria=StoppingCriteriaList([StopRowAt(0, 58)]),
                  stop_strings=tokenizer.decode(banned[1, 52:54]), tokenizer=tokenizer)
    expected = compiled.generate(ids, attention_mask=mask, **kwargs)
    # Row 1 stopped on the string by 54 tokens and was padded; row 0 at 58, where the sequences end.
    assert expected.shape[1] == 58 and (expected[1, 54:] == 0).all()
    compiled.engine.decode_mode = "fixed"
    assert torch.equal(compiled.generate(ids, attention_mask=mask, **kwargs), expected)
    assert compiled.stats["fixed_shape_steps"] == compiled.stats["steps"]


class DivergesFrom(StoppingCriteria):
    """Stops a row whose last token is not ``expected``'s there: on the final sequences it never fires, so a
    row it stops was stopped on a token that a redo took back. Counts those tokens."""

    def __init__(self, expected: torch.Tensor):
        self.expected, self.diverged = expected, 0

    def __call__(self, input_ids, scores, **kwargs):
        length = input_ids.shape[1]
        if length > self.expected.shape[1]:
            return torch.ones(input_ids.shape[0], dtype=torch.bool)
        differs = input_ids[:, -1] != self.expected[:, length - 1]
        self.diverged += int(differs.sum())
        return differs


@pytest.mark.parametrize("decode_mode", ["eager", "fixed", "fixed_lagged"])
def test_a_criterion_on_a_taken_back_step_does_not_stop_the_row(decode_mode, monkeypatch):
    """The accuracy guard takes back steps whose selection missed (read one step late, "fixed_lagged": the
    token chosen from the missed step's logits was already appended and judged by the criteria): the row
    goes on from before it, as EOS does, and the output is the dense model's with the same criteria."""
    lag_stop_check(monkeypatch, decode_mode == "fixed_lagged")
    ids, mask = padded_batch(96, [40, 33], seed=5)
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    dense_model = peaked_llama()
    dense = specontext.compile(dense_model, "1GB", token_budget=None, progress=False)
    stop_row = StoppingCriteriaList([StopRowAt(0, 50)])
    expected = dense.generate(ids, attention_mask=mask, stopping_criteria=stop_row, **kwargs)
    assert torch.equal(dense_model.generate(ids, attention_mask=mask, stopping_criteria=stop_row, **kwargs), expected)
    assert (expected[0, 50:] == 0).all() and expected.shape[1] == 60
    guarded = compile_missing(GuardSettings(threshold=0.6, hold_steps=0, check_every=1, dense_start=0))
    set_decode_mode(guarded, decode_mode)
    diverges = DivergesFrom(expected)
    out = guarded.generate(ids, attention_mask=mask, stopping_criteria=StoppingCriteriaList([StopRowAt(0, 50), diverges]),
                           **kwargs)
    assert torch.equal(out, expected)
    assert guarded.stats["guard_triggers"] > 0
    if decode_mode == "fixed_lagged":
        assert diverges.diverged > 0  # the criteria did see tokens that were then taken back
