"""The memory plan at large batches on the GPU: predicted peak against ``torch.cuda.max_memory_allocated``
and ``max_memory_reserved`` (the allocator's fragmentation), with the default caching allocator and with
``expandable_segments``. The ``batches`` part of ``benchmarks/memory_plan_gpu.py`` (its docstring has the
command); each allocator setting runs in a process of its own, since the setting must be in the
environment before CUDA initializes.

Rows, Llama-3.1-8B shape with random bf16 weights under a 135 GB budget (issue 20):

* 32K: a 32,760-token prompt and 8 new tokens at batches 16, 24 and 32 (``offload="auto"``, the default)
  and at the largest batch the plan admits with every layer's KV on the GPU (``offload="none"``). The
  largest batch with ``offload="auto"`` keeps most KV in host memory (``MemoryPlan.host_bytes``: 730 GB
  at 32K), more than the machine has: it is planned and reported, not run.
* [2K in, 16K out]: a 2,048-token prompt planned for 16,384 new tokens (everything reserved for 18,432),
  stopped after 16 (the out-of-memory error at batch 48 came at 0 tokens) at batch 48 and at the largest
  batch admitted with every layer's KV on the GPU.

Each row records whether the plan admitted it (a refusal must come before any work: nothing allocated
past the weights), the plan's peak, the measured allocated and reserved peaks, the allocator's retries
and out-of-memory count, the manager's out-of-memory retries (an admitted batch must need none) and the
prefill's time. Rows that would not finish before the deadline are left out and say so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

BUDGET = "135GB"
EXPANDABLE = "expandable_segments:True"
#: (name, prompt, max_new_tokens, tokens generated, batch or "largest", offload)
ROWS = [
    ("2k+16k", 2048, 16384, 16, 48, "auto"),
    ("32k", 32760, 8, 8, 16, "auto"),
    ("32k", 32760, 8, 8, 24, "auto"),
    ("32k", 32760, 8, 8, "largest", "none"),
    ("32k", 32760, 8, 8, 32, "auto"),
    ("2k+16k", 2048, 16384, 16, "largest", "none"),
]
#: Assumed prefill rate before one was measured (8B, bf16, H200, tokens/s at 32K).
FIRST_GUESS_TOKENS_PER_S = 12_000


class StopAfter:
    """A stopping criterion: every row has ``new`` tokens past the prompt (the plan reserved for more)."""

    def __init__(self, prompt: int, new: int):
        self.length = prompt + new

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool,
                          device=input_ids.device)


def run_rows(deadline: float) -> list[dict]:
    """Every row of :data:`ROWS` in this process (its allocator as the environment set it), until ``deadline``
    (``time.time()``): a row expected to end past it is skipped."""
    import specontext
    from transformers import StoppingCriteriaList

    from benchmarks.offload import llama_8b_random

    model = llama_8b_random()
    compiled = {offload: specontext.compile(model, BUDGET, token_budget=2048, offload=offload, progress=False,
                                            compile_decode_step=False) for offload in ("auto", "none")}
    weights = torch.cuda.memory_allocated()
    rate = FIRST_GUESS_TOKENS_PER_S
    rows = []
    for name, prompt, max_new, new, batch, offload in ROWS:
        runner = compiled[offload]
        end = prompt + max_new
        largest = runner.memory.max_batch(prompt, end)
        batch = largest if batch == "largest" else batch
        row = {"case": name, "prompt": prompt, "max_new_tokens": max_new, "generated": new, "batch": batch,
               "offload": offload, "largest_admitted": largest, "budget": BUDGET}
        if offload == "auto" and batch <= largest:  # what the plan keeps in host memory (not in the budget)
            row["plan_host_bytes"] = specontext.plan_memory(model, BUDGET, end, batch=batch, prompt=prompt).host_bytes
        # (a batch past the largest is run: its refusal, before any work, is what the row checks)
        if batch == 0 or batch <= largest and time.time() + batch * prompt / rate > deadline:
            row["skipped"] = ("no batch admitted" if batch == 0 else
                              f"expected to end past the deadline at {rate:.0f} prefill tokens/s")
            rows.append(row)
            print(f"{name} x {batch} ({offload}): skipped, {row['skipped']}", flush=True)
            continue
        ids = torch.randint(10, runner.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(5)).cuda()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        retries_before = runner.memory.retries
        try:
            runner.generate(ids, max_new_tokens=max_new, do_sample=False, pad_token_id=0,
                            stopping_criteria=StoppingCriteriaList([StopAfter(prompt, new)]))
            row.update(admitted=True, error=None)
        except specontext.BudgetError as refusal:
            row.update(admitted=False, error=str(refusal))
        except torch.OutOfMemoryError as failure:
            row.update(admitted=True, error=f"OutOfMemoryError: {str(failure).splitlines()[0]}")
        stats = torch.cuda.memory_stats()
        allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        row.update(measured_allocated=allocated, measured_reserved=reserved, fragmentation=reserved - allocated,
                   allocator_retries=stats.get("num_alloc_retries", 0), allocator_ooms=stats.get("num_ooms", 0),
                   manager_retries=runner.memory.retries - retries_before)
        if row["admitted"]:
            predicted = runner.placement.peak_bytes
            row.update(predicted_peak=predicted, relative_error=(predicted - allocated) / allocated,
                       within_5_percent=abs(predicted - allocated) <= 0.05 * allocated,
                       gpu_layers_at_start=runner.runtime.store.num_layers - len(runner.runtime.store.offloaded))
            if row["error"] is None:
                seconds = runner.stats["prefill_seconds"]
                rate = batch * prompt / seconds
                row.update(prefill_seconds=seconds, prefill_tokens_per_s=rate)
        else:  # refused before any work: nothing but the weights (and the last row's freed cache) allocated
            row["allocated_past_weights_at_refusal"] = allocated - weights
        rows.append(row)
        print(f"{name} x {batch} ({offload}): admitted {row['admitted']}, predicted "
              f"{row.get('predicted_peak', 0) / 1e9:.2f} GB, allocated {allocated / 1e9:.2f} GB, reserved "
              f"{reserved / 1e9:.2f} GB, retries {row['manager_retries']}, error {row['error']}", flush=True)
        del ids
    return rows


def child_command(deadline: float) -> list[str]:
    return [sys.executable, "-m", "benchmarks.memory_plan_gpu", "--batches-child", str(deadline)]


def both_allocators(seconds: float) -> dict:
    """:func:`run_rows` once with the default allocator and once with expandable segments, each in a fresh
    process (this one never initializes CUDA), sharing ``seconds``."""
    started = time.time()
    results = {}
    for index, (name, setting) in enumerate((("default", None), ("expandable_segments", EXPANDABLE))):
        environment = dict(os.environ)
        environment.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        if setting:
            environment["PYTORCH_CUDA_ALLOC_CONF"] = setting
        deadline = started + seconds * (index + 1) / 2
        done = subprocess.run(child_command(deadline), env=environment, capture_output=True, text=True)
        print(done.stdout, end="", flush=True)
        if done.returncode:
            print(done.stderr[-4000:], file=sys.stderr, flush=True)
            results[name] = {"error": done.stderr[-2000:], "returncode": done.returncode}
            continue
        results[name] = json.loads(done.stdout.rsplit("\nROWS ", 1)[1])
    return results


def largest_with_host_memory(model) -> list[dict]:
    """Planned only: the largest batch ``offload="auto"`` admits per case, and the host memory it needs."""
    import specontext

    cases = {(name, prompt, max_new) for name, prompt, max_new, *_ in ROWS}
    plans = {name: specontext.plan_memory(model, BUDGET, prompt + max_new, batch="max", prompt=prompt)
             for name, prompt, max_new in cases}
    return [{"case": name, "largest_admitted": plan.batch, "gpu_layers_at_end": plan.resident,
             "host_bytes": plan.host_bytes, "predicted_peak": plan.peak_bytes} for name, plan in sorted(plans.items())]


def child(deadline: float) -> None:
    """What a child process runs: the rows, then one line ``ROWS <json>`` for the parent."""
    rows = {"allocator_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "rows": run_rows(deadline),
            "gpu": torch.cuda.get_device_name()}
    from transformers import LlamaConfig

    from benchmarks.offload import LLAMA_8B

    config = LlamaConfig(**LLAMA_8B)
    config.dtype = torch.bfloat16
    rows["largest_with_host_memory"] = largest_with_host_memory(config)
    print("\nROWS " + json.dumps(rows), flush=True)
