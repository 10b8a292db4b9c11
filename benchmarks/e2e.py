"""End to end on the GPU: HF transformers baselines and SpeContext, side by side in one run.

    python -m benchmarks.e2e --out e2e_h100                        # all systems, 32K
    python -m benchmarks.e2e --systems specontext_80gb --contexts 32768 --batches 1 4

Llama-3.1-8B shape with random bf16 weights (decode speed does not depend on the values), prompts of
random tokens. Systems:

* ``hf_eager``: ``model.generate`` with its default dynamic cache (the paper's baseline).
* ``hf_static_compile``: ``cache_implementation="static"``, the forward under ``torch.compile``
  (transformers compiles decoding with a static cache itself).
* ``hf_offloaded``: ``cache_implementation="offloaded"`` (the KV cache in host memory, a layer at a time).
* ``specontext_80gb`` / ``specontext_24gb``: ``specontext.compile(model, budget, token_budget=2048)``,
  decode steps replayed from a CUDA graph where they can be (``decode_mode="graph"``), and the same
  model decoding eagerly (``..._eager``) for comparison; ``specontext_80gb_offloaded`` keeps every
  layer's KV in host memory (``offload="all"``), for batches larger than the GPU holds.

For each system, context and batch: prefill seconds, decode ms per step and tokens/s, peak GPU memory,
PCIe bytes per step (SpeContext's counter), and the step against the roofline: (weights + KV bytes the
step must read) / the measured HBM bandwidth. Decode time = a generate of N+1 tokens minus one of 1
token, over N (SpeContext: N+3 minus 3, so that its once-per-call warm-up step and graph capture
cancel too); every system first runs the measured call once (compilation stays out of the numbers). A system that runs out of memory at a batch is recorded as such. Writes
benchmarks/results/<out>.json (and $OUT).

The paper's workloads ([prompt, new tokens], long generations integrated from step times, HF eager's
best batch, the edge 1B shape, SpeContext's 32K max batch): ``--workloads``, ``--edge``,
``--max-batch-32k``, ``--diagnose-hf`` (``benchmarks/e2e_workloads.py``; the GPU run plan is in
docs/benchmarks.md, "The paper's workloads").
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import time

import torch

from benchmarks import e2e_rows, e2e_workloads, e2e_workloads_cli
from benchmarks.results_file import write_results

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                rms_norm_eps=1e-5, tie_word_embeddings=False)
SYSTEMS = ("hf_eager", "hf_static_compile", "hf_offloaded", "specontext_80gb", "specontext_80gb_eager",
           "specontext_80gb_offloaded", "specontext_24gb")
TOKEN_BUDGET = 2048
INDUCTOR = None  # compile_decode_step: None (the default: Inductor on CUDA), --inductor True, --no-inductor False
INDUCTOR_OPTIONS: dict | None = None  # --inductor-options: Inductor's options for the fixed-shape step (None: defaults)
SHORT = 3  # tokens of the shorter generate without the guard (prefill, the eager warm-up step, one replay)
GUARD = True  # --no-guard: the accuracy guard off
TIME_WAITS = False  # --time-waits: time the compute stream's waits on loads inside graph steps
REPEATS = 3  # --repeats: pairs of generates whose step times' median is reported
BUDGET = "80GB"  # --budget: the specontext_80gb systems' budget (the name stays; "135GB" is what an H200 holds)


def llama_8b_random():
    from transformers import LlamaConfig, LlamaForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(LlamaConfig(**LLAMA_8B))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def hbm_bandwidth() -> float:
    """Bytes read + written per second of a 2 GiB device copy (median of 10)."""
    src = torch.randn(2**29, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * 2**29 * 4 / statistics.median(times[2:])


def _prompt(batch: int, context: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(context + batch)
    return torch.randint(10, 120000, (batch, context), generator=generator).cuda()


def _synchronized(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def run_hf(model, system: str, ids: torch.Tensor, new_tokens: int) -> dict:
    kwargs = dict(do_sample=False, pad_token_id=0)
    if system == "hf_static_compile":
        kwargs["cache_implementation"] = "static"
    elif system == "hf_offloaded":
        kwargs["cache_implementation"] = "offloaded"
    full = dict(max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, **kwargs)
    with torch.no_grad():
        model.generate(ids, **full)  # warm-up with the measured shapes (torch.compile compiles for them)
        _, prefill = _synchronized(lambda: model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs))
        _, total = _synchronized(lambda: model.generate(ids, **full))
    step = max(total - prefill, 1e-9) / new_tokens
    return {"prefill_seconds": prefill, "ms_per_step": 1e3 * step, "h2d_bytes_per_step": None}


_COMPILED: dict = {}


def difference_lengths(compiled, new_tokens: int) -> tuple[int, int]:
    """Tokens of the shorter and the longer of two generates whose difference, per step, is the step time:
    the shorter one already warms up and captures every kind of fixed-shape step the longer one runs (with
    the guard: the steps that measure its coverage, one in ``check_every``, the first of which comes at
    step ``check_every`` after the guard's dense start), and they differ by a whole number of guard periods."""
    guard = compiled.runtime.guard
    if guard is None:
        return SHORT, SHORT + new_tokens
    every = guard.settings.check_every
    # prefill's token, the dense start's steps, then two measured steps: the kind's warm-up and its capture
    short = guard.settings.dense_start + 2 * every + 1
    return short, short + every * -(-new_tokens // every)


def steady_step_ms(generate, short_tokens: int, long_tokens: int, repeats: int) -> tuple[list[float], list, dict]:
    """Step times from ``repeats`` pairs of generates (``generate(tokens)`` returns ``stats``): the
    differences, the longer calls' ``replayed_step_ms`` (events at each step: engine.time_steps), and the
    last longer call's stats. A pair's difference still holds the noise of what happens once per call (a
    capture, two warm-up steps); the replayed steps' mean interval has none of it."""
    times, replayed, long = [], [], {}
    for _ in range(repeats):
        short, long = generate(short_tokens), generate(long_tokens)
        times.append(step_ms(short, long))
        replayed.append(long.get("replayed_step_ms"))
    return times, replayed, long


def step_ms(short: dict, long: dict) -> float:
    """Per-step time of the steps by which two generates' ``stats`` differ; refuses a pair whose
    difference holds a warm-up or a capture (what happens once per call must cancel)."""
    for key in ("graph_captures", "fixed_shape_steps_not_replayed"):
        if short.get(key) != long.get(key):
            raise RuntimeError(f"{key} differs between the two generates ({short.get(key)} vs {long.get(key)}): "
                               "their difference is not replayed steps alone")
    return 1e3 * (long["decode_seconds"] - short["decode_seconds"]) / (long["steps"] - short["steps"])


def run_specontext(model, system: str, ids: torch.Tensor, new_tokens: int) -> dict:
    import specontext

    budget = "24GB" if "24gb" in system else BUDGET
    if system not in _COMPILED:  # one compile per system (torch.export of the 8B step takes a while)
        _COMPILED.clear()
        offload = "all" if system.endswith("_offloaded") else "auto"
        _COMPILED[system] = specontext.compile(model, budget, token_budget=TOKEN_BUDGET, offload=offload, progress=False,
                                               compile_decode_step=INDUCTOR, guard=GUARD)
        if INDUCTOR_OPTIONS is not None:
            _COMPILED[system].engine.compile_fixed_shape_step(inductor_options=INDUCTOR_OPTIONS)
    compiled = _COMPILED[system]
    compiled.engine.decode_mode = "eager" if system.endswith("_eager") else "graph"
    compiled.engine.time_graph_waits = TIME_WAITS
    compiled.engine.time_steps = True

    def generate(tokens: int) -> dict:
        compiled.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
        return dict(compiled.stats)

    short_tokens, long_tokens = difference_lengths(compiled, new_tokens)
    warm = generate(long_tokens)  # warm-up with both measured shapes (Triton and Inductor compile for them)
    generate(short_tokens)
    times, replayed, stats = steady_step_ms(generate, short_tokens, long_tokens, REPEATS)
    # A call at a length not seen before (another KV capacity): what a user pays for a new prompt length,
    # and whether it compiled kernels (entries added to Triton's and Inductor's caches on disk).
    caches = _cache_entries()
    other = generate(long_tokens + 2 * SHORT + 1)
    after = _cache_entries()
    caches_added = {name: after[name] - count for name, count in caches.items()}
    # As for HF: the difference of two generates over the steps they differ by, so that what happens once
    # per call (each kind of fixed-shape step's eager warm-up and graph capture) cancels.
    return {"prefill_seconds": stats["prefill_seconds"],
            "ms_per_step": statistics.median(times), "ms_per_step_repeats": times,
            "replayed_step_ms": statistics.median(replayed) if None not in replayed else None,
            "replayed_step_ms_repeats": replayed,
            "generate_tokens": [short_tokens, long_tokens],
            "graph_captures": stats["graph_captures"],
            "ms_per_step_with_capture": 1e3 * stats["decode_seconds"] / stats["steps"],
            "graph_capture_seconds": stats["graph_capture_seconds"],
            "compile_seconds_first_call": warm.get("compile_seconds", 0.0),
            "compile_seconds_new_length": other.get("compile_seconds", 0.0),
            "ms_per_step_new_length_call": 1e3 * other["decode_seconds"] / max(other["steps"], 1),
            "cache_entries_added_new_length": caches_added,
            "h2d_bytes_per_step": stats["h2d_bytes"] / max(stats["steps"], 1),
            "h2d_bytes_full_reload_per_step": stats["h2d_bytes_full_reload"] / max(stats["steps"], 1),
            "selection_overlap": stats["selection_overlap"],
            "fixed_shape_steps": stats["fixed_shape_steps"], "steps": stats["steps"],
            "offloaded_layers": len(compiled.runtime.store.offloaded),
            "attended_tokens_per_step": stats["attended_tokens_per_step"],
            "guard_dense_steps": stats.get("guard_dense_steps"), "guard_triggers": stats.get("guard_triggers"),
            "guard_min_coverage": stats.get("guard_min_coverage"),
            "graph_prefetch_wait_ms": stats.get("graph_prefetch_wait_ms")}


def _cache_entries() -> dict[str, int]:
    """Files in Triton's and Inductor's on-disk caches (a kernel compiled adds some)."""
    import os
    from pathlib import Path

    from torch._inductor.runtime.cache_dir_utils import cache_dir

    roots = {"triton": Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache")),
             "inductor": Path(cache_dir())}
    return {name: sum(len(files) for _, _, files in os.walk(root)) if root.is_dir() else 0
            for name, root in roots.items()}


def check_graph_decode() -> dict:
    """Tokens of CUDA-graph decode against eager decode and the fixed-shape path run eagerly: tiny random
    Llama and Gemma 2 (sliding windows, soft-capping) resident, Llama with every layer offloaded (elastic
    loads on the side stream inside the graph), and the latter with ``compile_decode_step=True`` (Inductor's
    step in the graph); float32, a left-padded batch, token budget 16."""
    import sys
    from pathlib import Path

    import specontext

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from specontext.testing import padded_batch, tiny_model

    results = {}
    for family, offload, inductor in (("llama", "none", False), ("llama", "none", True), ("gemma2", "none", False),
                                      ("gemma2", "none", True), ("llama", "all", False),
                                      ("llama", "all", True)):
        model = tiny_model(family).cuda()
        compiled = specontext.compile(model, "1GB", token_budget=16, offload=offload, local_window=4, progress=False,
                                      compile_decode_step=inductor)
        ids, mask = (t.cuda() for t in padded_batch(96, [48, 31], seed=5))
        tokens = {}
        for mode in ("eager", "fixed", "graph"):
            compiled.engine.decode_mode = mode
            tokens[mode] = compiled.generate(ids, attention_mask=mask, max_new_tokens=40, min_new_tokens=40,
                                             do_sample=False, pad_token_id=0)
            steps = compiled.stats["fixed_shape_steps"]
        name = (family if offload == "none" else f"{family} offloaded") + (", compile_decode_step" if inductor else "")
        results[name] = {"graph_equals_eager": bool(torch.equal(tokens["graph"], tokens["eager"])),
                         "fixed_equals_eager": bool(torch.equal(tokens["fixed"], tokens["eager"])),
                         "graph_steps": steps, "h2d_bytes": compiled.stats["h2d_bytes"]}
        print(f"graph decode check {name}: {results[name]}")
    return results


def measure(model, system: str, context: int, batch: int, new_tokens: int, hbm: float) -> dict:
    from specontext_compiler.planning import kv_bytes_per_token, weight_bytes

    if not system.startswith("specontext"):
        _COMPILED.clear()  # a compiled SpeContext model holds its KV store: free it before an HF system runs
        gc.collect()
        torch.cuda.empty_cache()
    ids = _prompt(batch, context)
    torch.cuda.reset_peak_memory_stats()
    row = {"system": system, "context": context, "batch": batch}
    try:
        runner = run_specontext if system.startswith("specontext") else run_hf
        row.update(runner(model, system, ids, new_tokens))
    except torch.OutOfMemoryError as error:
        row.update(error=f"out of memory: {str(error).splitlines()[0]}")
        return row
    finally:
        gc.collect()
        torch.cuda.empty_cache()
    attended = min(TOKEN_BUDGET, context) if system.startswith("specontext") else context
    step_bytes = e2e_rows.step_bytes(weight_bytes(model), kv_bytes_per_token(model.config, torch.bfloat16), batch, attended)
    row.update(peak_gpu_gb=torch.cuda.max_memory_allocated() / 1e9,
               tokens_per_s=batch * 1e3 / row["ms_per_step"],
               roofline_ms=1e3 * step_bytes / hbm, step_bytes=step_bytes)
    row["step_over_roofline"] = row["ms_per_step"] / row["roofline_ms"]
    if row.get("replayed_step_ms"):
        # The steady step's rate: with the guard's dense start, the difference of two generates carries the
        # variance of 16 eager dense steps (at batch 16 it once came out under the roofline).
        row["replayed_over_roofline"] = row["replayed_step_ms"] / row["roofline_ms"]
        row["tokens_per_s_replayed"] = batch * 1e3 / row["replayed_step_ms"]
    row["hbm_share"] = 1 / row["step_over_roofline"]
    return row


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--kernels", action="store_true",
                        help="SpeContext's Triton attention/scoring kernels in eager steps too (graph steps use them anyway)")
    parser.add_argument("--check-only", action="store_true", help="only compare graph, fixed and eager decode tokens")
    parser.add_argument("--inductor", action=argparse.BooleanOptionalAction, default=None,
                        help="compile_decode_step True / False (default: the library's default, Inductor on CUDA)")
    parser.add_argument("--inductor-options", type=json.loads, default=None,
                        help="Inductor options for the fixed-shape step, as JSON; they replace the library's "
                             "(step_compile.CUDA_INDUCTOR_OPTIONS): '{}' compiles with Inductor's own defaults")
    parser.add_argument("--time-waits", action="store_true",
                        help="time the compute stream's waits on loads inside graph steps (the last step's)")
    parser.add_argument("--no-guard", action="store_true", help="the accuracy guard off")
    parser.add_argument("--skip-check", action="store_true", help="skip the tiny-model graph-decode token check")
    parser.add_argument("--budget", default=BUDGET, help="budget of the specontext_80gb systems")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="pairs of generates per SpeContext row (median)")
    parser.add_argument("--out", default="e2e")
    e2e_workloads_cli.add_arguments(parser)
    return parser


