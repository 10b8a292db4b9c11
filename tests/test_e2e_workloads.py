"""The paper's workloads benchmark (benchmarks/e2e_workloads.py and its modules) on the CPU: the
integration arithmetic, workload parsing and usage errors, the best-batch searches, the headline keys
from fake measurements, the summary's table and PNG, the measurement paths against generate's tokens,
and one tiny end-to-end run through the CLI's code path."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from benchmarks import e2e_rows, e2e_workloads, e2e_workloads_cli, e2e_workloads_summary  # noqa: E402
from benchmarks.e2e_method import (Costs, Deadline, Trial, Workload, integrate_decode, interpolate,  # noqa: E402
                                   largest_admitted, measured_length_grid, parse_workload, predicted_max_batch,
                                   search_best_batch, step_midpoint, tokens_per_second)


@pytest.fixture
def one_thread():
    """Steps of a tiny model time erratically on two shared cores with two threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# -- workloads and the integration ------------------------------------------------------------------------
def test_parse_workload():
    assert parse_workload("2k_32k") == Workload("2k_32k", 2048, 32768)
    assert parse_workload("32K_2k") == Workload("32k_2k", 32768, 2048)
    assert parse_workload("96_40") == Workload("96_40", 96, 40)
    assert parse_workload("2k_32k").end == 34816
    for bad in ("2k", "2k-32k", "k_2", "", "2m_4k", "0_5", "5_1", "-2_4", None):
        with pytest.raises(ValueError, match="workload"):
            parse_workload(bad)


def test_integrate_decode_is_exact_for_piecewise_linear_steps():
    workload = Workload("w", 100, 901)  # steps make the KV 101 .. 1000 tokens long
    positions = range(101, 1001)
    assert integrate_decode([500.0], [0.002], workload) == pytest.approx(900 * 0.002)
    # linear in the context: exact from any two points, even outside the range
    a, b = 0.003, 2e-6
    assert integrate_decode([10.0, 5000.0], [a + b * 10, a + b * 5000], workload) == pytest.approx(
        sum(a + b * c for c in positions), rel=1e-12)
    # a kink at a non-integer length, constant beyond the measured points: the sum over the positions
    lengths, values = [250.5, 640.25, 800.0], [0.010, 0.004, 0.009]
    expected = sum(interpolate(lengths, values, c) for c in positions)
    assert integrate_decode(lengths, values, workload) == pytest.approx(expected, rel=1e-12)
    assert interpolate(lengths, values, 10) == 0.010 and interpolate(lengths, values, 5000) == 0.009
    # a trapezoid over the range would not be the sum: the kink falls between the integers
    trapezoid = 0.5 * (interpolate(lengths, values, 101) + interpolate(lengths, values, 1000)) * 900
    assert not math.isclose(trapezoid, expected, rel_tol=1e-3)


def test_length_grid_spans_the_workload_and_tokens_per_second():
    workload = parse_workload("2k_32k")
    grid = measured_length_grid(workload, 5, 19)
    assert grid[0] == 2048 and grid[-1] == workload.end - 19 and len(grid) == 5
    assert grid == sorted(grid)
    assert step_midpoint(1000, 3, 19) == 1000 + 10.5
    with pytest.raises(ValueError):
        measured_length_grid(Workload("w", 100, 10), 5, 19)
    with pytest.raises(ValueError):
        measured_length_grid(workload, 1, 19)
    assert tokens_per_second(4, 32768, 2.0, 1000.0) == pytest.approx(4 * 32768 / 1002.0)


# -- best batches and the time limit -----------------------------------------------------------------------
def fake_runner(oom_from: int, rate, peak_per_sequence: int | None = None, weights: int = 0):
    calls = []

    def measure(batch: int) -> Trial:
        calls.append(batch)
        if batch >= oom_from:
            return Trial(batch, None)
        peak = None if peak_per_sequence is None else weights + batch * peak_per_sequence
        return Trial(batch, rate(batch), peak)

    return measure, calls


def test_search_doubles_until_out_of_memory_then_tries_halfway():
    measure, calls = fake_runner(oom_from=20, rate=lambda b: 100.0 * b)
    best, trials = search_best_batch(measure, 4)
    assert calls == [4, 8, 16, 32, 24] and best.batch == 16
    measure, calls = fake_runner(oom_from=30, rate=lambda b: 100.0 * b)
    best, _ = search_best_batch(measure, 4)
    assert calls == [4, 8, 16, 32, 24] and best.batch == 24


