"""The paper's workloads on the GPU (Table 3): HF transformers and SpeContext side by side, one run.

    python -m benchmarks.e2e --workloads 2k_32k --spec-batches resident admitted --diagnose-hf --time-limit 560 --out e2e_w_2k32k
    python -m benchmarks.e2e --workloads 16k_2k 2k_16k --spec-batches resident --time-limit 560 --out e2e_w_18k
    python -m benchmarks.e2e --workloads 32k_2k --spec-batches resident --max-batch-32k --edge --full-check 90 \
        --time-limit 560 --out e2e_w_32k2k_edge
    python -m benchmarks.e2e --device cpu --model tiny --edge-model tiny --workloads 48_40 --spec-batches 2 \
        --spec-budget 1GB --token-budget 16 --lengths 3 --edge --edge-budget 1GB --edge-workload 32_24 \
        --edge-batches 1 2 --hf-max-batch 8 --out e2e_w_cpu_smoke      # the same code path on a CPU

A workload is [prompt, new tokens] (``2k_32k``: 2,048 + 32,768); Llama-3.1-8B shape, random bf16
weights, random-token prompts, greedy. Systems, each measured at the same context lengths:

* ``hf_eager``: ``model.generate`` with its dynamic cache, no compilation (the paper's baseline), at
  batch 4 (the paper's) with ``attn_implementation`` "sdpa" and "eager" on the same cache (the faster
  is the baseline; both rows are kept), then at its best batch: doubling from 4 while tok/s gains >= 3%,
  cut to the largest batch the measured peak memory predicts to fit, one try halfway after running out.
* ``hf_static_compile``: a static cache sized for the workload, the decode step compiled by
  transformers' own ``torch.compile`` (batch 4).
* ``specontext``: ``specontext.compile(model, "135GB", token_budget=2048, guard=False)`` (the accuracy
  guard off: random weights spread attention thin and make it attend densely, docs/benchmarks.md), at
  the memory planner's largest batch with every layer's KV on the GPU ("resident") and its largest batch
  with layers offloaded, host memory permitting ("admitted"); the faster is its best batch.

Method (``e2e_method``): a 32K-token generation of HF eager at batch 4 does not fit a 10-minute call, so
each system's decode step is measured at ``--lengths`` context lengths spanning the workload (one prefill
per batch: HF cuts its cache back, SpeContext rolls its runtime back; ``e2e_hf``, ``e2e_spec``), and the
decode time is the sum over the generated positions of the step time interpolated piecewise-linearly in
the context length; the prompt's prefill is measured once. tok/s = batch x new tokens / (prefill +
decode). ``--full-check S`` also runs whole generations whose estimated time is under S seconds and
reports the integration's error against them. Edge (``--edge``): Llama-3.2-1B shape, [2K, 16K], batch 1,
SpeContext under "4GB" (and its best batch under it) against HF eager (no budget: its peak is reported,
and whether it fits 4 GB). ``--max-batch-32k``: SpeContext's decode tok/s with 32K prompts at the largest
batch the planner keeps on the GPU (``--max-batch-policies admitted``: the largest it admits with layers
offloaded).
``--diagnose-hf``: HF eager's step at 32K, batch 1, three ways (``e2e_hf.hf_diagnose``).

Results are written after every measurement (``--time-limit``: measurements that would not finish in
time are skipped and listed). GPU run plan and estimates: docs/benchmarks.md, "The paper's workloads".
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
import traceback

import torch

from benchmarks import e2e_rows
from benchmarks.e2e_device import (capacity_bytes, copy_bandwidth, free_memory, gpu_state, host_available_bytes,
                                   pcie_bandwidth, random_llama, random_prompts)
from benchmarks.e2e_hf import hf_diagnose, hf_full_run, hf_profile
from benchmarks.e2e_method import (Costs, Deadline, Trial, Workload, measured_length_grid, predicted_max_batch,
                                   search_best_batch)
from benchmarks.e2e_spec import planner_batches, spec_full_run, spec_profile
from benchmarks.results_file import write_results

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
MAX_BATCH_PROMPT = 32768
STARTED = time.monotonic()  # --time-limit counts from here (the process's imports come before, a few seconds)


def build_model(name: str, device: torch.device):
    """``llama_8b`` / ``llama_1b``: random bf16 weights; ``tiny``: specontext.testing's tiny Llama (tests)."""
    if name == "tiny":
        from specontext.testing import tiny_model

        return tiny_model("llama").to(device).eval()
    from benchmarks.e2e import LLAMA_8B

    return random_llama({"llama_8b": LLAMA_8B, "llama_1b": LLAMA_1B}[name], device, torch.bfloat16)


