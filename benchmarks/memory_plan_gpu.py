"""The memory model against the GPU: predicted peak vs torch.cuda.max_memory_allocated (needs CUDA).

    PYTHONPATH=. python benchmarks/memory_plan_gpu.py --out memory_plan_h100

Llama-3.1-8B shape with random bf16 weights. For each (budget, context, batch): plan with
specontext.plan_memory, compile with the plan's placement (its CPU layers offloaded), generate 8 tokens
after a prompt of context - 8 tokens, and compare the plan's peak with the measured peak. Writes JSON
under benchmarks/results/ (and $OUT when set).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
CONFIGS = [(24, 8192, 1), (24, 32768, 1), (24, 131072, 1), (40, 32768, 4), (80, 131072, 1), (80, 32768, 4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="memory_plan_gpu")
    args = parser.parse_args()
    import specontext
    from benchmarks.offload import llama_8b_random

    model = llama_8b_random()
    rows = []
    for budget_gb, context, batch in CONFIGS:
        budget = budget_gb * 10**9
        plan = specontext.plan_memory(model, budget, context, batch=batch, token_budget=2048)
        offload = plan.cpu_layers if plan.cpu_layers else "none"
        compiled = specontext.compile(model, budget, token_budget=2048, offload=offload, progress=False)
        ids = torch.randint(10, 120000, (batch, context - 8), generator=torch.Generator().manual_seed(5)).cuda()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        compiled.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        measured = torch.cuda.max_memory_allocated()
        error = plan.peak_bytes - measured
        row = {"budget_gb": budget_gb, "context": context, "batch": batch, "gpu_layers": len(plan.gpu_layers),
               "predicted_peak": plan.peak_bytes, "measured_peak": measured, "error_bytes": error,
               "relative_error": error / measured, "within_tolerance": abs(error) <= max(0.05 * measured, 0.5e9),
               "measured_under_budget": measured <= budget, "terms": plan.breakdown()}
        rows.append(row)
        print(f"{budget_gb:>3} GB {context:>6} x {batch}: {row['gpu_layers']:>2} GPU layers, predicted "
              f"{plan.peak_bytes / 1e9:6.2f} GB, measured {measured / 1e9:6.2f} GB ({100 * row['relative_error']:+.1f}%), "
              f"under budget {row['measured_under_budget']}", flush=True)
        del compiled, ids
        torch.cuda.empty_cache()
    payload = {"command": "PYTHONPATH=. python benchmarks/memory_plan_gpu.py", "date": datetime.date.today().isoformat(),
               "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    text = json.dumps(payload, indent=2)
    (RESULTS / f"{args.out}.json").write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"{args.out}.json").write_text(text)


if __name__ == "__main__":
    main()
