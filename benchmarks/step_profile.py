"""Where a decode step's time goes on the GPU: kernels by kind, against the bytes it must read.

    python -m benchmarks.step_profile --out step_profile_h200
    python -m benchmarks.step_profile --batch 8 --variants graph_inductor --out step_profile_b8_h200

Three measurements on the Llama-3.1-8B shape (random bf16 weights, as in benchmarks/e2e.py):

* **projection floor**: every weight matrix of the model read once per step by ``F.linear`` on one
  token (the 32 layers' projections and the LM head), replayed from a CUDA graph; once with the
  separate projections of the HF model (q, k, v, o, gate, up, down) and once with q/k/v and gate/up
  concatenated. This is what cuBLAS makes of the weight bytes alone, the floor of any step.
* **kernel table**: SpeContext's decode step at 32K (``specontext.compile(model, "135GB",
  token_budget=2048)``), profiled with ``torch.profiler`` over two ``generate`` calls that differ only in
  their number of decode steps; the difference, per step, is the replayed step's kernels (prefill and
  capture cancel). Kernels are grouped by kind (matrix products, attention, selection, elementwise...).
* **step time** of each variant (``--variants``: the default CUDA graph; ``graph_inductor``, i.e.
  Inductor with coordinate-descent tuning; ``graph_inductor_untuned``, the default compiled step, without it
  (cuBLAS keeps the one-row matrix products); ``fixed``, the
  fixed-shape step without a graph), as the difference of two generates over the steps they differ
  by, with the kernel time summed per step: the difference is time the GPU spends between kernels.

Writes benchmarks/results/<out>.json (and $OUT).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.e2e import TOKEN_BUDGET, _prompt, difference_lengths, hbm_bandwidth, llama_8b_random, step_ms
from benchmarks.results_file import write_results
from specontext_compiler.runtime.step_compile import CUDA_INDUCTOR_OPTIONS

KINDS = (  # first match wins
    ("attention (Triton)", ("sparse_decode", "_attention_kernel", "attn")),
    ("retrieval scores (Triton)", ("retrieval", "score")),
    ("selection (top-k, sort)", ("topk", "sort", "radix", "bitonic", "gatherTopK")),
    ("matrix products", ("gemv", "gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90", "splitKreduce")),
    ("copies", ("memcpy", "memset", "Memcpy", "Memset", "copy_kernel", "CatArrayBatched")),
    ("Inductor fused", ("triton_",)),
)


def kind_of(name: str) -> str:
    for kind, keys in KINDS:
        if any(key in name for key in keys):
            return kind
    return "other elementwise / indexing"


def time_graph(fn, repeats: int = 30) -> float:
    """Median ms of a CUDA graph of ``fn`` (captured after a warm-up call)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[3:])


def projection_floor(model, batch: int, hbm: float) -> dict:
    layers = model.model.layers
    separate = [[l.self_attn.q_proj.weight, l.self_attn.k_proj.weight, l.self_attn.v_proj.weight, l.self_attn.o_proj.weight,
                 l.mlp.gate_proj.weight, l.mlp.up_proj.weight, l.mlp.down_proj.weight] for l in layers]
    head = model.lm_head.weight
    inputs = {n: torch.randn(batch, 1, n, device="cuda", dtype=torch.bfloat16) for n in (4096, 14336)}

    def run(groups):
        def fn():
            for group in groups:
                for w in group:
                    F.linear(inputs[w.shape[1]], w)
            F.linear(inputs[4096], head)
        return fn

    weight_bytes = sum(w.numel() * w.element_size() for g in separate for w in g) + head.numel() * 2
    out = {"weight_bytes": weight_bytes, "floor_ms": 1e3 * weight_bytes / hbm}
    out["separate_ms"] = time_graph(run(separate))
    fused = [[torch.cat(g[:3]), g[3], torch.cat(g[4:6]), g[6]] for g in separate]
    out["fused_ms"] = time_graph(run(fused))
    del fused
    for key in ("separate", "fused"):
        out[f"{key}_gb_s"] = weight_bytes / out[f"{key}_ms"] / 1e6
    return out


def kernel_times(compiled, ids, new_tokens: int) -> dict:
    """name -> (count, total us) of the device kernels of one generate."""
    from torch.profiler import ProfilerActivity, profile

    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        compiled.generate(ids, **settings)
    table = collections.defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            table[event.name][0] += 1
            table[event.name][1] += event.time_range.elapsed_us()
    return dict(table)


