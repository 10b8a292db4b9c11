"""One rank of the tensor-parallel tests (tests/test_tensor_parallel.py starts two, with torchrun's environment).

Each rank compiles every scenario with ``tensor_parallel=2`` and generates; it also compiles half of the
scenarios with ``tensor_parallel=1`` (the one-process references; the other rank does the other half, so
the two processes share the work). Everything it finds goes to ``<out>/rank<r>.pt`` (tensors, ints and
strings only), which the test reads.
"""

from __future__ import annotations

import io
import os
import sys
from contextlib import redirect_stderr, redirect_stdout

import torch

torch.set_num_threads(1)

import specontext  # noqa: E402
from specontext.testing import padded_batch, peaked_llama, tiny_model  # noqa: E402
from specontext_compiler.config import GuardSettings  # noqa: E402

#: The guard redoes about half of the steps of the peaked Llama's sparse decode (tests/test_tensor_parallel.py).
GUARD = GuardSettings(threshold=0.3, hold_steps=0, check_every=1, dense_start=0)
#: name -> (model builder, compile options); a prompt of 40 tokens, 16 attended per sparse step. Llama's
#: sparse run with every layer resident is the guard's (a model whose attention is not uniform).
SCENARIOS = {
    "llama_dense": (lambda: tiny_model("llama"), dict(token_budget=None)),
    "llama_guard": (peaked_llama, dict(token_budget=16, guard=GUARD)),
    "llama_offload": (lambda: tiny_model("llama"), dict(token_budget=16, offload="all")),
    "qwen3_dense": (lambda: tiny_model("qwen3"), dict(token_budget=None)),
    "qwen3_sparse": (lambda: tiny_model("qwen3"), dict(token_budget=16)),
    "qwen3_offload": (lambda: tiny_model("qwen3"), dict(token_budget=16, offload="all")),
}
GREEDY = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True)
SAMPLING = dict(max_new_tokens=12, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
STATS = ("attended_tokens_per_step", "kv_bytes", "guard_checks", "guard_triggers", "guard_dense_steps")


def run(compiled, mode: str = "eager") -> dict:
    ids, mask = padded_batch(96, [40, 33], seed=5)
    compiled.engine.decode_mode = mode
    out = compiled.generate(ids, attention_mask=mask, **GREEDY)
    stats = compiled.stats
    return {"tokens": out.sequences, "logits": torch.stack(out.logits), **{k: stats[k] for k in STATS if k in stats}}


def replay(compiled) -> torch.Tensor:
    """Teacher-forced logits of 12 tokens after a 40-token prompt (sparse past the token budget)."""
    ids = torch.randint(3, 96, (2, 52), generator=torch.Generator().manual_seed(7))
    return compiled.replay(ids[:, :40], ids[:, 40:])


def sample(compiled, seed: int) -> torch.Tensor:
    ids, mask = padded_batch(96, [40, 33], seed=5)
    torch.manual_seed(seed)
    return compiled.generate(ids, attention_mask=mask, **SAMPLING)


def graph_facts(compiled) -> dict:
    """The collectives of the exported step: all_reduce nodes, their waits, and whether DCE keeps them."""
    graph = compiled.graph.graph
    reduces = [n for n in graph.nodes if n.target == torch.ops._c10d_functional.all_reduce.default]
    waits = [n for n in graph.nodes if n.target == torch.ops._c10d_functional.wait_tensor.default]
    waited = all(len(n.users) == 1 and next(iter(n.users)).target == torch.ops._c10d_functional.wait_tensor.default
                 for n in reduces)
    used = all(len(n.users) >= 1 for n in waits)
    graph.eliminate_dead_code()
    after = sum(1 for n in graph.nodes if n.target == torch.ops._c10d_functional.all_reduce.default)
    return {"all_reduce": len(reduces), "wait_tensor": len(waits), "waited": waited, "used": used,
            "after_dce": after, "layers": len(compiled.layers)}


def error_of(call) -> str:
    try:
        call()
    except (ValueError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def word_tokenizer():
    """A tokenizer of the tiny models' 96 ids: the words w0..w94 and [UNK] (95), split at whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(95)} | {"[UNK]": 95}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", bos_token="w1", eos_token="w2",
                                   pad_token="w0")


def command_line(out: str, rank: int) -> dict:
    """``specontext generate --tensor-parallel 2`` in this rank (the process group is already up)."""
    from specontext_compiler.cli import main

    import torch.distributed as dist

    folder = os.path.join(out, "model")
    if rank == 0:  # transformers' save_pretrained writes from the main process of a process group only
        tiny_model("llama").save_pretrained(folder)
        word_tokenizer().save_pretrained(folder)
    dist.barrier()
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = main(["generate", "--model", folder, "--prompt", "w5 w7 w9 w11 w13", "--no-chat", "--max-new-tokens", "4",
                     "--budget", "1GB", "--device", "cpu", "--tensor-parallel", "2"])
    return {"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def main(out: str) -> None:
    rank = int(os.environ["RANK"])
    found: dict = {"rank": rank, "results": {}, "references": {}}
    for index, (name, (build, options)) in enumerate(SCENARIOS.items()):
        model = build()
        options = {"guard": False, **options}
        single = None
        if index % 2 == rank:  # this rank's half of the one-process references, compiled first: the sharding
            # then starts from a model whose q/k/v and gate/up are views of the fused weights of that compile
            single = specontext.compile(model, "1GB", progress=False, tensor_parallel=1, **options)
        compiled = specontext.compile(model, "1GB", progress=False, tensor_parallel=2, **options)
        found["results"][name] = run(compiled)
        if name == "llama_guard":  # the fixed-shape step (CUDA graphs' path, uncaptured) with the same guard
            found["results"]["llama_guard_fixed"] = run(compiled, "fixed")
        if name == "qwen3_sparse":
            found["replayed"] = replay(compiled)
        if name == "llama_offload":
            found["sampled"] = sample(compiled, seed=1234)
            # Every rank must sample from the same generator state and get the same prompt: refused otherwise.
            found["different_seeds"] = error_of(lambda: sample(compiled, seed=1234 + rank))
            ids = torch.full((1, 8), 5 + rank)
            found["different_prompts"] = error_of(lambda: compiled.generate(ids, max_new_tokens=2))
            found["graph"] = graph_facts(compiled)
            found["export"] = error_of(lambda: specontext.export(compiled, os.path.join(out, f"artifact{rank}")))
            found["weight_bytes"] = compiled.weight_bytes
            found["model_weights"] = sum(p.numel() * p.element_size() for p in model.parameters())
            found["untouched"] = all(p.shape == q.shape and torch.equal(p, q) for p, q in
                                     zip(model.parameters(), tiny_model("llama").parameters()))
        if single is not None:
            found["references"][name] = run(single)
            if name == "llama_guard":
                found["references"]["llama_guard_fixed"] = run(single, "fixed")
            if name == "qwen3_sparse":
                found["replayed_reference"] = replay(single)
            if name == "llama_offload":
                found["sampled_reference"] = sample(single, seed=1234)
    found["command_line"] = command_line(out, rank)
    torch.save(found, os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
