"""The ``specontext`` command (also ``python -m specontext``).

``specontext generate --model PATH_OR_GGUF --prompt-file F --budget 24GB`` streams a completion;
``specontext export --model PATH --budget 24GB --out DIR`` compiles and writes an artifact (``generate
--model DIR`` and ``specontext.load`` run it); ``specontext plan`` prints a memory plan;
``specontext info`` prints versions and the device.

Usage errors (a bad flag value, a missing prompt file, a budget that cannot hold the model, ...) print
one line, ``specontext: error: ...``, and exit with status 2; each is either checked here before the
model loads or one of the library's user-facing errors (``BudgetError``, ``ArtifactError``) caught where
the input is consumed. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import sys
from pathlib import Path
from typing import NoReturn

from .config import DEFAULT_TOKEN_BUDGET, BudgetError, check_compile_step

logger = logging.getLogger(__name__)


class UsageError(Exception):
    """A bad command line: :func:`main` prints it as one line, ``specontext: error: ...``, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (an unknown flag, a value of the wrong type, a missing option) as one line
    too, exit status 2 like argparse's."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)}\n")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def host_to_device_bandwidth(device: str = "cuda", megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second of a pinned host -> GPU copy of ``megabytes`` (median of ``repeats``): the PCIe rate
    offloaded layers load at."""
    import statistics

    import torch

    host = torch.empty(megabytes << 20, dtype=torch.uint8, pin_memory=True)
    target = torch.empty_like(host, device=device)
    target.copy_(host, non_blocking=True)  # warm-up
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return host.numel() / statistics.median(times)


def _info(args: argparse.Namespace) -> int:
    import torch
    import transformers

    import specontext_compiler

    lines = {
        "specontext": specontext_compiler.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import triton

        lines["triton"] = triton.__version__
    except ImportError:
        lines["triton"] = "not installed"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines["device"] = f"{props.name}, {props.total_memory / 2**30:.1f} GiB"
        lines["host -> GPU"] = f"{host_to_device_bandwidth() / 1e9:.1f} GB/s (pinned, 256 MiB copy, median of 5)"
    else:
        lines["device"] = "cpu (no CUDA device)"
        lines["host -> GPU"] = "not measured (no CUDA device)"
    width = max(map(len, lines))
    for key, value in lines.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _read_prompt(args: argparse.Namespace) -> str:
    """The prompt of ``--prompt TEXT`` or ``--prompt-file F`` (``-``: standard input); argparse lets
    exactly one through."""
    if args.prompt is not None:
        prompt, where = args.prompt, "--prompt"
    elif args.prompt_file == "-":
        prompt, where = sys.stdin.read(), "the prompt on standard input (--prompt-file -)"
    else:
        path = Path(args.prompt_file)
        if not path.exists():
            raise UsageError(f"prompt file {str(path)!r} does not exist")
        if not path.is_file():
            raise UsageError(f"prompt file {str(path)!r} is not a file")
        try:
            prompt = path.read_text()
        except (OSError, UnicodeDecodeError) as error:  # unreadable, or not text
            raise UsageError(f"prompt file {str(path)!r} cannot be read as text: {error}") from None
        where = f"prompt file {str(path)!r}"
    if not prompt.strip():
        raise UsageError(f"{where} is empty")
    return prompt


def _sampling(args: argparse.Namespace) -> dict:
    """``generate``'s keyword arguments for --do-sample, --temperature and --top-p (flags left out take the
    model's generation config), checked; --seed is checked here and applied just before generating."""
    if not args.do_sample:
        given = [flag for flag, value in (("--temperature", args.temperature), ("--top-p", args.top_p),
                                          ("--seed", args.seed)) if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only to sampling; add "
                             "--do-sample (greedy decoding is the default)")
        return {"do_sample": False}
    if args.temperature is not None and not (math.isfinite(args.temperature) and args.temperature > 0):
        raise UsageError(f"--temperature must be a positive number; got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1]; got {args.top_p}")
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise UsageError(f"--seed must be an int in 0..2**64-1; got {args.seed}")
    options = {"do_sample": True}
    if args.temperature is not None:
        options["temperature"] = args.temperature
    if args.top_p is not None:
        options["top_p"] = args.top_p
    return options


