"""The solver: how many layers keep their KV on the GPU under a budget, and at which lengths that drops.

``plan_memory(config_or_model, budget, context, batch=1, token_budget=2048)`` evaluates the memory
model (:mod:`.memory_model`) for every resident-layer count n, keeps the largest n whose peak fits,
and lists the thresholds: the context lengths past which n must drop.

Placement rule: the resident layers are the *first* n. Measured on the H100 (docs/memory.md, "Which
layers stay"): with half the layers offloaded, keeping the first half resident decodes as fast as any
other choice, and it leaves the later layers' prefetches the most compute to hide behind.

With ``prompt=`` the plan also says how one sequence that grows from ``prompt`` to ``context`` tokens
should move layers: a layer stays resident while the sequence holds at most ``resident_until[layer]``
tokens, then the runtime migrates its KV to host memory (:mod:`specontext_compiler.runtime.memory_manager`).
A resident layer's KV buffer is reserved once for exactly those tokens, so the check is against the
buffers' real sizes (``capacities``), not against the current length.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import sympy

from typing import Callable

from ..config import DEFAULT_PREFILL_CHUNK, BudgetError, format_bytes, parse_budget
from .memory_model import (B, DEFAULT_WORKSPACE, MIGRATION_CHUNK, HeadCost, L, MemoryTerm, ModelShape,
                           default_head_cost, memory_terms, n)

#: Terms sized once for the whole sequence (the head's key copy, the staging buffer): in a schedule
#: they are evaluated at the final length, whatever the current one.
RESERVED_TERMS = ("retrieval_head", "staging")
ACTIVATION_TERMS = ("prefill_activations", "decode_activations")


class PeakModel:
    """The memory terms of one model and runtime setting, compiled to plain functions, and the solver."""

    def __init__(self, shape: ModelShape, terms: list[MemoryTerm], migration_chunk: int = MIGRATION_CHUNK,
                 token_budget: int | None = None):
        self.shape = shape
        self.terms = terms
        self.migration_chunk = migration_chunk
        self.token_budget = token_budget  # decode steps up to this many tokens attend densely (None: all)
        modules = [{"Min": min, "Max": max}, "math"]
        self._functions = {t.name: sympy.lambdify((B, L, n), t.expr, modules=modules) for t in terms}

    def parts(self, batch: int, length: int, resident: int, reserved: int | None = None,
              capacities: list[int] | None = None, prompt: int | None = None, staged: bool = True) -> dict[str, int]:
        """Bytes of each term with ``resident`` layers on the GPU at ``length`` tokens. ``reserved``: the
        sequence's final length (for :data:`RESERVED_TERMS`; default ``length``); ``capacities``: the
        resident layers' buffer sizes in tokens (default ``length`` each); ``prompt``: the prompt's
        length (prefill activations peak at its last chunk; decode steps past it have none);
        ``staged=False``: no dense step ever runs with a layer offloaded (no staging buffer)."""
        reserved = length if reserved is None else reserved
        values = {}
        for name, function in self._functions.items():
            at = reserved if name in RESERVED_TERMS else length
            if name == "prefill_activations" and prompt is not None:
                at = min(prompt, length)
            values[name] = int(function(batch, at, resident))
        if capacities is not None:
            values["kv_resident"] = sum(capacities) * batch * self.shape.kv_layer_token_bytes
        if not staged:
            values["staging"] = 0
        return values

    def peak(self, batch: int, length: int, resident: int, reserved: int | None = None,
             capacities: list[int] | None = None, prompt: int | None = None, staged: bool = True) -> int:
        """Everything held + the larger of the prefill and decode activations."""
        parts = self.parts(batch, length, resident, reserved, capacities, prompt, staged)
        return sum(v for k, v in parts.items() if k not in ACTIVATION_TERMS) + max(parts[k] for k in ACTIVATION_TERMS)

    def migration_bytes(self, batch: int, length: int) -> int:
        """What moving one layer to host memory adds on the GPU while its buffer is still held: its ring
        and one copy chunk's device temporary (its slots are allocated after the buffer is freed)."""
        ring = self.parts(batch, length, self.shape.num_layers - 1)["ring"]
        return ring + batch * min(self.migration_chunk, length) * self.shape.kv_layer_token_bytes // 2

    def resident_layers(self, batch: int, length: int, budget: int, prompt: int | None = None,
                        staged: bool = True) -> int | None:
        """The most layers that can stay resident at ``length`` tokens (None: not even with every layer
        offloaded); ``prompt``/``staged`` as in :meth:`parts`."""
        for count in range(self.shape.num_layers, -1, -1):
            if self.peak(batch, length, count, prompt=prompt, staged=staged) <= budget:
                return count
        return None

    def thresholds(self, batch: int, budget: int, max_length: int) -> list[tuple[int, int | None]]:
        """Where the resident-layer count drops as the context grows, up to ``max_length``: a list of
        (length, n), meaning at most n layers fit for contexts longer than ``length`` (None: nothing fits).

        n(L) never increases with L (every term grows with L), so each drop is found by bisection.
        """
        def fitting(length: int) -> int:
            count = self.resident_layers(batch, length, budget)
            return -1 if count is None else count

        found: list[tuple[int, int | None]] = []
        low, current = 1, fitting(1)
        while current >= 0 and fitting(max_length) < current:
            high = max_length  # fitting(low) >= current > fitting(high)
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (middle, high) if fitting(middle) >= current else (low, middle)
            current = fitting(high)
            found.append((low, None if current < 0 else current))
            low = high
        return found

    def schedule(self, batch: int, start: int, end: int, budget: int, prompt: int | None = None) -> list[int] | None:
        """Per layer, the most tokens it holds on the GPU while a sequence grows from ``start`` to ``end``
        tokens: ``end`` (resident throughout), a length in [start, end) (migrates to host memory when
        the sequence passes it) or 0 (offloaded from the start). None when nothing fits at ``end``.
        ``prompt`` (default ``start``): the prompt's length, when planning from mid-sequence.

        Greedy from the end: the n(end) first layers stay throughout; each further layer stays as long
        as the buffers actually reserved (earlier layers' capacities + its own), the terms at that length
        and one layer's migration transient (:meth:`migration_bytes`) fit. Once it has left, the
        earlier layers' checks (or the check at ``end``) cover the memory.
        Lengths strictly decrease, so one layer migrates at a time.

        The staging buffer (dense steps of offloaded layers) is left out when no layer is offloaded
        during a dense step: every layer is resident through the prefill and leaves after the decode
        turned sparse (past the token budget).
        """
        prompt = start if prompt is None else prompt
        unstaged = self._schedule(batch, start, end, budget, prompt, staged=False)
        if unstaged is not None and not self.staged(unstaged, start, end):
            return unstaged
        return self._schedule(batch, start, end, budget, prompt, staged=True)

    def _schedule(self, batch: int, start: int, end: int, budget: int, prompt: int, staged: bool) -> list[int] | None:
        layers = self.shape.num_layers
        always = self.resident_layers(batch, end, budget, prompt, staged)
        if always is None:
            return None
        capacities = [end] * always
        margin = self.migration_bytes(batch, end)
        longest = end - 1
        for _ in range(always, layers):
            def fits(length: int) -> bool:
                peak = self.peak(batch, length, len(capacities) + 1, end, capacities + [length], prompt, staged)
                return peak + margin <= budget

            if longest < start or not fits(start):
                break
            low, high = start, longest  # fits(low); find the largest length that fits
            while low < high:
                middle = (low + high + 1) // 2
                low, high = (middle, high) if fits(middle) else (low, middle - 1)
            capacities.append(low)
            longest = low - 1
        return capacities + [0] * (layers - len(capacities))

    def staged(self, until: list[int], start: int, end: int) -> bool:
        """Whether a schedule runs a dense step with a layer offloaded (and so needs the staging buffer)."""
        dense_until = max(start, end + 1 if self.token_budget is None else self.token_budget)
        return not all(tokens == end or tokens >= dense_until for tokens in until)

    def max_batch(self, end: int, budget: int, prompt: int | None = None, resident: int | None = None) -> int:
        """The largest batch that fits sequences of ``end`` tokens under ``budget`` (0: not even one):
        growing from ``prompt`` with layers leaving as planned (:meth:`schedule`), or at ``end`` tokens
        with the most layers that fit (:meth:`resident_layers`); with ``resident``, a fixed placement of
        that many GPU-resident layers instead."""
        if resident is not None:
            return largest_batch(lambda batch: self.peak(batch, end, resident, end, prompt=prompt) <= budget)
        if prompt is not None:
            return largest_batch(lambda batch: self.schedule(batch, prompt, end, budget) is not None)
        return largest_batch(lambda batch: self.resident_layers(batch, end, budget) is not None)


