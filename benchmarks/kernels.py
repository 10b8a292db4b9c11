"""The Triton kernels on the GPU, in one run (needs CUDA):

    python -m benchmarks.kernels --out kernels_h100

1. Ceilings measured here: HBM (a 2 GiB device-to-device copy, bytes read + written) and pinned
   host->GPU copy bandwidth.
2. bf16 correctness against float64 references (GQA ratios 1, 4, 7, 8; Llama-3.1-8B heads), outputs
   poisoned with NaN before each call.
3. Sparse decode attention, Llama-3.1-8B heads (32 q / 8 kv, D=128, bf16), a 32K-token cache, K =
   512..8192 selected rows, B = 1..32: the kernel's time and achieved bandwidth (selected K/V rows +
   indices + q + out, over the measured HBM bandwidth), against torch.gather + SDPA(enable_gqa) and
   the runtime's torch path (gather + one grouped SDPA block per KV head), both gather included; SDPA
   alone over pre-gathered rows is listed too. Medians of: eager calls (triton.testing.do_bench, L2
   flushed, CPU launch cost included when it exceeds the GPU's), CUDA-graph replays (GPU time, as decode
   runs under CUDA graphs), and graph replays with L2 emptied by a 256 MB read before each call. The
   size floor: a torch device copy and a sum of the same sizes, timed the same ways.
4. Host-row gather: the runtime's zero-copy kernel, 4 KiB rows from pinned memory, vs the pinned copy.
5. Retrieval scoring + top-k (P = 32K, 128K keys; B = 1, 4) against torch (group_probabilities + topk).
6. The runtime with and without the kernels: float32 tokens (offloaded and resident, kernels on, vs the
   torch path) and decode ms/step on the Llama-3.1-8B shape at 32K.

Writes JSON under benchmarks/results/ (and $OUT when set) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import statistics

import torch
import torch.nn.functional as F

from benchmarks.results_file import write_results
HQ, HKV, DIM = 32, 8, 128


def bench(fn) -> float:
    """Median seconds of an eager call (triton.testing.do_bench: events, L2 flushed before every run):
    includes the CPU's launch overhead whenever it exceeds the GPU time."""
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3


def bench_graph(fn) -> float:
    """Median seconds of the GPU work alone: ``fn`` captured in a CUDA graph and replayed
    (triton.testing.do_bench_cudagraph), as the decode step will run under CUDA graphs."""
    import triton

    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") / 1e3


_FLUSH: list[torch.Tensor] = []


def bench_graph_cold(fn) -> float:
    """Like :func:`bench_graph` with L2 emptied before every call: a 256 MB read is captured ahead of
    ``fn`` and its own time (measured alone) subtracted. Replays on the same inputs otherwise find part
    of a working set under the H100's 50 MB L2 still there, which overstates HBM bandwidth."""
    if not _FLUSH:  # read, not written: a written flush leaves dirty lines whose write-back the call would pay
        _FLUSH.append(torch.ones(64 << 20, dtype=torch.float32, device="cuda"))
    flush = _FLUSH[0]
    both = bench_graph(lambda: (flush.sum(), fn()))
    return both - bench_graph(flush.sum)


def hbm_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    seconds = bench(lambda: dst.copy_(src))
    return 2 * src.nbytes / seconds


