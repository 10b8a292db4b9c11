"""Rows and headline figures of the workload benchmark, from measured step-time profiles (no device).

A row is one system at one batch on one workload: prefill seconds (measured once), decode seconds
integrated from the step times (``e2e_method.integrate_decode``), tokens/s = batch x new tokens /
(prefill + decode), and the roofline: each step must read the weights and the KV it attends to (the
whole context for HF, ``token_budget`` tokens for SpeContext), at the measured HBM bandwidth; the
decode's roofline is the sum over the steps. SpeContext rows also carry the PCIe bytes per step
(offloaded layers' loads) and their floor at the measured host-to-device bandwidth.

``headline(rows)``: the issue's keys (``speedup_vs_hf_eager_2k_32k``, ``tok_s_32k_max_batch``,
``step_over_roofline_32k_max_batch``, ``edge_speedup_1b_4gb``) and each workload's ratios, each with
the rows it came from; rows of one run only (the caller passes one run's rows).
"""

from __future__ import annotations

from benchmarks.e2e_method import Workload, integrate_decode, tokens_per_second

HF_PAPER_BATCH = 4  # the paper's HF eager baseline batch (Table 3)
METHOD = ("decode seconds = sum over the generated positions c (the step that makes the KV c tokens long, "
          "c = prompt+1 .. prompt+new-1) of the step time interpolated piecewise-linearly in c between the "
          "measured lengths (constant beyond them); tok/s = batch x new tokens / (prefill + decode)")


def step_bytes(weights: int, kv_per_token: int, batch: int, attended: int) -> int:
    """Bytes a decode step must read: the weights and ``attended`` tokens of KV per sequence."""
    return weights + batch * attended * kv_per_token


def roofline_decode_seconds(weights: int, kv_per_token: int, batch: int, workload: Workload, hbm: float,
                            token_budget: int | None) -> float:
    """The sum over a workload's decode steps of their bytes / ``hbm`` (``token_budget`` None: dense)."""
    total = 0
    for context in range(workload.prompt + 1, workload.end):
        attended = context if token_budget is None else min(token_budget, context)
        total += step_bytes(weights, kv_per_token, batch, attended)
    return total / hbm


def _base(section: str, model: str, workload: Workload, system: str, batch: int) -> dict:
    return {"section": section, "model": model, "workload": workload.name, "prompt": workload.prompt,
            "new_tokens": workload.new_tokens, "system": system, "batch": batch}


def _timing(row: dict, measured_at: list[float], step_ms: list[float], prefill: float, workload: Workload,
            weights: int, kv_per_token: int, hbm: float, token_budget: int | None) -> dict:
    decode = integrate_decode(measured_at, [ms / 1e3 for ms in step_ms], workload)
    roofline = roofline_decode_seconds(weights, kv_per_token, row["batch"], workload, hbm, token_budget)
    step_roofline_ms = [1e3 * step_bytes(weights, kv_per_token, row["batch"],
                                          round(at) if token_budget is None else min(token_budget, round(at))) / hbm
                        for at in measured_at]
    row.update(method="integrated_step_times", measured_at=measured_at, step_ms=step_ms, prefill_seconds=prefill,
               decode_seconds=decode, total_seconds=prefill + decode,
               tokens_per_s=tokens_per_second(row["batch"], workload.new_tokens, prefill, decode),
               decode_roofline_seconds=roofline, decode_over_roofline=decode / roofline,
               step_roofline_ms=step_roofline_ms,
               step_over_roofline=[ms / floor for ms, floor in zip(step_ms, step_roofline_ms)])
    if any(ms <= 0 for ms in step_ms):
        row["warning"] = "a step-time difference came out <= 0: the timing noise exceeds the steps measured"
    return row


def hf_rows(profile: dict, workload: Workload, system: str, *, section: str, model: str, weights: int,
            kv_per_token: int, hbm: float, dtype: str) -> list[dict]:
    """One row per attention implementation of an ``e2e_hf.hf_profile``; an implementation whose prompt
    prefill did not fit is a row with its error."""
    rows = []
    for impl, steps in profile["step_ms"].items():
        row = _base(section, model, workload, system, profile["batch"])
        row.update(attn_implementation=impl, attn_implementation_used=profile.get("attn_implementation_used", {}).get(impl),
                   cache=profile.get("cache_class"), dtype=dtype, warmup="one untimed generate before the measured ones",
                   first_call_step_ms=profile.get("first_call_step_ms"), warmup_seconds=profile.get("warmup_seconds"),
                   peak_gpu_gb=None if profile.get("peak_gpu_bytes") is None else profile["peak_gpu_bytes"] / 1e9,
                   lengths=profile["lengths"], generate_tokens=[profile["short_tokens"], profile["long_tokens"]])
        prefill = profile["attn_prefill"].get(impl, {})
        if prefill.get("prefill_seconds") is None:
            row["error"] = prefill.get("error", "prompt prefill not measured")
            row["step_ms"] = steps
            rows.append(row)
            continue
        rows.append(_timing(row, profile["measured_at"], steps, prefill["prefill_seconds"], workload, weights,
                            kv_per_token, hbm, None))
    return rows


