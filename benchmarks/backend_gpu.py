"""The torch.compile backend on the GPU (needs CUDA):

    python -m benchmarks.backend_gpu --out backend_h100

For tiny random models of several families in float32 on CUDA: logits of ``torch.compile(model,
backend="specontext")`` against eager on a short input (dense there; Inductor generates the GPU
kernels), and a compiled ``generate`` with a 16-token budget (decode steps sparse) against the same
rewritten graph run eagerly. Writes JSON under benchmarks/results/ (and $OUT when set).
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch

from benchmarks.results_file import write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="backend_gpu")
    parser.add_argument("--families", nargs="*", default=["llama", "qwen3", "gemma2"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/backend_gpu.py needs a CUDA GPU")
    import specontext  # noqa: F401  (registers the backend)
    from specontext_compiler.dynamo_backend import rewrite_attention
    from specontext.testing import tiny_model

    rows = []
    ids = torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(1)).cuda()
    for family in args.families:
        torch._dynamo.reset()
        model = tiny_model(family).cuda()
        started = time.perf_counter()
        with torch.no_grad():
            expected = model(ids).logits
            got = torch.compile(model, backend="specontext", options={"token_budget": 2048})(ids).logits
        diff = float((got - expected).abs().max())
        rows.append({"family": family, "max_logit_diff": diff, "within_1e-4": diff <= 1e-4,
                     "seconds": time.perf_counter() - started})
        print(f"{family:>8}: compiled vs eager logits max diff {diff:.2e} ({rows[-1]['seconds']:.1f} s)", flush=True)

    prompt = torch.randint(3, 96, (1, 40), generator=torch.Generator().manual_seed(2)).cuda()
    counts = []

    def rewrite_only(gm, example_inputs, **_):
        counts.append(rewrite_attention(gm, {"token_budget": 16, "sink_tokens": 4, "local_window": 64}))
        return gm.forward

    def generate(backend, **options):
        model = tiny_model("llama").cuda()
        model.forward = torch.compile(model.forward, backend=backend, **options)
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=6, do_sample=False)

    torch._dynamo.reset()
    eager_graph = generate(rewrite_only)
    torch._dynamo.reset()
    inductor = generate("specontext", options={"token_budget": 16})
    sparse = {"identical_tokens": bool(torch.equal(eager_graph, inductor)), "rewritten_per_graph": counts}
    print(f"sparse generate (budget 16, 40-token prompt): Inductor tokens identical to the rewritten eager graph: "
          f"{sparse['identical_tokens']}; SDPA calls rewritten per graph {counts}", flush=True)
    payload = {"command": "python -m benchmarks.backend_gpu", "date": datetime.date.today().isoformat(),
               "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "dense": rows, "sparse_generate": sparse}
    write_results(payload, args.out)


if __name__ == "__main__":
    main()
