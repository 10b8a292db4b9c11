import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from specontext_compiler.cli import main


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2):
    """A tiny random Llama with SmolLM2's tokenizer, saved as a normal model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer = smollm2
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_console_script_info():
    result = subprocess.run([sys.executable, "-m", "specontext_compiler.cli", "info"], capture_output=True, text=True, check=True)
    assert "torch" in result.stdout and "transformers" in result.stdout and "device" in result.stdout
    if not torch.cuda.is_available():
        assert re.search(r"host -> GPU +not measured \(no CUDA device\)", result.stdout)


def test_generate_streams_tokens_with_a_prefill_bar_and_reports(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from transformers import TextStreamer

    pieces = []
    original = TextStreamer.on_finalized_text
    monkeypatch.setattr(TextStreamer, "on_finalized_text",
                        lambda self, text, stream_end=False: pieces.append(text) or original(self, text, stream_end))
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Tell me about the river valley and its orchards, and the roads between the towns. " * 2)
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt-file", str(prompt), "--max-new-tokens", "12",
                 "--offload", "0", "--token-budget", "8", "--prefill-chunk", "16"]) == 0
    captured = capsys.readouterr()
    assert sum(1 for piece in pieces if piece) >= 2  # printed as the tokens came, not once at the end
    assert captured.out.strip()
    assert "prefill" in captured.err and "tok/s" in captured.err  # the tqdm bar over the 16-token chunks
    last = captured.err.strip().splitlines()[-1]
    assert "12 new" in last and "decode" in last and "tok/s" in last
    moved = re.search(r"KV moved host->GPU ([0-9.]+ [KMG]?B) \(full reloads would move ([0-9.]+ [KMG]?B)\)", last)
    assert moved, last  # layer 0 is offloaded: its selected rows moved to the device


def test_export_then_generate_from_the_artifact(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "artifact"
    assert main(["export", "--model", str(tiny_model_dir), "--budget", "1GB", "--out", str(out), "--token-budget", "8"]) == 0
    assert (out / "manifest.json").is_file() and (out / "tokenizer").is_dir()
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Tell me about the river valley and its orchards.")
    assert main(["generate", "--model", str(out), "--prompt-file", str(prompt), "--max-new-tokens", "5", "--budget", "2GB"]) == 0
    assert "5 new" in capsys.readouterr().err
    assert main(["export", "--model", str(tiny_model_dir), "--out", str(out)]) == 2  # not empty: one clear line
    assert "not an empty directory" in capsys.readouterr().err


ROOT = Path(__file__).parents[1]
PROMPT = "Tell me about the river valley and its orchards, and the roads between the towns."
SMALL = ["--max-new-tokens", "6", "--token-budget", "8"]


def run_module(*arguments: str, code: str | None = None) -> subprocess.CompletedProcess:
    """``python -m specontext ARGUMENTS`` from this checkout (or ``python -c CODE``), bounded in time."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "specontext", *arguments]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=180)


def test_version(capsys):
    import specontext_compiler

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"specontext {specontext_compiler.__version__}\n"


def test_python_dash_m_specontext_is_the_console_script():
    import specontext.__main__
    import specontext_compiler
    from specontext_compiler import cli

    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"specontext": "specontext_compiler.cli:main"} and specontext.__main__.main is cli.main
    result = run_module("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"specontext {specontext_compiler.__version__}\n"


def generate(tiny_model_dir, capsys, *arguments: str) -> str:
    assert main(["generate", "--model", str(tiny_model_dir), *SMALL, *arguments]) == 0
    captured = capsys.readouterr()
    assert "6 new" in captured.err.strip().splitlines()[-1]
    return captured.out


def test_prompt_as_text_or_on_standard_input(tiny_model_dir, capsys, monkeypatch):
    from_text = generate(tiny_model_dir, capsys, "--prompt", PROMPT)
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT))
    from_stdin = generate(tiny_model_dir, capsys, "--prompt-file", "-")
    assert from_text.strip() and from_text == from_stdin  # greedy: the same prompt, the same completion


def test_seeded_sampling_is_reproducible(tiny_model_dir, capsys):
    sampling = ["--prompt", PROMPT, "--do-sample", "--temperature", "1.5", "--top-p", "0.95"]
    first = generate(tiny_model_dir, capsys, *sampling, "--seed", "7")
    again = generate(tiny_model_dir, capsys, *sampling, "--seed", "7")
    other = generate(tiny_model_dir, capsys, *sampling, "--seed", "8")
    assert first.strip() and first == again and other != first


