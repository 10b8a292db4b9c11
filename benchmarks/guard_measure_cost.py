"""What the accuracy guard's measurement costs on the GPU, kernel by kernel (8B shape's guard layer).

    python -m benchmarks.guard_measure_cost --context 32768 --batches 1 16

Times, with CUDA events over many repetitions: the guard layer's attention mass over every stored key
(``group_probabilities``), the top-k that gives the best selection of the step's size, and the whole
``AccuracyGuard.measure``; bf16 keys [B, 8, context, 128], 32 query heads, 2,049 selected positions.
Prints a table and writes benchmarks/results/<out>.json.
"""

from __future__ import annotations

import argparse
import datetime

import torch

from benchmarks.results_file import write_results
from specontext_compiler.config import GuardSettings
from specontext_compiler.kernels import use_kernels
from specontext_compiler.retrieval.base import group_probabilities
from specontext_compiler.runtime.accuracy_guard import AccuracyGuard


def timed_ms(fn, repeats: int = 200) -> float:
    for _ in range(10):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--selected", type=int, default=2049)
    parser.add_argument("--out", default="guard_measure_cost")
    args = parser.parse_args()
    use_kernels(True)
    rows = []
    for batch in args.batches:
        q = torch.randn(batch, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        keys = torch.randn(batch, 8, args.context, 128, device="cuda", dtype=torch.bfloat16)
        positions = torch.randint(0, args.context, (batch, 8, args.selected), device="cuda")
        mass = group_probabilities(q[:, :, -1], keys, 0.088)
        guard = AccuracyGuard(GuardSettings(), layer=0)
        out = torch.ones(batch, device="cuda")
        row = {"batch": batch, "context": args.context, "selected": args.selected,
               "mass_ms": timed_ms(lambda: group_probabilities(q[:, :, -1], keys, 0.088)),
               "topk_ms": timed_ms(lambda: mass.topk(args.selected, dim=-1, sorted=False)),
               "measure_ms": timed_ms(lambda: guard.measure(q, keys, 0.088, positions, None, out=out))}
        rows.append(row)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    write_results({"command": "python -m benchmarks.guard_measure_cost " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()), "machine": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(), "torch": torch.__version__, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
