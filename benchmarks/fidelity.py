"""Long-generation fidelity: teacher-forced over the model's own dense continuation, per method and budget.

    python -m benchmarks.fidelity --context 3072 --new-tokens 1024 --budgets 0.06 0.12 --out fidelity_smollm2_h200

Prompts (chat turns over natural text from the held-out source, evaluation/texts.py): a document to
restate section by section, a document to answer questions about while quoting it, and an open-ended
explanation after the document (the continuation keeps referring back to the context in the first two).
Dense attention generates ``--new-tokens`` greedily (EOS suppressed so that every prompt reaches the
length); every method is then fed that continuation token by token from one shared prefill
(evaluation/shared_prefill.replay_each) and compared step by step with dense: top-1 agreement (the
greedy token equals dense's) and KL(dense || method) of the next-token distributions. Budgets are
fractions of the final context (prompt + continuation): the selection's share is larger earlier on.
Writes benchmarks/results/<out>.json.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import specontext
from specontext_compiler.evaluation import texts
from specontext_compiler.evaluation.shared_prefill import DENSE, HeadChoice, Method, generate_each, replay_each
from specontext_compiler.models import load_model

try:
    from .results_file import write_results
    from .ruler import head_variants
except ImportError:
    from results_file import write_results
    from ruler import head_variants

INSTRUCTIONS = (
    "Restate the document above section by section, in your own words, quoting its key terms.",
    "Answer in detail: what does the document above say, and which parts of it would a programmer need most? "
    "Quote the passages you rely on.",
    "Using the document above, write a long tutorial for a beginner, with examples.",
)


def prompt_ids(tokenizer, index: int, context: int) -> torch.Tensor:
    paragraphs = texts.paragraphs("docstrings")
    start = (index * 97) % len(paragraphs)
    document, ids = "", None
    for paragraph in paragraphs[start:] + paragraphs[:start]:
        candidate = document + paragraph + "\n\n"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": candidate + INSTRUCTIONS[index % len(INSTRUCTIONS)]}],
            add_generation_prompt=True, tokenize=False)
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(tokens) > context:
            break
        document, ids = candidate, tokens
    return torch.tensor([ids])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--context", type=int, default=3072)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--first-prompt", type=int, default=0)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.06, 0.12])
    parser.add_argument("--heads", nargs="+", default=["d72-80_look1", "v1", "streaming", "oracle"])
    parser.add_argument("--guard-heads", nargs="*", default=["d72-80_look1"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="fidelity")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, device=args.device)
    variants = head_variants(model.config.num_hidden_layers, getattr(model.config, "layer_types", None), model)
    choice = HeadChoice({name: variants[name]() for name in args.heads})
    compiled = specontext.compile(model, "200GB", draft=choice, offload="none", progress=False, guard=bool(args.guard_heads))
    runs = [(name, False) for name in args.heads] + [(name, True) for name in args.guard_heads]
    rows = []
    started = time.perf_counter()
    for index in tqdm(range(args.first_prompt, args.first_prompt + args.prompts), desc="prompts"):
        ids = prompt_ids(tokenizer, index, args.context).to(args.device)
        final = ids.shape[1] + args.new_tokens
        eos = compiled.generation_config.eos_token_id
        continuation = generate_each(compiled, choice, ids, [DENSE], args.new_tokens, min_new_tokens=args.new_tokens,
                                     pad_token_id=eos if isinstance(eos, int) else 0)[DENSE]
        plan = [(Method(name, round(b * final), guard), b) for b in args.budgets for name, guard in runs]
        stats = {}
        logits = replay_each(compiled, choice, ids, continuation, [DENSE] + [m for m, _ in plan], stats)
        reference = F.log_softmax(logits[DENSE].float(), -1)
        for method, budget in plan:
            got = F.log_softmax(logits[method].float(), -1)
            kl = (reference.exp() * (reference - got)).sum(-1)  # [1, N]
            agree = (got.argmax(-1) == reference.argmax(-1)).float()
            rows.append({"prompt": index, "prompt_tokens": ids.shape[1], "new_tokens": args.new_tokens,
                         "method": method.name, "budget": budget,
                         "token_budget": method.token_budget, "top1_agreement": float(agree.mean()),
                         "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
                         "top1_agreement_last_half": float(agree[:, args.new_tokens // 2:].mean()),
                         **{k: v for k, v in stats[method].items() if k.startswith("guard_") or k == "steps"}})
            print(f"prompt {index} {rows[-1]['method']:>20s} @{budget:.0%}: top-1 {rows[-1]['top1_agreement']:.4f} "
                  f"KL {rows[-1]['mean_kl']:.4f}")
        print("dense continuation starts:", repr(tokenizer.decode(continuation[0, :60])))
        write_results(payload(args, rows, started, complete=False), args.out, quiet=True)  # a cut-short run keeps its rows
    result = payload(args, rows, started, complete=True)
    for key, value in result["summary"].items():
        print(f"{key:28s} top-1 {value['top1_agreement']:.4f}  KL {value['mean_kl']:.4f}")
    write_results(result, args.out)


def payload(args, rows: list[dict], started: float, complete: bool) -> dict:
    groups = {}
    for row in rows:
        groups.setdefault(f"{row['method']}@{row['budget']}", []).append(row)
    summary = {key: {"top1_agreement": sum(r["top1_agreement"] for r in v) / len(v),
                     "mean_kl": sum(r["mean_kl"] for r in v) / len(v), "prompts": len(v)} for key, v in groups.items()}
    return {"command": "python -m benchmarks.fidelity " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
            "machine": f"{platform.node()}, {torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}, torch {torch.__version__}",
            "date": datetime.date.today().isoformat(), "seconds": time.perf_counter() - started, "complete": complete,
            "summary": summary, "rows": rows}


if __name__ == "__main__":
    main()