def _generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    import specontext

    from .artifact import ArtifactError

    if args.max_new_tokens <= 0:
        raise UsageError(f"--max-new-tokens must be a positive number of tokens; got {args.max_new_tokens}")
    sampling = _sampling(args)
    _check_budget(args.budget)
    _device_and_dtype(args)
    prompt = _read_prompt(args)  # after the flags' checks: standard input is read only for a good command
    if (Path(args.model) / "manifest.json").is_file():  # an exported artifact (specontext export)
        if args.tensor_parallel > 1:
            raise UsageError(f"--tensor-parallel {args.tensor_parallel}: an exported artifact runs on one device; "
                             "accepted: --tensor-parallel 1, or the model's directory with --tensor-parallel")
        try:
            fast = specontext.load(args.model, device=args.device, budget=args.budget,
                                   compile_decode_step=args.compile_step, cuda_graph=args.cuda_graph)
        except (ArtifactError, BudgetError) as error:  # a damaged artifact; a budget too small for it
            raise UsageError(str(error)) from None
        tokenizer = fast.tokenizer
        if tokenizer is None:
            raise UsageError(f"artifact {args.model!r} was exported without a tokenizer; export it with one")
    else:
        fast, tokenizer = _compile(args)
    if args.chat and tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if fast.max_positions is not None and ids.shape[1] > fast.max_positions:
        raise UsageError(f"the prompt is {ids.shape[1]} tokens; the model takes at most {fast.max_positions}")
    # Every rank generates the same tokens (docs/tensor_parallel.md): rank 0 alone prints them.
    first = getattr(fast, "tensor_parallel", None) is None or fast.tensor_parallel.rank == 0
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if first else None
    if args.seed is not None:
        torch.manual_seed(args.seed)  # as for HF generate: sampling draws from torch's global generators
    try:
        with torch.no_grad():
            fast.generate(ids, max_new_tokens=args.max_new_tokens, streamer=streamer, **sampling)
    except BudgetError as error:  # the budget holds the weights but not this prompt's KV
        raise UsageError(str(error)) from None
    if first:
        print(summary_line(ids.shape[1], fast.stats), file=sys.stderr)
    return 0


def summary_line(prompt_tokens: int, stats: dict) -> str:
    """The last line of ``specontext generate``: speed, and the KV bytes moved host -> GPU."""
    from .config import format_bytes

    moved = f"KV moved host->GPU {format_bytes(stats['h2d_bytes'])}"
    if stats["h2d_bytes_full_reload"]:
        moved += f" (full reloads would move {format_bytes(stats['h2d_bytes_full_reload'])})"
    return (f"[{prompt_tokens} prompt tokens, {stats['new_tokens']} new; prefill {stats['prefill_seconds']:.2f} s "
            f"({stats['prefill_tokens_per_s']:.0f} tok/s), decode {stats['tokens_per_s']:.1f} tok/s; {moved}; "
            f"KV held {format_bytes(stats['kv_bytes'])}]")


def _plan(args: argparse.Namespace) -> int:
    import specontext
    from specontext_compiler.planning.known_models import load_config

    from .config import validate_token_budget

    _check_budget(args.budget)
    if args.prompt is not None and args.prompt > args.context:
        raise UsageError(f"--prompt {args.prompt} is longer than --context {args.context}")
    try:
        validate_token_budget(args.token_budget)
        config = load_config(args.model)  # a known name, or a config.json the user points at
    except (ValueError, TypeError, OSError) as error:
        raise UsageError(str(error)) from None
    try:
        plan = specontext.plan_memory(config, args.budget, args.context, batch="max" if args.max_batch else args.batch,
                                      token_budget=args.token_budget, prompt=args.prompt,
                                      tensor_parallel=args.tensor_parallel, host_budget=args.host_budget)
    except ValueError as error:  # even every layer offloaded does not fit (BudgetError); heads not divisible
        raise UsageError(str(error)) from None
    print(plan.table())
    if args.png:
        plan.plot(args.png)
        print(f"wrote {args.png}")
    return 0


DTYPES = ("float32", "float16", "bfloat16")


