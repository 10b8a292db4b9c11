"""specontext imports and generates on the CPU where Triton is not installed (pyproject installs it on Linux
only: macOS, Windows and CPU-only installs have none). A subprocess hides Triton from the import system
and runs the same compile and generate as this process, which has Triton."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import specontext
from specontext.testing import tiny_model

TESTS = Path(__file__).parent

# What ``import triton`` does on a machine without it: ModuleNotFoundError, for the package and its modules.
HIDE_TRITON = textwrap.dedent("""
    import sys

    class NoTriton:
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoTriton())
""")

PROMPT = torch.randint(3, 96, (1, 40), generator=torch.Generator().manual_seed(0))
OPTIONS = dict(token_budget=12, sink_tokens=2, local_window=4, offload=[1], guard=False, progress=False)


def generate_tokens(specontext_module) -> list[list[int]]:
    """Sparse decode steps past the token budget, layer 1 offloaded (its rows gathered from host memory)."""
    fast = specontext_module.compile(tiny_model("llama"), "1GB", **OPTIONS)
    return fast.generate(PROMPT, max_new_tokens=8, do_sample=False).tolist()


SCRIPT = HIDE_TRITON + textwrap.dedent(f"""
    import io, json, logging, contextlib
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch
    torch.set_num_threads({torch.get_num_threads()})
    import specontext
    from specontext_compiler import kernels
    from specontext_compiler.cli import main
    from test_triton_optional import generate_tokens

    first = generate_tokens(specontext)
    second = generate_tokens(specontext)  # a second compile and generate: no second log line
    try:
        kernels.use_kernels(True)
        refusal = None
    except ImportError as error:
        refusal = str(error)
    try:
        kernels.sparse_decode_attention(None, None, None, None)
        direct = None
    except ImportError as error:
        direct = str(error)
    info = io.StringIO()
    with contextlib.redirect_stdout(info):
        main(["info"])
    print(json.dumps(dict(
        tokens=first, again=second, triton_imported="triton" in sys.modules, available=kernels.TRITON_AVAILABLE,
        on_path=kernels.on_triton_path(torch.zeros(1)), refusal=refusal, direct=direct, info=info.getvalue(),
        registered=[name for name in ("sparse_decode_attention", "retrieval_scores", "gather_rows")
                    if hasattr(torch.ops.specontext, name)],
    )))
""")


@pytest.fixture(scope="module")
def without_triton():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env.pop("SPECONTEXT_KERNELS", None)
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def test_imports_and_generates_the_same_tokens_without_triton(without_triton):
    report, _ = without_triton
    assert not report["triton_imported"] and not report["available"] and not report["on_path"]
    assert report["registered"] == []  # no triton_op registered
    assert report["tokens"] == report["again"] == generate_tokens(specontext)  # this process has Triton


def test_one_log_line_says_the_kernels_are_off(without_triton):
    _, stderr = without_triton
    lines = [line for line in stderr.splitlines() if "Triton is not available" in line]
    assert len(lines) == 1, stderr  # at import, not per compile or call
    assert "specontext_compiler.kernels" in lines[0] and "kernels are off" in lines[0] and "pip install triton" in lines[0]


def test_asking_for_the_kernels_without_triton_names_what_to_install(without_triton):
    report, _ = without_triton
    assert "use_kernels(True) needs Triton" in report["refusal"] and "pip install triton" in report["refusal"]
    assert "sparse_decode_attention is a Triton kernel" in report["direct"] and "pip install triton" in report["direct"]
    assert "not installed" in next(line for line in report["info"].splitlines() if line.startswith("triton"))


def test_the_kernels_are_registered_with_triton():
    from specontext_compiler import kernels

    assert kernels.TRITON_AVAILABLE
    for name in ("sparse_decode_attention", "sparse_decode_attention_appending", "retrieval_scores", "gather_rows"):
        assert hasattr(torch.ops.specontext, name), name


def test_compile_decode_step_on_cuda_without_triton_is_refused_before_any_work(monkeypatch):
    """Inductor's CUDA code is Triton: asking for the compiled step on CUDA without it fails at compile/load,
    not mid-generate (checked on a CUDA device object; nothing runs on it)."""
    from specontext_compiler import kernels
    from specontext_compiler.config import CompileConfig, check_cuda_graph

    monkeypatch.setattr(kernels, "TRITON_AVAILABLE", False)
    config = CompileConfig.from_arguments("1GB", compile_decode_step=True)
    with pytest.raises(ValueError, match="compile_decode_step=True on CUDA needs Triton, which is not installed"):
        check_cuda_graph(config, torch.device("cuda"))
    check_cuda_graph(config, torch.device("cpu"))  # on the CPU Inductor writes C++: accepted