def correctness() -> list[dict]:
    from specontext_compiler.kernels import (retrieval_scores, retrieval_scores_reference, sparse_decode_attention,
                                             sparse_decode_attention_reference)
    from specontext_compiler.kernels.sparse_decode_attention import _WORKSPACE

    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for ratio, kv_heads, length, selected, dim in [(1, 4, 3001, 777, 64), (4, 2, 4097, 1023, 128), (7, 1, 999, 333, 128),
                                                   (8, 2, 8191, 2047, 128), (4, 8, 32768, 2048, 128)]:
        b = 2
        q = torch.randn(b, kv_heads * ratio, dim, device="cuda", generator=g).bfloat16()
        k = torch.randn(b, kv_heads, length, dim, device="cuda", generator=g).bfloat16()
        v = torch.randn(b, kv_heads, length, dim, device="cuda", generator=g).bfloat16()
        idx = torch.rand(b, kv_heads, length, device="cuda", generator=g).topk(selected, dim=-1).indices
        valid = torch.rand(b, kv_heads, selected, device="cuda", generator=g) > 0.1
        ref = sparse_decode_attention_reference(q.double(), k.double(), v.double(), idx, valid=valid)
        attention_error, written = 0.0, True
        # Split-K as chosen (the merge kernel) and one split (the first kernel writes the output), outputs
        # and split partials poisoned before each call.
        for splits in (0, 1):
            for partials in _WORKSPACE.values():
                for buffer in partials:
                    buffer.fill_(float("nan"))
            out = torch.full((b, kv_heads * ratio, dim), float("nan"), device="cuda", dtype=torch.bfloat16)
            sparse_decode_attention(q, k, v, idx, valid=valid, out=out, splits=splits)
            attention_error = max(attention_error, float((out.double() - ref).norm() / ref.norm()))
            written = written and not bool(out.isnan().any())
        scores = torch.full((b, kv_heads, length), float("nan"), device="cuda")
        retrieval_scores(q, k, dim ** -0.5, out=scores)
        scores_ref = retrieval_scores_reference(q.double(), k.double(), dim ** -0.5)
        scores_error = float((scores.double() - scores_ref).norm() / scores_ref.norm())
        rows.append({"gqa_ratio": ratio, "kv_heads": kv_heads, "length": length, "selected": selected, "dim": dim,
                     "attention_rel_error": attention_error, "scores_rel_error": scores_error,
                     "no_nan": written and not bool(scores.isnan().any())})
        print(f"bf16 check ratio {ratio} ({kv_heads * ratio}q/{kv_heads}kv, D={dim}, T={length}, K={selected}): "
              f"attention {attention_error:.2e}, scores {scores_error:.2e}, written {rows[-1]['no_nan']}", flush=True)
    return rows


