"""HF transformers' decode step at several context lengths from one prefill (``e2e_workloads.py``).

``hf_profile`` prefills a batch once, the prompt timed as ``generate`` runs it (one forward over the
prompt into an empty cache, last-position logits), then extends the cache in chunks (not timed) to the
longest length to measure. At each length L, longest first, the cache is cut back to L - 1 tokens and
``model.generate(ids[:, :L], past_key_values=cache)`` runs: generate feeds the one uncached token, then
decodes; the step time is the difference of a generate of ``short + steps`` tokens and one of ``short``
tokens, over ``steps`` (the once-per-call work and the 1-token forward cancel). Each attention
implementation asked for is measured on the same cache at each length (``model.set_attn_implementation``).
Each attention implementation's first generate runs once untimed (warm-up; with a static cache it is
where ``torch.compile`` compiles), the profile's first one with its per-step times (``first_call_step_ms``).

Caches: ``dynamic`` (generate's default, ``DynamicCache``: cut with ``crop``) and ``static``
(``StaticCache`` sized for the workload; ``generate`` compiles the decode step itself, transformers'
auto-compile; cut by setting each layer's ``cumulative_length``).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, LogitsProcessorList, StaticCache

from benchmarks.e2e_device import StepClock, allocated_bytes, bucketed, free_memory, peak_bytes, reset_peak, timed
from benchmarks.e2e_method import Workload, step_midpoint

GENERATE = dict(do_sample=False, pad_token_id=0)


def static_cache_length(end: int) -> int:
    """A static cache's length for sequences of ``end`` tokens: rounded up to 256."""
    return 256 * -(-end // 256)


def new_cache(model, kind: str, end: int):
    if kind == "dynamic":
        return DynamicCache(config=model.config)
    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=static_cache_length(end))
    raise ValueError(f"cache kind {kind!r} is not 'dynamic' or 'static'")


def cut_cache(cache, length: int) -> None:
    """Keep the first ``length`` tokens of ``cache`` (a static cache's later rows are masked out)."""
    current = int(cache.get_seq_length())
    if current < length:
        raise ValueError(f"cannot cut a cache of {current} tokens to {length}")
    if isinstance(cache, StaticCache):
        for layer in cache.layers:
            layer.cumulative_length.fill_(length)
    elif current > length:
        cache.crop(length - current)  # a negative count: tokens removed from the end


def forward(model, ids: torch.Tensor, cache) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits


def extend(model, ids: torch.Tensor, cache, start: int, end: int, chunk: int) -> None:
    """Feed ``ids[:, start:end]`` into ``cache`` in chunks (the KV of the lengths to measure)."""
    for low in range(start, end, chunk):
        forward(model, ids[:, low:min(low + chunk, end)], cache)


def generate_from(model, ids: torch.Tensor, cache, length: int, tokens: int, clock: StepClock | None = None):
    """``tokens`` new tokens after ``ids[:, :length]``, with the cache cut to ``length - 1`` tokens."""
    cut_cache(cache, length - 1)
    extra = {} if clock is None else {"logits_processor": LogitsProcessorList([clock])}
    with torch.no_grad():
        return model.generate(ids[:, :length], past_key_values=cache, max_new_tokens=tokens, min_new_tokens=tokens,
                              **GENERATE, **extra)


def timed_prefill(model, ids: torch.Tensor, prompt: int, cache, device) -> float:
    """Seconds of the prompt's forward into ``cache`` (what ``generate``'s prefill runs)."""
    _, seconds = timed(device, lambda: forward(model, ids[:, :prompt], cache))
    return seconds


