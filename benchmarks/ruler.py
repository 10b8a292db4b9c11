"""The RULER-style suite (specontext_compiler/evaluation/ruler.py) over selection methods and budgets.

    .venv/bin/python -m benchmarks.ruler --split fit --lengths 4096 --budgets 0.06 0.12 --prompts 4

Per prompt: one dense prefill, then every method x budget decodes greedily from it (the runtime rolled
back to the prefilled state each time: evaluation/shared_prefill.py). Score: share of the reference
strings in the output (RULER's string_match_all), per task, length, method and budget, with dense beside.
Methods: dense, the draft-free retrieval head and its variants (``HEADS``), StreamingLLM, Quest, oracle
top-k. Budgets are fractions of the prompt (the token budget is rounded to an integer per prompt).

Writes benchmarks/results/<out>.json (every output) and <out>.png (score against budget per method).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections import defaultdict

import torch
from tqdm import tqdm

import specontext
from specontext_compiler.config import GuardSettings
from specontext_compiler.evaluation import ruler
from specontext_compiler.evaluation.shared_prefill import DENSE, HeadChoice, Method, generate_each
from specontext_compiler.models import load_model
from specontext_compiler.retrieval import OracleTopK, QuestPages, StreamingLLM, TargetLayerHead
from specontext_compiler.retrieval.target_layer_head import default_layers

try:
    from .results_file import RESULTS, write_results
except ImportError:  # run as a script
    from results_file import RESULTS, write_results


def head_variants(num_layers: int, layer_types=None, model=None) -> dict[str, object]:
    """Every head measured (names as in docs/accuracy.md): the draft-free head's variants and the baselines.

    ``v1``: the head before the suite existed (layer at 5/6 of the depth, prior, weight 8, no lookahead).
    ``d80``: one layer at 0.8 of the depth (SmolLM2: 23, the best single layer teacher-forced on the fit
    split, benchmarks/ruler_layers.py); ``d72-80``: three layers at 0.72-0.8 of the depth (SmolLM2:
    21-23); ``look1``: lookahead 1; ``noprior``: without the prefill prior. On a model with sliding-window
    layers (``layer_types``), ``d72-80_look1`` is the depths as they are and ``d72-80_full_look1`` each
    moved to the nearest full-attention layer (the default there: target_layer_head.default_layers).
    ``pred``: the current token's query predicted (``query="predicted"``, needs ``model``).
    """
    def at(*fractions):
        return tuple(sorted({round(f * (num_layers - 1)) for f in fractions}))

    one, three = at(0.8), at(0.72, 0.76, 0.8)
    full = default_layers(num_layers, layer_types)
    return {
        "v1": lambda: TargetLayerHead(at(5 / 6), lookahead=0),
        "d80_look1": lambda: TargetLayerHead(one, lookahead=1),
        "d80_look1_noprior": lambda: TargetLayerHead(one, prefill_prior=False, lookahead=1),
        "d72-80_look1": lambda: TargetLayerHead(three, lookahead=1),
        "d72-80_look1_noprior": lambda: TargetLayerHead(three, prefill_prior=False, lookahead=1),
        "d72-80_look0": lambda: TargetLayerHead(three, lookahead=0),
        # candidates of the selection phase (benchmarks/ruler_select.py; docs/accuracy.md):
        "d72-80_look2": lambda: TargetLayerHead(three, lookahead=2),
        "d72-80_look1_behind1": lambda: TargetLayerHead(three, lookahead=1, lookbehind=1),
        "d72-80_look1_win16": lambda: TargetLayerHead(three, lookahead=1, prior_window=16),
        "d72-80_look1_win64": lambda: TargetLayerHead(three, lookahead=1, prior_window=64),
        "d72-80_look1_w4": lambda: TargetLayerHead(three, lookahead=1, query_weight=4.0),
        "d72-80_look1_w16": lambda: TargetLayerHead(three, lookahead=1, query_weight=16.0),
        "d60-90_look1": lambda: TargetLayerHead(at(0.6, 0.7, 0.8, 0.9), lookahead=1),
        # the third round's candidates (harder fit tasks; docs/accuracy.md):
        "d72-80_look1_union": lambda: TargetLayerHead(three, lookahead=1, combine="union"),
        "d72-80_look1_deepprior": lambda: TargetLayerHead(three, lookahead=1, prior_from=0.5),
        "d72-80_look1_union_deepprior": lambda: TargetLayerHead(three, lookahead=1, combine="union", prior_from=0.5),
        **({"d72-80_full_look1": lambda: TargetLayerHead(default_layers(num_layers, layer_types), lookahead=1)}
           if default_layers(num_layers, layer_types) != three else {}),
        # the fourth round: the current token's query predicted (retrieval/query_prediction.py)
        **({"d72-80_pred": lambda: TargetLayerHead(full, lookahead=0, query="predicted", model=model),
            "d72-80_pred_look1": lambda: TargetLayerHead(full, lookahead=1, query="predicted", model=model)}
           if model is not None else {}),
        "streaming": StreamingLLM,
        "quest": QuestPages,
        "oracle": OracleTopK,
    }


def load(name: str, device: str):
    """The model and whether its prompts are chat turns (SmolLM2-Instruct) or plain text (a base model)."""
    return load_model(name, device=device), "smollm2" in str(name).lower()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="'smollm2' or a .gguf path (base model: plain prompts)")
    parser.add_argument("--split", choices=ruler.SPLITS, default="fit")
    parser.add_argument("--tasks", nargs="+", default=None, help="default: every task of the split")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.03, 0.06, 0.12, 0.25])
    parser.add_argument("--heads", nargs="+", default=None, help="default: every variant (head_variants)")
    parser.add_argument("--guard-heads", nargs="*", default=[], help="also run these heads with the accuracy guard")
    parser.add_argument("--guard-threshold", type=float, default=GuardSettings().threshold,
                        help="the guard's threshold (0: measure coverage, never redo a step)")
    parser.add_argument("--guard-check-every", type=int, default=GuardSettings().check_every,
                        help="steps between the guard's reads of the coverage (1: every step's is recorded)")
    parser.add_argument("--guard-dense-start", type=int, default=GuardSettings().dense_start,
                        help="the guard's dense decode steps at each sequence's start (its methods get '+dense<N>')")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--first-prompt", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    (model, tokenizer), chat = load(args.model, args.device)
    variants = head_variants(model.config.num_hidden_layers, getattr(model.config, "layer_types", None), model)
    names = args.heads or list(variants)
    unknown = [name for name in names if name not in variants]
    if unknown:
        raise SystemExit(f"unknown heads {unknown}; known: {', '.join(variants)}")
    tasks = args.tasks or list(ruler.tasks_of(args.split))
    choice = HeadChoice({name: variants[name]() for name in names})
    runs = [(name, False) for name in names] + [(name, True) for name in args.guard_heads]
    dense_suffix = f"+dense{args.guard_dense_start}" if args.guard_dense_start else ""
    labels = [name + ("+guard" + dense_suffix if guard else "") for name, guard in runs]
    guard = GuardSettings(threshold=args.guard_threshold, check_every=args.guard_check_every,
                          dense_start=args.guard_dense_start) if args.guard_heads else False
    compiled = specontext.compile(model, "200GB", draft=choice, offload="none", guard=guard)
    samples = ruler.suite(tokenizer, tasks, args.lengths, args.prompts, args.split, chat, args.first_prompt)
    rows = []
    started = time.perf_counter()
    name = args.out or f"ruler_{'smollm2' if args.model == 'smollm2' else 'gguf'}_{args.split}"

    def payload(complete: bool) -> dict:
        return {
            "command": "python -m benchmarks.ruler " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
            "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                       f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}, torch {torch.__version__}",
            "date": datetime.date.today().isoformat(),
            "seconds": time.perf_counter() - started,
            "complete": complete, "prompts_done": len({(r["task"], r["length"], r["index"]) for r in rows}),
            "prompts_planned": len(samples),
            "model": args.model, "split": args.split, "tasks": tasks, "heads": names, "budgets": args.budgets,
            "summary": summarize(rows), "rows": rows,
        }

    for sample in tqdm(samples, desc="ruler", unit="prompt"):
        plan = [(DENSE, None)] + [(Method(name, max(16, round(b * sample.tokens)), guard), b)
                                  for b in args.budgets for name, guard in runs]
        stats = {}
        outputs = generate_each(compiled, choice, sample.input_ids.to(args.device), [m for m, _ in plan],
                                sample.max_new_tokens, stats)
        for method, budget in plan:
            text = tokenizer.decode(outputs[method][0], skip_special_tokens=True)
            rows.append({"task": sample.task, "length": sample.tokens, "index": sample.index,
                         "target_length": next(length for length in args.lengths if sample.tokens <= length),
                         "method": method.name + (dense_suffix if method.guard else ""), "budget": budget,
                         "token_budget": method.token_budget, "score": sample.score(text), "output": text,
                         "references": list(sample.references),
                         **{k: v for k, v in stats[method].items() if k in GUARD_STATS}})
        write_results(payload(complete=False), name, quiet=True)  # a run cut short keeps what it measured
    result = payload(complete=True)
    print_table(result["summary"], labels, args.budgets)
    write_results(result, name)
    plot(result["summary"], labels, args.budgets, RESULTS / f"{name}.png")


GUARD_STATS = ("guard_checks", "guard_triggers", "guard_dense_steps", "steps", "guard_mean_coverage", "guard_min_coverage")


def summarize(rows) -> list[dict]:
    """Mean score per (length, method, budget), over niah tasks, every task, and per task."""
    groups = defaultdict(list)
    for row in rows:
        key = (row["target_length"], row["method"], row["budget"])
        groups[key + ("all",)].append(row["score"])
        groups[key + (row["task"],)].append(row["score"])
        if row["task"].startswith("niah"):
            groups[key + ("niah",)].append(row["score"])
    return [{"length": k[0], "method": k[1], "budget": k[2], "tasks": k[3], "score": statistics.fmean(v), "prompts": len(v)}
            for k, v in sorted(groups.items(), key=lambda item: str(item[0]))]


def print_table(summary, names, budgets) -> None:
    table = {(row["length"], row["method"], row["budget"], row["tasks"]): row["score"] for row in summary}
    for length in sorted({row["length"] for row in summary}):
        for tasks in ("niah", "all"):
            dense = table.get((length, "dense", None, tasks))
            if dense is None:
                continue
            print(f"\n{length} tokens, {tasks} tasks: dense {100 * dense:.1f}")
            print(f"{'method':22s}" + "".join(f"{b:>9.0%}" for b in budgets))
            for name in names:
                print(f"{name:22s}" + "".join(f"{100 * table.get((length, name, b, tasks), float('nan')):9.1f}" for b in budgets))


def plot(summary, names, budgets, path) -> None:
    """Niah score against budget per method, one panel per length."""
    table = {(row["length"], row["method"], row["budget"], row["tasks"]): row["score"] for row in summary}
    panels = [(f"{length} tokens, niah tasks",
               {name: [table.get((length, name, b, "niah"), float("nan")) for b in budgets] for name in names},
               table.get((length, "dense", None, "niah")))
              for length in sorted({row["length"] for row in summary})]
    plot_panels(panels, budgets, path)


def plot_panels(panels, budgets, path) -> None:
    """``panels``: (title, {method: score per budget}, dense score or None), scores in [0, 1]; one panel
    each, side by side, written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, curves, dense) in zip(axes[0], panels):
        for name, scores in curves.items():
            ax.plot([100 * b for b in budgets], [100 * score for score in scores], marker="o", label=name)
        if dense is not None:
            ax.axhline(100 * dense, color="black", linestyle="--", label="dense")
        ax.set(title=title, xlabel="token budget (% of prompt)", ylabel="niah score (%)", xscale="log")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
