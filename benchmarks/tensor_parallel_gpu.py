"""Tensor parallelism on the GPUs of one host: tokens against one GPU, and each rank's decode step against
its roofline. Not run yet (no multi-GPU machine was lent when it was written); run it under torchrun:

    torchrun --nproc-per-node 2 -m benchmarks.tensor_parallel_gpu --out tensor_parallel_8b_h200x2
    torchrun --nproc-per-node 4 -m benchmarks.tensor_parallel_gpu --shape llama-3.1-70b --out tensor_parallel_70b_h200x4
    torchrun --nproc-per-node 8 -m benchmarks.tensor_parallel_gpu --shape llama-3.1-70b --out tensor_parallel_70b_h200x8
    torchrun --nproc-per-node 2 -m benchmarks.tensor_parallel_gpu --parity-only --out tensor_parallel_parity_h200x2

What each run does, on every rank (rank 0 writes benchmarks/results/<out>.json, and $OUT):

* ``parity``: tiny Llama and Qwen3 in float32, compiled with ``tensor_parallel=N`` and with
  ``tensor_parallel=1`` on the rank's own GPU; dense, sparse and with every layer offloaded, each decoded
  eagerly and from CUDA graphs (``decode_mode`` "eager" / "graph": the graph captures the NCCL
  all-reduces). Greedy tokens must be equal; the largest logit difference is recorded. A case that
  fails records its error instead of ending the run.
* ``speed``: the shape's model with random bf16 weights (decode time does not depend on their values;
  :func:`random_model` builds it in little host memory, so a 70B shape fits any host), random prompts
  of ``--contexts`` tokens at ``--batches``, ``token_budget=2048``. Step time as ``benchmarks/e2e.py``
  measures it (the difference of two generates, and the replayed steps' own interval), against this
  rank's roofline: (this rank's weight bytes + batch x attended tokens x this rank's KV bytes per
  token) / the measured HBM bandwidth, plus 2 x layers all-reduces of a step's hidden states (measured
  on this group: :func:`all_reduce_seconds`). ``--baseline`` also measures the same shape on one GPU
  (rank 0, ``tensor_parallel=1``) where it fits.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import statistics

import torch

logger = logging.getLogger(__name__)

TOKEN_BUDGET = 2048
#: Rows of a random weight are windows of one random pool this many elements apart (see random_model).
ROW_STEP = 7
SHAPES = ("llama-3.1-8b", "llama-3.1-70b")


def strided_random(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """A random-looking tensor of ``shape`` backed by far fewer elements: row i of a matrix is the window of
    one random pool starting at i x :data:`ROW_STEP` (overlapping windows, so neighbouring rows differ by a
    shift). Vectors (norm weights) are ones. Sharding copies each rank's rows into real memory on its GPU."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    rows, cols = shape
    pool = (torch.randn(rows * ROW_STEP + cols, generator=generator) * 0.02).to(dtype)
    return pool.as_strided((rows, cols), (ROW_STEP, 1))


def random_model(shape, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """``shape`` (a name of ``planning.known_models``, or a transformers config) as a model on the CPU whose
    parameters are :func:`strided_random` views: a 70B shape in a few hundred MB of host memory, each rank's
    shard made real only on its GPU by ``specontext.compile(..., tensor_parallel=N)``."""
    import transformers

    from specontext_compiler.planning.known_models import load_config

    if isinstance(shape, str):
        config = load_config(shape)
        config.rope_theta = 500000.0
    else:
        config = shape
    with torch.device("meta"):
        model = getattr(transformers, type(config).__name__.replace("Config", "ForCausalLM"))(config)
    generator = torch.Generator().manual_seed(seed)
    made: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, parameter in module._parameters.items():
            if parameter is not None and id(parameter) not in made:
                made[id(parameter)] = torch.nn.Parameter(strided_random(tuple(parameter.shape), dtype, generator),
                                                         requires_grad=False)
            if parameter is not None:
                module._parameters[name] = made[id(parameter)]
    rotary = model.model.rotary_emb  # its buffers were computed on the meta device: compute them again
    model.model.rotary_emb = type(rotary)(config)
    return model.eval()


def rank_step_bytes(config, batch: int, context: int, size: int, dtype: torch.dtype = torch.bfloat16,
                    token_budget: int | None = TOKEN_BUDGET) -> int:
    """Bytes one of ``size`` ranks reads in a decode step: its weights (estimated from its counts) and, per
    sequence, the KV of its heads at the attended tokens."""
    from specontext_compiler.planning.memory_model import ModelShape
    from specontext_compiler.tensor_parallel import rank_config

    shape = ModelShape.from_config(rank_config(config, size) if size > 1 else config, dtype)
    attended = context if token_budget is None else min(token_budget, context)
    return shape.weight_bytes + batch * attended * shape.kv_layer_token_bytes * shape.num_layers


def roofline_ms(step_bytes: int, hbm_bytes_per_s: float, all_reduce_s: float = 0.0, all_reduces: int = 0) -> float:
    """A step's lower bound: its bytes at the HBM's rate, plus the collectives it waits for."""
    return 1e3 * (step_bytes / hbm_bytes_per_s + all_reduces * all_reduce_s)


def all_reduce_seconds(batch: int, hidden: int, dtype: torch.dtype, device: torch.device, repeats: int = 50) -> float:
    """Median time of one all-reduce of a decode step's hidden states [batch, 1, hidden] on the world group."""
    import torch.distributed as dist

    tensor = torch.randn(batch, 1, hidden, device=device).to(dtype)
    for _ in range(5):
        dist.all_reduce(tensor)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dist.all_reduce(tensor)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def parity(size: int, device: torch.device) -> dict:
    """Greedy tokens of tensor_parallel=size against tensor_parallel=1 on this rank's GPU (module docstring)."""
    import specontext
    from specontext.testing import padded_batch, tiny_model

    results = {}
    ids, mask = padded_batch(96, [48, 31], seed=5)
    for family in ("llama", "qwen3"):
        for name, options in (("dense", dict(token_budget=None)), ("sparse", dict(token_budget=16)),
                              ("offload_all", dict(token_budget=16, offload="all"))):
            for mode in ("eager", "graph"):
                case = f"{family} {name} {mode}"
                try:
                    sharded = specontext.compile(tiny_model(family), "8GB", progress=False, guard=False,
                                                 tensor_parallel=size, **options)
                    single = specontext.compile(tiny_model(family).to(device), "8GB", progress=False, guard=False,
                                                **options)
                    outputs = []
                    for compiled in (sharded, single):
                        compiled.engine.decode_mode = mode
                        outputs.append(compiled.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                                                         return_dict_in_generate=True, output_logits=True))
                    tp, one = outputs
                    results[case] = {
                        "tokens_equal": bool(torch.equal(tp.sequences.cpu(), one.sequences.cpu())),
                        "tokens": tp.sequences.cpu().tolist(),  # compared across the ranks in the JSON
                        "max_logit_difference": max(float((a - b).abs().max()) for a, b in zip(tp.logits, one.logits)),
                        "fixed_shape_steps": sharded.stats["fixed_shape_steps"],
                    }
                except Exception as error:  # recorded: the run goes on to the other cases
                    results[case] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
                logger.warning("parity %s: %s", case, {k: v for k, v in results[case].items() if k != "tokens"})
    return results


