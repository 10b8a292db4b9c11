"""GPU numbers of the tiered KV runtime, in one run (needs CUDA):

    python -m benchmarks.offload --out offload_h100

1. Row gather from pinned host memory into GPU slots (the runtime's Triton zero-copy kernel, K and V
   in one launch), for 4 KiB rows and for the runtime's own per-KV-head rows (head_dim x 2 bytes),
   against the pinned host->GPU copy bandwidth measured in the same run; every gathered row checked
   element by element.
2. Decode, Llama-3.1-8B shape with random bf16 weights, 32K-token context, batch 1, token_budget=2048:
   every layer's KV resident on the GPU against every layer offloaded (elastic loading): ms per step,
   host->GPU bytes per step (and what full reloads would move), prefetch wait.
3. Prefill of a ~128K-token prompt with every layer offloaded under a 24 GB budget: the peak of
   torch.cuda.max_memory_allocated against the budget.

Prints a table and writes JSON under benchmarks/results/ (and $OUT when set).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
from pathlib import Path

import torch

from benchmarks.results_file import write_results
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                rms_norm_eps=1e-5, tie_word_embeddings=False)


def timed(fn, repeat: int = 20) -> float:
    """Median seconds of ``fn`` over ``repeat`` runs (CUDA events, after two warm-up runs)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def gather_bandwidth() -> list[dict]:
    """The runtime's gather kernel, every row from pinned host memory (K and V in one launch, as an
    offloaded layer's step does), against the pinned host->GPU copy; every row checked bit-exact."""
    from specontext_compiler.kernels.gather_rows import gather_from_host_or_ring

    rows = []
    copy_bytes = 1 << 30
    pinned = torch.empty(copy_bytes, dtype=torch.uint8, pin_memory=True).random_(0, 255)
    on_gpu = torch.empty(copy_bytes, dtype=torch.uint8, device="cuda")
    copy_gbps = copy_bytes / timed(lambda: on_gpu.copy_(pinned, non_blocking=True)) / 1e9
    pinned = on_gpu = None  # free before the next gigabyte
    for heads, dim in [(1, 2048), (8, 128)]:  # 4 KiB rows; the runtime's bf16 rows of one KV head
        tokens = (1 << 29) // (heads * dim * 2)  # 512 MiB each for K and V
        # token-major host storage seen as [1, H, T, D], as the KV store keeps an offloaded layer
        host_k, host_v = (torch.empty(tokens, 1, heads, dim, dtype=torch.bfloat16, pin_memory=True).permute(1, 2, 0, 3)
                          for _ in range(2))
        for tensor in (host_k, host_v):
            tensor.view(torch.int16).random_(-(1 << 14), 1 << 14)
        picked = tokens // 4
        g = torch.Generator().manual_seed(0)
        token = torch.stack([torch.randperm(tokens, generator=g)[:picked] for _ in range(heads)])[None].sort(-1).values.cuda()
        slot = torch.arange(picked, device="cuda").expand(1, heads, picked).contiguous()
        source = torch.ones(1, heads, picked, dtype=torch.int8, device="cuda")
        ring = torch.zeros(1, heads, 1, dim, dtype=torch.bfloat16, device="cuda")
        dst_k, dst_v = (torch.full((1, heads, picked, dim), float("nan"), dtype=torch.bfloat16, device="cuda") for _ in range(2))
        seconds = timed(lambda: gather_from_host_or_ring(host_k, host_v, ring, ring.clone(), dst_k, dst_v, token,
                                                         torch.zeros_like(token), source, slot))
        exact = all(
            torch.equal(dst[0].cpu().view(torch.int16), host[0][torch.arange(heads)[:, None], token[0].cpu()].view(torch.int16))
            for dst, host in ((dst_k, host_k), (dst_v, host_v))
        )
        moved = 2 * heads * picked * dim * 2
        rows.append({"row_bytes": dim * 2, "rows": 2 * heads * picked, "bytes": moved, "seconds": seconds,
                     "gbps": moved / seconds / 1e9, "pinned_copy_gbps": copy_gbps,
                     "share_of_copy": moved / seconds / 1e9 / copy_gbps, "bit_exact": exact})
    return rows


