"""Which layers' previous-token query ranks like the oracle, on the suite's fit split (teacher-forced).

    .venv/bin/python -m benchmarks.ruler_layers --lengths 1024 --prompts 3 --budget 0.12

For each fit prompt: dense generates the answer; then, for every layer L and lookahead in --lookaheads,
a draft-free head scoring with layer L alone (no prefill prior) is fed the dense answer token by token
(teacher forcing) and we count the steps whose greedy token equals dense's. Oracle top-k beside. What
this ranks is used to pick the scoring layers of the default head (fit split only).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch
from tqdm import tqdm

import specontext
from specontext_compiler.evaluation import ruler
from specontext_compiler.evaluation.shared_prefill import DENSE, HeadChoice, Method, generate_each, replay_each
from specontext_compiler.models import load_model
from specontext_compiler.retrieval import OracleTopK, TargetLayerHead

try:
    from .results_file import write_results
except ImportError:
    from results_file import write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024])
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--budget", type=float, default=0.12)
    parser.add_argument("--lookaheads", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--tasks", nargs="+", default=list(ruler.FIT_TASKS))
    parser.add_argument("--out", default="ruler_layers_fit")
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2")
    layers = model.config.num_hidden_layers
    heads = {"oracle": OracleTopK()}
    for look in args.lookaheads:
        for layer in range(layers):
            heads[f"L{layer}_look{look}"] = TargetLayerHead(layer, prefill_prior=False, lookahead=look)
    choice = HeadChoice(heads)
    compiled = specontext.compile(model, "200GB", draft=choice, offload="none", progress=False, guard=False)
    agree = {name: [0, 0] for name in heads}
    started = time.perf_counter()
    for sample in tqdm(ruler.suite(tokenizer, args.tasks, args.lengths, args.prompts, "fit"), desc="prompts"):
        ids = sample.input_ids
        answer = generate_each(compiled, choice, ids, [DENSE], sample.max_new_tokens)[DENSE]
        budget = round(args.budget * sample.tokens)
        methods = [Method(name, budget) for name in heads]
        logits = replay_each(compiled, choice, ids, answer, methods)
        for method in methods:
            same = (logits[method].argmax(-1) == answer).sum().item()
            agree[method.head][0] += same
            agree[method.head][1] += answer.shape[1]
    ranked = sorted(agree.items(), key=lambda item: -item[1][0] / item[1][1])
    for name, (same, total) in ranked:
        print(f"{name:14s} {same / total:.3f}")
    write_results({"command": "python -m benchmarks.ruler_layers " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
                   "machine": f"{platform.node()} CPU, torch {torch.__version__}", "date": datetime.date.today().isoformat(),
                   "seconds": time.perf_counter() - started,
                   "agreement": {name: same / total for name, (same, total) in ranked}}, args.out)


if __name__ == "__main__":
    main()