def spec_row(profile: dict, workload: Workload, *, section: str, model: str, budget: str, policy: str, weights: int,
             kv_per_token: int, token_budget: int, hbm: float, pcie: float | None) -> dict:
    """The row of an ``e2e_spec.spec_profile`` (``policy``: how its batch was chosen)."""
    row = _base(section, model, workload, "specontext", profile["batch"])
    row.update(budget=budget, batch_policy=policy, token_budget=token_budget, dtype=profile.get("dtype"),
               decode_mode=profile.get("decode_mode"), lengths=profile["lengths"],
               generate_tokens=[profile["short_tokens"], profile["long_tokens"]],
               replayed_step_ms=profile["replayed_step_ms"], h2d_bytes_per_step=profile["h2d_bytes_per_step"],
               pcie_gb_s=None if pcie is None else pcie / 1e9,
               pcie_floor_ms_per_step=None if pcie is None else [1e3 * b / pcie for b in profile["h2d_bytes_per_step"]],
               layers_on_host=profile["layers_on_host"], offloaded_from_start=profile["offloaded_from_start"],
               migrations=profile["migrations"], fixed_shape_steps=profile["fixed_shape_steps"],
               graph_captures=profile["graph_captures"], attended_tokens_per_step=profile["attended_tokens_per_step"],
               warmup_compile_seconds=profile.get("warmup_compile_seconds"),
               gpu_allocated_before_gb=profile.get("allocated_before_gb"),
               peak_gpu_gb=None if profile.get("peak_gpu_bytes") is None else profile["peak_gpu_bytes"] / 1e9)
    row = _timing(row, profile["measured_at"], profile["step_ms"], profile["prefill_seconds"], workload, weights,
                  kv_per_token, hbm, token_budget)
    differ = [length for length, (short, long) in zip(profile["lengths"], profile["graph_captures"]) if short != long]
    if differ:  # e.g. the last layer left for host memory between the two decodes: a capture in the difference
        row["warning"] = f"graph captures differ between the short and the long decode at lengths {differ}"
    return row


def steady_row(row: dict) -> dict:
    """A one-length row (the 32K max-batch measurement): decode tokens/s at its step, B / step, as e2e.py
    reports, rather than a workload's integrated throughput."""
    row = dict(row, method="steady_step_at_one_length")
    row["tokens_per_s_workload"] = row.pop("tokens_per_s")
    row["tokens_per_s"] = row["batch"] * 1e3 / row["step_ms"][0]
    return row


def error_row(section: str, model: str, workload: Workload, system: str, batch: int | None, error: str, **extra) -> dict:
    row = _base(section, model, workload, system, batch)
    row.update(error=error, **extra)
    return row


def add_full_run(row: dict, full: dict) -> dict:
    """The whole generation's times next to the integration's, and the integration's errors."""
    check = dict(full)
    check["integrated_total_seconds"] = row["total_seconds"]
    check["integration_error_total"] = row["total_seconds"] / full["total_seconds"] - 1
    # The steps as the clock saw them (the interval from the first new token to the last), against the
    # integration of the profile's step times over the same steps.
    measured = full.get("decode_seconds_clock")
    check["integration_error_decode"] = row["decode_seconds"] / measured - 1 if measured else None
    row["full_run"] = check
    return row


def _best(rows: list[dict], **match) -> dict | None:
    found = [r for r in rows if "error" not in r and r.get("tokens_per_s") is not None
             and all(r.get(key) == value for key, value in match.items())]
    return max(found, key=lambda r: r["tokens_per_s"], default=None)


def _source(row: dict | None) -> dict | None:
    if row is None:
        return None
    keys = ("section", "model", "workload", "system", "batch", "attn_implementation", "batch_policy", "budget",
            "tokens_per_s", "step_over_roofline", "run")
    return {key: row[key] for key in keys if key in row}


def _ratio(numerator: dict | None, denominator: dict | None) -> float | None:
    if numerator is None or denominator is None:
        return None
    return numerator["tokens_per_s"] / denominator["tokens_per_s"]


def headline(rows: list[dict]) -> dict:
    """The issue's keys and each workload's ratios from one run's rows (None where a side is missing)."""
    out: dict = {}
    workloads = sorted({r["workload"] for r in rows if r["section"] == "workload"})
    for name in workloads:
        spec = _best(rows, section="workload", workload=name, system="specontext")
        hf_b4 = _best(rows, section="workload", workload=name, system="hf_eager", batch=HF_PAPER_BATCH)
        hf_best = _best(rows, section="workload", workload=name, system="hf_eager")
        static = _best(rows, section="workload", workload=name, system="hf_static_compile")
        out[f"speedup_vs_hf_eager_{name}"] = _ratio(spec, hf_b4)
        out[f"speedup_vs_hf_eager_best_batch_{name}"] = _ratio(spec, hf_best)
        out[f"speedup_vs_hf_static_compile_{name}"] = _ratio(spec, static)
        out[f"from_{name}"] = {"specontext_best_batch": _source(spec), f"hf_eager_batch_{HF_PAPER_BATCH}": _source(hf_b4),
                               "hf_eager_best_batch": _source(hf_best), "hf_static_compile": _source(static)}
    out.setdefault("speedup_vs_hf_eager_2k_32k", None)
    big = _best(rows, section="max_batch_32k", system="specontext")
    out["tok_s_32k_max_batch"] = None if big is None else big["tokens_per_s"]
    out["step_over_roofline_32k_max_batch"] = None if big is None else big["step_over_roofline"][0]
    out["from_32k_max_batch"] = _source(big)
    edge_hf = _best(rows, section="edge", system="hf_eager", batch=1)
    edge_spec = _best(rows, section="edge", system="specontext", batch=1)
    edge_spec_best = _best(rows, section="edge", system="specontext")
    out["edge_speedup_1b_4gb"] = _ratio(edge_spec, edge_hf)
    out["edge_speedup_1b_4gb_best_batch"] = _ratio(edge_spec_best, edge_hf)
    out["from_edge"] = {"specontext_batch_1": _source(edge_spec), "specontext_best_batch": _source(edge_spec_best),
                        "hf_eager_batch_1": _source(edge_hf),
                        "hf_eager_peak_gpu_gb": None if edge_hf is None else edge_hf.get("peak_gpu_gb")}
    return out
