"""The RULER-style suite (evaluation/ruler.py): its samples, its splits, its scoring, and a small slice of
the benchmark on the real SmolLM2 (the full runs are benchmarks/accuracy_gpu.sh)."""

import pytest

import specontext
from specontext_compiler.config import GuardSettings
from specontext_compiler.evaluation import ruler, texts
from specontext_compiler.evaluation.shared_prefill import DENSE, HeadChoice, Method, generate_each
from specontext_compiler.retrieval import OracleTopK, TargetLayerHead
from specontext_compiler.retrieval.target_layer_head import default_layers


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2[1]


@pytest.mark.parametrize("task", ruler.TASKS)
def test_every_task_fits_its_length_and_its_answers_are_in_the_prompt(task, tokenizer):
    split = "fit" if task in ruler.FIT_TASKS else "heldout"
    length = 2400 if task == "common_words" else 700  # its 10 words x 30 and the rest x 3 need ~1.9K tokens
    sample = ruler.make_sample(task, tokenizer, length, 1, split)
    assert 0.8 * length <= sample.tokens <= length
    assert sample.references and sample.max_new_tokens > 0
    context = sample.text.lower()
    for reference in sample.references:
        assert reference.lower() in context, reference
    assert sample.score(" ".join(sample.references).upper()) == 1.0  # case-insensitive, every reference
    assert sample.score("") == 0.0
    again = ruler.make_sample(task, tokenizer, length, 1, split)
    assert again.text == sample.text and again.references == sample.references  # seeded


def test_partial_answers_score_their_share():
    assert ruler.string_match_all("alpha and gamma", ("Alpha", "beta", "gamma", "delta")) == 0.5


def test_the_splits_use_different_texts_and_tasks():
    fit, held_out = set(texts.sentences("reference")), set(texts.sentences("docstrings"))
    assert len(fit) > 200 and len(held_out) > 200
    assert len(fit & held_out) / min(len(fit), len(held_out)) < 0.03  # a few stock sentences recur (1.5%)
    assert set(ruler.tasks_of("fit")) < set(ruler.tasks_of("heldout"))


@pytest.mark.parametrize("bad, match", [
    (dict(task="niah_everything"), "task 'niah_everything' is not one of"),
    (dict(split="train"), "split 'train' is not one of"),
    (dict(length=100), "length must be an int of at least 256"),
    (dict(task="common_words", length=700), r"task 'common_words' needs at least \d+ tokens of input; got length=700"),
])
def test_bad_suite_arguments_are_refused(bad, match, tokenizer):
    arguments = dict(task="niah_single_noise", length=512, index=0, split="fit") | bad
    with pytest.raises(ValueError, match=match):
        ruler.make_sample(arguments["task"], tokenizer, arguments["length"], arguments["index"], arguments["split"])


def test_a_slice_of_the_suite_on_smollm2(smollm2):
    """One held-out needle at ~1K tokens: dense finds it, and so do the default head (with the guard on,
    selecting from the first decode step: no dense start, so the selection is what finds it) and oracle
    top-k at a quarter of the prompt, all decoded from one prefill."""
    model, tokenizer = smollm2
    sample = ruler.make_sample("niah_single_noise", tokenizer, 1024, 0, "heldout")
    choice = HeadChoice({"default": TargetLayerHead(default_layers(model.config.num_hidden_layers)),
                         "oracle": OracleTopK()})
    compiled = specontext.compile(model, "24GB", draft=choice, offload="none", progress=False,
                                  guard=GuardSettings(dense_start=0))
    budget = sample.tokens // 4
    methods = [DENSE, Method("default", budget, guard=True), Method("oracle", budget)]
    stats = {}
    outputs = generate_each(compiled, choice, sample.input_ids, methods, sample.max_new_tokens, stats)
    scores = {m.label: sample.score(tokenizer.decode(outputs[m][0], skip_special_tokens=True)) for m in methods}
    assert scores == {label: 1.0 for label in scores}, scores
    assert stats[methods[1]]["guard_checks"] >= 1
