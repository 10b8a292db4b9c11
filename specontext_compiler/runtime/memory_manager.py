"""The memory manager: applies the memory plan to the KV store and keeps it inside the budget as a
sequence grows.

Before a sequence, :meth:`MemoryManager.plan` asks the planner (:mod:`specontext_compiler.planning`)
how one sequence growing from its prompt to prompt + max_new_tokens should be placed: layers resident
throughout, layers offloaded from the start, and layers that stay on the GPU until the sequence passes
their length. Before each step, :meth:`before_step` moves the layers whose length the step passes to
host memory (:meth:`LayerMigration.to_host`: ring and slots filled on the device, the copy on the side
stream in the background). :meth:`run_step` runs a step; if the GPU still runs out of memory, the step
is rolled back (stored tokens, the retrieval head), the margin doubles, the plan is redone for the rest
of the sequence (more layers move out at once), and the step runs again.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import BudgetError, check_offload_layers, format_bytes
from ..planning.memory_model import DEFAULT_WORKSPACE, HeadCost, ModelShape, memory_terms, target_layer_head_cost
from ..planning.planner import PeakModel, impossible_budget, largest_batch
from ..retrieval.selection import resolve_token_budget
from . import step_transaction
from .attention_runtime import AttentionRuntime

logger = logging.getLogger(__name__)

#: A layer's background copy to host memory starts this many decode steps before it must leave.
LEAD_STEPS = 32


@dataclass
class Placement:
    """Where one sequence's KV lives: offloaded from the start, and resident layers that move out later."""

    offloaded: tuple[int, ...]
    resident_until: dict[int, int]  # layer -> the most tokens it holds on the GPU
    peak_bytes: int  # the plan's peak for the sequence (at its final length)