def cuda_check() -> dict:
    """Offloaded == resident and elastic == full reload on the GPU (side streams, pinned memory, the
    Triton gather), with a small random Llama at 4K tokens, a left-padded batch of 2 and slots poisoned
    with a large finite value. float32: the tokens must be identical and the logits agree to rounding;
    bfloat16: reported (a different key order rounds differently, and a random model has near-ties)."""
    import specontext
    from transformers import LlamaConfig, LlamaForCausalLM

    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                             num_key_value_heads=2, vocab_size=1000, max_position_embeddings=8192)
        model = LlamaForCausalLM(config).to("cuda", dtype).eval()
        ids = torch.randint(5, 1000, (2, 4096), generator=torch.Generator().manual_seed(3)).cuda()
        mask = torch.ones_like(ids)
        mask[1, :700] = 0  # a left-padded row
        reference = None
        for offload, elastic in [("none", True), ("all", True), ("all", False), ([1, 3], True)]:
            compiled = specontext.compile(model, "8GB", token_budget=256, offload=offload, elastic=elastic, progress=False)
            compiled.runtime.store.fill_value = 1e4
            out = compiled.generate(ids, attention_mask=mask, max_new_tokens=48, min_new_tokens=48, do_sample=False,
                                    pad_token_id=0, return_dict_in_generate=True, output_logits=True)
            if reference is None:
                reference = out
            same = bool(torch.equal(out.sequences, reference.sequences))
            first = next((i for i, (a, b) in enumerate(zip(out.sequences[0], reference.sequences[0])) if a != b), None)
            steps = len(out.logits) if same else max(1, out.sequences.shape[1] - ids.shape[1])
            diff = max(float((a - b).abs().max()) for a, b in list(zip(out.logits, reference.logits))[:steps])
            results[f"{str(dtype)[6:]}/{offload}/elastic={elastic}"] = {
                "identical_tokens": same, "max_logit_diff_while_identical": diff if same else None,
                "first_step_logit_diff": float((out.logits[0] - reference.logits[0]).abs().max()),
                "second_step_logit_diff": float((out.logits[1] - reference.logits[1]).abs().max()),
                "first_different_position": first,
                "h2d_bytes": compiled.stats["h2d_bytes"], "h2d_bytes_full_reload": compiled.stats["h2d_bytes_full_reload"]}
    return results


def llama_8b_random():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LLAMA_8B)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def decode(model, context: int, new_tokens: int, token_budget: int, repeats: int = 3) -> list[dict]:
    """Both placements compiled once and warmed up, then timed alternately ``repeats`` times (the
    resident step of this launch-bound eager loop moves by 10-30% between machines and runs)."""
    import specontext

    ids = torch.randint(10, 120000, (1, context), generator=torch.Generator().manual_seed(1)).cuda()
    configs = [("resident", "80GB", "none"), ("offloaded", "24GB", "all")]
    compiled = {name: specontext.compile(model, budget, token_budget=token_budget, offload=offload, progress=False)
                for name, budget, offload in configs}
    for runner in compiled.values():
        runner.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)  # warm-up
    runs: dict[str, list[dict]] = {name: [] for name in compiled}
    for _ in range(repeats):
        for name, runner in compiled.items():
            runner.generate(ids, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, do_sample=False, pad_token_id=0)
            runs[name].append(dict(runner.stats))
    rows = []
    for name, stats_list in runs.items():
        times = [stats["ms_per_step"] for stats in stats_list]
        stats = stats_list[times.index(statistics.median(times))]
        steps = stats["steps"]
        rows.append({"config": name, "offloaded_layers": len(compiled[name].runtime.store.offloaded),
                     "ms_per_step": statistics.median(times), "ms_per_step_runs": times,
                     "tokens_per_s": 1e3 / statistics.median(times),
                     "h2d_bytes_per_step": stats["h2d_bytes"] / steps,
                     "h2d_bytes_full_reload_per_step": stats["h2d_bytes_full_reload"] / steps,
                     "selection_overlap": stats["selection_overlap"],
                     "prefetch_wait_ms_per_step": stats["prefetch_wait_ms"] / steps,
                     "kv_device_bytes": stats["kv_device_bytes"], "prefill_seconds": stats["prefill_seconds"]})
    del compiled
    torch.cuda.empty_cache()
    return rows


def profile_decode(model, context: int, new_tokens: int, token_budget: int, path: Path | None) -> str:
    """cProfile of generate (a short prompt, so decode dominates) for both placements: where the CPU time
    of a step goes (both steps are bound by launch overhead)."""
    import cProfile
    import io
    import pstats

    import specontext

    ids = torch.randint(10, 120000, (1, context), generator=torch.Generator().manual_seed(4)).cuda()
    report = io.StringIO()
    for name, budget, offload in [("resident", "80GB", "none"), ("offloaded", "24GB", "all")]:
        compiled = specontext.compile(model, budget, token_budget=token_budget, offload=offload, progress=False)
        compiled.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        profiler = cProfile.Profile()
        profiler.enable()
        compiled.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        profiler.disable()
        report.write(f"==== {name}: {compiled.stats['ms_per_step']:.2f} ms/step under cProfile\n")
        pstats.Stats(profiler, stream=report).sort_stats("tottime").print_stats(30)
        del compiled
    text = report.getvalue()
    if path is not None:
        path.write_text(text)
    return text


