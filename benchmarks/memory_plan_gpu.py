"""The memory model and the memory manager against the GPU, in one run (needs CUDA):

    python -m benchmarks.memory_plan_gpu --out memory_plan_h100

Large batches under the allocator's two settings (issue 20; ``benchmarks/memory_batches.py``), alone:

    python -m benchmarks.memory_plan_gpu --both-allocators 540 --out memory_plan_batches_h200

runs the ``batches`` part twice, each in a fresh process, with the default caching allocator and with
``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``, sharing 540 s: 8B shape, budget "135GB", 32K
prompts at batches 16, 24, 32 and the largest batch admitted with every layer's KV on the GPU, and
[2K in, 16K out] at batch 48 and at its largest all-resident batch. Per row: the plan's peak,
``max_memory_allocated`` and ``max_memory_reserved``, the allocator's retries, the manager's
out-of-memory retries (0 for an admitted batch), the prefill's seconds. Expected, not yet run: about
4.5 minutes a setting (model and two compiles ~1 min; prefill of 0.5-1M tokens a row at an estimated
12K tokens/s); a row expected to end past its half of the time is skipped and says so. With
``--expandable-segments`` a whole run (any parts) uses expandable segments, set before CUDA initializes.

1. Predicted vs measured peak: Llama-3.1-8B shape with random bf16 weights; for each (budget, context,
   batch) compile with offload="auto" (the runtime asks the planner), generate 8 tokens after a prompt of
   context - 8, and compare the plan's peak with torch.cuda.max_memory_allocated (and report
   max_memory_reserved). The residual measured - (predicted - workspace) is the margin the workspace
   term must cover: the largest residual is the measured workspace.
2. Migration correctness on CUDA: a small float32 random Llama (4K prompt, 64 new tokens, slots
   poisoned) under a budget whose plan moves layers to host memory mid-decode: tokens must equal
   offload="none"; then the 8B shape at 32K under such a budget: per-step times around each move.
3. Out-of-memory recovery: the allocator is capped below the budget (torch.cuda.set_per_process_memory_fraction)
   so real CUDA out-of-memory errors happen; the manager must roll back, re-plan and finish.
4. Which layers stay resident: 8B shape, 32K, half the layers offloaded: the first half resident vs the
   last half vs every other layer, decode ms/step.
5. Out of memory during decode (``oom_decode``): a float32 random Llama under a budget with room for
   every layer; when a chosen token arrives, another tenant takes the GPU's free memory (the allocator
   is capped at what the process reserves then plus 48 MiB, and the free blocks the allocator caches
   are taken too). The next
   step runs out: eager decode at the 4th token; graph decode before its warm-up step, before its
   capture (both fall back to eager steps) and after its capture (replays allocate nothing). The manager
   must re-plan and retry, and the tokens must equal an undisturbed run. Before it, an error injected
   inside the capture while offloaded layers' loads are forked onto the side stream (not run yet: the
   device time ran out in the session that added it).

Writes JSON under benchmarks/results/ (and $OUT when set) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
import traceback

import torch

from benchmarks.results_file import write_results
CONFIGS = [(24, 8192, 1), (24, 32768, 1), (24, 131072, 1), (40, 32768, 4), (80, 131072, 1), (80, 32768, 4)]


def predicted_vs_measured(model) -> list[dict]:
    import specontext

    rows = []
    for budget_gb, context, batch in CONFIGS:
        budget = budget_gb * 10**9
        compiled = specontext.compile(model, budget, token_budget=2048, offload="auto", progress=False)
        plan = specontext.plan_memory(model, budget, context, batch=batch, token_budget=2048, prompt=context - 8)
        ids = torch.randint(10, 120000, (batch, context - 8), generator=torch.Generator().manual_seed(5)).cuda()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        compiled.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        measured = torch.cuda.max_memory_allocated()
        reserved = torch.cuda.max_memory_reserved()
        predicted = compiled.placement.peak_bytes
        workspace = compiled.memory.workspace
        error = predicted - measured
        row = {"budget_gb": budget_gb, "context": context, "batch": batch,
               "gpu_layers": len(plan.gpu_layers), "offloaded_at_end": len(compiled.runtime.store.offloaded),
               "planner_agrees": plan.peak_bytes == predicted, "predicted_peak": predicted, "measured_peak": measured,
               "measured_reserved": reserved, "error_bytes": error, "relative_error": error / measured,
               "residual_over_terms": measured - (predicted - workspace),
               "within_tolerance": abs(error) <= max(0.05 * measured, 0.5e9),
               "measured_under_budget": measured <= budget, "terms": plan.breakdown()}
        rows.append(row)
        print(f"{budget_gb:>3} GB {context:>6} x {batch}: {row['gpu_layers']:>2} GPU layers, predicted "
              f"{predicted / 1e9:6.2f} GB, measured {measured / 1e9:6.2f} GB ({100 * row['relative_error']:+.1f}%), "
              f"reserved {reserved / 1e9:6.2f} GB, residual {row['residual_over_terms'] / 2**20:7.1f} MiB, "
              f"under budget {row['measured_under_budget']}", flush=True)
        del compiled, ids
        torch.cuda.empty_cache()
    return rows


def budget_with_migrations(compiled, batch: int, prompt: int, total: int, always: int, leave: int) -> tuple[int, list[int]]:
    """The budget with room for ``always`` layers throughout and one more until ``leave`` tokens (and
    its move's transient): the plan must move layer ``always`` out when the sequence passes ``leave``."""
    memory = compiled.memory.model(total)
    budget = memory.peak(batch, leave, always + 1, total, [total] * always + [leave], prompt, staged=False)
    budget += memory.migration_bytes(batch, total)
    until = memory.schedule(batch, prompt, total, budget)
    if until[always] != leave:
        raise RuntimeError(f"the plan for {budget} bytes is {until}, expected layer {always} to leave at {leave}")
    return budget, until


class StepClock:
    """A streamer that timestamps every token (``put`` receives a host copy: the step is done)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def migration(model_8b) -> dict:
    import specontext
    from transformers import LlamaConfig, LlamaForCausalLM

    result = {}
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=8192)
    small = LlamaForCausalLM(config).to("cuda", torch.float32).eval()
    ids = torch.randint(5, 1000, (1, 4096), generator=torch.Generator().manual_seed(3)).cuda()
    new = 192
    options = dict(token_budget=256, progress=False)
    reference = specontext.compile(small, "8GB", offload="none", **options).generate(
        ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    probe = specontext.compile(small, "8GB", offload="auto", **options)
    probe.runtime.store.migration.chunk = 16  # a small copy temporary: moves fit within a short decode
    prompt = ids.shape[1]
    budget, until = budget_with_migrations(probe, 1, prompt, prompt + new, 3, prompt + new // 4)
    compiled = specontext.compile(small, budget, offload="auto", **options)
    compiled.runtime.store.migration.chunk = 16
    compiled.runtime.store.fill_value = 1e4
    out = compiled.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    result["small_fp32"] = {"budget_bytes": budget, "resident_until": until, "migrated": compiled.memory.migrated,
                            "identical_tokens": bool(torch.equal(out, reference))}
    print(f"migration, small fp32: moves {compiled.memory.migrated}, identical tokens {result['small_fp32']['identical_tokens']}",
          flush=True)

    context, new = 32768 - 384, 384
    ids = torch.randint(10, 120000, (1, context), generator=torch.Generator().manual_seed(7)).cuda()
    probe = specontext.compile(model_8b, "80GB", token_budget=2048, offload="auto", progress=False)
    probe.runtime.store.migration.chunk = 256
    budget, until = budget_with_migrations(probe, 1, context, context + new, 31, context + 96)
    compiled = specontext.compile(model_8b, budget, token_budget=2048, offload="auto", progress=False)
    compiled.runtime.store.migration.chunk = 256
    clock = StepClock()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    compiled.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, streamer=clock)
    peak = torch.cuda.max_memory_allocated()
    # times[0]: the prompt; times[i + 1] - times[i]: decode step i - 1, which starts at context + i - 1 tokens
    steps_ms = [1e3 * (b - a) for a, b in zip(clock.times[1:], clock.times[2:])]
    from specontext_compiler.runtime.memory_manager import LEAD_STEPS

    moved = {length - context for length, _ in compiled.memory.migrated}  # the step that switched the layer
    began = {step - LEAD_STEPS for step in moved}  # the step that started its background copy
    at_moves = [ms for i, ms in enumerate(steps_ms) if i in moved]
    at_begins = [ms for i, ms in enumerate(steps_ms) if i in began]
    others = [ms for i, ms in enumerate(steps_ms) if i not in moved and i not in began]
    result["llama8b_32k"] = {"budget_bytes": budget, "migrated": compiled.memory.migrated, "peak_bytes": peak,
                             "under_budget": peak <= budget, "step_ms": steps_ms,
                             "median_step_ms_at_moves": statistics.median(at_moves) if at_moves else None,
                             "median_step_ms_at_copy_start": statistics.median(at_begins) if at_begins else None,
                             "median_step_ms_otherwise": statistics.median(others)}
    r = result["llama8b_32k"]
    print(f"migration, 8B 32K: budget {budget / 1e9:.2f} GB, {len(compiled.memory.migrated)} moves, peak "
          f"{peak / 1e9:.2f} GB (under budget {r['under_budget']}), step at a switch {r['median_step_ms_at_moves']} ms, "
          f"at a copy start {r['median_step_ms_at_copy_start']} ms, {r['median_step_ms_otherwise']:.2f} ms otherwise", flush=True)
    del compiled, probe
    torch.cuda.empty_cache()
    return result


def out_of_memory_recovery(model) -> dict:
    import specontext

    budget, context, cap = 24 * 10**9, 32768, 20.5e9
    total = torch.cuda.get_device_properties(0).total_memory
    ids = torch.randint(10, 120000, (1, context - 8), generator=torch.Generator().manual_seed(5)).cuda()
    compiled = specontext.compile(model, budget, token_budget=2048, offload="auto", progress=False)
    compiled.memory.max_retries = 4
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(cap / total)
    try:
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        compiled.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        seconds = time.perf_counter() - started
        finished, error = True, None
    except torch.OutOfMemoryError as failure:
        finished, error, seconds = False, str(failure)[:300], None
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    result = {"budget_bytes": budget, "allocator_cap_bytes": cap, "finished": finished, "error": error,
              "retries": compiled.memory.retries, "workspace_after": compiled.memory.workspace,
              "offloaded_at_end": len(compiled.runtime.store.offloaded), "peak_bytes": torch.cuda.max_memory_allocated(),
              "seconds": seconds}
    print(f"out of memory: cap {cap / 1e9:.1f} GB under a {budget / 1e9:.0f} GB budget: finished {finished} after "
          f"{result['retries']} retries, {result['offloaded_at_end']} layers offloaded, peak {result['peak_bytes'] / 1e9:.2f} GB",
          flush=True)
    del compiled
    torch.cuda.empty_cache()
    return result


class TenantTakesMemory:
    """A streamer: when new token ``at`` arrives (before the decode step that follows it), another tenant
    takes the GPU's free memory: the allocator is capped at what this process reserves now + ``slack``,
    and the free blocks it caches are filled with ballast.
    Each ``put`` also records the bytes the step since the last one needed above what was allocated."""

    def __init__(self, at: int | None, slack: int):
        self.at, self.slack = at, slack
        self.puts = 0
        self.cap: int | None = None
        self.ballast: list[torch.Tensor] = []
        self.allocated: list[int] = []
        self.needs: list[int] = []  # needs[i]: decode step i + 1 (the step after new token i + 1)

    def put(self, value):  # the prompt, then each new token (a host copy: its step has finished)
        torch.cuda.synchronize()
        if self.allocated:
            self.needs.append(torch.cuda.max_memory_allocated() - self.allocated[-1])
        self.allocated.append(torch.cuda.memory_allocated())
        torch.cuda.reset_peak_memory_stats()
        if self.at is not None and self.puts == self.at:
            torch.cuda.empty_cache()
            total, reserved = torch.cuda.get_device_properties(0).total_memory, torch.cuda.memory_reserved()
            torch.cuda.set_per_process_memory_fraction(reserved / total)
            self.ballast = self._fill_cached_blocks()
            self.cap = reserved + self.slack
            torch.cuda.set_per_process_memory_fraction(self.cap / total)
        self.puts += 1

    @staticmethod
    def _fill_cached_blocks() -> list[torch.Tensor]:
        """Take what the caching allocator holds free inside segments still in use (the tenant got the
        rest of the GPU); largest pieces first, down to the small pool's."""
        ballast = []
        for size in (64 << 20, 16 << 20, 4 << 20, 2 << 20, (1 << 20) + 512, 512 << 10, 64 << 10, 8 << 10, 512):
            while True:
                try:
                    ballast.append(torch.empty(size, dtype=torch.uint8, device="cuda"))
                except torch.OutOfMemoryError:
                    break
        return ballast

    def end(self):
        pass


def out_of_memory_in_decode() -> dict:
    import specontext
    from specontext_compiler.kernels import use_kernels
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=16000, max_position_embeddings=32768)
    model = LlamaForCausalLM(config).to("cuda", torch.float32).eval()
    batch, prompt, new = 32, 16384, 24
    ids = torch.randint(5, 16000, (batch, prompt), generator=torch.Generator().manual_seed(3)).cuda()
    settings = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    options = dict(token_budget=512, progress=False)
    workspace = 128 * 2**20
    probe = specontext.compile(model, "40GB", offload="auto", **options)
    probe.memory.workspace = workspace
    budget = probe.memory.model(prompt + new).peak(batch, prompt + new, config.num_hidden_layers, prompt=prompt)
    del probe
    # Room for the engine's work between steps (20 MiB segments, the allocator's unit for 1-10 MiB
    # blocks, and 2 MiB ones) but not for a step's (~70 MiB at batch 32: the head's scores, the selection).
    slack = 48 * 2**20
    # (decode mode, the new token whose arrival caps the allocator: puts counts the prompt as 0)
    cases = [("eager", None), ("eager", 4), ("graph", None), ("graph", 1), ("graph", 2), ("graph", 4)]
    names = {None: "undisturbed", 1: "before the warm-up step", 2: "before the capture", 4: "after 4 tokens"}
    rows, references = [], {}
    # Eager steps through the Triton kernels too, as graph steps: the same rounding on both paths.
    use_kernels(True)
    for mode, at in cases:
        compiled = specontext.compile(model, budget, offload="auto", **options)
        compiled.memory.workspace = workspace
        compiled.runtime.store.migration.chunk = 32  # a move's device temporary: a small (<= 1 MiB) block
        compiled.engine.decode_mode = mode
        tenant = TenantTakesMemory(at, slack)
        torch.cuda.empty_cache()
        try:
            out = compiled.generate(ids, streamer=tenant, **settings)
            error = None
        except Exception as failure:  # recorded in the row and printed: the other cases still run
            out, error = None, f"{type(failure).__name__}: {str(failure).splitlines()[0]}"
            traceback.print_exc()
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
        if at is None:
            references[mode] = out
        stats = compiled.stats
        # Graph and eager steps may still round differently (the head scores all capacity positions in a
        # graph step, the stored ones in an eager step): each run is compared with both undisturbed runs.
        same = {name: out is not None and ref is not None and bool(torch.equal(out, ref)) for name, ref in references.items()}
        first_difference = {name: None if out is None or ref is None or equal else
                            int((out[:, prompt:] != ref[:, prompt:]).any(0).nonzero()[0]) for (name, ref), equal in
                            zip(references.items(), same.values())}
        row = {"decode_mode": mode, "tenant_takes_memory": names[at], "finished": out is not None, "error": error,
               "identical_tokens": same.get(mode, False), "identical_to": same,
               "first_different_new_token": first_difference,
               "retries": compiled.memory.retries, "workspace_after": compiled.memory.workspace,
               "migrated": compiled.memory.migrated, "offloaded_at_end": len(compiled.runtime.store.offloaded),
               "fixed_shape_steps": stats.get("fixed_shape_steps"), "fixed_shape_abandoned": stats.get("fixed_shape_abandoned"),
               "allocator_cap_bytes": tenant.cap, "slack_bytes": slack if at else None, "budget_bytes": budget,
               "ballast_bytes": sum(t.numel() for t in tenant.ballast),
               "step_need_bytes": tenant.needs[:6]}
        rows.append(row)
        print(f"oom in decode: {mode:>5}, tenant {names[at]:>24}: finished {row['finished']}, identical to "
              f"{same} (first different new token {first_difference}), retries {row['retries']}, moved {row['migrated']}, fixed-shape steps "
              f"{row['fixed_shape_steps']} (abandoned {row['fixed_shape_abandoned']}), step needs "
              f"{[round(n / 2**20, 1) for n in tenant.needs[:4]]} MiB, ballast {row['ballast_bytes'] / 2**20:.0f} MiB"
              f"{'' if error is None else ', ' + error}", flush=True)
        del compiled, tenant
        torch.cuda.empty_cache()
    use_kernels(None)
    return {"config": "Llama, 8 layers, hidden 1024, 16/4 heads, vocabulary 16,000, float32", "batch": batch, "prompt": prompt,
            "new_tokens": new, "token_budget": 512, "workspace": workspace, "rows": rows}


