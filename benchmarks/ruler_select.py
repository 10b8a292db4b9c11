"""Choose the draft-free head's variant on the suite's fit split, by a rule fixed before any run.

    .venv/bin/python -m benchmarks.ruler_select --inputs 'ruler_select_*' --choice chosen_head.txt

Rule: the variant with the highest niah score averaged over every fit row at the budgets below oracle's
saturation (the runs of ``benchmarks/accuracy_gpu.sh ... select``: ~4K and ~7K, budgets 3% and 6%);
a tie keeps the incumbent (the first candidate), then the candidates' order (``--candidates``, by default
``CANDIDATES``). Only fit-split rows
count (held-out rows in the inputs are an error). Writes the name to ``--choice`` and the table to
benchmarks/results/<out>.json.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

try:
    from .results_file import write_results
    from .ruler_summary import DEFAULT, load
except ImportError:  # run as a script
    from results_file import write_results
    from ruler_summary import DEFAULT, load

#: The variants the selection phase runs (benchmarks/ruler.py: head_variants), the incumbent first.
CANDIDATES = (DEFAULT, "d72-80_look2", "d72-80_look1_behind1", "d72-80_look1_win16", "d72-80_look1_win64",
              "d72-80_look1_w4", "d72-80_look1_w16", "d60-90_look1")


#: The third round's: the prior and the layers' rankings interleaved, and the prior from the deeper layers.
CANDIDATES_ROUND3 = (DEFAULT, "d72-80_look1_union", "d72-80_look1_deepprior", "d72-80_look1_union_deepprior")
#: The fourth round's: the current token's query predicted (retrieval/query_prediction.py), without and with
#: lookahead.
CANDIDATES_ROUND4 = (DEFAULT, "d72-80_pred", "d72-80_pred_look1")


def choose(rows: list[dict], candidates: tuple[str, ...] = CANDIDATES) -> tuple[str, dict[str, dict]]:
    """The chosen variant and, per candidate, its mean niah score, rows, and scores per (length, budget)."""
    if any(row["split"] != "fit" for row in rows):
        raise SystemExit("the selection reads the fit split only; the inputs hold other rows")
    by_method = defaultdict(list)
    cells = defaultdict(list)
    for row in rows:
        if row["task"].startswith("niah") and row["method"] in candidates + ("oracle", "dense"):
            by_method[row["method"]].append(row["score"])
            cells[row["method"], row["target_length"], row["budget"]].append(row["score"])
    missing = [name for name in candidates if name not in by_method]
    if missing:
        raise SystemExit(f"no fit rows for {missing}")
    counts = {len(by_method[name]) for name in candidates}
    if len(counts) != 1:
        raise SystemExit(f"candidates ran on different numbers of rows: {counts}")
    table = {name: {"score": statistics.fmean(scores), "rows": len(scores),
                    "cells": {f"{length}@{budget}": statistics.fmean(cells[name, length, budget])
                              for (method, length, budget) in sorted(cells, key=str) if method == name}}
             for name, scores in by_method.items()}
    best = max(candidates, key=lambda name: (table[name]["score"], -candidates.index(name)))
    return best, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", nargs="+", default=["ruler_select_*"])
    parser.add_argument("--choice", required=True, help="file the chosen variant's name is written to")
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), help="the incumbent first")
    parser.add_argument("--out", default="ruler_select_fit")
    args = parser.parse_args()
    rows, commands = load(args.inputs)
    best, table = choose(rows, tuple(args.candidates))
    for name, entry in sorted(table.items(), key=lambda item: -item[1]["score"]):
        cells = "  ".join(f"{cell} {100 * score:5.1f}" for cell, score in entry["cells"].items())
        print(f"{name:24s} {100 * entry['score']:5.1f}  ({entry['rows']} rows)  {cells}")
    print(f"chosen: {best}")
    Path(args.choice).write_text(best + "\n")
    write_results({"commands": commands, "rule": __doc__.split("\n\n")[2], "chosen": best, "table": table}, args.out)


if __name__ == "__main__":
    main()