def _empty_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(" \n"))
    return ["--prompt-file", "-"]


@pytest.mark.parametrize("arguments, message", [
    (lambda tmp_path, _: ["--prompt-file", str(tmp_path / "missing.txt")], r"^specontext: error: prompt file '.*missing.txt' does not exist$"),
    (lambda tmp_path, _: ["--prompt-file", str(tmp_path)], r"^specontext: error: prompt file '.*' is not a file$"),
    (lambda _, __: ["--prompt", "  "], r"^specontext: error: --prompt is empty$"),
    (lambda _, monkeypatch: _empty_stdin(monkeypatch), r"^specontext: error: the prompt on standard input \(--prompt-file -\) is empty$"),
    # Met once the model is loaded: still one line, exit status 2.
    (lambda _, __: ["--prompt", "hi", "--budget", "1KB"], r"^specontext: error: budget is too small: the model needs at least .*; budget is 1.0 KB$"),
    (lambda _, __: ["--prompt", "hi", "--offload", "5"], r"^specontext: error: offload lists layers \[5\]; the model has layers 0..1$"),
    (lambda _, __: ["--prompt", "hi " * 600], r"^specontext: error: the prompt is \d+ tokens; the model takes at most 512$"),
], ids=["missing prompt file", "prompt file a directory", "empty --prompt", "empty stdin", "budget below the weights",
        "offload past the last layer", "prompt longer than the model"])
def test_usage_errors_are_one_line_and_exit_2(arguments, message, tiny_model_dir, tmp_path, monkeypatch, capsys):
    assert main(["generate", "--model", str(tiny_model_dir), *arguments(tmp_path, monkeypatch)]) == 2
    captured = capsys.readouterr()
    # The error is the last line: before it only transformers' weight-loading bar (once the model loads).
    lines = [line for line in re.split(r"[\r\n]", captured.err) if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and re.search(message, lines[0]), captured.err
    assert "Traceback" not in captured.err and not captured.out


@pytest.mark.parametrize("arguments, message", [
    (["generate", "--model", "M", "--prompt", "hi", "--max-new-tokens", "many"], "argument --max-new-tokens: invalid int value: 'many'"),
    (["generate", "--model", "M"], "one of the arguments --prompt --prompt-file is required"),
    (["generate", "--model", "M", "--prompt", "hi", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["plan", "--model", "llama-3.1-8b", "--budget", "24GB", "--context", "0"], "argument --context: must be a positive int; got 0"),
])
def test_argparse_errors_are_one_line_and_exit_2(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(arguments)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("specontext") and f"error: {message}" in err


def test_a_model_directory_without_a_config_is_a_usage_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert re.fullmatch(r"specontext: error: model directory '.*' has no config.json .*\n", capsys.readouterr().err)


def test_internal_errors_keep_their_traceback(tiny_model_dir, monkeypatch):
    """A bug's TypeError or ValueError is not a usage error: it leaves main with its traceback."""
    import specontext
    from specontext_compiler.api import SpeContextModel

    def bug(*args, **kwargs):
        raise ValueError("a bug in generate")

    monkeypatch.setattr(SpeContextModel, "generate", bug)
    with pytest.raises(ValueError, match="a bug in generate"):
        main(["generate", "--model", str(tiny_model_dir), "--prompt", PROMPT, *SMALL])
    monkeypatch.setattr(specontext, "compile", lambda *a, **k: {}["a bug in compile"])  # KeyError
    with pytest.raises(KeyError, match="a bug in compile"):
        main(["generate", "--model", str(tiny_model_dir), "--prompt", PROMPT, *SMALL])
    # The command itself: a traceback on stderr and exit status 1, not one line and 2.
    result = run_module(code=(
        "import runpy, sys, specontext\n"
        "def bug(*args, **kwargs):\n    raise TypeError('a bug in compile')\n"
        "specontext.compile = bug\n"
        f"sys.argv = ['specontext', 'generate', '--model', {str(tiny_model_dir)!r}, '--prompt', 'hi']\n"
        "runpy.run_module('specontext', run_name='__main__')\n"))
    assert result.returncode == 1, result.stderr
    assert "Traceback (most recent call last)" in result.stderr and "TypeError: a bug in compile" in result.stderr
    assert "specontext: error" not in result.stderr
