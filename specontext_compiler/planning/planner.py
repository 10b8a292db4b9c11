"""The solver: how many layers keep their KV on the GPU under a budget, and at which lengths that drops.

``plan_memory(config_or_model, budget, context, batch=1, token_budget=2048)`` evaluates the memory
model (:mod:`.memory_model`) for every resident-layer count n, keeps the largest n whose peak fits,
and lists the thresholds: the context lengths past which n must drop. Resident layers are the *first*
n (placement rule of :mod:`.placement`: later layers' prefetches have the most compute to hide behind).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import sympy

from ..config import format_bytes, parse_budget
from .memory_model import B, DEFAULT_WORKSPACE, L, MemoryTerm, ModelShape, memory_terms, n, peak_expression


@dataclass
class MemoryPlan:
    """Where the KV lives for one (batch, context) under a budget, and what each term costs."""

    budget_bytes: int
    batch: int
    context: int
    token_budget: int | None
    num_layers: int
    resident: int
    terms: list[MemoryTerm] = field(repr=False)
    thresholds: list[tuple[int, int | None]]  # (length, resident layers for longer contexts; None: none fit)

    @property
    def gpu_layers(self) -> list[int]:
        return list(range(self.resident))

    @property
    def cpu_layers(self) -> list[int]:
        return list(range(self.resident, self.num_layers))

    def breakdown(self) -> dict[str, int]:
        return {t.name: t.bytes(self.batch, self.context, self.resident) for t in self.terms}

    @property
    def peak_bytes(self) -> int:
        parts = self.breakdown()
        activations = max(parts.pop("prefill_activations"), parts.pop("decode_activations"))
        return sum(parts.values()) + activations

    def table(self) -> str:
        rows = [f"memory plan: batch {self.batch} x {self.context} tokens, token budget {self.token_budget}, "
                f"budget {format_bytes(self.budget_bytes)}",
                f"GPU-resident layers: {self.resident} of {self.num_layers}"]
        for term in self.terms:
            rows.append(f"  {term.name:<20} {format_bytes(term.bytes(self.batch, self.context, self.resident)):>10}  {term.what}")
        rows.append(f"  {'peak':<20} {format_bytes(self.peak_bytes):>10}  held terms + the larger activation term")
        for length, resident in self.thresholds:
            rows.append(f"  past {length} tokens: {resident} resident layers")
        return "\n".join(rows)

    def plot(self, path) -> None:
        """PNG: resident layers and the peak's terms against the context length, with the budget."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        peak = _peak_function(self.terms)
        lengths = sorted({max(1, int(self.context * i / 64)) for i in range(1, 65)})
        resident = [resident_layers(peak, self.num_layers, self.batch, x, self.budget_bytes) for x in lengths]
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

    def to_json(self) -> str:
        return json.dumps({
            "budget_bytes": self.budget_bytes, "batch": self.batch, "context": self.context,
            "token_budget": self.token_budget, "peak_bytes": self.peak_bytes, "gpu_layers": self.gpu_layers,
            "cpu_layers": self.cpu_layers, "thresholds": self.thresholds, "terms": self.breakdown(),
            "expressions": {t.name: str(t.expr) for t in self.terms},
        }, indent=2)


def _peak_function(terms: list[MemoryTerm]):
    return sympy.lambdify((B, L, n), peak_expression(terms), modules=[{"Min": min, "Max": max}, "math"])


def resident_layers(peak, num_layers: int, batch: int, length: int, budget: int) -> int | None:
    """The most layers that can stay resident (None: not even with every layer offloaded)."""
    for count in range(num_layers, -1, -1):
        if peak(batch, length, count) <= budget:
            return count
    return None


def thresholds(peak, num_layers: int, batch: int, budget: int, max_length: int) -> list[tuple[int, int | None]]:
    """Where the resident-layer count drops as the context grows, up to ``max_length``: a list of
    (length, n), meaning at most n layers fit for contexts longer than ``length`` (None: nothing fits).

    n(L) never increases with L (every term grows with L), so each drop is found by bisection.
    """
    def fitting(length: int) -> int:
        count = resident_layers(peak, num_layers, batch, length, budget)
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


def plan_memory(
    config_or_model,
    budget: int | str,
    context: int,
    batch: int = 1,
    token_budget: int | None = 2048,
    dtype=None,
    window: int = 65,
    prefill_chunk: int = 2048,
    workspace: int = DEFAULT_WORKSPACE,
) -> MemoryPlan:
    """Plan where each layer's KV lives for ``batch`` sequences of ``context`` tokens under ``budget``.

    ``config_or_model``: a transformers config or model (a model's actual weight bytes are used).
    Raises ValueError stating the minimum budget and where it goes when even offloading every layer
    does not fit.
    """
    budget_bytes = parse_budget(budget)
    for name, value in (("context", context), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    if hasattr(config_or_model, "get_input_embeddings"):
        shape = ModelShape.from_model(config_or_model)
    elif hasattr(config_or_model, "num_hidden_layers"):
        shape = ModelShape.from_config(config_or_model, dtype)
    else:
        raise TypeError(f"plan_memory takes a transformers config or model; got {type(config_or_model).__name__}")
    terms = memory_terms(shape, token_budget, window, prefill_chunk, workspace=workspace)
    peak = _peak_function(terms)
    resident = resident_layers(peak, shape.num_layers, batch, context, budget_bytes)
    if resident is None:
        floor = MemoryPlan(budget_bytes, batch, context, token_budget, shape.num_layers, 0, terms, [])
        parts = ", ".join(f"{name} {format_bytes(value)}" for name, value in floor.breakdown().items() if value)
        raise ValueError(
            f"needs at least {format_bytes(floor.peak_bytes)} for batch {batch} x {context} tokens with every layer "
            f"offloaded: {parts}; budget is {format_bytes(budget_bytes)}"
        )
    return MemoryPlan(budget_bytes, batch, context, token_budget, shape.num_layers, resident, terms,
                      thresholds(peak, shape.num_layers, batch, budget_bytes, max(context, 1)))
