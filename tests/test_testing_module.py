"""specontext.testing is what tests, benchmarks and the demo build on; benchmarks run as modules from the
repository root with no PYTHONPATH edits."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specontext.testing import TINY_FAMILIES, code_word_document, padded_batch, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_every_benchmark_imports_from_the_repository_root_without_pythonpath():
    modules = sorted(path.stem for path in (ROOT / "benchmarks").glob("*.py") if path.stem != "__init__")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    code = "import importlib, sys\nfor name in sys.argv[1:]: importlib.import_module('benchmarks.' + name)"
    result = subprocess.run([sys.executable, "-c", code, *modules], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "e2e" in modules and "accuracy" in modules


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_tiny_models_are_seeded(family):
    first, second = tiny_model(family, seed=3), tiny_model(family, seed=3)
    ids, mask = padded_batch(first.config.vocab_size, [7, 4], seed=1)
    assert mask.tolist() == [[1] * 7, [0] * 3 + [1] * 4] and bool((ids[mask == 1] >= 3).all())
    with torch.no_grad():
        assert torch.equal(first(ids, attention_mask=mask).logits, second(ids, attention_mask=mask).logits)


def test_code_word_document_holds_its_code_word_near_the_length_asked(smollm2):
    tokenizer = smollm2[1]
    ids, word = code_word_document(tokenizer, target_tokens=600, code_word="LANTERN", seed=2)
    text = tokenizer.decode(ids[0])
    assert word == "LANTERN" and "secret code word is LANTERN" in text
    assert 500 <= ids.shape[1] <= 620