def test_search_stops_without_gain_and_follows_the_memory_prediction():
    measure, calls = fake_runner(oom_from=10**6, rate=lambda b: 1000.0 * b / (b + 6))  # saturating
    best, _ = search_best_batch(measure, 4, min_gain=0.03)
    # 4: 400, 8: 571, 16: 727, 32: 842, 64: 914, 128: 955 (+4.5%), 256: 977 (+2.3%: stop)
    assert calls == [4, 8, 16, 32, 64, 128, 256] and best.batch == 256
    gib = 2**30
    measure, calls = fake_runner(oom_from=10**6, rate=lambda b: 100.0 * b, peak_per_sequence=5 * gib, weights=16 * gib)
    fits = lambda trials, _: predicted_max_batch(16 * gib, trials, 100 * gib)  # noqa: E731
    best, _ = search_best_batch(measure, 4, fits=fits)
    assert calls == [4, 8, 15] and best.batch == 15  # (0.95 x 100 - 16) / 5 = 15.8
    measure, calls = fake_runner(oom_from=4, rate=lambda b: 1.0)
    assert search_best_batch(measure, 4) == (None, [Trial(4, None)])


def test_largest_admitted_and_deadline():
    assert largest_admitted(lambda b: b <= 37) == 37
    assert largest_admitted(lambda b: b <= 1) == 1
    assert largest_admitted(lambda b: False) is None
    assert largest_admitted(lambda b: True, limit=100) == 100
    now = [0.0]
    deadline = Deadline(100, reserve=10, clock=lambda: now[0])
    assert deadline.allows(80, "a")
    now[0] = 30
    assert not deadline.allows(80, "b") and deadline.allows(60)
    assert deadline.skipped == ["b (estimated 80 s, 70 s left)"]
    assert Deadline(None).allows(1e9)
    with pytest.raises(ValueError):
        Deadline(0)
    costs = Costs(weights=16 * 10**9)
    assert costs.profile("hf", 4, 34816, 0) == pytest.approx(4 * 34816 / 20000)
    costs.observe("hf", 1000, 0.5, 10, 0.2)
    assert costs.profile("hf", 1, 1000, 5) == pytest.approx(0.5 + 5 * 0.02)


# -- usage errors ---------------------------------------------------------------------------------------------
def parse(argv: list[str]):
    from benchmarks.e2e import build_parser

    parser = build_parser()
    args = parser.parse_args(argv)
    e2e_workloads_cli.check_arguments(args, parser)
    return args


@pytest.mark.parametrize("argv, message", [
    (["--workloads", "2k"], "is not <prompt>_<new tokens>"),
    (["--workloads", "2k_1"], "at least 2"),
    (["--lengths", "1"], "--lengths must be >= 2"),
    (["--hf-batch", "0"], "--hf-batch must be >= 1"),
    (["--time-limit", "0"], "--time-limit must be positive"),
    (["--full-check", "-1"], "--full-check must be >= 0"),
    (["--host-memory-fraction", "1.5"], "--host-memory-fraction"),
    (["--spec-batches", "many"], "'resident', 'admitted' or a batch size"),
    (["--spec-batches", "0"], "batch size must be >= 1"),
    (["--spec-budget", "lots", "--device", "cpu", "--model", "tiny"], "--spec-budget"),
    (["--device", "cpu", "--workloads", "2k_32k"], "the 8B shape needs a GPU"),
    (["--workloads", "2k_32k", "--systems", "hf_eager"], "--systems is an option of e2e.py's --contexts path"),
])
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_e2e_cli_dispatches_and_refuses_bad_workloads(monkeypatch, capsys):
    from benchmarks import e2e

    monkeypatch.setattr(sys, "argv", ["e2e", "--workloads", "2k_32k", "--check-only"])
    with pytest.raises(SystemExit):
        e2e.main()
    assert "--check-only does not combine" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["e2e", "--workloads", "32k"])
    with pytest.raises(SystemExit):
        e2e.main()
    assert "is not <prompt>_<new tokens>" in capsys.readouterr().err


# -- rows, headline keys and the summary from fake measurements ----------------------------------------------
GB = 10**9


def fake_hf(batch: int, step_ms: dict, prefill: float, peak: float) -> dict:
    return {"batch": batch, "lengths": [2048, 34000], "measured_at": [2048.0, 34000.0], "step_ms": step_ms,
            "attn_prefill": {impl: {"prefill_seconds": prefill} for impl in step_ms}, "short_tokens": 2,
            "long_tokens": 10, "cache_class": "DynamicCache", "peak_gpu_bytes": int(peak * GB)}


