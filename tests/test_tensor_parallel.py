"""Tensor parallelism on the CPU: two processes with gloo, started with torchrun's environment variables
(tests/tensor_parallel_worker.py), against one process; and what is refused without them."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import specontext
from specontext.testing import tiny_model
from specontext_compiler.planning import weight_bytes
from specontext_compiler.planning.known_models import load_config
from specontext_compiler.sharding import sharded_projections
from specontext_compiler.tensor_parallel import rank_config, rank_weight_bytes

ROOT = Path(__file__).parents[1]
WORKER = Path(__file__).with_name("tensor_parallel_worker.py")
SCENARIOS = ["llama_dense", "llama_guard", "llama_guard_fixed", "llama_offload", "qwen3_dense", "qwen3_sparse",
             "qwen3_offload"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Both ranks' findings (one run of the two processes for the whole file)."""
    out = tmp_path_factory.mktemp("tensor_parallel")
    port = _free_port()
    processes = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        processes.append(subprocess.Popen([sys.executable, str(WORKER), str(out)], env=env, cwd=ROOT,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for process in processes:
        try:
            logs.append(process.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            pytest.fail("the tensor-parallel ranks did not finish in 240 s")
    failed = [f"rank {rank} failed:\n{log[-3000:]}" for rank, (process, log) in enumerate(zip(processes, logs))
              if process.returncode != 0]
    assert not failed, "\n".join(failed)
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(2)]


def _reference(ranks, name):
    return ranks[0]["references"].get(name) or ranks[1]["references"][name]


@pytest.mark.parametrize("name", SCENARIOS)
def test_two_ranks_generate_the_tokens_of_one_process(ranks, name):
    expected = _reference(ranks, name)
    for found in ranks:
        got = found["results"][name]
        assert torch.equal(got["tokens"], expected["tokens"]), (found["rank"], got["tokens"], expected["tokens"])
        # Same logits up to the order of float32 sums (partial products summed by the all-reduce).
        torch.testing.assert_close(got["logits"], expected["logits"], rtol=1e-4, atol=1e-4)
    # Each rank holds the KV of half the heads.
    assert ranks[0]["results"][name]["kv_bytes"] * 2 == expected["kv_bytes"]
    if "sparse" in name or "offload" in name:
        assert ranks[0]["results"][name]["attended_tokens_per_step"] == 16  # decode steps were sparse
    if "guard" in name:  # sparse steps, and the dense redos of those the guard caught
        assert 16 < ranks[0]["results"][name]["attended_tokens_per_step"] < 40


@pytest.mark.parametrize("name", ["llama_guard", "llama_guard_fixed"])
def test_the_guard_decides_the_same_steps_on_every_rank_as_one_process(ranks, name):
    expected = _reference(ranks, name)
    assert 0 < expected["guard_triggers"] < expected["guard_checks"]  # some steps redone, not all
    for found in ranks:
        got = found["results"][name]
        assert (got["guard_checks"], got["guard_triggers"], got["guard_dense_steps"]) == (
            expected["guard_checks"], expected["guard_triggers"], expected["guard_dense_steps"])


def test_replay_gives_the_logits_of_one_process(ranks):
    reference = ranks[0].get("replayed_reference")
    reference = reference if reference is not None else ranks[1]["replayed_reference"]
    assert reference.shape == (2, 12, 96)
    for found in ranks:
        torch.testing.assert_close(found["replayed"], reference, rtol=1e-4, atol=1e-4)


def test_seeded_sampling_matches_one_process_and_needs_the_same_seed_everywhere(ranks):
    reference = ranks[0].get("sampled_reference")
    reference = reference if reference is not None else ranks[1]["sampled_reference"]
    assert torch.equal(ranks[0]["sampled"], reference) and torch.equal(ranks[1]["sampled"], reference)
    for found in ranks:
        assert found["different_seeds"].startswith("ValueError: tensor_parallel=2: the random generator's state")
        assert found["different_prompts"].startswith("ValueError: tensor_parallel=2: the prompt")


def test_the_step_graph_holds_one_all_reduce_after_attention_and_one_after_the_mlp(ranks):
    for found in ranks:
        graph = found["graph"]
        assert graph["all_reduce"] == graph["wait_tensor"] == 2 * graph["layers"] == 4
        assert graph["waited"] and graph["used"]  # each sum is waited for, and the wait's result is read
        assert graph["after_dce"] == graph["all_reduce"]  # dead-code elimination keeps them


def test_each_rank_holds_its_shard_and_the_users_model_is_untouched(ranks):
    for found in ranks:
        assert found["untouched"]
        assert found["weight_bytes"] == rank_weight_bytes(tiny_model("llama"), 2) < found["model_weights"]
        assert found["export"].startswith("ValueError: specontext.export takes a model compiled with tensor_parallel=1")


def test_the_command_line_generates_under_torchrun_and_rank_0_prints(ranks):
    first, second = ranks[0]["command_line"], ranks[1]["command_line"]
    assert first["code"] == second["code"] == 0, (first, second)
    assert first["stdout"].strip() and re.search(r"\[\d+ prompt tokens, 4 new", first["stderr"])
    assert second["stdout"] == "" and "prompt tokens" not in second["stderr"]


def test_rank_weight_bytes_counts_half_of_each_projection_and_the_rest_whole():
    model = tiny_model("llama")
    total = weight_bytes(model)  # parameters and buffers
    sharded = sum(p.module.weight.numel() * 4 for p in sharded_projections(model))
    assert rank_weight_bytes(model, 2) == total - sharded // 2
    assert rank_weight_bytes(model, 1) == total
    phi3 = tiny_model("phi3")  # fused qkv and gate_up: each section split
    assert [p.parts for p in sharded_projections(phi3)][:2] == [(64, 32, 32), (64,)]


def test_plan_memory_is_per_rank():
    config = load_config("llama-3.1-70b")
    four = specontext.plan_memory(config, "80GB", 32768, dtype=torch.bfloat16, tensor_parallel=4)
    per_rank = rank_config(config, 4)
    assert (per_rank.num_attention_heads, per_rank.num_key_value_heads, per_rank.intermediate_size, per_rank.head_dim) == (
        16, 2, 7168, 128)
    parts = four.breakdown()
    # 70B in bf16: embeddings and LM head whole (2 x 128256 x 8192), a quarter of the 80 layers' projections.
    layer = 8192 * (8192 + 2 * 1024 + 8192) + 3 * 8192 * 28672
    expected = 2 * (2 * 128256 * 8192 + 80 * (layer // 4 + 2 * 8192) + 8192)
    assert parts["weights"] == expected
    assert parts["kv_resident"] == four.resident * 32768 * 2 * 2 * 128 * 2  # 2 of the 8 KV heads per rank
    assert four.to_dict()["tensor_parallel"] == 4 and "per GPU" in four.table()
    with pytest.raises(ValueError, match=r"tensor_parallel=3 does not divide the model's 64 attention heads"):
        specontext.plan_memory(config, "80GB", 32768, tensor_parallel=3)


def test_cli_plan_takes_tensor_parallel(capsys):
    from specontext_compiler.cli import main

    assert main(["plan", "--model", "llama-3.1-70b", "--budget", "80GB", "--context", "32768",
                 "--tensor-parallel", "8"]) == 0
    out = capsys.readouterr().out
    assert "tensor parallel 8: per rank (one GPU)" in out and "budget 80.0 GB per GPU" in out
    assert main(["plan", "--model", "llama-3.1-8b", "--budget", "24GB", "--context", "4096",
                 "--tensor-parallel", "3"]) == 2
    assert "does not divide the model's 32 attention heads" in capsys.readouterr().err


def test_the_dynamo_backend_refuses_tensor_parallel():
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="specontext", options={"tensor_parallel": 2})
    with pytest.raises(Exception, match="for tensor parallelism use specontext.compile"):
        compiled(torch.ones(1, 4, dtype=torch.long))


def test_the_gpu_benchmark_builds_random_shards_and_rooflines_on_the_cpu():
    from benchmarks.tensor_parallel_gpu import build_parser, random_model, rank_step_bytes, roofline_ms

    config = tiny_model("llama", num_hidden_layers=3).config
    model = random_model(config, dtype=torch.float32)
    parameters = list(model.parameters())
    # Every parameter real (no meta), random rows that differ, in far less memory than their size.
    assert all(p.device.type == "cpu" for p in parameters)
    embeddings = model.get_input_embeddings().weight
    assert not torch.equal(embeddings[0], embeddings[1]) and embeddings.abs().max() > 0
    assert sum(p.untyped_storage().nbytes() for p in parameters) < sum(p.numel() * 4 for p in parameters) / 3
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    # The roofline's bytes: this rank's weights as the library counts them, and its KV heads' share.
    attended_kv = 16 * (2 * 1 * 16 * 4) * 3  # 16 tokens, 1 of 2 KV heads of 16 dims, float32, 3 layers
    assert rank_step_bytes(config, 1, 100, 2, torch.float32, token_budget=16) == (
        rank_weight_bytes(model, 2) - buffers + attended_kv)
    assert roofline_ms(4e9, 4e12, 1e-5, 64) == pytest.approx(1.0 + 0.64)
    # A model of strided random weights compiles and generates (one process here; a rank copies its shard).
    compiled = specontext.compile(model, "1GB", token_budget=16, progress=False)
    assert compiled.generate(torch.ones(1, 8, dtype=torch.long), max_new_tokens=2).shape == (1, 10)
    args = build_parser().parse_args(["--shape", "llama-3.1-70b", "--batches", "1", "16", "--parity-only"])
    assert args.shape == "llama-3.1-70b" and args.batches == [1, 16] and args.parity_only