def speed(shape_name: str, size: int, contexts: list[int], batches: list[int], budget: str, new_tokens: int,
          device: torch.device, tensor_parallel: int) -> list[dict]:
    """Step times of the shape at each context and batch (module docstring), compiled with ``tensor_parallel``."""
    import specontext
    from benchmarks.e2e import difference_lengths, hbm_bandwidth, steady_step_ms

    model = random_model(shape_name)
    if tensor_parallel == 1:  # one GPU holds the whole model (a tensor-parallel rank copies its shard itself)
        model = model.to(device)
    compiled = specontext.compile(model, budget, token_budget=TOKEN_BUDGET, progress=False,
                                  tensor_parallel=tensor_parallel)
    compiled.engine.time_steps = True
    hbm = hbm_bandwidth()
    rows = []
    for context in contexts:
        for batch in batches:
            generator = torch.Generator().manual_seed(context + batch)
            ids = torch.randint(10, 120000, (batch, context), generator=generator)
            row = {"shape": shape_name, "tensor_parallel": tensor_parallel, "context": context, "batch": batch}

            def generate(tokens: int) -> dict:
                compiled.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
                return dict(compiled.stats)

            torch.cuda.reset_peak_memory_stats(device)
            try:
                short, long = difference_lengths(compiled, new_tokens)
                generate(long)  # warm-up: every kind of step compiled and captured
                times, replayed, stats = steady_step_ms(generate, short, long, repeats=3)
            except torch.OutOfMemoryError as error:
                row["error"] = f"out of memory: {str(error).splitlines()[0]}"
                rows.append(row)
                continue
            collectives = all_reduce_seconds(batch, model.config.hidden_size, torch.bfloat16, device) if tensor_parallel > 1 else 0.0
            step_bytes = rank_step_bytes(model.config, batch, context, tensor_parallel)
            row.update(ms_per_step=statistics.median(times), ms_per_step_repeats=times,
                       replayed_step_ms=None if None in replayed else statistics.median(replayed),
                       prefill_seconds=stats["prefill_seconds"], rank_step_bytes=step_bytes,
                       all_reduce_ms=1e3 * collectives, hbm_bytes_per_s=hbm,
                       roofline_ms=roofline_ms(step_bytes, hbm),
                       roofline_with_all_reduces_ms=roofline_ms(step_bytes, hbm, collectives,
                                                                2 * model.config.num_hidden_layers if tensor_parallel > 1 else 0),
                       peak_gpu_gb=torch.cuda.max_memory_allocated(device) / 1e9, fixed_shape_steps=stats["fixed_shape_steps"])
            row["step_over_roofline"] = row["ms_per_step"] / row["roofline_ms"]
            logger.warning("speed %s", row)
            rows.append(row)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="llama-3.1-8b")
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--budget", default="120GB", help="per GPU (default 120GB: an H200 less a margin)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--parity-only", action="store_true")
    parser.add_argument("--baseline", action="store_true", help="also the shape on one GPU (rank 0), where it fits")
    parser.add_argument("--out", default="tensor_parallel_gpu")
    return parser


def main(argv: list[str] | None = None) -> None:
    import torch.distributed as dist

    from benchmarks.results_file import write_results
    from specontext_compiler.tensor_parallel import join_process_group

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s rank " + os.environ.get("RANK", "?") + ": %(message)s")
    size = int(os.environ.get("WORLD_SIZE", "1"))
    tp = join_process_group(size)  # NCCL from torchrun's environment
    found = parity(size, tp.device)
    every_rank: list = [None] * size  # each rank's own comparison: all must hold, not rank 0's alone
    dist.all_gather_object(every_rank, found)
    payload = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(tp.device),
               "world_size": size, "torch": torch.__version__, "parity": every_rank}
    if not args.parity_only:
        payload["speed"] = speed(args.shape, size, args.contexts, args.batches, args.budget, args.new_tokens, tp.device, size)
        if args.baseline:
            if tp.rank == 0:
                payload["speed_one_gpu"] = speed(args.shape, 1, args.contexts, args.batches, args.budget, args.new_tokens,
                                                 tp.device, 1)
            dist.barrier()
    if tp.rank == 0:
        write_results(payload, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