#: Batches past this are not searched (a plan's batch sizes buffers; no GPU holds a batch this large).
MAX_BATCH_SEARCHED = 2**20


def largest_batch(fits: Callable[[int], bool]) -> int:
    """The largest batch for which ``fits`` holds, up to :data:`MAX_BATCH_SEARCHED` (0: not even 1), by
    doubling then bisection: every term's bound never falls as the batch grows (memory_model.py), so once
    a batch does not fit no larger one does."""
    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= MAX_BATCH_SEARCHED and fits(high):
        low, high = high, 2 * high
    high = min(high, MAX_BATCH_SEARCHED + 1)  # fits(low); high does not fit, or is past the search
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


@dataclass
class MemoryPlan:
    """Where the KV lives for one (batch, context) under a budget, and what each term costs."""

    budget_bytes: int
    batch: int
    context: int
    token_budget: int | None
    num_layers: int
    resident: int  # GPU-resident layers at ``context`` tokens
    terms: list[MemoryTerm] = field(repr=False)
    thresholds: list[tuple[int, int | None]]  # (length, resident layers for longer contexts; None: none fit)
    #: With ``prompt``: per layer, the most tokens it holds on the GPU (0: offloaded from the start).
    resident_until: list[int] | None = None
    prompt: int | None = None
    model: PeakModel = field(default=None, repr=False)
    staged: bool = True  # a dense step runs with a layer offloaded (the staging buffer is held)
    tensor_parallel: int = 1  # ranks the model is sharded across: every figure is one rank's (one GPU's)
    #: ``plan_memory(batch="max")``: ``batch`` is the largest the budget admits, and this the peak of one more.
    next_batch_peak: int | None = None
    #: ``plan_memory(host_budget=)``: host memory for the offloaded layers' K/V (None: not bounded).
    host_budget: int | None = None
    #: ``plan_memory(batch="max")``: ``batch`` is the largest admitted (``next_batch_peak`` None where the
    #: host budget, not the GPU's, set it).
    largest_batch: bool = False

    @property
    def gpu_layers(self) -> list[int]:
        """Layers whose KV is on the GPU at ``context`` tokens."""
        return list(range(self.resident))

    @property
    def cpu_layers(self) -> list[int]:
        return list(range(self.resident, self.num_layers))

    @property
    def migrations(self) -> list[tuple[int, int]]:
        """(length, layer): the layer moves to host memory when the sequence grows past ``length``."""
        if self.resident_until is None or self.prompt is None:
            return []
        return sorted(((until, layer) for layer, until in enumerate(self.resident_until)
                       if self.prompt <= until < self.context), reverse=True)

    @property
    def host_bytes(self) -> int:
        """Host memory the offloaded layers' full K/V take at ``context`` tokens (pinned on a GPU machine; not
        planned: the budget is the GPU's)."""
        return (self.num_layers - self.resident) * self.batch * self.context * self.model.shape.kv_layer_token_bytes

    def breakdown(self) -> dict[str, int]:
        """Each term's bytes at ``context`` tokens (prefill activations at the prompt's length, if given)."""
        return self.model.parts(self.batch, self.context, self.resident, prompt=self.prompt, staged=self.staged)

    @property
    def peak_bytes(self) -> int:
        return self.model.peak(self.batch, self.context, self.resident, prompt=self.prompt, staged=self.staged)

    def table(self) -> str:
        rows = [f"memory plan: batch {self.batch} x {self.context} tokens, token budget {self.token_budget}, "
                f"budget {format_bytes(self.budget_bytes)}" + (" per GPU" if self.tensor_parallel > 1 else "")]
        if self.tensor_parallel > 1:
            rows.append(f"tensor parallel {self.tensor_parallel}: per rank (one GPU): 1/{self.tensor_parallel} of the "
                        "heads, KV heads and MLP width; embeddings, norms and LM head whole")
        if self.host_budget is not None:
            rows.append(f"host budget {format_bytes(self.host_budget)} for the offloaded layers' K/V")
        if self.largest_batch and self.host_budget is None:
            rows.append(f"largest batch the budget admits: {self.batch} (batch {self.batch + 1} needs "
                        f"{format_bytes(self.next_batch_peak)})")
        elif self.largest_batch:
            limit = "the host budget" if self.next_batch_peak is None else f"the GPU budget: batch {self.batch + 1} needs {format_bytes(self.next_batch_peak)}"
            rows.append(f"largest batch the GPU and host budgets admit: {self.batch} (limited by {limit})")
        rows.append(f"GPU-resident layers: {self.resident} of {self.num_layers}")
        parts = self.breakdown()
        for term in self.terms:
            rows.append(f"  {term.name:<20} {format_bytes(parts[term.name]):>10}  {term.what}")
        rows.append(f"  {'peak':<20} {format_bytes(self.peak_bytes):>10}  held terms + the larger activation term")
        if self.host_bytes:
            within = "not in the budget" if self.host_budget is None else "within the host budget"
            rows.append(f"  {'host memory':<20} {format_bytes(self.host_bytes):>10}  offloaded layers' K/V ({within})")
        for length, resident in self.thresholds:
            rows.append(f"  past {length} tokens: {resident} resident layers")
        if self.prompt is not None:
            start = sum(1 for until in self.resident_until if until >= self.prompt)
            rows.append(f"growing from a {self.prompt}-token prompt: {start} resident layers at the start")
            for length, layer in self.migrations:
                rows.append(f"  past {length} tokens: layer {layer} moves to host memory")
        return "\n".join(rows)

    def plot(self, path) -> None:
        """PNG: resident layers and the peak's terms against the context length, with the budget."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        model = self.model
        lengths = sorted({max(1, int(self.context * i / 64)) for i in range(1, 65)})
        resident = [model.resident_layers(self.batch, x, self.budget_bytes) for x in lengths]
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
        top.step(lengths, [-1 if r is None else r for r in resident], where="post")
        top.set_ylabel("GPU-resident layers")
        top.set_title(f"batch {self.batch}, token budget {self.token_budget}, budget {format_bytes(self.budget_bytes)}")
        stacks = {t.name: [t.bytes(self.batch, x, 0 if r is None else r) / 1e9 for x, r in zip(lengths, resident)]
                  for t in self.terms}
        bottom.stackplot(lengths, *stacks.values(), labels=list(stacks))
        bottom.axhline(self.budget_bytes / 1e9, color="black", linestyle="--", label="budget")
        bottom.set_xlabel("context length (tokens)")
        bottom.set_ylabel("GB (both activation terms stacked)")
        bottom.legend(fontsize=7, loc="upper left")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def to_dict(self) -> dict:
        """The plan as JSON-ready values: what ``to_json`` writes (and an artifact's ``memory_plan.json``)."""
        return {
            "budget_bytes": self.budget_bytes, "batch": self.batch, "context": self.context,
            "token_budget": self.token_budget, "peak_bytes": self.peak_bytes, "gpu_layers": self.gpu_layers,
            "cpu_layers": self.cpu_layers, "thresholds": [list(t) for t in self.thresholds],
            "terms": self.breakdown(), "expressions": {t.name: str(t.expr) for t in self.terms},
            "prompt": self.prompt, "resident_until": self.resident_until,
            "migrations": [list(m) for m in self.migrations], "tensor_parallel": self.tensor_parallel,
            "host_bytes": self.host_bytes, "host_budget": self.host_budget,
            "largest_batch": self.largest_batch, "next_batch_peak": self.next_batch_peak,
        }

    def to_json(self) -> str:
        """The plan as a JSON text (an object: :meth:`to_dict`)."""
        return json.dumps(self.to_dict(), indent=2)


def model_shape(config_or_model, dtype=None, tensor_parallel: int = 1) -> ModelShape:
    """The memory model's view of a transformers config or model (a model's actual weight bytes), as one of
    ``tensor_parallel`` ranks holds it (its heads, KV heads, MLP width and weights)."""
    from ..tensor_parallel import rank_config, rank_weight_bytes

    if hasattr(config_or_model, "get_input_embeddings"):
        if tensor_parallel == 1:
            return ModelShape.from_model(config_or_model)
        dtype = config_or_model.get_input_embeddings().weight.dtype
        return ModelShape.from_config(rank_config(config_or_model.config, tensor_parallel), dtype,
                                      rank_weight_bytes(config_or_model, tensor_parallel))
    if hasattr(config_or_model, "num_hidden_layers"):
        if tensor_parallel == 1:
            return ModelShape.from_config(config_or_model, dtype)
        # The estimate from a rank's counts is the rank's: its share of each layer, the embeddings whole.
        return ModelShape.from_config(rank_config(config_or_model, tensor_parallel), dtype)
    raise TypeError(f"plan_memory takes a transformers config or model; got {type(config_or_model).__name__}")


def impossible_budget(model: PeakModel, budget: int, batch: int, length: int, resident: int = 0,
                      prompt: int | None = None, largest: int | None = None) -> BudgetError:
    """The error for a budget that cannot hold ``batch`` x ``length`` tokens with ``resident`` layers on the
    GPU; ``largest``: the largest batch it admits for these lengths, named in the message."""
    parts = model.parts(batch, length, resident, prompt=prompt)
    needed = model.peak(batch, length, resident, prompt=prompt)
    listed = ", ".join(f"{name} {format_bytes(value)}" for name, value in parts.items() if value)
    layers = model.shape.num_layers
    where = "with every layer offloaded" if resident == 0 else f"with {resident} of {layers} layers' KV on the GPU"
    hint = "" if resident == 0 else "; offload='auto' or 'all' keeps less KV on the GPU"
    if largest is not None:
        shape = f"{length} tokens" if prompt is None else f"a {prompt}-token prompt growing to {length} tokens"
        hint += (f"; the largest batch it admits for {shape} is {largest}" if largest else
                 f"; it admits no batch of {shape}")
    return BudgetError(f"needs at least {format_bytes(needed)} for batch {batch} x {length} tokens {where}: "
                      f"{listed}; budget is {format_bytes(budget)}{hint}")


def host_bytes_at_end(model: PeakModel, batch: int, context: int, budget: int, prompt: int | None) -> int:
    """Host memory the offloaded layers' K/V take once ``batch`` sequences reach ``context`` tokens under
    ``budget`` (the layers the plan leaves off the GPU by then); the batch must fit the budget."""
    if prompt is None:
        offloaded = model.shape.num_layers - model.resident_layers(batch, context, budget)
    else:
        offloaded = sum(1 for tokens in model.schedule(batch, prompt, context, budget) if tokens < context)
    return offloaded * batch * context * model.shape.kv_layer_token_bytes


def impossible_host_budget(model: PeakModel, host_budget: int, batch: int, length: int, budget: int,
                           prompt: int | None, largest: int) -> BudgetError:
    """The error for a batch whose offloaded K/V does not fit ``host_budget``; ``largest``: the largest
    batch that fits both budgets."""
    needed = host_bytes_at_end(model, batch, length, budget, prompt)
    shape = f"{length} tokens" if prompt is None else f"a {prompt}-token prompt growing to {length} tokens"
    which = f"the largest batch both admit for {shape} is {largest}" if largest else f"no batch of {shape} fits both"
    return BudgetError(f"batch {batch} x {length} tokens needs {format_bytes(needed)} of host memory for the KV "
                       f"of the layers the GPU budget ({format_bytes(budget)}) leaves off the GPU; host budget is "
                       f"{format_bytes(host_budget)}: {which}")


def plan_memory(
    config_or_model,
    budget: int | str,
    context: int,
    batch: int | str = 1,
    token_budget: int | None = 2048,
    dtype=None,
    window: int = 65,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    workspace: int = DEFAULT_WORKSPACE,
    prompt: int | None = None,
    head: HeadCost | None = None,
    tensor_parallel: int = 1,
    host_budget: int | str | None = None,
) -> MemoryPlan:
    """Plan where each layer's KV lives for ``batch`` sequences of ``context`` tokens under ``budget``.

    ``config_or_model``: a transformers config or model (a model's actual weight bytes are used).
    ``batch``: a number of sequences, or ``"max"``: the largest batch the budget admits for these
    lengths (the plan's ``batch``; ``next_batch_peak``: what one more would need).
    ``prompt``: also plan one sequence growing from ``prompt`` to ``context`` tokens
    (``.resident_until``, ``.migrations``). ``head``: the retrieval head's cost (default: the draft-free
    head ``compile`` builds). ``tensor_parallel``: the model sharded across that many GPUs; ``budget`` and
    every figure of the plan are per GPU (one rank). ``host_budget``: host memory for the offloaded layers'
    K/V at ``context`` tokens (``host_bytes``; None: not bounded, the plan may be for another machine):
    ``batch="max"`` stays within it too, and a batch past it is refused. Raises :class:`~specontext_compiler.config.BudgetError`
    (a ValueError) stating the minimum budget and where it goes when even offloading every layer does not fit.
    """
    from ..tensor_parallel import validate_tensor_parallel

    tensor_parallel = validate_tensor_parallel(tensor_parallel)
    budget_bytes = parse_budget(budget)
    host_budget_bytes = None if host_budget is None else parse_budget(host_budget)
    if not (batch == "max" or isinstance(batch, int) and not isinstance(batch, bool) and batch > 0):
        raise ValueError(f"batch must be a positive int or 'max'; got {batch!r}")
    if isinstance(context, bool) or not isinstance(context, int) or context <= 0:
        raise ValueError(f"context must be a positive int; got {context!r}")
    if prompt is not None and (isinstance(prompt, bool) or not isinstance(prompt, int) or not 0 < prompt <= context):
        raise ValueError(f"prompt must be an int of tokens in 1..context ({context}); got {prompt!r}")
    shape = model_shape(config_or_model, dtype, tensor_parallel)
    if head is None and token_budget is not None:
        config = getattr(config_or_model, "config", config_or_model)
        head = default_head_cost(shape, getattr(config, "layer_types", None))
    terms = memory_terms(shape, token_budget, window, prefill_chunk, workspace=workspace, head=head)
    model = PeakModel(shape, terms, token_budget=token_budget)
    next_batch_peak = None
    largest = batch == "max"
    if largest:
        batch = model.max_batch(context, budget_bytes, prompt)
        if batch == 0:
            raise impossible_budget(model, budget_bytes, 1, context, prompt=prompt)
        gpu_largest = batch
        if host_budget_bytes is not None:
            # Host bytes only grow with the batch (more rows, no more layers on the GPU): bisect below it.
            batch = largest_batch(lambda rows: rows <= gpu_largest and host_bytes_at_end(
                model, rows, context, budget_bytes, prompt) <= host_budget_bytes)
            if batch == 0:
                raise impossible_host_budget(model, host_budget_bytes, 1, context, budget_bytes, prompt, largest=0)
        if batch == gpu_largest:  # the GPU budget set it: what one more would need there
            next_batch_peak = model.peak(batch + 1, context, 0, prompt=prompt)
    elif host_budget_bytes is not None and model.max_batch(context, budget_bytes, prompt) >= batch:
        needed = host_bytes_at_end(model, batch, context, budget_bytes, prompt)
        if needed > host_budget_bytes:
            largest = largest_batch(lambda rows: rows <= batch and host_bytes_at_end(
                model, rows, context, budget_bytes, prompt) <= host_budget_bytes)
            raise impossible_host_budget(model, host_budget_bytes, batch, context, budget_bytes, prompt, largest)
    if prompt is None:
        until, staged = None, True
        resident = model.resident_layers(batch, context, budget_bytes)
    else:
        # A growing sequence: the schedule says what stays on the GPU to the end (and whether a staging
        # buffer is needed at all), so the plan's resident layers and peak are the schedule's.
        until = model.schedule(batch, prompt, context, budget_bytes)
        staged = until is None or model.staged(until, prompt, context)
        resident = None if until is None else sum(1 for tokens in until if tokens == context)
    if resident is None:
        raise impossible_budget(model, budget_bytes, batch, context, prompt=prompt,
                                largest=model.max_batch(context, budget_bytes, prompt))
    return MemoryPlan(budget_bytes, batch, context, token_budget, shape.num_layers, resident, terms,
                      model.thresholds(batch, budget_bytes, context), until, prompt, model, staged,
                      tensor_parallel=tensor_parallel, next_batch_peak=next_batch_peak, host_budget=host_budget_bytes,
                      largest_batch=largest)
