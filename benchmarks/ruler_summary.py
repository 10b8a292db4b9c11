"""One table from many runs of benchmarks/ruler.py (benchmarks/accuracy_gpu.sh runs one process per task
group side by side): scores per length, split, method and budget; the issue's acceptance figures; the
accuracy guard's triggers against what the unguarded head did.

    .venv/bin/python -m benchmarks.ruler_summary --inputs 'ruler_4k_*' 'ruler_7k_*' --guard-inputs 'ruler_guard_4k_*' \
        --out ruler_smollm2_h200

``--guard-inputs``: runs whose guarded rows replace those of ``--inputs`` (whose guarded rows are dropped:
the first runs let one guarded method's hold leak into the next, since fixed); their other rows must
equal the same rows of ``--inputs`` output for output (the runs are deterministic), and the count of
differences is reported.

Acceptance (niah tasks averaged, per length and split): the default head's score as a share of dense's and
its distance to oracle top-k at ~6%; its distance to dense at ~12%.

Guard: a sequence "needed" the guard when the unguarded head scored below dense on it; a trigger on a
sequence that did not is a false trigger ("diverged" counts the outputs that differ from dense's at all). The guard's running-minimum coverage also says what another
threshold would have done (a sequence triggers at threshold t when its minimum coverage is below t; after
a trigger the rest of the sequence is dense, so this is exact for the first trigger). Thresholds are
chosen on the fit split only; the held-out split reports.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
from collections import defaultdict

try:
    from .results_file import RESULTS, write_results
    from .ruler import plot_panels
except ImportError:  # run as a script
    from results_file import RESULTS, write_results
    from ruler import plot_panels

DEFAULT = "d72-80_look1"
METHODS = ("dense", DEFAULT, DEFAULT + "+guard", "v1", "quest", "streaming", "oracle")
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def load(patterns: list[str]) -> tuple[list[dict], list[str]]:
    rows, commands = [], []
    for pattern in patterns:
        for path in sorted(glob.glob(str(RESULTS / f"{pattern}.json"))):
            payload = json.loads(open(path).read())
            if "rows" not in payload or "split" not in payload:
                continue
            if not payload.get("complete", True):
                raise SystemExit(f"{path} is a run cut short ({payload.get('prompts_done')} prompts)")
            commands.append(f"{payload['command']}  # {payload['machine']}, {payload['date']}")
            rows += [{**row, "split": payload["split"]} for row in payload["rows"]]
    if not rows:
        raise SystemExit(f"no ruler results match {patterns} under {RESULTS}")
    return rows, commands


def scores(rows: list[dict]) -> dict:
    """(length, split, tasks, method, budget) -> (mean score, prompts); tasks: 'niah', 'all' or a task."""
    groups = defaultdict(list)
    for row in rows:
        for tasks in ("all", "niah" if row["task"].startswith("niah") else None, row["task"]):
            if tasks:
                groups[(row["target_length"], row["split"], tasks, row["method"], row["budget"])].append(row["score"])
    return {key: (statistics.fmean(v), len(v)) for key, v in groups.items()}


def acceptance(table: dict, budgets: list[float]) -> list[dict]:
    low = min(budgets, key=lambda b: abs(b - 0.06))
    high = min(budgets, key=lambda b: abs(b - 0.12))
    out = []
    for length, split in sorted({(k[0], k[1]) for k in table}):
        def score(method, budget):
            return 100 * table[(length, split, "niah", method, budget)][0]
        dense = score("dense", None)
        for head in (DEFAULT, DEFAULT + "+guard"):
            if (length, split, "niah", head, low) not in table:
                continue
            out.append({
                "length": length, "split": split, "head": head, "niah_prompts": table[(length, split, "niah", "dense", None)][1],
                "dense": dense, f"head_at_{low}": score(head, low), f"oracle_at_{low}": score("oracle", low),
                "share_of_dense_at_low": score(head, low) / dense if dense else None,
                "below_oracle_at_low": score("oracle", low) - score(head, low),
                f"head_at_{high}": score(head, high), "below_dense_at_high": dense - score(head, high),
            })
    return out


def guard_analysis(rows: list[dict]) -> list[dict]:
    """Per split and budget: triggers, false triggers, misses at the settings used, and what each threshold
    in THRESHOLDS would have done."""
    by_key = {(r["split"], r["target_length"], r["task"], r["index"], r["method"], r["budget"]): r for r in rows}
    out = []
    for split in sorted({r["split"] for r in rows}):
        for budget in sorted({r["budget"] for r in rows if r["budget"] is not None}):
            cases = []
            for r in rows:
                if r["split"] != split or r["budget"] != budget or r["method"] != DEFAULT + "+guard":
                    continue
                key = (split, r["target_length"], r["task"], r["index"])
                dense = by_key[key + ("dense", None)]
                head = by_key[key + (DEFAULT, budget)]
                cases.append({"needed": head["score"] < dense["score"], "diverged": head["output"] != dense["output"],
                              "triggered": r["guard_triggers"] > 0,
                              "min_coverage": r["guard_min_coverage"], "head_score": head["score"],
                              "guard_score": r["score"], "dense_score": dense["score"],
                              "steps": r["steps"], "dense_steps": r["guard_dense_steps"]})
            if not cases:
                continue
            needed = [c for c in cases if c["needed"]]
            entry = {"split": split, "budget": budget, "sequences": len(cases), "needed": len(needed),
                     "diverged": sum(c["diverged"] for c in cases),
                     "triggered": sum(c["triggered"] for c in cases),
                     "false_triggers": sum(c["triggered"] and not c["needed"] for c in cases),
                     "caught": sum(c["triggered"] and c["needed"] for c in cases),
                     "dense_step_share": sum(c["dense_steps"] for c in cases) / max(1, sum(c["steps"] for c in cases)),
                     "score_gain": statistics.fmean(c["guard_score"] - c["head_score"] for c in cases),
                     "by_threshold": {}}
            for t in THRESHOLDS:
                fire = [c for c in cases if c["min_coverage"] is not None and c["min_coverage"] < t]
                entry["by_threshold"][str(t)] = {"would_trigger": len(fire), "false": sum(not c["needed"] for c in fire),
                                                 "caught": sum(c["needed"] for c in fire)}
            out.append(entry)
    return out


def merge_guard_runs(rows: list[dict], guard_rows: list[dict]) -> tuple[list[dict], dict]:
    """``rows`` without their guarded rows, plus the guarded rows of ``guard_rows``; the other rows of
    ``guard_rows`` are compared with ``rows``."""
    def key(row):
        return row["split"], row["target_length"], row["task"], row["index"], row["method"], row["budget"]

    first = {key(row): row for row in rows}
    compared = differ = 0
    for row in guard_rows:
        if not row["method"].endswith("+guard") and key(row) in first:
            compared += 1
            differ += row["output"] != first[key(row)]["output"]
    merged = [row for row in rows if not row["method"].endswith("+guard")]
    merged += [row for row in guard_rows if row["method"].endswith("+guard")]
    return merged, {"rows_compared": compared, "outputs_differing": differ}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", nargs="+", required=True, help="result names under benchmarks/results/ (globs)")
    parser.add_argument("--guard-inputs", nargs="*", default=[], help="runs whose guarded rows replace those of --inputs")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows, commands = load(args.inputs)
    repeat = None
    if args.guard_inputs:
        guard_rows, guard_commands = load(args.guard_inputs)
        rows, repeat = merge_guard_runs(rows, guard_rows)
        commands += guard_commands
        print("rows run twice:", repeat)
    table = scores(rows)
    budgets = sorted({r["budget"] for r in rows if r["budget"] is not None})
    for length, split in sorted({(k[0], k[1]) for k in table}):
        for tasks in ("niah", "all"):
            dense = table.get((length, split, tasks, "dense", None))
            print(f"\n{length} tokens, {split} split, {tasks} tasks ({dense[1]} prompts): dense {100 * dense[0]:.1f}")
            print(f"{'method':22s}" + "".join(f"{b:>8.0%}" for b in budgets))
            for method in METHODS[1:]:
                print(f"{method:22s}" + "".join(
                    f"{100 * table.get((length, split, tasks, method, b), (float('nan'),))[0]:8.1f}" for b in budgets))
    checks = acceptance(table, budgets)
    guard = guard_analysis(rows)
    print("\nacceptance:", json.dumps(checks, indent=1))
    print("guard:", json.dumps(guard, indent=1))
    write_results({"inputs": args.inputs, "guard_inputs": args.guard_inputs, "repeat_check": repeat, "commands": commands, "acceptance": checks, "guard": guard,
                   "scores": [{"length": k[0], "split": k[1], "tasks": k[2], "method": k[3], "budget": k[4],
                               "score": v[0], "prompts": v[1]} for k, v in sorted(table.items(), key=lambda i: str(i[0]))]},
                  args.out)
    plot(table, budgets, RESULTS / f"{args.out}.png")


def plot(table: dict, budgets: list[float], path) -> None:
    """Niah score against budget per method, one panel per (length, split)."""
    panels = []
    for length, split in sorted({(k[0], k[1]) for k in table}):
        dense, prompts = table[(length, split, "niah", "dense", None)]
        curves = {method: [table.get((length, split, "niah", method, b), (float("nan"),))[0] for b in budgets]
                  for method in METHODS[1:]}
        panels.append((f"{length} tokens, {split} ({prompts} niah prompts)", curves, dense))
    plot_panels(panels, budgets, path)


if __name__ == "__main__":
    main()