class Run:
    """One call's measurements, in priority order (``run``), written after each."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.deadline = Deadline(args.time_limit, started=STARTED)
        self.rows: list[dict] = []
        self.extra: dict = {}
        self.compiled = None
        self.model = None
        self.model_name = None
        self.hbm = copy_bandwidth(self.device)
        self.pcie = pcie_bandwidth(self.device)
        self.host = host_available_bytes()
        self.gpu_start = gpu_state(self.device)

    # -- bookkeeping --------------------------------------------------------------------------------------
    def save(self, complete: bool = False) -> None:
        args = self.args
        payload = {
            "command": "python -m benchmarks.e2e " + " ".join(sys.argv[1:]),
            "arguments": {k: _arg(v) for k, v in vars(args).items()},
            "date": datetime.date.today().isoformat(), "device": self.device.type,
            "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
            "torch": torch.__version__, "transformers": _version("transformers"), "triton": _version("triton"),
            "hbm_copy_gb_s": self.hbm / 1e9, "pcie_h2d_gb_s": None if self.pcie is None else self.pcie / 1e9,
            "host_memory_available_gb": None if self.host is None else self.host / 1e9,
            "gpu_state_start": self.gpu_start, "gpu_state_end": gpu_state(self.device) if complete else None,
            "method": e2e_rows.METHOD, "complete": complete, "skipped": self.deadline.skipped,
            "headline": e2e_rows.headline(self.rows), **self.extra, "rows": self.rows,
        }
        write_results(payload, args.out, quiet=not complete)

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        self.save()
        tok = row.get("tokens_per_s")
        print(f"{row['section']:13s} {row['workload']:8s} {row['system']:18s} b{row.get('batch')!s:4s} "
              f"{row.get('attn_implementation') or row.get('batch_policy') or '':9s} "
              + (f"{tok:9.1f} tok/s  prefill {row['prefill_seconds']:7.2f} s  decode {row['decode_seconds']:8.1f} s  "
                 f"x{row['decode_over_roofline']:.2f} roofline" if tok is not None else row.get("error", "")[:90]),
              flush=True)
        return row

    def use_model(self, name: str):
        if self.model_name != name:
            self.drop_spec()
            self.model = None
            free_memory(self.device)
            self.model = build_model(name, self.device)
            self.model_name = name
            self.costs = Costs(self.weights)
        return self.model

    @property
    def weights(self) -> int:
        from specontext_compiler.planning import weight_bytes

        return weight_bytes(self.model)

    @property
    def kv_per_token(self) -> int:
        from specontext_compiler.planning import kv_bytes_per_token

        return kv_bytes_per_token(self.model.config, self.model.dtype)

    def ids(self, batch: int, length: int) -> torch.Tensor:
        return random_prompts(batch, length, self.model.config.vocab_size, self.device, seed=batch * 1_000_003 + length)

    # -- HF -----------------------------------------------------------------------------------------------
    def hf(self, section: str, workload: Workload, system: str, batch: int, attn: tuple[str, ...]) -> list[dict]:
        args = self.args
        static = system == "hf_static_compile"
        steps = args.hf_steps
        lengths = measured_length_grid(workload, args.lengths, 2 + steps)
        generations = len(lengths) * len(attn) * 3 * (2 + steps) + (2 + steps)
        estimate = self.costs.profile("hf", batch, max(lengths), generations, "hf_static" if static else None)
        what = f"{section} {workload.name} {system} batch {batch}"
        if not self.deadline.allows(estimate, what):
            return []
        try:
            profile = hf_profile(self.model, self.ids(batch, max(lengths)), workload, lengths,
                                 cache_kind="static" if static else "dynamic", attn=attn, short=2, steps=steps,
                                 device=self.device)
        except Exception as error:  # out of memory, or anything else: recorded, and the call goes on
            free_memory(self.device)
            return [self.add(e2e_rows.error_row(section, self.model_name, workload, system, batch, failure(error)))]
        if static:
            self.costs.compile.pop("hf_static", None)
        self.costs.observe("hf", batch * max(lengths), profile["prefill_seconds"] + profile.get("extend_seconds", 0.0),
                           1, sum(profile["step_ms"][attn[0]]) / len(lengths) / 1e3)
        rows = e2e_rows.hf_rows(profile, workload, system, section=section, model=self.model_name, weights=self.weights,
                                kv_per_token=self.kv_per_token, hbm=self.hbm, dtype=str(self.model.dtype))
        for row in rows:
            row["gpu_allocated_before_gb"] = profile.get("allocated_before_gb")
            self.add(row)
        return rows

    def hf_search(self, workload: Workload, fastest_attn: str) -> None:
        """HF eager's best batch (``e2e_method.search_best_batch``), its batch-4 row reused."""
        known = {r["batch"]: r for r in self.rows if r["section"] == "workload" and r["workload"] == workload.name
                 and r["system"] == "hf_eager" and r.get("attn_implementation") == fastest_attn}

        def measure(batch: int) -> Trial:
            rows = [known[batch]] if batch in known else self.hf("workload", workload, "hf_eager", batch, (fastest_attn,))
            row = rows[0] if rows else None
            if row is None or "error" in row:
                return Trial(batch, None)
            return Trial(batch, row["tokens_per_s"], None if row.get("peak_gpu_gb") is None else int(row["peak_gpu_gb"] * 1e9))

        capacity = capacity_bytes(self.device)
        fits = None if capacity is None else (lambda trials, _: predicted_max_batch(self.weights, trials, capacity))
        best, trials = search_best_batch(measure, self.args.hf_batch, fits=fits, limit=max(self.args.hf_max_batch,
                                                                                           self.args.hf_batch))
        self.extra.setdefault("hf_batch_search", {})[workload.name] = {
            "attn_implementation": fastest_attn, "best_batch": None if best is None else best.batch,
            "trials": [vars(t) for t in trials], "rule": "double while tok/s gains >= 3%; cut to the largest batch "
            "the measured peak memory predicts to fit (95% of the GPU); one try halfway after out of memory"}
        self.save()

    # -- SpeContext ---------------------------------------------------------------------------------------
    def spec_compiled(self, budget: str):
        import specontext

        if self.compiled is None or self.compiled.config.budget_bytes != specontext.parse_budget(budget):
            self.drop_spec()
            token_budget = self.args.token_budget
            self.compiled = specontext.compile(self.model, budget, token_budget=token_budget, guard=False, progress=False)
            self.spec_workspace = self.compiled.memory.workspace
        return self.compiled

    def drop_spec(self) -> None:
        if self.compiled is not None:
            self.compiled = None
            free_memory(self.device)

    def spec(self, section: str, workload: Workload, budget: str, batches, lengths_count: int | None = None) -> list[dict]:
        """SpeContext rows of ``workload`` at ``batches`` (policies or sizes); ``lengths_count`` 1: the
        step at the prompt's length only (the max-batch measurement)."""
        args = self.args
        steps = args.spec_steps
        compile_key = None if self.compiled is not None else "spec"
        if not self.deadline.allows(self.costs.compile.get("spec", 0.0) if compile_key else 0.0, f"{section} compile"):
            return []
        host = None if self.host is None else int(self.args.host_memory_fraction * self.host)
        policies = [b for b in batches if isinstance(b, str)]
        try:
            compiled = self.spec_compiled(budget)
            chosen = planner_batches(self.model, compiled, budget, workload, host, policies)
        except Exception as error:  # a failed compile: recorded, and the call goes on without SpeContext here
            free_memory(self.device)
            return [self.add(e2e_rows.error_row(section, self.model_name, workload, "specontext", None, failure(error),
                                                budget=budget))]
        self.extra.setdefault("planner_batches", {})[f"{section} {workload.name} {budget}"] = {
            **chosen, "host_bytes_allowed": host}
        plan = [(b, chosen[b]) if isinstance(b, str) else ("given", b) for b in batches]  # in the order asked
        rows = []
        for policy, batch in plan:
            if batch is None:
                rows.append(self.add(e2e_rows.error_row(section, self.model_name, workload, "specontext", None,
                                                        f"the planner places no batch under {budget} ({policy})",
                                                        budget=budget, batch_policy=policy)))
                continue
            if any(r.get("batch") == batch for r in rows):
                continue
            lengths = [workload.prompt] if lengths_count == 1 else measured_length_grid(workload, args.lengths, 3 + steps)
            estimate = self.costs.profile("spec", batch, max(lengths), len(lengths) * 3 * (3 + steps), compile_key)
            if not self.deadline.allows(estimate, f"{section} {workload.name} specontext {policy} batch {batch}"):
                continue
            retries = compiled.memory.retries
            try:
                profile = spec_profile(compiled, self.ids(batch, max(lengths)), workload, lengths, steps=steps)
            except Exception as error:  # out of memory, refused by the planner, or anything else
                free_memory(self.device)
                rows.append(self.add(e2e_rows.error_row(section, self.model_name, workload, "specontext", batch,
                                                        failure(error), budget=budget, batch_policy=policy)))
                continue
            finally:
                # An out-of-memory re-plan doubles the memory manager's margin for the model's life: each
                # measurement starts from the library's margin again (the re-plans are reported).
                replans = compiled.memory.retries - retries
                compiled.memory.workspace = self.spec_workspace
            self.costs.compile.pop("spec", None)
            compile_key = None
            self.costs.observe("spec", batch * max(lengths), profile["prefill_seconds"] + profile.get("extend_seconds", 0.0),
                               len(lengths), sum(profile["step_ms"]) / 1e3)
            row = e2e_rows.spec_row(profile, workload, section=section, model=self.model_name, budget=budget, policy=policy,
                                    weights=self.weights, kv_per_token=self.kv_per_token, token_budget=args.token_budget,
                                    hbm=self.hbm, pcie=self.pcie)
            row["memory_replans"] = replans  # > 0: a step ran out of memory and the placement changed
            rows.append(self.add(e2e_rows.steady_row(row) if lengths_count == 1 else row))
        return rows

    # -- whole generations ------------------------------------------------------------------------------
    def full_check(self, row: dict, workload: Workload) -> None:
        """A whole generation of ``row``'s system and batch, if it is estimated to take under --full-check
        seconds (and fits the time left); the integration's error goes into the row."""
        if "error" in row or row.get("method") != "integrated_step_times" or row["total_seconds"] > self.args.full_check:
            return
        if not self.deadline.allows(1.3 * row["total_seconds"], f"full run {row['workload']} {row['system']} b{row['batch']}"):
            return
        ids = self.ids(row["batch"], workload.prompt)
        try:
            if row["system"] == "specontext":
                full = spec_full_run(self.spec_compiled(row["budget"]), ids, workload)
            else:
                cache = "static" if row["system"] == "hf_static_compile" else "dynamic"
                full = hf_full_run(self.model, ids, workload, cache, row["attn_implementation"], self.device)
        except Exception as error:
            row["full_run"] = {"error": failure(error)}
        else:
            e2e_rows.add_full_run(row, full)
        free_memory(self.device)
        self.save()