def attention_grid(hbm: float, batches, selections, length: int = 32768) -> list[dict]:
    from specontext_compiler.kernels import sparse_decode_attention
    from specontext_compiler.runtime.attention_runtime import sparse_decode_attention as runtime_torch_path

    g = torch.Generator(device="cuda").manual_seed(1)
    top = max(batches)
    cache_k = torch.randn(top, HKV, length, DIM, device="cuda", generator=g, dtype=torch.bfloat16)
    cache_v = torch.randn(top, HKV, length, DIM, device="cuda", generator=g, dtype=torch.bfloat16)
    rows = []
    for batch in batches:
        k, v = cache_k[:batch], cache_v[:batch]
        q = torch.randn(batch, HQ, DIM, device="cuda", generator=g, dtype=torch.bfloat16)
        for selected in selections:
            idx = torch.rand(batch, HKV, length, device="cuda", generator=g).topk(selected, dim=-1).indices
            out = torch.empty(batch, HQ, DIM, device="cuda", dtype=torch.bfloat16)
            expand = idx[..., None].expand(-1, -1, -1, DIM)

            def torch_gather_sdpa():
                ks, vs = k.gather(2, expand), v.gather(2, expand)
                return F.scaled_dot_product_attention(q[:, :, None], ks, vs, enable_gqa=True)

            def triton_call():
                return sparse_decode_attention(q, k, v, idx, out=out)

            def runtime_torch():
                return runtime_torch_path(q[:, :, None], k, v, idx, None, DIM ** -0.5)

            pregathered = (k.gather(2, expand), v.gather(2, expand))

            def sdpa_alone():
                return F.scaled_dot_product_attention(q[:, :, None], *pregathered, enable_gqa=True)

            moved = 2 * batch * HKV * selected * DIM * 2 + idx.numel() * idx.element_size() + 2 * q.nbytes
            row = {"batch": batch, "selected": selected, "bytes": moved}
            for name, fn in [("triton", triton_call), ("torch_gather_sdpa", torch_gather_sdpa),
                             ("runtime_torch_path", runtime_torch), ("sdpa_on_pregathered", sdpa_alone)]:
                row[f"{name}_us"] = 1e6 * bench(fn)
                row[f"{name}_graph_us"] = 1e6 * bench_graph(fn)
            row["triton_cold_graph_us"] = 1e6 * bench_graph_cold(triton_call)
            row["share_of_hbm_cold_graph"] = moved / (row["triton_cold_graph_us"] * 1e-6) / hbm
            row["triton_gbps"] = moved / row["triton_us"] * 1e-3
            row["triton_graph_gbps"] = moved / row["triton_graph_us"] * 1e-3
            row["share_of_hbm"] = row["triton_gbps"] * 1e9 / hbm
            row["share_of_hbm_graph"] = row["triton_graph_gbps"] * 1e9 / hbm
            for mode in ("", "_graph"):
                row[f"speedup_vs_gather_sdpa{mode}"] = row[f"torch_gather_sdpa{mode}_us"] / row[f"triton{mode}_us"]
                row[f"speedup_vs_runtime_torch{mode}"] = row[f"runtime_torch_path{mode}_us"] / row[f"triton{mode}_us"]
            rows.append(row)
            print(f"attention B={batch:>2} K={selected:>4} | eager: triton {row['triton_us']:7.1f} us "
                  f"({100 * row['share_of_hbm']:5.1f}% HBM), gather+SDPA {row['torch_gather_sdpa_us']:7.1f}, runtime torch "
                  f"{row['runtime_torch_path_us']:7.1f} | graph: triton {row['triton_graph_us']:7.1f} us "
                  f"{row['triton_graph_gbps']:7.1f} GB/s ({100 * row['share_of_hbm_graph']:5.1f}% HBM; L2 emptied "
                  f"{100 * row['share_of_hbm_cold_graph']:5.1f}%), gather+SDPA "
                  f"{row['torch_gather_sdpa_graph_us']:7.1f} ({row['speedup_vs_gather_sdpa_graph']:4.2f}x), runtime torch "
                  f"{row['runtime_torch_path_graph_us']:7.1f} ({row['speedup_vs_runtime_torch_graph']:4.2f}x), SDPA alone "
                  f"{row['sdpa_on_pregathered_graph_us']:7.1f}", flush=True)
    return rows


def sweep_config(config: dict, settings: list[dict], call, moved: int, hbm: float) -> list[dict]:
    """CUDA-graph time of ``call`` under each of ``settings`` applied to a kernel's launch ``config`` (put
    back after), with the share of HBM bandwidth that ``moved`` bytes make."""
    default = dict(config)
    results = []
    for setting in settings:
        config.update(setting)
        try:
            seconds = bench_graph(call)
        except Exception as error:  # out of shared memory for this combination: skip it
            results.append({"config": dict(config), "error": str(error)[:120]})
            continue
        results.append({"config": dict(config), "us": 1e6 * seconds, "share_of_hbm": moved / seconds / hbm})
    config.update(default)
    return results


