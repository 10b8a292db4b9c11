"""HF generate vs SpeContext on SmolLM2-135M-Instruct: prefill and decode speed at a few context lengths.

    .venv/bin/python -m benchmarks.generate --contexts 1000 2000 --new-tokens 32

Prints a table and writes benchmarks/results/generate_<device>.json. Decode speed is also stated as
bytes read per step (weights + KV) over the step time, the figure the hardware bounds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

import specontext
from specontext_compiler.models import load_model
from specontext.testing import code_word_document

RESULTS = Path(__file__).parent / "results"


def timed_hf(model, ids, new_tokens):
    """HF generate; decode time from a run with 1 new token subtracted (HF exposes no split)."""
    with torch.no_grad():
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        total = time.perf_counter() - t
    return out, prefill, max(total - prefill, 1e-9)


def copy_bandwidth_gb_s(device: torch.device, megabytes: int = 512) -> float:
    """Measured memory bandwidth (bytes read + written per second) of a large tensor copy on ``device``."""
    src = torch.ones(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1000, 2000])
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2")
    fast = specontext.compile(model, "24GB", progress=False)
    weights = fast.weight_bytes
    bandwidth = copy_bandwidth_gb_s(fast.device)
    rows = []
    for context in tqdm(args.contexts, desc="contexts"):
        ids, _ = code_word_document(tokenizer, target_tokens=context)
        hf_out, hf_prefill, hf_decode = timed_hf(model, ids, args.new_tokens)
        sc_out = fast.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        s = fast.stats
        steps = args.new_tokens - 1
        kv_mid = fast.kv_bytes_per_token * (ids.shape[1] + args.new_tokens // 2)
        rows.append({
            "context": int(ids.shape[1]),
            "hf_prefill_s": hf_prefill,
            "hf_decode_tok_s": steps / hf_decode,
            "specontext_prefill_s": s["prefill_seconds"],
            "specontext_decode_tok_s": s["tokens_per_s"],
            "specontext_ms_per_step": s["ms_per_step"],
            "bytes_per_step": weights + kv_mid,
            "specontext_read_GB_s": (weights + kv_mid) / (s["ms_per_step"] / 1e3) / 1e9,
            "measured_copy_GB_s": bandwidth,
            "identical_tokens": bool(torch.equal(hf_out, sc_out)),
        })
    header = f"{'context':>8} {'HF prefill s':>12} {'HF tok/s':>9} {'SC prefill s':>12} {'SC tok/s':>9} {'SC GB/s read':>12} {'same':>5}"
    print(header)
    for r in rows:
        print(f"{r['context']:>8} {r['hf_prefill_s']:>12.2f} {r['hf_decode_tok_s']:>9.1f} {r['specontext_prefill_s']:>12.2f} "
              f"{r['specontext_decode_tok_s']:>9.1f} {r['specontext_read_GB_s']:>12.2f} {str(r['identical_tokens']):>5}")
    print(f"measured copy bandwidth on {fast.device}: {bandwidth:.1f} GB/s (read + write)")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu-{torch.get_num_threads()}threads"
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"generate_{'cuda' if torch.cuda.is_available() else 'cpu'}.json"
    path.write_text(json.dumps({
        "command": "benchmarks/generate.py " + " ".join(f"--contexts {' '.join(map(str, args.contexts))} --new-tokens {args.new_tokens}".split()),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {device}",
        "torch": torch.__version__,
        "rows": rows,
    }, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
