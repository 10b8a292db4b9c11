"""Merge the JSON of several ``benchmarks/e2e.py`` runs into the headline figures, a table and a PNG.

    python -m benchmarks.e2e_summary benchmarks/results/e2e_*_h200.json --out h200

For each system and context, the fastest measured row (tokens/s) of any batch is its best; the
headline ratios compare bests: SpeContext at budget "80GB" against HF eager and HF static cache +
torch.compile at 32K, SpeContext at budget "24GB" against HF's offloaded cache at 128K, and SpeContext's
batch-1 step at 32K against its roofline. Writes benchmarks/results/<out>.json and <out>.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def best(rows: list[dict], system: str, context: int, batch: int | None = None) -> dict | None:
    """The row of ``system`` at ``context`` (to the nearest 1K: a 128K run may stop short of the model's
    131,072 positions) and ``batch`` with the most tokens/s."""
    candidates = [r for r in rows if r["system"] == system and round(r["context"] / 1024) == round(context / 1024)
                  and "error" not in r
                  and (batch is None or r["batch"] == batch)]
    return max(candidates, key=lambda r: r["tokens_per_s"], default=None)


def ratio(numerator: dict | None, denominator: dict | None) -> float | None:
    if numerator is None or denominator is None:
        return None
    return numerator["tokens_per_s"] / denominator["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--exclude-hf", nargs="*", default=[], metavar="RUN",
                        help="runs (file names) whose HF rows were measured before a benchmark fix: ignored")
    parser.add_argument("--out", default="h200")
    args = parser.parse_args()
    runs = [json.loads(path.read_text()) for path in args.runs]
    rows = []
    for path, run in zip(args.runs, runs):
        flags = run["command"]
        for row in run["rows"]:
            spec = row["system"].startswith("specontext")
            if not spec and path.name in args.exclude_hf:
                continue
            variant = " +kernels" if spec and "--kernels True" in flags else ""
            variant += " +inductor" if spec and "--inductor True" in flags else ""
            variant += " +fused" if spec and run.get("fused_projections") else ""
            rows.append({**row, "variant": variant.strip(), "run": path.name})
    spec_32k = best(rows, "specontext_80gb", 32768)
    spec_b1 = best(rows, "specontext_80gb", 32768, batch=1)
    summary = {
        "speedup_vs_hf_eager_throughput_32k": ratio(spec_32k, best(rows, "hf_eager", 32768)),
        "speedup_vs_hf_static_compile_32k": ratio(spec_32k, best(rows, "hf_static_compile", 32768)),
        "speedup_vs_hf_offloaded_24gb_128k": ratio(best(rows, "specontext_24gb", 131072, batch=1),
                                                   best(rows, "hf_offloaded", 131072, batch=1)),
        "b1_step_over_roofline": None if spec_b1 is None else spec_b1["step_over_roofline"],
        "targets": {"speedup_vs_hf_eager_throughput_32k": 25, "speedup_vs_hf_static_compile_32k": 2,
                    "speedup_vs_hf_offloaded_24gb_128k": 20, "b1_step_over_roofline": 1.3},
        "gpu": runs[0]["gpu"], "torch": runs[0]["torch"], "dates": sorted({run["date"] for run in runs}),
        "hbm_copy_gb_s": [run["hbm_copy_gb_s"] for run in runs], "runs": [p.name for p in args.runs], "hf_rows_excluded_from": args.exclude_hf,
        "commands": [run["command"] for run in runs], "rows": rows,
    }
    print(f"{'system':24s} {'variant':18s} {'context':>7s} {'batch':>5s} {'ms/step':>8s} {'tok/s':>8s} "
          f"{'x roofline':>10s} {'prefill s':>9s} {'peak GB':>7s}")
    for row in rows:
        if "error" in row:
            print(f"{row['system']:24s} {row['variant']:18s} {row['context']:>7d} {row['batch']:>5d} {row['error'][:40]}")
            continue
        print(f"{row['system']:24s} {row['variant']:18s} {row['context']:>7d} {row['batch']:>5d} "
              f"{row['ms_per_step']:8.2f} {row['tokens_per_s']:8.1f} {row['step_over_roofline']:10.2f} "
              f"{row['prefill_seconds']:9.2f} {row['peak_gpu_gb']:7.1f}")
    for key, target in summary["targets"].items():
        value = summary[key]
        print(f"{key}: {'not measured' if value is None else f'{value:.2f}'} (target {target})")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(summary, indent=2))
    plot(rows, RESULTS / f"{args.out}.png", summary)
    print(f"wrote {RESULTS / (args.out + '.json')} and .png")


def plot(rows: list[dict], path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if "error" not in r]
    labels = [f"{r['system']}{' ' + r['variant'] if r['variant'] else ''}\n{r['context'] // 1024}K x{r['batch']}"
              for r in measured]
    colors = ["tab:blue" if r["system"].startswith("specontext") else "tab:gray" for r in measured]
    fig, ax = plt.subplots(figsize=(12, 0.45 * len(measured) + 1.5))
    ax.barh(range(len(measured)), [r["tokens_per_s"] for r in measured], color=colors)
    ax.set_yticks(range(len(measured)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("decode tokens/s (log scale)")
    ax.set_title(f"Llama-3.1-8B shape, bf16, {summary['gpu']} ({', '.join(summary['dates'])}): "
                 "SpeContext (blue) vs HF transformers (gray)", fontsize=9)
    for index, row in enumerate(measured):
        ax.text(row["tokens_per_s"], index, f" {row['tokens_per_s']:.0f} ({row['ms_per_step']:.1f} ms)", va="center",
                fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
