"""SpeContext's decode step at several context lengths from one prefill (``e2e_workloads.py``), its best
batch from the memory planner, and a whole generation to check the integration against.

``spec_profile`` plans the batch as ``generate`` would for the workload (the memory plan for sequences
growing from the prompt to prompt + new tokens: which layers are offloaded from the start and where
the others move to host memory), prefills the prompt (timed: the workload's prefill, KV reserved for the
whole sequence as ``generate`` reserves it), then extends the sequence in prefill chunks to each length
to measure, ascending (the memory manager moves layers to host memory as the chunks pass their
lengths, as it does when a run's decode steps pass them). At each length L it decodes from that state,
as a ``generate`` of the workload that reached L would (same KV capacity, same placement), stopped after
a few tokens, then rolls the runtime back to L (``step_transaction``, what an out-of-memory retry
uses). Step time = the difference of a decode of ``short + steps`` tokens and one of ``short`` tokens,
over the steps they differ by, so the once-per-call warm-up step and CUDA-graph capture cancel.
The prompt tokens past the prompt are random tokens fed as prefill rather than generated ones: the
step's cost depends on the lengths and the placement, not on the values (random weights anyway).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from benchmarks.e2e_device import StepClock, allocated_bytes, bucketed, peak_bytes, reset_peak, synchronize, timed
from benchmarks.e2e_method import Workload, largest_admitted, step_midpoint


class StopAfter(StoppingCriteria):
    """Ends a generation after ``tokens`` new tokens (max_new_tokens is the workload's, for its capacity)."""

    def __init__(self, tokens: int):
        self.tokens, self.calls, self.flags = tokens, 0, None

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        if self.flags is None:
            batch = input_ids.shape[0]
            self.flags = (torch.zeros(batch, dtype=torch.bool, device=input_ids.device),
                          torch.ones(batch, dtype=torch.bool, device=input_ids.device))
        return self.flags[self.calls >= self.tokens]


def planner_admits(model, compiled, budget, workload: Workload, host_bytes: int | None,
                   resident_only: bool):
    """``admits(batch)``: whether the memory planner (``specontext.plan_memory``, with the compiled model's
    retrieval-head bytes) places ``batch`` sequences of the workload under ``budget`` and, of the KV it
    sends to host memory, at most ``host_bytes`` (None: no host limit); with ``resident_only``, every
    layer's KV on the GPU throughout."""
    import specontext
    from specontext_compiler.planning import kv_bytes_per_token
    from specontext_compiler.runtime.engine import reserved_tokens

    layer_token_bytes = kv_bytes_per_token(model.config, compiled.dtype) // model.config.num_hidden_layers
    capacity = reserved_tokens(workload.end)

    def admits(batch: int) -> bool:
        try:
            plan = specontext.plan_memory(
                model, budget, context=workload.end, batch=batch, prompt=workload.prompt,
                token_budget=compiled.config.token_budget, window=compiled.window,
                prefill_chunk=compiled.config.prefill_chunk, head=compiled.memory.head)
        except ValueError:  # BudgetError: not even with every layer offloaded
            return False
        leaving = sum(1 for tokens in plan.resident_until if tokens < workload.end)
        if resident_only and leaving:
            return False
        return host_bytes is None or batch * capacity * layer_token_bytes * leaving <= host_bytes

    return admits


def planner_batches(model, compiled, budget, workload: Workload, host_bytes: int | None, policies) -> dict[str, int | None]:
    """Per policy ("resident": every layer's KV on the GPU; "admitted": the largest batch the planner
    places, host memory permitting) the largest batch (``e2e_method.largest_admitted``)."""
    return {policy: largest_admitted(planner_admits(model, compiled, budget, workload, host_bytes,
                                                    resident_only=policy == "resident"))
            for policy in policies}


def _decode_settings(compiled, length: int, end: int, tokens: int):
    from specontext_compiler.runtime.sampling import resolve_generation_config

    left = end - length
    return resolve_generation_config(compiled.generation_config, None, length,
                                     {"max_new_tokens": left, "min_new_tokens": left, "do_sample": False, "pad_token_id": 0},
                                     compiled.max_positions, stopping_criteria=StoppingCriteriaList([StopAfter(tokens)]))


def _extend(engine, ids: torch.Tensor, mask: torch.Tensor, start: int, end: int, logits: torch.Tensor) -> torch.Tensor:
    """Feed ``ids[:, start:end]`` as prefill chunks after the stored ones; the last position's logits."""
    from specontext_compiler.runtime.context import activate
    from specontext_compiler.runtime.engine import prompt_position_ids

    positions = prompt_position_ids(mask[:, :end])
    runtime = engine.runtime
    with torch.no_grad(), activate(runtime):
        runtime.prefilling = True
        try:
            for low in range(start, end, engine.prefill_chunk):
                high = min(low + engine.prefill_chunk, end)
                logits = engine.run_step(engine.step, ids[:, low:high], mask[:, :high], positions[:, low:high])
        finally:
            runtime.prefilling = False
    return logits


def decode_from(compiled, at, end: int, tokens: int, state) -> tuple[torch.Tensor, dict]:
    """``tokens`` new tokens after the prefilled state ``at`` (an engine ``Prefilled`` of L tokens), decoded
    as a ``generate`` of sequences ending at ``end`` tokens would (its KV capacity), then the runtime
    rolled back to ``state`` (``step_transaction.begin`` taken at L); the sequences and the engine's stats."""
    from specontext_compiler.runtime import step_transaction

    length = at.input_ids.shape[1]
    sequences = compiled.engine.decode(at, _decode_settings(compiled, length, end, tokens))
    stats = dict(compiled.engine.stats)
    step_transaction.roll_back(compiled.runtime, state)
    return sequences, stats


def _layers_on_host(compiled) -> int:
    store = compiled.runtime.store
    return sum(1 for layer in range(store.num_layers) if store.is_offloaded(layer))


def spec_profile(compiled, ids: torch.Tensor, workload: Workload, lengths: list[int], *, short: int = 3,
                 steps: int = 16) -> dict:
    """Prefill seconds and decode step milliseconds at ``lengths`` (module docstring) for the batch ``ids``
    ([B, >= max(lengths)]). Raises ValueError if the planner refuses the batch, torch.OutOfMemoryError if
    it does not fit after all."""
    from specontext_compiler.runtime import step_transaction
    from specontext_compiler.runtime.engine import Prefilled, reserved_tokens

    engine, runtime, device = compiled.engine, compiled.runtime, compiled.device
    batch = ids.shape[0]
    mask = torch.ones_like(ids)
    engine.time_steps = True
    result: dict = {"batch": batch, "dtype": str(compiled.dtype), "decode_mode": engine.decode_mode, "short_tokens": short, "long_tokens": short + steps, "lengths": sorted(lengths),
                    "step_ms": [], "replayed_step_ms": [], "h2d_bytes_per_step": [], "layers_on_host": [],
                    "fixed_shape_steps": [], "graph_captures": [], "attended_tokens_per_step": []}
    reset_peak(device)
    before = allocated_bytes(device)
    result["allocated_before_gb"] = None if before is None else before / 1e9
    placement = compiled.memory.plan(batch, workload.prompt, workload.end)  # what generate plans for the workload
    result["offloaded_from_start"] = len(placement.offloaded)
    result["migrations"] = sorted((tokens, layer) for layer, tokens in placement.resident_until.items())
    prefilled = engine.prefill(ids[:, :workload.prompt], mask[:, :workload.prompt], reserved_tokens(workload.end))
    result["prefill_seconds"] = prefilled.seconds
    logits, current, first = prefilled.logits, workload.prompt, True
    for length in sorted(lengths):
        if length > current:
            logits, seconds = timed(device, lambda: _extend(engine, ids, mask, current, length, logits))
            result["extend_seconds"] = result.get("extend_seconds", 0.0) + seconds
            current = length
        state = step_transaction.begin(runtime)
        at = Prefilled(ids[:, :length], mask[:, :length], logits, 0.0)

        def decode(tokens: int) -> dict:
            return decode_from(compiled, at, workload.end, tokens, state)[1]

        if first:  # warm-up: Triton/Inductor compile for this batch kind here, once per process
            warm = decode(short + steps)
            result["warmup_compile_seconds"] = warm.get("compile_seconds", 0.0)
            first = False
        brief, full = decode(short), decode(short + steps)
        counted = full["steps"] - brief["steps"]
        result["step_ms"].append(1e3 * (full["decode_seconds"] - brief["decode_seconds"]) / counted)
        result["replayed_step_ms"].append(full.get("replayed_step_ms"))
        result["h2d_bytes_per_step"].append((full["h2d_bytes"] - brief["h2d_bytes"]) / counted)
        result["layers_on_host"].append(_layers_on_host(compiled))
        result["fixed_shape_steps"].append([brief["fixed_shape_steps"], full["fixed_shape_steps"]])
        result["graph_captures"].append([brief.get("graph_captures"), full.get("graph_captures")])
        result["attended_tokens_per_step"].append(full["attended_tokens_per_step"])
    result["measured_at"] = [step_midpoint(length, short, short + steps) for length in result["lengths"]]
    result["peak_gpu_bytes"] = peak_bytes(device)
    synchronize(device)
    return result


def spec_full_run(compiled, ids: torch.Tensor, workload: Workload) -> dict:
    """One whole ``generate`` of the workload, with the engine's prefill and decode seconds and the
    per-step times (a logits-processor clock)."""
    clock = StepClock(compiled.device)
    compiled.generate(ids[:, :workload.prompt], max_new_tokens=workload.new_tokens, min_new_tokens=workload.new_tokens,
                      do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([clock]))
    stats = compiled.stats
    steps = clock.step_ms()
    return {"total_seconds": stats["prefill_seconds"] + stats["decode_seconds"], "prefill_seconds": stats["prefill_seconds"],
            "decode_seconds": stats["decode_seconds"], "decode_seconds_clock": sum(steps) / 1e3,
            "steps": stats["steps"], "step_ms_buckets": bucketed(steps),
            "fixed_shape_steps": stats["fixed_shape_steps"], "graph_captures": stats.get("graph_captures"),
            "h2d_bytes": stats["h2d_bytes"]}
