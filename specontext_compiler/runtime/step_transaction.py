"""What one step changes, taken at its start and put back when it fails or is undone.

Three callers need the state between two steps back: a step that ran out of GPU memory part-way
(``MemoryManager.run_step`` re-plans and runs it again), a step whose selection missed (the accuracy
guard redoes it densely: ``GenerationEngine.guarded_step``, ``GraphDecoder.undo_step``) and an evaluation
that decodes several methods from one prefill (``evaluation/shared_prefill.py``). That state lives in
several objects; this module is the one place that lists them:

* the KV store: the tokens stored (a failed step may have stored its token in some layers only);
* the retrieval head: its key cache and last queries (``RetrievalHead.snapshot`` / ``restore``);
* the runtime's per-step records: attended tokens and recall entries;
* the prefetcher: its load plan (dropped: the retry plans again) and transfer counters (the retry
  counts its transfers again).

A fixed-shape step (``cuda_graph_decode.py``) writes in place instead of appending: what it wrote at its
own position is rewritten by the retry, so it puts back the head's query buffers
(``RetrievalHead.static_snapshot``) and the transfer counters it adds to on the device, after joining
the loads it queued on the side stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepState:
    """The runtime between two eager steps (:func:`begin`), for :func:`roll_back`."""

    stored_tokens: int
    head: object
    attended_steps: int
    recall_entries: int
    transfers: tuple


def begin(runtime) -> StepState:
    """The state of ``runtime`` (an ``AttentionRuntime``) before a step."""
    store = runtime.store
    return StepState(
        stored_tokens=max((store.length(layer) for layer in range(store.num_layers)), default=0),
        head=None if runtime.head is None else runtime.head.snapshot(),
        attended_steps=len(runtime.attended_tokens),
        recall_entries=len(runtime.recall),
        transfers=runtime.prefetcher.counters(),
    )


def roll_back(runtime, state: StepState) -> None:
    """Undo what the steps since ``state`` did, all of it or part of it (some layers stored the token,
    some did not)."""
    runtime.store.truncate(state.stored_tokens)
    if runtime.head is not None:
        runtime.head.restore(state.head)
    del runtime.attended_tokens[state.attended_steps:]
    del runtime.recall[state.recall_entries:]
    runtime.prefetcher.end_sequence()
    runtime.prefetcher.restore_counters(state.transfers)


@dataclass(frozen=True)
class FixedShapeStepState:
    """A fixed-shape step's in-place state (:func:`begin_fixed_shape`), for :func:`roll_back_fixed_shape`."""

    head: object
    counters: tuple[torch.Tensor, ...] | None  # None: the step's transfers count even if it is undone


def begin_fixed_shape(static, counters: bool = True) -> FixedShapeStepState:
    """The state a fixed-shape step (``StaticDecodeRuntime`` ``static``) is about to change in place; with
    ``counters``, its device transfer counters too."""
    saved = tuple(counter.clone() for counter in static.counters()) if counters else None
    return FixedShapeStepState(static.head.static_snapshot(), saved)


def roll_back_fixed_shape(static, state: FixedShapeStepState) -> None:
    """Put back the head's query buffers and the counters ``state`` holds; the loads the step queued on
    the side stream are joined first (they read what the step wrote)."""
    static.join_side_stream()
    static.head.static_restore(state.head)
    for counter, saved in zip(static.counters(), state.counters or ()):
        counter.copy_(saved)
