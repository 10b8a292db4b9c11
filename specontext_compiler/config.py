"""Options of :func:`specontext.compile`, validated before any work starts."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_BUDGET_RE = re.compile(r"^\s*([+-]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
_ACCEPTED_BUDGET = 'a positive number of bytes (int) or a string such as "24GB", "24 GB", "24GiB", "512MB", "1.5GB"'

# More than any machine has: catches typos such as "24000GB" meant as MB.
MAX_BUDGET_BYTES = 2**50


class BudgetError(ValueError):
    """The memory budget cannot hold the model: its weights, or the KV of the batch and length asked for.

    A ``ValueError`` like every refusal of a bad budget; its own class lets the ``specontext`` command tell
    it (a usage error) from any other ``ValueError`` (a bug, which keeps its traceback)."""


def parse_budget(budget: int | str) -> int:
    """GPU memory budget -> bytes. Decimal units (GB = 1e9) and binary units (GiB = 2**30)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, str)):
        raise TypeError(f"budget must be {_ACCEPTED_BUDGET}; got {budget!r} of type {type(budget).__name__}")
    if isinstance(budget, int):
        value = budget
    else:
        match = _BUDGET_RE.match(budget)
        if not match:
            raise ValueError(f"budget {budget!r} is not understood; expected {_ACCEPTED_BUDGET}")
        number, unit = match.groups()
        unit = unit.upper() or "B"
        if unit not in _UNITS:
            raise ValueError(
                f"budget {budget!r} has unknown unit {match.group(2)!r}; accepted units: "
                f"{', '.join(u if 'I' not in u else u[:-2] + 'iB' for u in _UNITS)}"
            )
        value = float(number) * _UNITS[unit]
        if not math.isfinite(value):
            raise ValueError(f"budget {budget!r} is not a finite size; expected {_ACCEPTED_BUDGET}")
        value = int(value)
    if value <= 0:
        raise ValueError(f"budget must be positive; got {budget!r}. Expected {_ACCEPTED_BUDGET}")
    if value > MAX_BUDGET_BYTES:
        raise ValueError(f"budget {budget!r} = {value / 1e12:.0f} TB is larger than any GPU; expected {_ACCEPTED_BUDGET}")
    return value


def format_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def validate_token_budget(token_budget: int | float | None) -> int | float | None:
    """None (dense), a positive int of tokens, or a float fraction of the context in (0, 1]."""
    accepted = "None (dense attention), a positive int of tokens, or a float fraction of the context in (0, 1]"
    if token_budget is None:
        return None
    if isinstance(token_budget, bool) or not isinstance(token_budget, (int, float)):
        raise TypeError(f"token_budget must be {accepted}; got {token_budget!r} of type {type(token_budget).__name__}")
    if isinstance(token_budget, int):
        if token_budget <= 0:
            raise ValueError(f"token_budget must be {accepted}; got {token_budget}")
        return token_budget
    if not (0.0 < token_budget <= 1.0) or math.isnan(token_budget):
        raise ValueError(f"token_budget must be {accepted}; got the float {token_budget}")
    return token_budget


def check_sticky_margin(margin: float) -> float:
    """A sticky margin must be a finite float >= 0 (0.0: off)."""
    accepted = "a finite float >= 0.0 in the retrieval scores' units (0.0: off)"
    if isinstance(margin, bool) or not isinstance(margin, float):
        raise TypeError(f"sticky_margin must be {accepted}; got {margin!r} of type {type(margin).__name__}")
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"sticky_margin must be {accepted}; got {margin!r}")
    return margin


def check_cuda_graph(config: CompileConfig, device) -> None:
    """``cuda_graph=True`` where the model does not run on CUDA, and ``compile_decode_step=True`` on CUDA
    without Triton (Inductor's CUDA code is Triton): refused before any work (compile, load)."""
    if config.cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device; the model runs on {device}")
    check_compile_step(config.compile_decode_step, device)


def check_compile_step(compile_decode_step: bool | None, device: torch.device) -> None:
    """``compile_decode_step=True`` on CUDA needs Triton: Inductor's CUDA code is Triton."""
    if compile_decode_step and device.type == "cuda":
        from .kernels import INSTALL_TRITON, TRITON_AVAILABLE

        if not TRITON_AVAILABLE:
            raise ValueError(f"compile_decode_step=True on CUDA needs Triton, which is not installed; install it: "
                             f"{INSTALL_TRITON}")