def _device_and_dtype(args: argparse.Namespace) -> None:
    """Fill in --device (cuda if there is one) and --dtype (bfloat16 on a GPU, float32 on the CPU); refuse a
    CUDA device on a machine without one, --cuda-graph on the CPU and --compile-step on CUDA without Triton,
    before any model is loaded."""
    import torch

    cuda = torch.cuda.is_available()
    if args.device is None:
        args.device = "cuda" if cuda else "cpu"
    index = args.device[len("cuda:"):] if args.device.startswith("cuda:") else "0"
    if not (args.device in ("cpu", "cuda") or (args.device.startswith("cuda:") and index.isdigit())):
        raise UsageError(f"--device {args.device!r}: accepted are cpu, cuda, cuda:N")
    if args.device.startswith("cuda") and not cuda:
        raise UsageError(f"--device {args.device!r} but this machine has no CUDA device; accepted: cpu")
    if args.device.startswith("cuda") and int(index) >= torch.cuda.device_count():
        raise UsageError(f"--device {args.device!r} but this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s); accepted: cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if args.cuda_graph and args.device == "cpu":
        raise UsageError("--cuda-graph needs a CUDA device; --device is cpu")
    try:
        check_compile_step(args.compile_step, torch.device(args.device))  # before the model loads
    except ValueError as error:
        raise UsageError(f"--compile-step: {error}") from None
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"


def _check_budget(budget: str) -> None:
    from .config import parse_budget

    try:
        parse_budget(budget)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _compile(args: argparse.Namespace):
    """The model ``--model`` names, compiled with ``--budget``, ``--token-budget`` and ``--offload`` on
    ``--device``; and its tokenizer. Every option is checked before the model is loaded, the model (its
    family, its layers for ``--offload``, its weights against the budget) before it is compiled."""
    import torch

    import specontext
    from specontext_compiler import models

    from .capture import check_supported
    from .config import CompileConfig, check_offload_layers
    from .tensor_parallel import check_divisible

    if args.model != "smollm2" and not Path(args.model).exists():
        raise UsageError(f"model path {args.model!r} does not exist (give a model directory, a .gguf file or smollm2)")
    _check_budget(args.budget)
    offload = args.offload if args.offload in ("auto", "none", "all") else _layers(args.offload)
    _device_and_dtype(args)
    options = dict(token_budget=args.token_budget, offload=offload, prefill_chunk=args.prefill_chunk,
                   compile_decode_step=args.compile_step, cuda_graph=args.cuda_graph,
                   tensor_parallel=args.tensor_parallel)
    try:  # the library's own validation of every option, before the model loads
        config = CompileConfig.from_arguments(args.budget, **options)
    except (ValueError, TypeError) as error:
        raise UsageError(str(error)) from None
    if args.tensor_parallel > 1:
        _check_tensor_parallel(args)
    path = Path(args.model)
    if path.is_dir() and not (path / "config.json").is_file():
        raise UsageError(f"model directory {args.model!r} has no config.json (give a model directory, a .gguf file, "
                         "smollm2, or for generate a directory written by specontext export)")
    load_on = args.device
    if args.tensor_parallel > 1:
        load_on = _join_tensor_parallel(args)  # before the model loads: a bad environment is a usage error
    try:
        model, tokenizer = models.load_model(args.model, dtype=getattr(torch, args.dtype), device=load_on)
    except (OSError, ValueError) as error:  # not a model directory or GGUF file transformers can read
        raise UsageError(f"cannot load model {args.model!r}: {type(error).__name__}: {error}") from None
    try:
        check_supported(model)
        check_offload_layers(config.offload, model.config.num_hidden_layers)
        if args.tensor_parallel > 1:
            check_divisible(model.config, args.tensor_parallel)
    except (TypeError, ValueError) as error:  # a family SpeContext does not compile; --offload past the last layer
        raise UsageError(str(error)) from None
    try:
        return specontext.compile(model, args.budget, **options), tokenizer
    except BudgetError as error:  # the weights alone exceed --budget
        raise UsageError(str(error)) from None


def _check_tensor_parallel(args: argparse.Namespace) -> None:
    """``--tensor-parallel N``: --device cpu or cuda (each rank takes the GPU of its LOCAL_RANK), and N processes
    to run in (torchrun's environment, or a process group), before the model loads."""
    from .tensor_parallel import check_environment

    if args.device not in ("cpu", "cuda"):
        raise UsageError(f"--device {args.device!r} with --tensor-parallel {args.tensor_parallel}: each rank uses the GPU "
                         "of its LOCAL_RANK; accepted: cuda or cpu")
    try:
        check_environment(args.tensor_parallel)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _join_tensor_parallel(args: argparse.Namespace) -> str:
    """Join (or start, from torchrun's environment) the process group of ``--tensor-parallel`` ranks: NCCL for
    --device cuda, gloo for cpu. Returns where to load the model: the CPU, from which each rank copies its
    shard to its own GPU (the whole model need not fit one)."""
    from .tensor_parallel import join_process_group

    join_process_group(args.tensor_parallel, backend="nccl" if args.device == "cuda" else "gloo")
    return "cpu"


def _export(args: argparse.Namespace) -> int:
    import specontext

    from .artifact import check_export_path

    try:
        check_export_path(args.out)  # before the compile, not after it
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.tensor_parallel > 1:
        raise UsageError(f"--tensor-parallel {args.tensor_parallel}: export writes a model for one device; accepted: "
                         "--tensor-parallel 1 (the artifact runs on one GPU)")
    compiled, tokenizer = _compile(args)
    path = specontext.export(compiled, args.out, tokenizer=tokenizer)
    print(f"exported {compiled} to {path}")
    return 0


def _layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--offload {text!r}: accepted are auto, none, all, or comma-separated layer indices") from None


def _token_budget(text: str) -> int | float | None:
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: accepted are a number of tokens, a fraction in (0, 1], or none") from None


def _add_compile_arguments(parser: argparse.ArgumentParser, model_help: str) -> None:
    """--model and the compile options, shared by generate and export."""
    parser.add_argument("--model", required=True, help=model_help)
    parser.add_argument("--budget", default="24GB", help="GPU memory budget, e.g. 24GB (default)")
    parser.add_argument("--token-budget", type=_token_budget, default=DEFAULT_TOKEN_BUDGET,
                        help=f"tokens attended per step: an int, a fraction in (0, 1], or none for dense (default {DEFAULT_TOKEN_BUDGET})")
    parser.add_argument("--offload", default="auto", help="auto (default), none, all, or comma-separated layer indices")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if there is one, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, help="weights' dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    parser.add_argument("--prefill-chunk", type=int, default=2048,
                        help="prompt tokens per prefill step over the batch, at least 16 (default 2048)")
    parser.add_argument("--compile-step", action=argparse.BooleanOptionalAction, default=None,
                        help="compile the decode step with Inductor before its CUDA graph (default: on CUDA with Triton; faster "
                             "steps, ~1 min to compile); --no-compile-step captures it as exported")
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                        help="replay decode steps from a CUDA graph (default: on CUDA); --no-cuda-graph runs them eagerly")
    parser.add_argument("--tensor-parallel", type=_positive_int, default=1,
                        help="shard the model across N GPUs of this host: run the command under torchrun "
                             "--nproc-per-node N; --budget is per GPU (default 1)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive int; got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="specontext", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions and device")
    info.set_defaults(func=_info)

    gen = sub.add_parser("generate", help="stream a completion of a prompt")
    _add_compile_arguments(gen, "model directory, .gguf file, \"smollm2\" (the packaged GGUF), or an exported directory")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompt-file", help="a file holding the prompt; - reads it from standard input")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    gen.add_argument("--no-chat", dest="chat", action="store_false", help="do not apply the chat template")
    gen.add_argument("--do-sample", action="store_true",
                     help="sample instead of greedy decoding (the model's generation config, with the flags below)")
    gen.add_argument("--temperature", type=float, help="sampling temperature, > 0 (with --do-sample)")
    gen.add_argument("--top-p", type=float, help="nucleus sampling: the smallest set of tokens of this probability "
                                                 "mass, in (0, 1] (with --do-sample)")
    gen.add_argument("--seed", type=int, help="seed torch's generators first: the same seed samples the same "
                                              "tokens (with --do-sample)")
    gen.set_defaults(func=_generate)

    plan = sub.add_parser("plan", help="where the KV of a model lives under a budget (memory model)")
    plan.add_argument("--model", required=True, help="llama-3.1-8b, llama-3.1-70b, qwen2.5-7b, qwen3-8b, mistral-7b, or a config.json / its directory")
    plan.add_argument("--budget", required=True, help="GPU memory budget, e.g. 24GB")
    plan.add_argument("--context", type=_positive_int, required=True, help="tokens per sequence (prompt + generated)")
    batch = plan.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=_positive_int, default=1, help="sequences planned together (default 1)")
    batch.add_argument("--max-batch", action="store_true",
                       help="plan the largest batch the budget admits for --context (and --prompt) instead")
    plan.add_argument("--host-budget", help="host memory for the offloaded layers' KV, e.g. 120GB (default: not "
                      "bounded; --max-batch then stays within it too)")
    plan.add_argument("--token-budget", type=_token_budget, default=DEFAULT_TOKEN_BUDGET)
    plan.add_argument("--prompt", type=_positive_int, help="also plan one sequence growing from this many tokens (which layers leave when)")
    plan.add_argument("--png", help="also plot placement and memory against the context length")
    plan.add_argument("--tensor-parallel", type=_positive_int, default=1,
                      help="GPUs the model is sharded across; --budget and the plan are per GPU (default 1)")
    plan.set_defaults(func=_plan)

    export = sub.add_parser("export", help="compile a model and write it to a directory (specontext.load reads it)")
    _add_compile_arguments(export, "model directory, .gguf file, or \"smollm2\" (the packaged GGUF)")
    export.add_argument("--out", required=True, help="the directory to write (must not exist or be empty)")
    export.set_defaults(func=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` (default: ``sys.argv[1:]``); returns the exit status: 0, or 2 for a usage
    error (argparse's own exit with 2 as ``SystemExit``). Other exceptions propagate with their traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except UsageError as error:
        print(f"{parser.prog}: error: {_one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