def eager_attention_prefill(model, ids: torch.Tensor, prompt: int, device) -> dict:
    """The prompt's prefill with ``attn_implementation="eager"`` (it materializes every attention score:
    a long prompt may not fit); a throwaway cache."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        seconds = timed_prefill(model, ids, prompt, DynamicCache(config=model.config), device)
        return {"prefill_seconds": seconds}
    except torch.OutOfMemoryError as error:
        return {"prefill_seconds": None, "error": f"prefill out of memory: {str(error).splitlines()[0][:160]}"}
    finally:
        model.set_attn_implementation(previous)
        free_memory(device)


def hf_profile(model, ids: torch.Tensor, workload: Workload, lengths: list[int], *, cache_kind: str = "dynamic",
               attn: tuple[str, ...] = ("sdpa",), short: int = 2, steps: int = 8, chunk: int = 2048,
               device: torch.device) -> dict:
    """Prefill seconds and decode step milliseconds at ``lengths`` (module docstring) for the batch
    ``ids`` ([B, >= max(lengths)]). Raises torch.OutOfMemoryError if the batch does not fit."""
    batch = ids.shape[0]
    result: dict = {"batch": batch, "cache_kind": cache_kind, "short_tokens": short, "long_tokens": short + steps,
                    "lengths": sorted(lengths), "step_ms": {}, "attn_prefill": {}}
    # A batch of another size runs in the same process later: the compiled step is recompiled for it.
    model.set_attn_implementation("sdpa")
    if "eager" in attn and workload.prompt:
        result["attn_prefill"]["eager"] = eager_attention_prefill(model, ids, workload.prompt, device)
    reset_peak(device)
    before = allocated_bytes(device)
    result["allocated_before_gb"] = None if before is None else before / 1e9
    cache = new_cache(model, cache_kind, workload.end)
    try:
        result["prefill_seconds"] = timed_prefill(model, ids, workload.prompt, cache, device)
        result["attn_prefill"]["sdpa"] = {"prefill_seconds": result["prefill_seconds"]}
        _, result["extend_seconds"] = timed(device, lambda: extend(model, ids, cache, workload.prompt, max(lengths), chunk))
        result["cache_class"] = type(cache).__name__
        warmed: set[str] = set()
        for length in sorted(lengths, reverse=True):
            for impl in attn:
                model.set_attn_implementation(impl)
                if impl not in warmed:  # warm-up at the measured shapes; a static cache's compilation happens here
                    clock = StepClock(device)
                    _, seconds = timed(device, lambda: generate_from(model, ids, cache, length, short + steps, clock))
                    if not warmed:  # the first implementation's: the profile's first generate
                        result["warmup_seconds"], result["first_call_step_ms"] = seconds, clock.step_ms()
                    warmed.add(impl)
                _, brief = timed(device, lambda: generate_from(model, ids, cache, length, short))
                _, full = timed(device, lambda: generate_from(model, ids, cache, length, short + steps))
                result["step_ms"].setdefault(impl, []).append(1e3 * (full - brief) / steps)
                result.setdefault("attn_implementation_used", {})[impl] = model.config._attn_implementation
        result["step_ms"] = {impl: values[::-1] for impl, values in result["step_ms"].items()}  # ascending lengths
        result["measured_at"] = [step_midpoint(length, short, short + steps) for length in result["lengths"]]
        result["peak_gpu_bytes"] = peak_bytes(device)
    finally:
        model.set_attn_implementation("sdpa")
        cache = None  # the KV goes before the caller measures another batch
        free_memory(device)
    return result


def hf_full_run(model, ids: torch.Tensor, workload: Workload, cache_kind: str, attn: str, device) -> dict:
    """One whole ``generate`` of the workload (prefill included), timed, with its per-step times."""
    model.set_attn_implementation(attn)
    clock = StepClock(device)
    extra = {"cache_implementation": "static"} if cache_kind == "static" else {}
    try:
        with torch.no_grad():
            _, seconds = timed(device, lambda: model.generate(
                ids[:, :workload.prompt], max_new_tokens=workload.new_tokens, min_new_tokens=workload.new_tokens,
                logits_processor=LogitsProcessorList([clock]), **GENERATE, **extra))
    finally:
        model.set_attn_implementation("sdpa")
        free_memory(device)
    steps = clock.step_ms()
    return {"total_seconds": seconds, "decode_seconds_clock": sum(steps) / 1e3, "steps": len(steps),
            "step_ms_buckets": bucketed(steps)}


def hf_diagnose(model, ids: torch.Tensor, context: int, new_tokens: int, device) -> dict:
    """Why two runs measured HF eager's step at 32K, batch 1, at 26 and 57 ms: the same step measured
    three ways in one process, with what transformers actually used.

    * ``two_generates``: the old e2e.py method, (generate of N+1 tokens - generate of 1 token) / N, three
      times: both calls prefill the whole prompt, so prefill variance divided by N lands in the step;
      each call's per-step times (a logits-processor clock) are kept, the first call's being the
      process's first HF decode steps (warm-up).
    * ``cached_prefix``: one prefill, then generates from the cache (``hf_profile``), sdpa and eager.
    * what generate used: the attention implementation, the cache class, the SDPA backends enabled,
      and the GPU's clocks/power/throttle reasons before and after.
    """
    from benchmarks.e2e_device import gpu_state

    report: dict = {"context": context, "batch": ids.shape[0], "new_tokens": new_tokens, "gpu_before": gpu_state(device),
                    "attn_implementation_default": model.config._attn_implementation, "dtype": str(model.dtype)}
    if torch.device(device).type == "cuda":
        report["sdpa_backends_enabled"] = {"flash": torch.backends.cuda.flash_sdp_enabled(),
                                           "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                                           "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                                           "math": torch.backends.cuda.math_sdp_enabled()}
    prompt = ids[:, :context]
    calls = []
    for _ in range(3):
        clocks = StepClock(device), StepClock(device)
        with torch.no_grad():
            out, one = timed(device, lambda: model.generate(prompt, max_new_tokens=1, min_new_tokens=1,
                                                            logits_processor=LogitsProcessorList([clocks[0]]), **GENERATE,
                                                            return_dict_in_generate=True))
            _, more = timed(device, lambda: model.generate(prompt, max_new_tokens=new_tokens + 1,
                                                           min_new_tokens=new_tokens + 1,
                                                           logits_processor=LogitsProcessorList([clocks[1]]), **GENERATE))
        report["cache_class_used_by_generate"] = type(out.past_key_values).__name__
        del out
        calls.append({"one_token_seconds": one, "n_plus_one_seconds": more, "step_ms": 1e3 * (more - one) / new_tokens,
                      "per_step_ms": clocks[1].step_ms()})
        free_memory(device)
    report["two_generates"] = calls
    workload = Workload(f"{context}_{new_tokens}", context, new_tokens + 16)
    profile = hf_profile(model, ids, workload, [context], attn=("sdpa", "eager"), steps=new_tokens // 2, device=device)
    report["cached_prefix"] = {key: profile.get(key) for key in
                               ("step_ms", "first_call_step_ms", "attn_implementation_used", "cache_class", "prefill_seconds")}
    report["gpu_after"] = gpu_state(device)
    return report