def main() -> None:
    global INDUCTOR, INDUCTOR_OPTIONS, BUDGET, GUARD, TIME_WAITS, REPEATS
    parser = build_parser()
    args = parser.parse_args()
    if e2e_workloads_cli.requested(args):  # the paper's workloads: benchmarks/e2e_workloads.py
        e2e_workloads.main(args, parser)
        return

    INDUCTOR, BUDGET, GUARD, TIME_WAITS = args.inductor, args.budget, not args.no_guard, args.time_waits
    REPEATS, INDUCTOR_OPTIONS = args.repeats, args.inductor_options
    if INDUCTOR_OPTIONS is not None and INDUCTOR is False:
        parser.error("--inductor-options compiles the step with Inductor: not with --no-inductor")
    if args.kernels:
        from specontext_compiler.kernels import use_kernels

        use_kernels(True)
    check = {} if args.skip_check else check_graph_decode()
    if args.check_only:
        return
    hbm = hbm_bandwidth()
    print(f"{torch.cuda.get_device_name()}: HBM copy {hbm / 1e9:.0f} GB/s")
    model = llama_8b_random()
    rows = []
    for context in args.contexts:
        for system in args.systems:
            for batch in args.batches:
                row = measure(model, system, context, batch, args.new_tokens, hbm)
                rows.append(row)
                write_results(payload(args, hbm, check, rows, complete=False), args.out, quiet=True)
                if "error" in row:
                    print(f"{system:24s} {context:>7d} x{batch:<3d} {row['error'][:60]}")
                    break  # larger batches will not fit either
                print(f"{system:24s} {context:>7d} x{batch:<3d} prefill {row['prefill_seconds']:6.2f} s  "
                      f"{row['ms_per_step']:7.2f} ms/step  {row['tokens_per_s']:8.1f} tok/s  "
                      f"roofline {row['roofline_ms']:5.2f} ms (x{row['step_over_roofline']:.2f})  "
                      f"replayed {row.get('replayed_step_ms') or 0:6.2f} ms (x{row.get('replayed_over_roofline') or 0:.2f})  "
                      f"peak {row['peak_gpu_gb']:5.1f} GB  compile {row.get('compile_seconds_first_call') or 0:.0f} s  "
                      f"guard dense {row.get('guard_dense_steps')}  wait {row.get('graph_prefetch_wait_ms')}")
    _COMPILED.clear()
    write_results(payload(args, hbm, check, rows, complete=True), args.out)


def payload(args, hbm: float, check: dict, rows: list[dict], complete: bool) -> dict:
    return {"command": "python -m benchmarks.e2e " + " ".join(
                f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                for k, v in vars(args).items()),
            "date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__, "hbm_copy_gb_s": hbm / 1e9, "token_budget": TOKEN_BUDGET,
            "fused_projections": True,  # q/k/v and gate/up as one product each (projection_fusion.py)
            "guard": GUARD, "complete": complete, "graph_decode_check": check, "rows": rows}


if __name__ == "__main__":
    main()