def profile_variant(compiled, ids, new_tokens: int) -> dict:
    def generate(tokens: int) -> dict:
        compiled.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
        return dict(compiled.stats)

    short, long = difference_lengths(compiled, new_tokens)
    generate(long)  # warm-up: Triton and Inductor compile for both shapes (Inductor recompiles
    generate(short)  # with a dynamic length at the second), so no compilation falls in what is measured
    a_stats, b_stats = generate(short), generate(long)
    steps = b_stats["steps"] - a_stats["steps"]
    ms_per_step = step_ms(a_stats, b_stats)
    a = kernel_times(compiled, ids, short)
    b = kernel_times(compiled, ids, long)
    rows = []
    for name in b:
        count = (b[name][0] - a.get(name, [0, 0.0])[0]) / steps
        us = (b[name][1] - a.get(name, [0, 0.0])[1]) / steps
        if count > 0.5:
            rows.append({"kernel": name[:120], "kind": kind_of(name), "per_step": count, "us_per_step": us})
    rows.sort(key=lambda r: -r["us_per_step"])
    kinds = collections.defaultdict(lambda: [0.0, 0.0])
    for row in rows:
        kinds[row["kind"]][0] += row["per_step"]
        kinds[row["kind"]][1] += row["us_per_step"]
    kernel_ms = sum(r["us_per_step"] for r in rows) / 1e3
    return {"ms_per_step": ms_per_step, "kernel_ms_per_step": kernel_ms,
            "kernels_per_step": sum(r["per_step"] for r in rows),
            "kernels_profiled": {"short": sum(c for c, _ in a.values()), "long": sum(c for c, _ in b.values())},
            "kinds": {k: {"kernels": v[0], "ms": v[1] / 1e3} for k, v in sorted(kinds.items(), key=lambda kv: -kv[1][1])},
            "top_kernels": rows[:40]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (the kernel table's)")
    parser.add_argument("--variants", nargs="+", default=["graph", "graph_inductor"],
                        choices=["graph", "fixed", "graph_inductor", "graph_inductor_untuned"])
    parser.add_argument("--deadline", type=float, default=540, help="seconds; later variants are skipped")
    parser.add_argument("--no-guard", action="store_true", help="the accuracy guard off")
    parser.add_argument("--budget", default="135GB", help="what the GPU holds (an H200: 135GB)")
    parser.add_argument("--out", default="step_profile")
    args = parser.parse_args()
    started = time.perf_counter()
    import specontext

    hbm = hbm_bandwidth()
    print(f"{torch.cuda.get_device_name()}: HBM copy {hbm / 1e9:.0f} GB/s")
    model = llama_8b_random()
    floor = {f"batch_{b}": projection_floor(model, b, hbm) for b in (1, 8)}
    for key, f in floor.items():
        print(f"projections {key}: floor {f['floor_ms']:.2f} ms; separate {f['separate_ms']:.2f} ms "
              f"({f['separate_gb_s']:.0f} GB/s); fused qkv/gate-up {f['fused_ms']:.2f} ms ({f['fused_gb_s']:.0f} GB/s)")
    compiled = specontext.compile(model, args.budget, token_budget=TOKEN_BUDGET, progress=False, guard=not args.no_guard)
    ids = _prompt(args.batch, args.context)
    variants = {}
    for variant in args.variants:
        if time.perf_counter() - started > args.deadline:
            print(f"skipped {variant}: past the deadline")
            continue
        compiled.engine.decode_mode = "fixed" if variant == "fixed" else "graph"
        compiled.engine.fixed_shape_step = None
        if variant == "graph_inductor":  # the defaults + coordinate-descent tuning (a default until 2026-12-04)
            compiled.engine.compile_fixed_shape_step(
                inductor_options={**CUDA_INDUCTOR_OPTIONS, "coordinate_descent_tuning": True})
        elif variant == "graph_inductor_untuned":
            compiled.engine.compile_fixed_shape_step()  # the defaults: cuBLAS keeps the matrix products
        try:
            variants[variant] = profile_variant(compiled, ids, new_tokens=16)
        except Exception as error:  # a variant that fails is recorded, and the others still run
            variants[variant] = {"error": repr(error)[:500]}
            print(f"{variant}: {error!r}"[:300])
            continue
        v = variants[variant]
        print(f"\n{variant}: {v['ms_per_step']:.2f} ms/step, kernels {v['kernel_ms_per_step']:.2f} ms "
              f"({v['kernels_per_step']:.0f} per step)")
        for kind, k in v["kinds"].items():
            print(f"  {kind:32s} {k['kernels']:7.0f} kernels  {k['ms']:6.3f} ms")
        for row in v["top_kernels"][:12]:
            print(f"    {row['us_per_step']:8.1f} us  x{row['per_step']:<5.0f} {row['kernel'][:90]}")
    write_results({"command": "python -m benchmarks.step_profile " + " ".join(
                       f"--{k} {' '.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items()),
                   "date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
                   "torch": torch.__version__, "hbm_copy_gb_s": hbm / 1e9, "context": args.context, "batch": args.batch,
                   "token_budget": TOKEN_BUDGET, "projection_floor": floor, "variants": variants}, args.out)


if __name__ == "__main__":
    main()