def failure(error: BaseException) -> str:
    """An error as a row records it: out of memory says so; anything else with where it was raised."""
    first = (str(error).splitlines() or [""])[0][:240]
    if isinstance(error, torch.OutOfMemoryError):
        return f"out of memory: {first}"
    where = traceback.extract_tb(error.__traceback__)[-1:] if error.__traceback__ else []
    at = f" (at {where[0].filename.split('/')[-1]}:{where[0].lineno})" if where else ""
    return f"{type(error).__name__}: {first}{at}"


def _arg(value) -> str:
    if isinstance(value, list):
        return " ".join(_arg(v) for v in value)
    return value.name if isinstance(value, Workload) else str(value)


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return None


def fastest_attention(rows: list[dict], workload: str, batch: int) -> str:
    """The attention implementation of HF eager's fastest batch-``batch`` row of ``workload`` (sdpa if none)."""
    found = [r for r in rows if r["workload"] == workload and r["system"] == "hf_eager" and r["batch"] == batch
             and r["section"] == "workload" and "error" not in r]
    return max(found, key=lambda r: r["tokens_per_s"])["attn_implementation"] if found else "sdpa"


def run(args) -> dict:
    """The call's measurements in priority order: HF diagnostics (a cold process), HF eager at its fixed
    batch, SpeContext (workloads, 32K max batch), the edge, HF eager's best batch, HF static + compile,
    then whole-generation checks. Returns the last payload's headline."""
    work = Run(args)
    systems = set(args.workload_systems)
    if args.workloads or args.diagnose_hf or args.max_batch_32k:
        work.use_model(args.model)
    if args.diagnose_hf:
        context = 32768 if args.model != "tiny" else 64
        if work.deadline.allows(60, "HF diagnostics"):
            try:
                work.extra["hf_diagnostics"] = hf_diagnose(work.model, work.ids(1, context), context,
                                                           32 if args.model != "tiny" else 8, work.device)
            except Exception as error:
                work.extra["hf_diagnostics"] = {"error": failure(error)}
                free_memory(work.device)
            work.save()
    if "hf_eager" in systems:
        for workload in args.workloads:
            work.hf("workload", workload, "hf_eager", args.hf_batch, tuple(args.hf_attn))
    if "specontext" in systems:
        for workload in args.workloads:
            work.spec("workload", workload, args.spec_budget, args.spec_batches)
    if args.max_batch_32k:
        prompt = MAX_BATCH_PROMPT if args.model != "tiny" else 64
        workload = Workload(f"{prompt // 1024 or prompt}k_max_batch" if prompt >= 1024 else f"{prompt}_max_batch",
                            prompt, 3 + args.spec_steps + 1)
        work.spec("max_batch_32k", workload, args.spec_budget, args.max_batch_policies, lengths_count=1)
    if args.full_check and "specontext" in systems:
        for row in [r for r in work.rows if r["system"] == "specontext" and r["section"] == "workload"]:
            work.full_check(row, next(w for w in args.workloads if w.name == row["workload"]))
    work.drop_spec()
    if args.edge:
        edge_run(work)
    if args.workloads and work.model_name != args.model:
        work.use_model(args.model)
    if "hf_eager" in systems and not args.no_hf_search:
        for workload in args.workloads:
            work.hf_search(workload, fastest_attention(work.rows, workload.name, args.hf_batch))
    if "hf_static_compile" in systems:
        for workload in args.workloads:
            work.hf("workload", workload, "hf_static_compile", args.hf_batch, ("sdpa",))
    if args.full_check:
        for row in [r for r in work.rows if r["system"].startswith("hf") and r["section"] == "workload"
                    and r["batch"] == args.hf_batch]:  # the baselines' fixed batch
            work.full_check(row, next(w for w in args.workloads if w.name == row["workload"]))
    work.drop_spec()
    work.save(complete=True)
    return e2e_rows.headline(work.rows)


