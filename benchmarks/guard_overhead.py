"""The accuracy guard's cost in a decode step, on the GPU: 8B shape, random bf16, 32K prompts.

    python -m benchmarks.guard_overhead --batches 1 16 --out guard_overhead_h200

One compiled model (Llama-3.1-8B shape, ``token_budget=2048``, the default decode path: Inductor, then a
CUDA graph), guard settings measured back to back in one run: guard off; guard on with threshold 0
(its measurements and host reads, nothing ever redone); guard at its defaults (against the best
selection of the step's size, random weights do not trigger it: its cost as shipped); guard read one
step in 64 (how much of the cost is the host's read). Step time as in benchmarks/e2e.py: the
difference of two generates, the shorter of which already warmed up and captured the guard's measuring
step, so the figure is the steady cost of a step; the per-call capture is reported beside it. The
roofline: weights + selected KV + the guard layer's keys (read one step in ``check_every``) over
measured HBM bandwidth. Writes benchmarks/results/<out>.json.
"""


from __future__ import annotations

import argparse
import statistics
import datetime
import platform

import torch

import specontext
from benchmarks.e2e import _prompt, difference_lengths, hbm_bandwidth, llama_8b_random, steady_step_ms
from benchmarks.results_file import write_results
from specontext_compiler.config import GuardSettings

TOKEN_BUDGET = 2048


def measure(compiled, ids, new_tokens: int, repeats: int) -> tuple[list[float], dict]:
    """Step times of ``repeats`` pairs of generates (:func:`benchmarks.e2e.steady_step_ms`) and the last
    longer one's stats."""
    def generate(tokens):
        compiled.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
        return dict(compiled.stats)

    short_tokens, long_tokens = difference_lengths(compiled, new_tokens)
    first = generate(long_tokens)  # compiles the step where this process has not yet
    times, replayed, long = steady_step_ms(generate, short_tokens, long_tokens, repeats)
    return times, {**long, "replayed_step_ms_repeats": replayed, "compile_seconds_first_call": first["compile_seconds"],
                   "generate_tokens": [short_tokens, long_tokens]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--budget", default="135GB")
    parser.add_argument("--settings", nargs="+", default=["off", "threshold_0", "default"],
                        choices=["off", "threshold_0", "default", "read_every_64"],
                        help="measured in this order (repeats allowed); read_every_64: the default guard read and "
                             "measured one step in 64 (what the host's read costs, against default's one in 8)")
    parser.add_argument("--repeats", type=int, default=3, help="pairs of generates per row (their median)")
    parser.add_argument("--out", default="guard_overhead")
    args = parser.parse_args()
    hbm = hbm_bandwidth()
    model = llama_8b_random()
    compiled = specontext.compile(model, args.budget, token_budget=TOKEN_BUDGET, offload="none", progress=False)
    runtime = compiled.runtime
    compiled.engine.time_steps = True
    settings = {"off": None, "threshold_0": GuardSettings(threshold=0.0), "default": GuardSettings(),
                "read_every_64": GuardSettings(check_every=64)}
    order = list(args.settings)  # repeats allowed: the same setting measured again later in the run
    shape = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_token_layer = 2 * shape.num_key_value_heads * (shape.hidden_size // shape.num_attention_heads) * 2  # K+V bf16
    rows = []
    for batch in args.batches:
        ids = _prompt(batch, args.context)
        for name in order:
            setting = settings[name]
            compiled.set_guard(setting)
            guard = runtime.guard
            try:
                times, stats = measure(compiled, ids, args.new_tokens, args.repeats)
                ms = statistics.median(times)
            except torch.OutOfMemoryError as error:
                rows.append({"batch": batch, "setting": name, "error": str(error).splitlines()[0]})
                continue
            selected = batch * TOKEN_BUDGET * shape.num_hidden_layers * kv_token_layer
            # the guard layer's keys, read by one step in check_every
            guard_keys = 0 if guard is None else batch * args.context * kv_token_layer // 2 // guard.settings.check_every
            floor = (weights + selected + guard_keys) / hbm
            row = {"batch": batch, "setting": name, "ms_per_step": ms, "ms_per_step_repeats": times,
                   "replayed_step_ms": statistics.median(stats["replayed_step_ms_repeats"]),
                   "replayed_step_ms_repeats": stats["replayed_step_ms_repeats"], "tokens_per_s": batch * 1e3 / ms,
                   "roofline_ms": 1e3 * floor, "step_over_roofline": ms / (1e3 * floor),
                   "fixed_shape_steps": stats["fixed_shape_steps"], "steps": stats["steps"],
                   "compile_seconds_first_call": stats["compile_seconds_first_call"],
                   "generate_tokens": stats["generate_tokens"], "graph_captures": stats["graph_captures"],
                   "graph_capture_seconds": stats["graph_capture_seconds"],
                   **{k: v for k, v in stats.items() if k.startswith("guard")}}
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})
        offs = [r["ms_per_step"] for r in rows if r["batch"] == batch and r["setting"] == "off" and "ms_per_step" in r]
        base = min(offs) if offs else None  # the fastest guard-off measurement: the overhead is not understated
        for row in rows:
            if row["batch"] == batch and base and "ms_per_step" in row:
                row["overhead_vs_off"] = row["ms_per_step"] / base - 1
    for batch in args.batches:  # the same against the event-timed replayed steps
        offs = [r["replayed_step_ms"] for r in rows if r["batch"] == batch and r["setting"] == "off" and "replayed_step_ms" in r]
        for row in rows:
            if row["batch"] == batch and offs and "replayed_step_ms" in row:
                row["replayed_overhead_vs_off"] = row["replayed_step_ms"] / min(offs) - 1
    print(f"{'batch':>5} {'guard':>12} {'ms/step':>9} {'replayed':>9} {'roofline':>9} {'overhead':>9} {'replayed':>9} {'triggers':>8}")
    for row in rows:
        if "ms_per_step" in row:
            print(f"{row['batch']:5d} {row['setting']:>12} {row['ms_per_step']:9.2f} {row['replayed_step_ms']:9.2f} "
                  f"{row['roofline_ms']:9.2f} {100 * row.get('overhead_vs_off', 0):8.1f}% "
                  f"{100 * row.get('replayed_overhead_vs_off', 0):8.1f}% {row.get('guard_triggers', 0):8}")
    write_results({"command": "python -m benchmarks.guard_overhead " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
                   "machine": torch.cuda.get_device_name(), "host": platform.node(), "date": datetime.date.today().isoformat(),
                   "torch": torch.__version__, "hbm_bytes_per_s": hbm, "context": args.context, "token_budget": TOKEN_BUDGET,
                   "rows": rows}, args.out)


if __name__ == "__main__":
    main()