def long_prefill(model, context: int, budget_bytes: int) -> dict:
    import specontext

    ids = torch.randint(10, 120000, (1, context), generator=torch.Generator().manual_seed(2)).cuda()
    compiled = specontext.compile(model, budget_bytes, token_budget=2048, offload="all", progress=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    compiled.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    peak = torch.cuda.max_memory_allocated()
    stats = compiled.stats
    return {"context": context, "budget_bytes": budget_bytes, "peak_bytes": peak, "under_budget": peak <= budget_bytes,
            "prefill_seconds": stats["prefill_seconds"], "ms_per_step": stats["ms_per_step"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="offload_gpu")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--long-context", type=int, default=131072 - 8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--token-budget", type=int, default=2048)
    parser.add_argument("--profile", action="store_true", help="also cProfile decode (both placements) into $OUT/profile.txt")
    parser.add_argument("--skip", nargs="*", default=[], choices=["check", "gather", "decode", "prefill"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/offload.py needs a CUDA GPU")
    payload = {"command": "python -m benchmarks.offload", "date": datetime.date.today().isoformat(),
               "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    if "check" not in args.skip:
        payload["cuda_check"] = cuda_check()
        for name, r in payload["cuda_check"].items():
            print(f"check {name:>30}: identical tokens {r['identical_tokens']}, logit diff step 1/2 "
                  f"{r['first_step_logit_diff']:.2e}/{r['second_step_logit_diff']:.2e}, first difference at "
                  f"{r['first_different_position']}, h2d {r['h2d_bytes']} of full reload {r['h2d_bytes_full_reload']}", flush=True)
    if "gather" not in args.skip:
        payload["gather"] = gather_bandwidth()
        for r in payload["gather"]:
            print(f"gather {r['row_bytes']:>5} B rows: {r['gbps']:6.1f} GB/s = {100 * r['share_of_copy']:5.1f}% of the "
                  f"pinned copy ({r['pinned_copy_gbps']:.1f} GB/s), bit-exact {r['bit_exact']}", flush=True)
    if "decode" in args.skip and "prefill" in args.skip and not args.profile:
        return write_results(payload, args.out)
    model = llama_8b_random()
    if "decode" not in args.skip:
        payload["decode"] = decode(model, args.context, args.new_tokens, args.token_budget)
        for r in payload["decode"]:
            print(f"decode {r['config']:>9}: {r['ms_per_step']:7.2f} ms/step (runs {', '.join(f'{t:.1f}' for t in r['ms_per_step_runs'])}), h2d {r['h2d_bytes_per_step'] / 1e6:7.2f} MB/step "
                  f"(full reload {r['h2d_bytes_full_reload_per_step'] / 1e6:7.2f}), overlap {r['selection_overlap']:.3f}, "
                  f"prefetch wait {r['prefetch_wait_ms_per_step']:.3f} ms/step", flush=True)
        resident, offloaded = payload["decode"]
        payload["decode_ratio"] = offloaded["ms_per_step"] / resident["ms_per_step"]
        payload["decode_ratio_per_run"] = [o / r for o, r in zip(offloaded["ms_per_step_runs"], resident["ms_per_step_runs"])]
        print(f"offloaded / resident step time: {payload['decode_ratio']:.3f} (medians; per run "
              f"{', '.join(f'{x:.3f}' for x in payload['decode_ratio_per_run'])})")
    if args.profile:
        out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
        profile_decode(model, 4096, 32, args.token_budget, None if out_dir is None else out_dir / "profile.txt")
    if "prefill" not in args.skip:
        payload["long_prefill"] = long_prefill(model, args.long_context, 24 * 10**9)
        r = payload["long_prefill"]
        print(f"prefill {r['context']} tokens, all offloaded: peak {r['peak_bytes'] / 1e9:.2f} GB of budget "
              f"{r['budget_bytes'] / 1e9:.0f} GB, {r['prefill_seconds']:.1f} s")
    write_results(payload, args.out)


if __name__ == "__main__":
    main()