def tune(hbm: float, cases=((1, 8192), (2, 8192), (4, 4096), (8, 2048), (16, 1024), (32, 512), (32, 8192)),
         length: int = 32768, block_n=(32, 64, 128), programs=(264, 396, 528, 1056), warps=(4, 8),
         stages=(2, 3, 4), pdl=(True,), merge_loads=(16,), merge_warps=(4,)) -> list[dict]:
    """CUDA-graph time of the attention kernel for each launch configuration, per (B, K)."""
    import itertools

    from specontext_compiler.kernels import sparse_decode_attention
    from specontext_compiler.kernels.sparse_decode_attention import GPU_CONFIG

    g = torch.Generator(device="cuda").manual_seed(1)
    top = max(b for b, _ in cases)
    cache_k = torch.randn(top, HKV, length, DIM, device="cuda", generator=g, dtype=torch.bfloat16)
    cache_v = torch.randn(top, HKV, length, DIM, device="cuda", generator=g, dtype=torch.bfloat16)
    rows = []
    for batch, selected in cases:
        k, v = cache_k[:batch], cache_v[:batch]
        q = torch.randn(batch, HQ, DIM, device="cuda", generator=g, dtype=torch.bfloat16)
        idx = torch.rand(batch, HKV, length, device="cuda", generator=g).topk(selected, dim=-1).indices
        out = torch.empty(batch, HQ, DIM, device="cuda", dtype=torch.bfloat16)
        moved = 2 * batch * HKV * selected * DIM * 2 + idx.numel() * idx.element_size() + 2 * q.nbytes
        settings = [dict(block_n=n, programs=p, num_warps=w, num_stages=st, pdl=dependent, merge_splits_per_load=loads,
                         merge_warps=mw) for n, p, w, st, dependent, loads, mw
                    in itertools.product(block_n, programs, warps, stages, pdl, merge_loads, merge_warps)]
        results = sweep_config(GPU_CONFIG, settings, lambda: sparse_decode_attention(q, k, v, idx, out=out), moved, hbm)
        ok = sorted((r for r in results if "us" in r), key=lambda r: r["us"])
        rows.append({"batch": batch, "selected": selected, "best": ok[:5], "all": results})
        print(f"tune B={batch:>2} K={selected:>4}: best {ok[0]['config']} {ok[0]['us']:.1f} us "
              f"({100 * ok[0]['share_of_hbm']:.1f}% HBM)", flush=True)
    return rows


def merge_sweep(hbm: float, **cases) -> list[dict]:
    """The merge kernel's launch (after the first kernel or early, programmatic dependent launch), splits
    per load and warps, at the shipped launch parameters of the first."""
    from specontext_compiler.kernels.sparse_decode_attention import GPU_CONFIG

    rows = tune(hbm, block_n=(GPU_CONFIG["block_n"],), programs=(GPU_CONFIG["programs"],),
                warps=(GPU_CONFIG["num_warps"],), stages=(GPU_CONFIG["num_stages"],), pdl=(True, False),
                merge_loads=(64, 16), merge_warps=(1, 2, 4), **cases)
    for row in rows:
        times = {(f"{'PDL' if r['config']['pdl'] else 'after'}/{r['config']['merge_splits_per_load']}/"
                  f"{r['config']['merge_warps']}"): r["us"] for r in row["all"] if "us" in r}
        print(f"merge B={row['batch']:>2} K={row['selected']:>4} (us; launch, splits per load, warps): "
              + ", ".join(f"{name} {t:.1f}" for name, t in times.items()), flush=True)
    return rows