def fake_spec(batch: int, step: float, prefill: float, lengths=(2048, 34000)) -> dict:
    n = len(lengths)
    return {"batch": batch, "lengths": list(lengths), "measured_at": [float(x) for x in lengths], "step_ms": [step] * n,
            "prefill_seconds": prefill, "short_tokens": 3, "long_tokens": 19, "replayed_step_ms": [step] * n,
            "h2d_bytes_per_step": [1e6] * n, "layers_on_host": [4] * n, "offloaded_from_start": 4, "migrations": [],
            "fixed_shape_steps": [[1, 17]] * n, "graph_captures": [[1, 1]] * n, "attended_tokens_per_step": [2048.0] * n,
            "peak_gpu_bytes": 130 * GB}


def fake_rows() -> list[dict]:
    w, edge, big = parse_workload("2k_32k"), parse_workload("2k_16k"), Workload("32k_max_batch", 32768, 20)
    common = dict(weights=16 * GB, kv_per_token=131072, hbm=4.2e12)
    rows = e2e_rows.hf_rows(fake_hf(4, {"sdpa": [30.0, 30.0], "eager": [40.0, 40.0]}, 1.0, 40), w, "hf_eager",
                            section="workload", model="llama_8b", dtype="torch.bfloat16", **common)
    rows += e2e_rows.hf_rows(fake_hf(12, {"sdpa": [50.0, 50.0]}, 3.0, 120), w, "hf_eager", section="workload",
                             model="llama_8b", dtype="torch.bfloat16", **common)
    rows.append(e2e_rows.spec_row(fake_spec(23, 10.0, 4.0), w, section="workload", model="llama_8b", budget="135GB",
                                  policy="resident", token_budget=2048, pcie=50e9, **common))
    rows.append(e2e_rows.error_row("workload", "llama_8b", w, "specontext", 36, "OutOfMemoryError: x",
                                   budget="135GB", batch_policy="admitted"))
    rows.append(e2e_rows.steady_row(e2e_rows.spec_row(fake_spec(24, 8.0, 50.0, (32768,)), big, section="max_batch_32k",
                                                      model="llama_8b", budget="135GB", policy="resident",
                                                      token_budget=2048, pcie=50e9, **common)))
    edge_common = dict(weights=2_471_000_000, kv_per_token=32768, hbm=4.2e12)
    rows += e2e_rows.hf_rows(fake_hf(1, {"sdpa": [20.0, 20.0]}, 0.1, 3.2), edge, "hf_eager", section="edge",
                             model="llama_1b", dtype="torch.bfloat16", **edge_common)
    rows.append(e2e_rows.spec_row(fake_spec(1, 2.0, 0.1), edge, section="edge", model="llama_1b", budget="4GB",
                                  policy="given", token_budget=2048, pcie=50e9, **edge_common))
    return rows


def test_headline_keys_from_fake_measurements():
    rows = fake_rows()
    decode = lambda ms: 32767 * ms / 1e3  # noqa: E731  constant step: every one of the 32,767 steps
    hf_b4 = tokens_per_second(4, 32768, 1.0, decode(30.0))  # sdpa: the faster of the two
    spec = tokens_per_second(23, 32768, 4.0, decode(10.0))
    by = {(r["system"], r["batch"], r.get("attn_implementation")): r for r in rows if r["workload"] == "2k_32k"}
    assert by[("hf_eager", 4, "sdpa")]["tokens_per_s"] == pytest.approx(hf_b4)
    head = e2e_rows.headline(rows)
    assert head["speedup_vs_hf_eager_2k_32k"] == pytest.approx(spec / hf_b4)
    assert head["speedup_vs_hf_eager_best_batch_2k_32k"] == pytest.approx(spec / tokens_per_second(12, 32768, 3.0, decode(50.0)))
    assert head["speedup_vs_hf_static_compile_2k_32k"] is None
    assert head["from_2k_32k"]["hf_eager_batch_4"]["attn_implementation"] == "sdpa"
    assert head["tok_s_32k_max_batch"] == pytest.approx(24 * 1e3 / 8.0)
    roofline_ms = 1e3 * (16 * GB + 24 * 2048 * 131072) / 4.2e12
    assert head["step_over_roofline_32k_max_batch"] == pytest.approx(8.0 / roofline_ms)
    edge_decode = 16383 * 2.0 / 1e3
    assert head["edge_speedup_1b_4gb"] == pytest.approx(
        tokens_per_second(1, 16384, 0.1, edge_decode) / tokens_per_second(1, 16384, 0.1, 16383 * 20.0 / 1e3))
    spec_row = by[("specontext", 23, None)]
    assert spec_row["pcie_floor_ms_per_step"] == [pytest.approx(1e3 * 1e6 / 50e9)] * 2
    assert spec_row["decode_roofline_seconds"] == pytest.approx(
        32767 * (16 * GB + 23 * 2048 * 131072) / 4.2e12)


