"""The ``specontext`` command.

``specontext generate --model PATH_OR_GGUF --prompt-file F --budget 24GB`` streams a completion;
``specontext export --model PATH --budget 24GB --out DIR`` compiles and writes an artifact (``generate
--model DIR`` and ``specontext.load`` run it); ``specontext plan`` prints a memory plan;
``specontext info`` prints versions and the device.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
from pathlib import Path

from .config import DEFAULT_TOKEN_BUDGET

logger = logging.getLogger(__name__)


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


def _generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    import specontext

    prompt_path = Path(args.prompt_file)
    if not prompt_path.is_file():
        raise SystemExit(f"error: prompt file {str(prompt_path)!r} does not exist")
    prompt = prompt_path.read_text()
    if not prompt.strip():
        raise SystemExit(f"error: prompt file {str(prompt_path)!r} is empty")
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be a positive number of tokens; got {args.max_new_tokens}")
    if (Path(args.model) / "manifest.json").is_file():  # an exported artifact (specontext export)
        _device_and_dtype(args)
        fast = specontext.load(args.model, device=args.device, budget=args.budget, compile_decode_step=args.compile_step, cuda_graph=args.cuda_graph)
        tokenizer = fast.tokenizer
        if tokenizer is None:
            raise ValueError(f"artifact {args.model!r} was exported without a tokenizer; export it with one")
    else:
        fast, tokenizer = _compile(args)
    if args.chat and tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)  # prints each token as it comes
    with torch.no_grad():
        fast.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer)
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

    config = load_config(args.model)
    plan = specontext.plan_memory(config, args.budget, args.context, batch=args.batch, token_budget=args.token_budget,
                                  prompt=args.prompt)
    print(plan.table())
    if args.png:
        plan.plot(args.png)
        print(f"wrote {args.png}")
    return 0


DTYPES = ("float32", "float16", "bfloat16")


def _device_and_dtype(args: argparse.Namespace) -> None:
    """Fill in --device (cuda if there is one) and --dtype (bfloat16 on a GPU, float32 on the CPU); refuse a
    CUDA device on a machine without one, before any model is loaded."""
    import torch

    cuda = torch.cuda.is_available()
    if args.device is None:
        args.device = "cuda" if cuda else "cpu"
    if not (args.device == "cpu" or args.device == "cuda" or args.device.startswith("cuda:")):
        raise ValueError(f"--device {args.device!r}: accepted are cpu, cuda, cuda:N")
    if args.device.startswith("cuda") and not cuda:
        raise ValueError(f"--device {args.device!r} but this machine has no CUDA device; accepted: cpu")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"


def _compile(args: argparse.Namespace):
    """The model ``--model`` names, compiled with ``--budget``, ``--token-budget`` and ``--offload`` on
    ``--device``; and its tokenizer. Every option is checked before the model is loaded."""
    import torch

    import specontext
    from specontext_compiler.models import load_model

    from .config import CompileConfig

    if args.model != "smollm2" and not Path(args.model).exists():
        raise FileNotFoundError(f"model path {args.model!r} does not exist (give a model directory, a .gguf file or smollm2)")
    offload = args.offload if args.offload in ("auto", "none", "all") else _layers(args.offload)
    _device_and_dtype(args)
    options = dict(token_budget=args.token_budget, offload=offload, prefill_chunk=args.prefill_chunk,
                   compile_decode_step=args.compile_step, cuda_graph=args.cuda_graph)
    CompileConfig.from_arguments(args.budget, **options)  # bad options fail here, before the model loads
    model, tokenizer = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    return specontext.compile(model, args.budget, **options), tokenizer


def _export(args: argparse.Namespace) -> int:
    import specontext

    compiled, tokenizer = _compile(args)
    path = specontext.export(compiled, args.out, tokenizer=tokenizer)
    print(f"exported {compiled} to {path}")
    return 0


def _layers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--offload {text!r}: accepted are auto, none, all, or comma-separated layer indices") from None


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
    parser.add_argument("--prefill-chunk", type=int, default=2048, help="prompt tokens per prefill step (default 2048)")
    parser.add_argument("--compile-step", action=argparse.BooleanOptionalAction, default=None,
                        help="compile the decode step with Inductor before its CUDA graph (default: on CUDA; faster "
                             "steps, ~1 min to compile); --no-compile-step captures it as exported")
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                        help="replay decode steps from a CUDA graph (default: on CUDA); --no-cuda-graph runs them eagerly")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specontext", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions and device")
    info.set_defaults(func=_info)

    gen = sub.add_parser("generate", help="stream a completion of a prompt file")
    _add_compile_arguments(gen, "model directory, .gguf file, \"smollm2\" (the packaged GGUF), or an exported directory")
    gen.add_argument("--prompt-file", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--no-chat", dest="chat", action="store_false", help="do not apply the chat template")
    gen.set_defaults(func=_generate)

    plan = sub.add_parser("plan", help="where the KV of a model lives under a budget (memory model)")
    plan.add_argument("--model", required=True, help="llama-3.1-8b, qwen2.5-7b, qwen3-8b, mistral-7b, or a config.json / its directory")
    plan.add_argument("--budget", required=True, help="GPU memory budget, e.g. 24GB")
    plan.add_argument("--context", type=int, required=True, help="tokens per sequence (prompt + generated)")
    plan.add_argument("--batch", type=int, default=1)
    plan.add_argument("--token-budget", type=_token_budget, default=DEFAULT_TOKEN_BUDGET)
    plan.add_argument("--prompt", type=int, help="also plan one sequence growing from this many tokens (which layers leave when)")
    plan.add_argument("--png", help="also plot placement and memory against the context length")
    plan.set_defaults(func=_plan)

    export = sub.add_parser("export", help="compile a model and write it to a directory (specontext.load reads it)")
    _add_compile_arguments(export, "model directory, .gguf file, or \"smollm2\" (the packaged GGUF)")
    export.add_argument("--out", required=True, help="the directory to write (must not exist or be empty)")
    export.set_defaults(func=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        # Bad input: one clear line, not a traceback.
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