def edge_run(work: Run) -> None:
    """The edge setting: the 1B shape, HF eager at batch 1 (both attention implementations), SpeContext
    under the edge budget at batch 1 and at the planner's largest admitted batch; whole runs if asked."""
    args = work.args
    workload = args.edge_workload
    work.use_model(args.edge_model)
    budget = args.edge_budget
    hf = work.hf("edge", workload, "hf_eager", 1, tuple(args.hf_attn))
    from specontext import parse_budget

    for row in hf:  # HF runs without a budget: does its peak fit the edge's? (CUDA's context not counted)
        row["edge_budget"] = budget
        if row.get("peak_gpu_gb") is not None:
            row["fits_edge_budget"] = row["peak_gpu_gb"] * 1e9 <= parse_budget(budget)
    work.save()
    spec = work.spec("edge", workload, budget, args.edge_batches)
    if args.full_check:
        for row in spec + hf:
            work.full_check(row, workload)
    work.drop_spec()


def main(args, parser: argparse.ArgumentParser) -> None:
    from benchmarks.e2e_workloads_cli import check_arguments

    check_arguments(args, parser)
    if args.device == "cpu":  # a smoke run: two threads of a shared CPU time a tiny model's steps erratically
        torch.set_num_threads(1)
    headline = run(args)
    for key in ("speedup_vs_hf_eager_2k_32k", "tok_s_32k_max_batch", "step_over_roofline_32k_max_batch",
                "edge_speedup_1b_4gb"):
        value = headline.get(key)
        print(f"{key}: {'not measured' if value is None else f'{value:.2f}'}")
