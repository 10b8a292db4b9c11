import re
import subprocess
import sys

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
                 "--offload", "0", "--token-budget", "8", "--prefill-chunk", "8"]) == 0
    captured = capsys.readouterr()
    assert sum(1 for piece in pieces if piece) >= 2  # printed as the tokens came, not once at the end
    assert captured.out.strip()
    assert "prefill" in captured.err and "tok/s" in captured.err  # the tqdm bar over the 8-token chunks
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
