"""The docs table (markdown) and a PNG of the paper's workloads from ``e2e_workloads`` results JSON.

    python -m benchmarks.e2e_workloads_summary benchmarks/results/e2e_w_*.json --out workloads_h200

Each run's headline figures come from its own rows (ratios never mix runs); where several runs give a
figure, the first run named gives it. The table lists every row: tokens/s of the workload (prefill +
integrated decode), the decode against its roofline, the peak memory, and the integration's error where
a whole generation was run. The PNG: tokens/s per system per workload, log scale. Writes
benchmarks/results/<out>.json, <out>.md and <out>.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.e2e_rows import HF_PAPER_BATCH, headline

RESULTS = Path(__file__).parent / "results"
KEYS = ("speedup_vs_hf_eager_2k_32k", "tok_s_32k_max_batch", "step_over_roofline_32k_max_batch", "edge_speedup_1b_4gb")
SYSTEM_NAMES = {"hf_eager": "HF eager", "hf_static_compile": "HF static cache + torch.compile", "specontext": "SpeContext"}


def load(paths: list[Path]) -> list[tuple[str, dict]]:
    runs = []
    for path in paths:
        try:
            run = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise SystemExit(f"cannot read results file {path}: {error}") from None
        if not isinstance(run, dict) or "rows" not in run:
            raise SystemExit(f"{path} is not a results file of benchmarks/e2e_workloads.py (no 'rows')")
        runs.append((Path(path).name, run))
    return runs


def merge(runs: list[tuple[str, dict]]) -> dict:
    """Every run's rows (tagged with the run) and the headline: each figure from the first run that has it."""
    rows, figures, per_run = [], {}, {}
    for name, run in runs:
        tagged = [dict(row, run=name) for row in run["rows"]]
        rows += tagged
        per_run[name] = own = headline(tagged)
        for key, value in own.items():
            if key.startswith("from_"):
                continue
            if figures.get(key) is None and value is not None:
                figures[key] = value
                figures[f"{key}_run"] = name
    for key in KEYS:
        figures.setdefault(key, None)
    return {"headline": figures, "headline_per_run": per_run, "rows": rows,
            "runs": [{"file": name, "command": run.get("command"), "date": run.get("date"), "gpu": run.get("gpu"),
                      "torch": run.get("torch"), "transformers": run.get("transformers"),
                      "hbm_copy_gb_s": run.get("hbm_copy_gb_s"), "pcie_h2d_gb_s": run.get("pcie_h2d_gb_s"),
                      "complete": run.get("complete"), "skipped": run.get("skipped")} for name, run in runs]}


def label(row: dict) -> str:
    name = SYSTEM_NAMES.get(row["system"], row["system"])
    if row["system"] == "hf_eager":
        name += f" ({row.get('attn_implementation')})"
    if row["system"] == "specontext":
        name += f" \"{row.get('budget')}\" ({row.get('batch_policy')})"
    return name


def _num(value, digits: int = 2) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def table(summary: dict) -> str:
    """Markdown: the headline figures, then every row grouped by section and workload."""
    lines = ["| figure | value | run |", "|---|---|---|"]
    for key in KEYS:
        value = summary["headline"].get(key)
        lines.append(f"| `{key}` | {'not measured' if value is None else _num(value)} | "
                     f"{summary['headline'].get(f'{key}_run') or ''} |")
    lines += ["", "| section | workload | system | batch | prefill s | decode s | tok/s | decode / roofline | "
              "peak GB | full run: integration error |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(summary["rows"], key=lambda r: (r["section"], r["workload"], r["system"], r.get("batch") or 0)):
        full = row.get("full_run") or {}
        error = full.get("integration_error_total")
        check = full.get("error") or ("" if error is None else f"{100 * error:+.1f}% (total)")
        if "error" in row:
            lines.append(f"| {row['section']} | {row['workload']} | {label(row)} | {row.get('batch') or ''} | "
                         f"{row['error'][:80]} | | | | | |")
            continue
        ratio = row.get("decode_over_roofline") if row.get("method") == "integrated_step_times" else row["step_over_roofline"][0]
        lines.append(f"| {row['section']} | {row['workload']} | {label(row)} | {row['batch']} | "
                     f"{_num(row['prefill_seconds'])} | {_num(row['decode_seconds'], 1)} | {_num(row['tokens_per_s'], 1)} | "
                     f"{_num(ratio)} | {_num(row.get('peak_gpu_gb'), 1)} | {check} |")
    return "\n".join(lines) + "\n"


def bars(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per category (workload, edge, 32K max batch) the tok/s of each system as the paper compares them:
    HF eager at batch 4 (edge: 1) and at its best batch, HF static + compile, SpeContext's best batch."""
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        if "error" in row or row.get("tokens_per_s") is None:
            continue
        category = {"edge": f"edge {row['workload']}", "max_batch_32k": "32K max batch (decode only)"}.get(row["section"], row["workload"])
        names = []
        if row["system"] == "hf_eager":
            fixed = 1 if row["section"] == "edge" else HF_PAPER_BATCH
            names = ["HF eager, best batch"] + ([f"HF eager, batch {fixed}"] if row["batch"] == fixed else [])
        elif row["system"] == "hf_static_compile":
            names = ["HF static + compile"]
        elif row["system"] == "specontext":
            names = ["SpeContext, best batch"] + (["SpeContext, batch 1"] if row["section"] == "edge" and row["batch"] == 1 else [])
        for name in names:
            out.setdefault(category, {})
            out[category][name] = max(out[category].get(name, 0.0), row["tokens_per_s"])
    return out


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = bars(summary["rows"])
    categories = sorted(data)
    systems = sorted({name for values in data.values() for name in values})
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(categories)), 4.5))
    width = 0.8 / max(1, len(systems))
    for index, system in enumerate(systems):
        xs = [c + index * width for c, category in enumerate(categories) if system in data[category]]
        ys = [data[category][system] for category in categories if system in data[category]]
        ax.bar(xs, ys, width, label=system)
        for x, y in zip(xs, ys):
            ax.text(x, y, f"{y:,.0f}", ha="center", va="bottom", fontsize=6)
    ax.set_xticks([c + width * (len(systems) - 1) / 2 for c in range(len(categories))], categories)
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s (prefill + decode; log scale)")
    gpus = sorted({run["gpu"] or "cpu" for run in summary["runs"]})
    dates = sorted({run["date"] or "" for run in summary["runs"]})
    ax.set_title(f"The paper's workloads [prompt, new tokens]: {', '.join(gpus)} ({', '.join(dates)})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", default="workloads_h200")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where to write <out>.json/.md/.png")
    args = parser.parse_args(argv)
    summary = merge(load(args.runs))
    args.results.mkdir(parents=True, exist_ok=True)
    markdown = table(summary)
    (args.results / f"{args.out}.json").write_text(json.dumps(summary, indent=2))
    (args.results / f"{args.out}.md").write_text(markdown)
    plot(summary, args.results / f"{args.out}.png")
    print(markdown)
    print(f"wrote {args.results / args.out}.json, .md and .png")
    return summary


if __name__ == "__main__":
    main()