def out_of_memory_in_capture_with_offloaded_layers() -> dict:
    """An out-of-memory error raised inside the CUDA-graph capture while offloaded layers' loads are forked
    onto the side stream (injected at layer 0's attention, before any layer joins its loads back): the
    capture must still end, the error reach the engine, and the sequence finish eagerly with the tokens of
    an undisturbed run (a tiny float32 Llama, layers 2 and 3 offloaded by the plan)."""
    import specontext
    from specontext_compiler.runtime import cuda_graph_decode
    from specontext.testing import padded_batch, tiny_model

    options = dict(token_budget=20, sink_tokens=2, local_window=4, progress=False)
    model = tiny_model("llama", num_hidden_layers=4).cuda()
    ids, mask = (t.cuda() for t in padded_batch(model.config.vocab_size, [90], seed=2))
    settings = dict(max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0)
    reference = specontext.compile(model, "1GB", offload="none", **options)
    reference.engine.decode_mode = "eager"
    expected = reference.generate(ids, attention_mask=mask, **settings)
    workspace = 40 * reference.kv_bytes_per_token
    reference.memory.workspace = workspace
    budget = reference.memory.model(130).peak(1, 130, 2, prompt=90)
    compiled = specontext.compile(model, budget, offload="auto", **options)
    compiled.memory.workspace = workspace
    original = cuda_graph_decode.StaticDecodeRuntime.attention
    raised = []

    def attention(self, layer, *args, **kwargs):
        if layer == 0 and torch.cuda.is_current_stream_capturing() and not raised:
            raised.append(layer)
            raise torch.OutOfMemoryError("CUDA out of memory (injected during the capture)")
        return original(self, layer, *args, **kwargs)

    cuda_graph_decode.StaticDecodeRuntime.attention = attention
    try:
        out, error = compiled.generate(ids, attention_mask=mask, **settings), None
    except Exception as failure:  # recorded and printed: what escaped instead of the out-of-memory error
        out, error = None, f"{type(failure).__name__}: {str(failure).splitlines()[0]}"
        traceback.print_exc()
    finally:
        cuda_graph_decode.StaticDecodeRuntime.attention = original
    row = {"offloaded_from_start": list(compiled.placement.offloaded), "raised_in_capture": bool(raised),
           "finished": out is not None, "error": error,
           "identical_tokens": out is not None and bool(torch.equal(out, expected)),
           "retries": compiled.memory.retries, "fixed_shape_abandoned": compiled.engine.fixed_shape_abandoned,
           "default_stream_after": torch.cuda.current_stream() == torch.cuda.default_stream()}
    print(f"oom in capture, offloaded layers: {row}", flush=True)
    return row