def check_offload_layers(offload: str | tuple[int, ...], layers: int) -> None:
    """A list of layers to offload must name layers the model has."""
    bad = [] if isinstance(offload, str) else [layer for layer in offload if layer >= layers]
    if bad:
        raise ValueError(f"offload lists layers {bad}; the model has layers 0..{layers - 1}")


#: Prompt tokens per prefill step over the whole batch (``CompileConfig.prefill_chunk``).
DEFAULT_PREFILL_CHUNK = 2048
#: A prefill step feeds each row a multiple of this many tokens, and at least this many
#: (``runtime.engine.prefill_row_chunk``).
MIN_PREFILL_CHUNK = 16
#: Dense attention with a mask expands K/V to the query heads in groups of rows (or KV heads) of at most
#: this many bytes (``runtime.attention_runtime.dense_attention``). 256 MiB is about one default prefill
#: step's MLP activations at the Llama-3.1-8B shape (2048 tokens x 4 x 14336 x 2 bytes = 224 MiB): the
#: expansion no longer dominates a step, and at 32K tokens a row takes two SDPA calls per layer.
DENSE_EXPANSION_BYTES = 256 * 2**20

# How sparse steps pick tokens: the retrieval head (the method) or a baseline measured against it.
#: Sparse by default: measured on SmolLM2 at 2K tokens with 256 (docs/accuracy.md), 2048 is far inside it.
DEFAULT_TOKEN_BUDGET = 2048
OFFLOAD_MODES = ("auto", "none", "all")
SELECTIONS = ("retrieval_head", "streaming", "quest", "oracle")
#: Sticky selection's margin: off. docs/offload.md: 0.003 cost no accuracy on SmolLM2's report split, but a
#: margin makes tokens depend on which layers are offloaded (offloaded would no longer equal resident).
DEFAULT_STICKY_MARGIN = 0.0


def _non_negative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int; got {value!r}")
    return value


#: Coverage below which a step is redone densely (docs/accuracy.md: chosen on the fit split).
DEFAULT_THRESHOLD = 0.65
#: Dense steps after a trigger before the selection is tried again.
DEFAULT_HOLD_STEPS = 16
#: Steps between two host reads of the coverage (docs/accuracy.md: the read's cost on an H200 at batch 1).
DEFAULT_CHECK_EVERY = 8
#: Decode steps at the start of each sequence that attend densely (docs/accuracy.md: the fifth round).
DEFAULT_DENSE_START = 16
#: Whether compile turns the guard on when not told (tests of other features turn it off: tests/conftest.py).
DEFAULT_GUARD = True


@dataclass(frozen=True)
class GuardSettings:
    """How the accuracy guard decides (runtime/accuracy_guard.py).

    Attributes:
        threshold: minimum coverage, in [0, 1): one minus the guard layer's attention mass that the best
            selection of the same size (that layer's top-k) holds and a step's selection misses.
        hold_steps: dense steps after a trigger before selecting again.
        check_every: one step in ``check_every`` is measured and its coverage read on the host (a read
            makes the host wait for the GPU, and the measurement is a few percent of a step at long
            contexts; docs/benchmarks.md); a miss there redoes that step.
        layer: the guard layer; None: the retrieval head's (deepest) scoring layer, or the deepest of the
            draft-free head's default layers, moved to the nearest full-attention layer whose KV stays on
            the GPU.
        dense_start: the first ``dense_start`` decode steps of each sequence attend densely, as during a
            hold (a short answer's tokens come from the whole context); not where layers start offloaded,
            whose dense steps would read their whole KV over PCIe.
    """

    threshold: float = DEFAULT_THRESHOLD
    hold_steps: int = DEFAULT_HOLD_STEPS
    check_every: int = DEFAULT_CHECK_EVERY
    layer: int | None = None
    dense_start: int = DEFAULT_DENSE_START

    def __post_init__(self):
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not 0 <= self.threshold < 1:
            raise ValueError(f"guard threshold must be a number in [0, 1); got {self.threshold!r}")
        if isinstance(self.hold_steps, bool) or not isinstance(self.hold_steps, int) or self.hold_steps < 0:
            raise ValueError(f"guard hold_steps must be a non-negative int; got {self.hold_steps!r}")
        if isinstance(self.check_every, bool) or not isinstance(self.check_every, int) or self.check_every < 1:
            raise ValueError(f"guard check_every must be a positive int; got {self.check_every!r}")
        if isinstance(self.dense_start, bool) or not isinstance(self.dense_start, int) or self.dense_start < 0:
            raise ValueError(f"guard dense_start must be a non-negative int; got {self.dense_start!r}")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0):
            raise ValueError(f"guard layer must be a non-negative int or None; got {self.layer!r}")