class MemoryManager:
    """Keeps the KV placement of one compiled model inside its GPU budget.

    Args:
        runtime: the attention runtime whose store it places.
        shape: the memory model's view of the model (weights, KV per token, ...).
        budget_bytes: the GPU budget.
        offload: "auto" (plan; migrate as the sequence grows), "none", "all" or layer indices (fixed).
        token_budget: the sparse token budget (int, fraction, or None for dense).
        window: recent tokens an offloaded layer keeps on the GPU.
        prefill_chunk: prompt tokens per prefill step over the batch.
        head: what the retrieval head costs on the GPU (:func:`head_cost`; None: no head).
        workspace: the initial margin for allocator fragmentation and library workspaces.
        max_retries: out-of-memory retries of one step before giving up.
    """

    def __init__(
        self,
        runtime: AttentionRuntime,
        shape: ModelShape,
        budget_bytes: int,
        offload,
        token_budget,
        window: int,
        prefill_chunk: int,
        head: HeadCost | None = None,
        workspace: int = DEFAULT_WORKSPACE,
        max_retries: int = 3,
        host_budget_bytes: int | None = None,
    ):
        self.runtime = runtime
        self.shape = shape
        self.budget_bytes = budget_bytes
        self.offload = offload
        self.token_budget = token_budget
        self.window = window
        self.prefill_chunk = prefill_chunk
        self.head = HeadCost(held=0) if head is None else head
        self.workspace = workspace
        self.max_retries = max_retries
        self.host_budget_bytes = host_budget_bytes  # the offloaded layers' K/V in host memory (None: not bounded)
        self.placement: Placement | None = None
        self.retries = 0  # out-of-memory retries over this manager's life
        self.migrated: list[tuple[int, int]] = []  # (length, layer) of the current sequence
        self._batch = self._prompt = self._end = 0
        self._models: dict[tuple, PeakModel] = {}

    def model(self, end: int) -> PeakModel:
        """The memory model for sequences of ``end`` tokens (the selection size depends on it)."""
        selected = None if self.token_budget is None else min(end, resolve_token_budget(self.token_budget, end))
        chunk = self.runtime.store.migration.chunk
        key = (selected, self.workspace, chunk, self.runtime.expansion_bytes)
        if key not in self._models:
            terms = memory_terms(self.shape, selected, self.window, self.prefill_chunk, workspace=self.workspace,
                                 head=self.head, expansion_bytes=self.runtime.expansion_bytes)
            self._models[key] = PeakModel(self.shape, terms, chunk, selected)
        return self._models[key]

    # -- before a sequence -----------------------------------------------------------------------------
    def plan(self, batch: int, prompt: int, end: int) -> Placement:
        """Place ``batch`` sequences growing from ``prompt`` to ``end`` tokens and apply it to the runtime.

        Raises :class:`~specontext_compiler.config.BudgetError` (a ValueError), saying what is needed and
        the largest batch the budget admits for these lengths, when the placement cannot fit the budget.
        """
        layers = self.shape.num_layers
        model = self.model(end)
        if self.offload == "auto":
            until = model.schedule(batch, prompt, end, self.budget_bytes)
            if until is None:
                raise impossible_budget(model, self.budget_bytes, batch, end, prompt=prompt,
                                        largest=self.max_batch(prompt, end))
            offloaded = tuple(layer for layer, tokens in enumerate(until) if tokens < prompt)
            later = {layer: tokens for layer, tokens in enumerate(until) if prompt <= tokens < end}
            peak = model.peak(batch, end, layers - len(offloaded) - len(later), end, prompt=prompt,
                              staged=model.staged(until, prompt, end))
        else:
            check_offload_layers(self.offload, layers)
            offloaded = self._fixed_offloaded()
            later = {}
            peak = model.peak(batch, end, layers - len(offloaded), end, prompt=prompt)
            if peak > self.budget_bytes:
                raise impossible_budget(model, self.budget_bytes, batch, end, layers - len(offloaded), prompt=prompt,
                                        largest=self.max_batch(prompt, end))
        self._check_host_budget(batch, prompt, end, len(offloaded) + len(later))
        self.placement = Placement(tuple(offloaded), later, peak)
        self.migrated = []
        self._batch, self._prompt, self._end = batch, prompt, end
        self.runtime.place(self.placement.offloaded, later)
        # One record of the moves still to come: the runtime's (fixed-shape decode engages once it is empty).
        self.placement.resident_until = self.runtime.resident_until
        if later:
            logger.info("memory plan: %d layers offloaded from the start, %d move out as the sequence grows (%s)",
                        len(offloaded), len(later), ", ".join(f"layer {k} past {v}" for k, v in sorted(later.items())))
        return self.placement

    def max_batch(self, prompt: int, end: int) -> int:
        """The largest batch of sequences growing from ``prompt`` to ``end`` tokens that :meth:`plan`
        admits under the budget and this placement (0: none)."""
        model = self.model(end)
        if self.offload == "auto":
            largest = model.max_batch(end, self.budget_bytes, prompt)
        else:
            largest = model.max_batch(end, self.budget_bytes, prompt, resident=self.shape.num_layers - len(self._fixed_offloaded()))
        if self.host_budget_bytes is None:
            return largest
        # Host bytes only grow with the batch (more rows, no more layers on the GPU).
        return largest_batch(lambda batch: batch <= largest and self._host_bytes(model, batch, prompt, end)
                             <= self.host_budget_bytes)

    def _host_bytes(self, model: PeakModel, batch: int, prompt: int, end: int) -> int:
        """The offloaded layers' K/V in host memory at ``end`` tokens for a batch the GPU budget admits."""
        if self.offload == "auto":
            leaving = sum(1 for tokens in model.schedule(batch, prompt, end, self.budget_bytes) if tokens < end)
        else:
            leaving = len(self._fixed_offloaded())
        return leaving * batch * end * self.shape.kv_layer_token_bytes

    def _check_host_budget(self, batch: int, prompt: int, end: int, leaving: int) -> None:
        """Refuse a placement whose offloaded K/V at ``end`` tokens exceeds the host budget, before any work."""
        needed = leaving * batch * end * self.shape.kv_layer_token_bytes
        if self.host_budget_bytes is None or needed <= self.host_budget_bytes:
            return
        largest = self.max_batch(prompt, end)
        shape = f"a {prompt}-token prompt growing to {end} tokens"
        which = f"the largest batch both admit for {shape} is {largest}" if largest else f"no batch of {shape} fits both"
        raise BudgetError(f"batch {batch} x {end} tokens needs {format_bytes(needed)} of host memory for the KV of the "
                          f"{leaving} layers the plan keeps off the GPU; host_budget is "
                          f"{format_bytes(self.host_budget_bytes)}: {which}")

    def _fixed_offloaded(self) -> tuple[int, ...]:
        """The layers a fixed placement (``offload`` "none", "all" or a list) keeps in host memory."""
        return {"none": (), "all": tuple(range(self.shape.num_layers))}.get(self.offload, self.offload)

    # -- during a sequence -----------------------------------------------------------------------------
    def before_step(self, total: int) -> None:
        """The next step makes the sequence ``total`` tokens long: move out the layers it would overflow,
        and start the background copy of those due within :data:`LEAD_STEPS` steps."""
        if not self.placement or not self.placement.resident_until:
            return
        store = self.runtime.store
        moved_from_gpu = False
        for layer, tokens in sorted(self.placement.resident_until.items(), key=lambda item: -item[1]):
            if tokens >= total + LEAD_STEPS:
                continue
            stream = None
            if store.devices[layer].type == "cuda":
                stream = self.runtime.prefetcher.side_stream(store.devices[layer])
            if tokens >= total:
                # Copy in the background, an even share of what is left each step until it must leave.
                store.migration.advance(layer, stream, steps_left=tokens - total + 1)
                continue
            store.migration.to_host(layer)
            del self.placement.resident_until[layer]
            self.migrated.append((store.length(layer), layer))
            moved_from_gpu = moved_from_gpu or stream is not None
        if moved_from_gpu:  # the moved KV's segments go back to the device, usable from any stream
            torch.cuda.empty_cache()

    def run_step(self, step: Callable[[], torch.Tensor], total: int) -> torch.Tensor:
        """Run one step that makes the sequence ``total`` tokens long; on running out of GPU memory, roll
        it back, re-plan with twice the margin and run it again (at most ``max_retries`` times)."""
        attempts = 0
        while True:
            state = step_transaction.begin(self.runtime)
            failure = None
            try:
                self.before_step(total)  # a move that runs out of memory leaves its layer resident
                return step()
            except torch.OutOfMemoryError as error:
                failure = error  # handled below, once the failed step's frames (and tensors) are gone
                traceback.clear_frames(error.__traceback__)  # the traceback stays; its frames' tensors go
            attempts += 1
            step_transaction.roll_back(self.runtime, state)
            self.recover(failure, state.stored_tokens, attempts)

    def recover(self, failure: torch.OutOfMemoryError, length: int, attempts: int = 1) -> None:
        """A step at ``length`` stored tokens ran out of GPU memory and was rolled back: re-plan the rest
        of the sequence with twice the margin, or raise ``failure`` where there is nothing to re-plan (a
        fixed placement, steps run outside ``generate``) or the step failed ``max_retries`` times already."""
        if attempts > self.max_retries or self.offload != "auto" or self.placement is None:
            raise failure
        self._replan_after_out_of_memory(length, failure)

    def _replan_after_out_of_memory(self, length: int, failure: BaseException) -> None:
        self.retries += 1
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.workspace *= 2
        model = self.model(self._end)
        # The rest of the prompt is still to be prefilled: plan from the later of the two.
        until = model.schedule(self._batch, max(length, self._prompt), self._end, self.budget_bytes, self._prompt)
        if until is None:
            raise impossible_budget(model, self.budget_bytes, self._batch, self._end) from failure
        store = self.runtime.store
        # Only ever fewer layers on the GPU: offloaded ones stay put, resident ones leave no later than
        # planned before, and at once (0) where the new plan has no room for them now.
        exits = {}
        for layer, tokens in enumerate(until):
            if not store.is_offloaded(layer):
                exit_at = min(self.placement.resident_until.get(layer, self._end), tokens)
                if exit_at < self._end:
                    exits[layer] = exit_at
        self.placement.resident_until.clear()  # the runtime's record too (one dict)
        self.placement.resident_until.update(exits)
        # The plan's peak, for the sequence's placement as it now stands (the doubled margin included).
        until_now = [0 if store.is_offloaded(layer) else exits.get(layer, self._end) for layer in range(len(until))]
        self.placement.peak_bytes = model.peak(
            self._batch, self._end, sum(1 for tokens in until_now if tokens >= self._end), self._end,
            prompt=self._prompt, staged=model.staged(until_now, self._prompt, self._end))
        logger.warning("out of GPU memory at %d tokens: margin now %.0f MiB; %d layers leave the GPU now",
                       length, self.workspace / 2**20, sum(1 for tokens in exits.values() if tokens <= length))


def head_cost(head, shape: ModelShape) -> HeadCost:
    """What a retrieval head costs on the GPU (None: no head). The draft-free head's is counted from its
    layers (memory_model.target_layer_head_cost); another head's caches are what it reports, its scoring
    is counted as one layer's float32 attention over the context (the memory model's bound for every
    sparse step), and a draft model's forward during prefill is not counted (unmeasured: docs/memory.md)."""
    if head is None:
        return HeadCost(held=0)
    from ..retrieval.target_layer_head import TargetLayerHead

    if isinstance(head, TargetLayerHead):
        return target_layer_head_cost(shape, len(head.layers), head.prefill_prior)
    return HeadCost(held=head.cache_bytes_per_token(), parameters=head.parameter_count() * shape.dtype_bytes)