def which_layers_stay(model, context: int = 32768, new: int = 33, repeats: int = 3) -> list[dict]:
    import specontext

    ids = torch.randint(10, 120000, (1, context), generator=torch.Generator().manual_seed(1)).cuda()
    layers = model.config.num_hidden_layers
    choices = {"first half resident": list(range(layers // 2, layers)), "last half resident": list(range(layers // 2)),
               "every other resident": list(range(1, layers, 2))}
    compiled = {name: specontext.compile(model, "80GB", token_budget=2048, offload=offload, progress=False)
                for name, offload in choices.items()}
    for runner in compiled.values():
        runner.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    times = {name: [] for name in compiled}
    for _ in range(repeats):
        for name, runner in compiled.items():
            runner.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
            times[name].append(runner.stats["ms_per_step"])
    rows = [{"placement": name, "ms_per_step": statistics.median(t), "runs": t} for name, t in times.items()]
    for r in rows:
        print(f"placement {r['placement']:>22}: {r['ms_per_step']:.2f} ms/step (runs {', '.join(f'{t:.1f}' for t in r['runs'])})",
              flush=True)
    del compiled
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="memory_plan_gpu")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["peaks", "migration", "oom", "placement", "oom_decode", "batches"])
    parser.add_argument("--expandable-segments", action="store_true",
                        help="run with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (set before CUDA initializes)")
    parser.add_argument("--both-allocators", type=float, metavar="SECONDS",
                        help="only the batches part, once per allocator setting in fresh processes, in SECONDS")
    parser.add_argument("--batches-child", type=float, metavar="DEADLINE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from benchmarks import memory_batches

    if args.expandable_segments:  # before anything initializes CUDA: the allocator reads it once
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = memory_batches.EXPANDABLE
    if args.batches_child is not None:
        memory_batches.child(args.batches_child)
        return
    if args.both_allocators is not None:  # this process leaves CUDA alone: each setting gets a fresh one
        payload = {"command": f"python -m benchmarks.memory_plan_gpu --both-allocators {args.both_allocators:g}",
                   "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                   "batches": memory_batches.both_allocators(args.both_allocators)}
        write_results(payload, args.out)
        return
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/memory_plan_gpu.py needs a CUDA GPU")
    from benchmarks.offload import llama_8b_random

    payload = {"command": "python -m benchmarks.memory_plan_gpu", "date": datetime.date.today().isoformat(),
               "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "allocator_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    if "oom_decode" not in args.skip:
        payload["out_of_memory_in_capture"] = out_of_memory_in_capture_with_offloaded_layers()
        payload["out_of_memory_in_decode"] = out_of_memory_in_decode()
    model = None if {"peaks", "migration", "oom", "placement"} <= set(args.skip) else llama_8b_random()
    if "peaks" not in args.skip:
        payload["rows"] = predicted_vs_measured(model)
        payload["measured_workspace"] = max(r["residual_over_terms"] for r in payload["rows"])
        payload["fragmentation"] = max(r["measured_reserved"] - r["measured_peak"] for r in payload["rows"])
        print(f"largest residual over the terms: {payload['measured_workspace'] / 2**20:.0f} MiB; largest reserved - "
              f"allocated: {payload['fragmentation'] / 2**20:.0f} MiB", flush=True)
    if "migration" not in args.skip:
        payload["migration"] = migration(model)
    if "oom" not in args.skip:
        payload["out_of_memory"] = out_of_memory_recovery(model)
    if "placement" not in args.skip:
        payload["placement"] = which_layers_stay(model)
    if "batches" not in args.skip:
        del model
        torch.cuda.empty_cache()
        payload["batches"] = memory_batches.run_rows(deadline=float("inf"))
    write_results(payload, args.out)


if __name__ == "__main__":
    main()