def test_run_writes_the_keys_and_the_summary_builds_table_and_png(tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    args = parse(["--device", "cpu", "--model", "tiny", "--out", str(tmp_path / "run")])
    run = e2e_workloads.Run(args)
    for row in fake_rows():
        run.add(row)
    written = json.loads((tmp_path / "run.json").read_text())
    for key in e2e_workloads_summary.KEYS:
        assert written["headline"][key] is not None, key
    assert written["method"] == e2e_rows.METHOD and written["hbm_copy_gb_s"] > 0 and not written["complete"]
    summary = e2e_workloads_summary.main([str(tmp_path / "run.json"), "--out", "s", "--results", str(tmp_path)])
    assert summary["headline"]["speedup_vs_hf_eager_2k_32k"] == pytest.approx(written["headline"]["speedup_vs_hf_eager_2k_32k"])
    markdown = (tmp_path / "s.md").read_text()
    assert f"{written['headline']['speedup_vs_hf_eager_2k_32k']:,.2f}" in markdown
    assert "OutOfMemoryError" in markdown and "HF eager (eager)" in markdown
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bars = e2e_workloads_summary.bars(summary["rows"])
    assert set(bars["2k_32k"]) == {"HF eager, best batch", "HF eager, batch 4", "SpeContext, best batch"}
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(SystemExit, match="not a results file"):
        e2e_workloads_summary.main([str(tmp_path / "bad.json"), "--results", str(tmp_path)])


# -- the measurement paths compute what generate computes ---------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from specontext.testing import tiny_model

    return tiny_model("llama").eval()


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_hf_generate_from_a_cut_cache_equals_a_fresh_generate(tiny, kind, one_thread):
    from benchmarks.e2e_hf import extend, forward, generate_from, new_cache

    ids = torch.randint(3, 96, (2, 90), generator=torch.Generator().manual_seed(1))
    cache = new_cache(tiny, kind, 90)
    forward(tiny, ids[:, :30], cache)
    extend(tiny, ids, cache, 30, 80, chunk=16)
    assert int(cache.get_seq_length()) == 80
    for length in (75, 40):  # longest first, as hf_profile cuts
        got = generate_from(tiny, ids, cache, length, 6)
        with torch.no_grad():
            fresh = tiny.generate(ids[:, :length], max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(got, fresh)
        assert int(cache.get_seq_length()) == length + 5


def test_spec_decode_from_an_extended_state_equals_generate(tiny, one_thread):
    """SpeContext, every layer offloaded, fixed-shape decode: the prompt's prefill, chunks up to L, decoding
    from there (twice: the rollback puts the state back) give generate's tokens for a prompt of L tokens."""
    import specontext
    from specontext_compiler.runtime import step_transaction
    from specontext_compiler.runtime.engine import Prefilled, reserved_tokens

    from benchmarks.e2e_spec import _extend, decode_from

    compiled = specontext.compile(tiny, "1GB", token_budget=16, local_window=4, offload="all", prefill_chunk=16,
                                  progress=False, guard=False)
    compiled.engine.decode_mode = "fixed"
    ids = torch.randint(3, 96, (2, 120), generator=torch.Generator().manual_seed(2))
    mask, prompt, end, length = torch.ones_like(ids), 40, 120, 90
    compiled.memory.plan(2, prompt, end)
    prefilled = compiled.engine.prefill(ids[:, :prompt], mask[:, :prompt], reserved_tokens(end))
    logits = _extend(compiled.engine, ids, mask, prompt, length, prefilled.logits)
    state = step_transaction.begin(compiled.runtime)
    at = Prefilled(ids[:, :length], mask[:, :length], logits, 0.0)
    first, stats = decode_from(compiled, at, end, 8, state)
    again, _ = decode_from(compiled, at, end, 8, state)
    assert stats["fixed_shape_steps"] > 0 and stats["h2d_bytes"] > 0
    expected = compiled.generate(ids[:, :length], max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(first[:, :length + 8], expected) and torch.equal(again, first)


def test_planner_batches_follow_the_budget_and_the_host_limit(tiny):
    import specontext

    from benchmarks.e2e_spec import planner_batches

    workload = Workload("w", 64, 4032)  # the KV outgrows the prefill's activations: offloading admits more
    compiled = specontext.compile(tiny, "1GB", token_budget=16, local_window=4, progress=False, guard=False)
    plan = lambda batch: specontext.plan_memory(  # noqa: E731
        tiny, "1GB", context=4096, batch=batch, prompt=64, token_budget=16, window=compiled.window,
        head=compiled.memory.head)
    budget = plan(4).peak_bytes  # four sequences fit exactly with every layer's KV on the GPU
    compiled = specontext.compile(tiny, budget, token_budget=16, local_window=4, progress=False, guard=False)
    found = planner_batches(tiny, compiled, budget, workload, host_bytes=None, policies=("resident", "admitted"))
    assert found["resident"] == 4 and found["admitted"] > 4
    assert planner_batches(tiny, compiled, budget, workload, 0, ("admitted",))["admitted"] == 4  # no host memory


def test_spec_profile_follows_the_plans_migrations(tiny, one_thread):
    """A batch the planner admits only by moving a layer to host memory mid-sequence: the extension's
    chunks move it as they pass its length, as a run's decode steps would, and the steps after it load
    that layer's selection over the (host) link."""
    import specontext

    from benchmarks.e2e_spec import spec_profile

    compiled = specontext.compile(tiny, "1GB", token_budget=16, local_window=4, progress=False, guard=False)
    budget = specontext.plan_memory(tiny, "1GB", context=4096, batch=4, prompt=64, token_budget=16,
                                    window=compiled.window, head=compiled.memory.head).peak_bytes
    compiled = specontext.compile(tiny, budget, token_budget=16, local_window=4, progress=False, guard=False)
    # Where the plan of five sequences moves its layer out: probe before it, between it and the end, at the end.
    until = specontext.plan_memory(tiny, budget, context=4096, batch=5, prompt=64, token_budget=16,
                                   window=compiled.window, head=compiled.memory.head).resident_until
    (exit_at,) = [tokens for tokens in until if tokens < 4096]
    middle = (exit_at + 4000) // 2
    ids = torch.randint(3, 96, (5, 4096), generator=torch.Generator().manual_seed(3))
    profile = spec_profile(compiled, ids, Workload("w", 64, 4032), [64, middle, 4000], steps=4)
    (length, layer), = profile["migrations"]
    assert 64 < length < middle and profile["offloaded_from_start"] == 0
    assert profile["layers_on_host"] == [0, 1, 1]
    assert profile["h2d_bytes_per_step"][0] == 0 and min(profile["h2d_bytes_per_step"][1:]) > 0
    assert all(ms > 0 for ms in profile["step_ms"]) and compiled.memory.retries == 0


# -- one tiny run through the CLI's code path ---------------------------------------------------------------
def test_tiny_end_to_end_run(tmp_path, monkeypatch, one_thread):
    monkeypatch.delenv("OUT", raising=False)
    args = parse(["--device", "cpu", "--model", "tiny", "--edge-model", "tiny", "--workloads", "48_40",
                  "--spec-batches", "2", "--spec-budget", "1GB", "--token-budget", "16", "--lengths", "3",
                  "--hf-steps", "2", "--spec-steps", "3", "--edge", "--edge-budget", "1GB", "--edge-workload", "32_24",
                  "--edge-batches", "1", "2", "--full-check", "30", "--hf-max-batch", "8", "--out", str(tmp_path / "tiny")])
    head = e2e_workloads.run(args)
    written = json.loads((tmp_path / "tiny.json").read_text())
    assert written["complete"] and written["headline"] == head
    rows = {(r["section"], r["system"], r["batch"], r.get("attn_implementation")): r for r in written["rows"]}
    for key in [("workload", "hf_eager", 4, "sdpa"), ("workload", "hf_eager", 4, "eager"),
                ("workload", "hf_static_compile", 4, "sdpa"), ("workload", "specontext", 2, None),
                ("edge", "hf_eager", 1, "sdpa"), ("edge", "specontext", 1, None), ("edge", "specontext", 2, None)]:
        assert key in rows, key
        row = rows[key]
        assert "error" not in row and row["tokens_per_s"] > 0 and len(row["step_ms"]) == 3
        assert row["lengths"][0] == row["prompt"] and row["lengths"][-1] <= row["prompt"] + row["new_tokens"]
    assert head["speedup_vs_hf_eager_48_40"] is not None and head["edge_speedup_1b_4gb"] is not None
    assert [t["batch"] for t in written["hf_batch_search"]["48_40"]["trials"]][:2] == [4, 8]
    assert rows[("workload", "specontext", 2, None)]["full_run"]["steps"] == 39
