"""The command line of the paper's workloads (``benchmarks/e2e_workloads.py``): the options ``e2e.py``
adds to its parser, and the usage errors for values their types cannot refuse alone."""

from __future__ import annotations

import argparse

import torch

from benchmarks.e2e_method import PAPER_WORKLOADS, Workload, parse_workload
from benchmarks.e2e_rows import HF_PAPER_BATCH

SYSTEMS = ("hf_eager", "hf_static_compile", "specontext")
POLICIES = ("resident", "admitted")


def _spec_batches(text: str) -> str | int:
    if text in POLICIES:
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not 'resident', 'admitted' or a batch size") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"batch size must be >= 1; got {value}")
    return value


def _workload(text: str) -> Workload:
    try:
        return parse_workload(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("the paper's workloads (benchmarks/e2e_workloads.py)")
    group.add_argument("--workloads", nargs="+", type=_workload, default=[], metavar="P_N",
                       help=f"[prompt, new tokens] workloads, e.g. {' '.join(PAPER_WORKLOADS)}")
    group.add_argument("--workload-systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    group.add_argument("--hf-batch", type=int, default=HF_PAPER_BATCH, help="HF eager's fixed batch (paper: 4)")
    group.add_argument("--no-hf-search", action="store_true", help="no search for HF eager's best batch")
    group.add_argument("--hf-max-batch", type=int, default=4096, help="the largest batch HF eager's search tries")
    group.add_argument("--hf-attn", nargs="+", choices=("sdpa", "eager"), default=["sdpa", "eager"])
    group.add_argument("--spec-batches", nargs="+", type=_spec_batches, default=list(POLICIES),
                       help="SpeContext's batches: 'resident', 'admitted' (from the planner) or sizes")
    group.add_argument("--spec-budget", default="135GB", help="SpeContext's budget on the workloads")
    group.add_argument("--token-budget", type=int, default=2048)
    group.add_argument("--lengths", type=int, default=5, help="context lengths measured per workload (>= 2)")
    group.add_argument("--hf-steps", type=int, default=8, help="decode steps per HF step-time difference")
    group.add_argument("--spec-steps", type=int, default=16, help="decode steps per SpeContext step-time difference")
    group.add_argument("--full-check", type=float, default=0.0, metavar="SECONDS",
                       help="also run whole generations estimated under SECONDS (0: none)")
    group.add_argument("--edge", action="store_true", help="Llama-3.2-1B shape, [2K, 16K], SpeContext under --edge-budget")
    group.add_argument("--edge-budget", default="4GB")
    group.add_argument("--edge-workload", type=_workload, default=parse_workload("2k_16k"))
    group.add_argument("--edge-batches", nargs="+", type=_spec_batches, default=[1, "admitted"],
                       help="SpeContext's edge batches: sizes or planner policies")
    group.add_argument("--max-batch-32k", action="store_true", help="SpeContext's decode tok/s at 32K, largest batch")
    group.add_argument("--max-batch-policies", nargs="+", choices=POLICIES, default=["resident"])
    group.add_argument("--diagnose-hf", action="store_true", help="HF eager's 32K batch-1 step, three ways")
    group.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                       help="stop starting measurements that would end past SECONDS after the start")
    group.add_argument("--host-memory-fraction", type=float, default=0.5,
                       help="share of the host's available memory SpeContext's offloaded KV may take")
    group.add_argument("--device", default="cuda")
    group.add_argument("--model", choices=("llama_8b", "tiny"), default="llama_8b")
    group.add_argument("--edge-model", choices=("llama_1b", "tiny"), default="llama_1b")


def requested(args) -> bool:
    return bool(args.workloads or args.edge or args.max_batch_32k or args.diagnose_hf)


def check_arguments(args, parser: argparse.ArgumentParser) -> None:
    """Usage errors for values the options' types cannot refuse alone."""
    for name, low in (("hf_batch", 1), ("hf_max_batch", 1), ("lengths", 2), ("hf_steps", 1), ("spec_steps", 1), ("token_budget", 1)):
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}; got {getattr(args, name)}")
    if args.time_limit is not None and args.time_limit <= 0:
        parser.error(f"--time-limit must be positive seconds; got {args.time_limit}")
    if args.full_check < 0:
        parser.error(f"--full-check must be >= 0 seconds; got {args.full_check}")
    if not 0 < args.host_memory_fraction <= 1:
        parser.error(f"--host-memory-fraction must be in (0, 1]; got {args.host_memory_fraction}")
    for name in ("spec_budget", "edge_budget"):
        from specontext import parse_budget

        try:
            parse_budget(getattr(args, name))
        except ValueError as error:
            parser.error(f"--{name.replace('_', '-')}: {error}")
    if getattr(args, "check_only", False):
        parser.error("--check-only does not combine with the workload options")
    own = [name for name in ("systems", "contexts", "batches", "new_tokens", "kernels", "inductor", "inductor_options",
                             "time_waits", "no_guard", "budget", "repeats")
           if hasattr(args, name) and getattr(args, name) != parser.get_default(name)]
    if own:  # e2e.py's 32K path options: not what the workload options read
        parser.error(f"--{own[0].replace('_', '-')} is an option of e2e.py's --contexts path; the workload options "
                     "take --workload-systems, --hf-batch, --spec-batches, --spec-budget, --hf-steps/--spec-steps")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (a CPU smoke run: --device cpu --model tiny --edge-model tiny)")
    if device.type == "cpu" and (args.model != "tiny" or (args.edge and args.edge_model != "tiny")):
        parser.error("--device cpu runs the tiny model only (--model tiny --edge-model tiny): the 8B shape needs a GPU")