def resolve_guard(guard: bool | GuardSettings | None) -> GuardSettings | None:
    """``compile(guard=...)``: True (default settings), False/None (off) or :class:`GuardSettings`."""
    if guard is None or guard is False:
        return None
    if guard is True:
        return GuardSettings()
    if isinstance(guard, GuardSettings):
        return guard
    raise TypeError(f"guard must be True, False or a GuardSettings; got {guard!r}")



@dataclass(frozen=True)
class CompileConfig:
    """Everything :func:`specontext.compile` was asked for, validated.

    Attributes:
        budget_bytes: GPU memory budget in bytes.
        token_budget: tokens each decode step attends to (default 2048; None: dense attention).
        sink_tokens: first tokens always attended (attention sinks).
        local_window: most recent tokens always attended.
        selection: "retrieval_head" (the method) or a baseline: "streaming", "quest", "oracle".
        retrieval_layer: scoring layer(s) of the draft-free head, an int or a tuple of ints (None:
            ``target_layer_head.default_layers``: at 0.72, 0.76 and 0.8 of the depth), or the scoring
            layer of a draft model (an int; None: calibrate's choice or the draft's last layer).
        draft: None (a head from the target itself), a homologous transformers model or its directory,
            an EAGLE-3 checkpoint directory, or a calibrated head directory (``specontext.calibrate``).
        offload: where each layer's full KV lives: "none" (GPU), "all" (host memory), "auto" (the memory
            plan: the first layers that fit stay on the GPU, others leave as the sequence grows) or a
            tuple of layer indices to offload.
        elastic: offloaded layers load only the tokens each step's selection adds (False: the whole
            selection every step).
        sticky_margin: sticky selection (retrieval/selection.py): the tokens the offloaded layers' slots
            hold get this bonus, in the retrieval scores' units (attention mass), before the top-k, so a
            held token is dropped only for one that beats it by more than the margin. 0.0 (default): off;
            it applies only while some layer is offloaded and ``elastic`` is on (nothing is held
            otherwise). Measured in docs/offload.md.
        prefill_chunk: prompt tokens per prefill step, summed over the batch (default 2048): each step feeds
            every row ``prefill_chunk // batch`` tokens rounded down to a multiple of 16, at least 16 (a
            batch of more than ``prefill_chunk / 16`` rows feeds 16 tokens per row). It bounds a step's
            activation memory at any batch size, and steps of one size let the caching allocator reuse the
            same blocks (docs/memory.md). At least 16.
        progress: show a progress bar on prefills longer than one chunk.
        compile_decode_step: run the fixed-shape decode step through Inductor (``torch.compile`` with
            coordinate-descent tuning) before it is captured in a CUDA graph: Inductor fuses the step's
            elementwise operators and tunes its one-token matrix products (docs/benchmarks.md: 8B, 32K, batch
            1 on an H200, 6.9 -> 4.9 ms per step). None (default): on CUDA devices with Triton installed, not on
            the CPU (where decode steps run eagerly). Costs one compilation (about a minute for an 8B model; ``stats``
            ``compile_seconds``) for batch 1 and one for every larger batch, with the batch size and the
            sequence capacity dynamic (no recompilation for a new prompt length or batch size), from
            Inductor's on-disk caches in later processes. False: the step is captured as exported.
        cuda_graph: replay fixed-shape decode steps from a CUDA graph (None, the default: on CUDA devices;
            False: every decode step runs eagerly, e.g. to debug or profile op by op; True needs a CUDA
            device).
        guard: the accuracy guard's settings (runtime/accuracy_guard.py; default on), None when off.
        host_budget_bytes: host memory for the offloaded layers' K/V (``host_budget``, parsed like the budget;
            None, the default: not bounded). ``generate`` refuses a batch whose plan exceeds it, before any work.
        tensor_parallel: processes (GPUs of one host) the model is sharded across, each compiling it under
            ``torchrun`` (specontext_compiler/tensor_parallel.py); 1: one process, no sharding.
    """

    budget_bytes: int
    token_budget: int | float | None = DEFAULT_TOKEN_BUDGET
    sink_tokens: int = 4
    local_window: int = 64
    selection: str = "retrieval_head"
    retrieval_layer: int | tuple[int, ...] | None = None
    draft: object = None
    offload: str | tuple[int, ...] = "auto"
    elastic: bool = True
    sticky_margin: float = DEFAULT_STICKY_MARGIN
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    progress: bool = True
    compile_decode_step: bool | None = None
    cuda_graph: bool | None = None
    guard: GuardSettings | None = GuardSettings()
    tensor_parallel: int = 1
    host_budget_bytes: int | None = None

    @classmethod
    def from_arguments(
        cls, budget: int | str, token_budget: int | float | None = DEFAULT_TOKEN_BUDGET, **options
    ) -> "CompileConfig":
        budget_bytes = parse_budget(budget)
        token_budget = validate_token_budget(token_budget)
        sink_tokens = _non_negative_int("sink_tokens", options.pop("sink_tokens", 4))
        local_window = _non_negative_int("local_window", options.pop("local_window", 64))
        selection = options.pop("selection", "retrieval_head")
        if selection not in SELECTIONS:
            raise ValueError(f"selection={selection!r} is not one of {', '.join(map(repr, SELECTIONS))}")
        draft = options.pop("draft", None)
        retrieval_layer = options.pop("retrieval_layer", None)
        if isinstance(retrieval_layer, (list, tuple)):
            if not retrieval_layer or len(set(retrieval_layer)) != len(retrieval_layer):
                raise ValueError(f"retrieval_layer must list distinct layers; got {retrieval_layer!r}")
            retrieval_layer = tuple(_non_negative_int("retrieval_layer", layer) for layer in retrieval_layer)
        elif retrieval_layer is not None:
            retrieval_layer = _non_negative_int("retrieval_layer", retrieval_layer)
        offload = options.pop("offload", "auto")
        if isinstance(offload, str):
            if offload not in OFFLOAD_MODES:
                raise ValueError(f"offload={offload!r} is not one of {', '.join(map(repr, OFFLOAD_MODES))} or a list of layer indices")
        elif isinstance(offload, (list, tuple, set, frozenset)):
            offload = tuple(sorted(_non_negative_int("offload layer", layer) for layer in offload))
            if len(set(offload)) != len(offload):
                raise ValueError(f"offload lists a layer twice: {offload}")
        else:
            raise TypeError(f"offload must be 'auto', 'none', 'all' or a list of layer indices; got {offload!r}")
        elastic = options.pop("elastic", True)
        if not isinstance(elastic, bool):
            raise TypeError(f"elastic must be True or False; got {elastic!r}")
        sticky_margin = check_sticky_margin(options.pop("sticky_margin", DEFAULT_STICKY_MARGIN))
        prefill_chunk = options.pop("prefill_chunk", DEFAULT_PREFILL_CHUNK)
        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < MIN_PREFILL_CHUNK:
            raise ValueError(f"prefill_chunk must be an int of at least {MIN_PREFILL_CHUNK} tokens (a prefill step's "
                             f"tokens over the batch, at least {MIN_PREFILL_CHUNK} per row); got {prefill_chunk!r}")
        progress = options.pop("progress", True)
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be True or False; got {progress!r}")
        compile_decode_step = options.pop("compile_decode_step", None)
        if compile_decode_step is not None and not isinstance(compile_decode_step, bool):
            raise TypeError(f"compile_decode_step must be True, False or None (None: on CUDA); got {compile_decode_step!r}")
        cuda_graph = options.pop("cuda_graph", None)
        if cuda_graph is not None and not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be True, False or None (None: on CUDA); got {cuda_graph!r}")
        guard = resolve_guard(options.pop("guard", DEFAULT_GUARD))
        from .tensor_parallel import validate_tensor_parallel

        tensor_parallel = validate_tensor_parallel(options.pop("tensor_parallel", 1))
        host_budget = options.pop("host_budget", None)
        try:
            host_budget_bytes = None if host_budget is None else parse_budget(host_budget)
        except ValueError as error:  # name the option: the message is the budget parser's
            raise ValueError(f"host_budget: {error}") from None
        if options:
            raise TypeError(
                f"unknown option(s) {sorted(options)} for specontext.compile; accepted: token_budget, sink_tokens, "
                "local_window, selection, draft, retrieval_layer, offload, elastic, sticky_margin, prefill_chunk, progress, "
                "compile_decode_step, cuda_graph, guard, tensor_parallel, host_budget"
            )
        return cls(
            budget_bytes=budget_bytes,
            token_budget=token_budget,
            sink_tokens=sink_tokens,
            local_window=local_window,
            selection=selection,
            retrieval_layer=retrieval_layer,
            draft=draft,
            offload=offload,
            elastic=elastic,
            sticky_margin=sticky_margin,
            prefill_chunk=prefill_chunk,
            progress=progress,
            compile_decode_step=compile_decode_step,
            cuda_graph=cuda_graph,
            guard=guard,
            tensor_parallel=tensor_parallel,
            host_budget_bytes=host_budget_bytes,
        )