def size_floor(hbm: float, sizes_mb=(34, 68, 136, 272, 545)) -> list[dict]:
    """What plain torch kernels reach at the attention grid's sizes, timed the same way: a device copy
    moving n bytes (n/2 read, n/2 written) and a sum reading n bytes. A call's fixed cost (launch, the
    first loads' latency, the last wave's tail) is a visible share of a ~30 us kernel."""
    rows = []
    for mb in sizes_mb:
        n = mb * 1_000_000
        src = torch.ones(n // 4, dtype=torch.int16, device="cuda")
        dst = torch.empty_like(src)
        data = torch.ones(n // 4, dtype=torch.float32, device="cuda")
        row = {"megabytes": mb}
        for name, fn, moved in [("copy", lambda: dst.copy_(src), 2 * src.nbytes), ("sum", data.sum, data.nbytes)]:
            row[f"{name}_graph_us"] = 1e6 * bench_graph(fn)
            row[f"{name}_share_of_hbm_graph"] = moved / (row[f"{name}_graph_us"] * 1e-6) / hbm
            row[f"{name}_cold_graph_us"] = 1e6 * bench_graph_cold(fn)
            row[f"{name}_share_of_hbm_cold_graph"] = moved / (row[f"{name}_cold_graph_us"] * 1e-6) / hbm
        rows.append(row)
        print(f"size floor {mb:>4} MB: copy {row['copy_graph_us']:6.1f} us ({100 * row['copy_share_of_hbm_graph']:5.1f}% "
              f"HBM; L2 emptied {100 * row['copy_share_of_hbm_cold_graph']:5.1f}%), sum {row['sum_graph_us']:6.1f} us "
              f"({100 * row['sum_share_of_hbm_graph']:5.1f}%; L2 emptied {100 * row['sum_share_of_hbm_cold_graph']:5.1f}%)",
              flush=True)
    return rows


def scoring_sweep(hbm: float, cases=((1, 32768), (16, 32768), (4, 131072)), block_n=(64, 128), warps=(4, 8),
                  stages=(2, 3, 4), probability_blocks=(256, 512, 1024)) -> list[dict]:
    """CUDA-graph time of the retrieval scores (both passes) for each launch configuration, per (B, P)."""
    import itertools

    from specontext_compiler.kernels import retrieval_scores
    from specontext_compiler.kernels.retrieval_scores import GPU_CONFIG

    default = dict(GPU_CONFIG)
    g = torch.Generator(device="cuda").manual_seed(3)
    rows = []
    for batch, length in cases:
        q = torch.randn(batch, HQ, DIM, device="cuda", generator=g, dtype=torch.bfloat16)
        keys = torch.randn(batch, HKV, length, DIM, device="cuda", generator=g, dtype=torch.bfloat16)
        out = torch.empty(batch, HKV, length, device="cuda")
        moved = keys.nbytes + 2 * batch * HQ * length * 4 + batch * HKV * length * 4
        settings = [dict(block_n=n, num_warps=w, num_stages=st, probability_block=pb)
                    for n, w, st, pb in itertools.product(block_n, warps, stages, probability_blocks)]
        results = sweep_config(GPU_CONFIG, settings, lambda: retrieval_scores(q, keys, DIM ** -0.5, out=out), moved, hbm)
        ok = sorted((r for r in results if "us" in r), key=lambda r: r["us"])
        shipped = next(r for r in results if r["config"] == default and "us" in r)
        rows.append({"batch": batch, "keys": length, "best": ok[:5], "shipped": shipped, "all": results})
        print(f"scoring B={batch:>2} P={length:>6}: shipped {shipped['us']:.1f} us ({100 * shipped['share_of_hbm']:.1f}% "
              f"HBM); best {ok[0]['config']} {ok[0]['us']:.1f} us ({100 * ok[0]['share_of_hbm']:.1f}% HBM)", flush=True)
    return rows


def scoring(hbm: float) -> list[dict]:
    from specontext_compiler.kernels import retrieval_top_k, use_kernels
    from specontext_compiler.retrieval.base import group_probabilities

    rows = []
    g = torch.Generator(device="cuda").manual_seed(2)
    from specontext_compiler.kernels import retrieval_scores

    for batch, length in [(1, 32768), (1, 131072), (4, 32768), (4, 131072), (16, 32768)]:
        q = torch.randn(batch, HQ, DIM, device="cuda", generator=g, dtype=torch.bfloat16)
        keys = torch.randn(batch, HKV, length, DIM, device="cuda", generator=g, dtype=torch.bfloat16)
        use_kernels(False)  # group_probabilities: the torch path
        calls = {"triton_scores": lambda: retrieval_scores(q, keys, DIM ** -0.5),
                 "torch_scores": lambda: group_probabilities(q, keys, DIM ** -0.5),
                 "triton_topk": lambda: retrieval_top_k(q, keys, 2048, DIM ** -0.5),
                 "torch_topk": lambda: torch.topk(group_probabilities(q, keys, DIM ** -0.5), 2048, dim=-1).indices}
        row = {"batch": batch, "keys": length}
        for name, fn in calls.items():
            row[f"{name}_us"] = 1e6 * bench(fn)
            row[f"{name}_graph_us"] = 1e6 * bench_graph(fn)
        use_kernels(True)
        moved = keys.nbytes + 2 * batch * HQ * length * 4 + batch * HKV * length * 4
        row["bytes"] = moved
        row["triton_scores_share_of_hbm_graph"] = moved / (row["triton_scores_graph_us"] * 1e-6) / hbm
        rows.append(row)
        print(f"scoring B={batch} P={length:>6} (graph us): triton {row['triton_scores_graph_us']:7.1f} "
              f"({100 * row['triton_scores_share_of_hbm_graph']:4.1f}% HBM), torch {row['torch_scores_graph_us']:7.1f}; "
              f"+top-2048: triton {row['triton_topk_graph_us']:7.1f}, torch {row['torch_topk_graph_us']:7.1f} | eager "
              f"+top-2048: triton {row['triton_topk_us']:7.1f}, torch {row['torch_topk_us']:7.1f}", flush=True)
    return rows


def runtime_check() -> dict:
    """float32: the runtime with the kernels (resident and offloaded) against the torch path."""
    import specontext
    from specontext_compiler.kernels import use_kernels
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=8192)
    model = LlamaForCausalLM(config).to("cuda", torch.float32).eval()
    ids = torch.randint(5, 1000, (2, 4096), generator=torch.Generator().manual_seed(3)).cuda()
    mask = torch.ones_like(ids)
    mask[1, :700] = 0
    results = {}
    outputs = {}
    for kernels, offload in [(False, "none"), (True, "none"), (True, "all")]:
        use_kernels(kernels)
        compiled = specontext.compile(model, "8GB", token_budget=256, offload=offload, progress=False)
        compiled.runtime.store.fill_value = 1e4
        outputs[(kernels, offload)] = compiled.generate(
            ids, attention_mask=mask, max_new_tokens=48, min_new_tokens=48, do_sample=False, pad_token_id=0,
            return_dict_in_generate=True, output_logits=True)
    use_kernels(True)
    reference = outputs[(False, "none")]
    for key, out in outputs.items():
        same = bool(torch.equal(out.sequences, reference.sequences))
        diff = max(float((a - b).abs().max()) for a, b in zip(out.logits, reference.logits)) if same else None
        results[f"kernels={key[0]}/offload={key[1]}"] = {"identical_tokens": same, "max_logit_diff": diff}
        print(f"runtime float32 kernels={key[0]} offload={key[1]}: identical tokens {same}, max logit diff {diff}", flush=True)
    return results


def runtime_decode(context: int = 32768, new: int = 33, repeats: int = 3) -> list[dict]:
    import specontext
    from benchmarks.offload import llama_8b_random
    from specontext_compiler.kernels import use_kernels

    model = llama_8b_random()
    ids = torch.randint(10, 120000, (1, context), generator=torch.Generator().manual_seed(1)).cuda()
    compiled = {offload: specontext.compile(model, "80GB", token_budget=2048, offload=offload, progress=False)
                for offload in ("none", "all")}
    for kernels in (True, False):  # compile the kernels for these shapes outside the timed runs
        use_kernels(kernels)
        for runner in compiled.values():
            runner.generate(ids[:, :4096], max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    times: dict[tuple, list[float]] = {}
    for _ in range(repeats):
        for kernels in (True, False):
            use_kernels(kernels)
            for offload, runner in compiled.items():
                runner.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
                times.setdefault((kernels, offload), []).append(runner.stats["ms_per_step"])
    use_kernels(True)
    rows = []
    for (kernels, offload), runs in times.items():
        rows.append({"kernels": kernels, "offload": offload, "ms_per_step": statistics.median(runs), "runs": runs})
        print(f"decode 8B 32K offload={offload:>4} kernels={kernels!s:>5}: {statistics.median(runs):.2f} ms/step "
              f"(runs {', '.join(f'{t:.1f}' for t in runs)})", flush=True)
    del compiled, model
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="kernels_gpu")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--selections", type=int, nargs="*", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["check", "attention", "gather", "scoring", "runtime", "decode"])
    parser.add_argument("--tune", action="store_true", help="only sweep the attention kernel's launch parameters")
    parser.add_argument("--scoring-only", action="store_true",
                        help="only sweep the retrieval scores' launch parameters, then time scoring as shipped")
    parser.add_argument("--merge-only", action="store_true",
                        help="only compare the ways the attention kernel merges its splits, at decode's sizes")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels.py needs a CUDA GPU")
    payload = {"command": "python -m benchmarks.kernels", "date": datetime.date.today().isoformat(),
               "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    import triton

    payload["triton"] = triton.__version__
    hbm = hbm_bandwidth()
    payload["hbm_bytes_per_s"] = hbm
    print(f"HBM (device copy, read + write): {hbm / 1e9:.0f} GB/s", flush=True)
    if args.tune:
        payload["tune"] = tune(hbm)
        args.skip = ["check", "attention", "gather", "scoring", "runtime", "decode"]
    if args.scoring_only:
        args.skip = ["check", "attention", "gather", "runtime", "decode"]
        payload["scoring_sweep"] = scoring_sweep(hbm)
    if args.merge_only:
        args.skip = ["check", "attention", "gather", "scoring", "runtime", "decode"]
        payload["merge_sweep"] = merge_sweep(hbm, cases=((1, 2048), (4, 2048), (8, 2048), (16, 2048), (24, 2048),
                                                         (32, 2048), (1, 8192), (16, 8192)))
    if "check" not in args.skip:
        payload["bf16_check"] = correctness()
    if "attention" not in args.skip:
        from specontext_compiler.kernels.sparse_decode_attention import GPU_CONFIG

        payload["gpu_config"] = dict(GPU_CONFIG)  # as shipped: the grid measures what the runtime runs
        payload["size_floor"] = size_floor(hbm)
        payload["merge_sweep"] = merge_sweep(hbm)
        print(f"launch parameters: {GPU_CONFIG}", flush=True)
        payload["attention"] = attention_grid(hbm, args.batches, args.selections)
        big = [r for r in payload["attention"] if r["batch"] * r["selected"] >= 16384]
        payload["attention_min_share_of_hbm_b_k_16k_cold_graph"] = min(r["share_of_hbm_cold_graph"] for r in big)
        print(f"attention (graph, L2 emptied): lowest share of HBM where B*K >= 16K "
              f"{payload['attention_min_share_of_hbm_b_k_16k_cold_graph']:.3f}", flush=True)
        for mode in ("", "_graph"):
            payload[f"attention_min_share_of_hbm_b_k_16k{mode}"] = min(r[f"share_of_hbm{mode}"] for r in big)
            payload[f"attention_min_speedup_vs_gather_sdpa{mode}"] = min(r[f"speedup_vs_gather_sdpa{mode}"] for r in payload["attention"])
            payload[f"attention_min_speedup_vs_runtime_torch{mode}"] = min(r[f"speedup_vs_runtime_torch{mode}"] for r in payload["attention"])
            print(f"attention{mode or ' (eager)'}: lowest share of HBM where B*K >= 16K "
                  f"{payload[f'attention_min_share_of_hbm_b_k_16k{mode}']:.3f}; lowest speedup vs gather+SDPA "
                  f"{payload[f'attention_min_speedup_vs_gather_sdpa{mode}']:.2f}x, vs the runtime's torch path "
                  f"{payload[f'attention_min_speedup_vs_runtime_torch{mode}']:.2f}x", flush=True)
    if "gather" not in args.skip:
        from benchmarks.offload import gather_bandwidth

        payload["gather"] = gather_bandwidth()
        for r in payload["gather"]:
            print(f"gather {r['row_bytes']:>5} B rows: {r['gbps']:6.1f} GB/s = {100 * r['share_of_copy']:5.1f}% of the "
                  f"pinned copy ({r['pinned_copy_gbps']:.1f} GB/s), bit-exact {r['bit_exact']}", flush=True)
    if "scoring" not in args.skip:
        payload["scoring"] = scoring(hbm)
    if "runtime" not in args.skip:
        payload["runtime_check"] = runtime_check()
    if "decode" not in args.skip:
        payload["runtime_decode"] = runtime_decode()
    write_results(payload, args.out)


if __name__ == "__main__":
    main()
