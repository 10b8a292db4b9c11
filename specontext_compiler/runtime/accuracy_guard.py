"""The accuracy guard: notice when a step's selection misses the attention it needed, and redo it densely.

The retrieval head ranks the context before layer 0 of a step runs, from what it saw of earlier steps;
nothing in the selection itself says whether it found what the step's queries attend to. The guard
measures it exactly, on one layer: at the guard layer (resident on the GPU) the step's own query is
softmaxed over *every* stored key of that layer; the attention mass that the best selection of the same
size (that layer's own top-k) holds and the step's selection (with the new token) does not is what the
selection **missed**, and one minus it is the step's **coverage**, per sequence (averaged over KV heads,
the group's query heads' mass averaged as the selection shares them). Measured against the best
selection rather than against all of the mass, because how much mass a few tokens can hold depends on
how concentrated the attention is: a layer that attends almost uniformly (random weights, or a prompt
with nothing to find) leaves any selection of 6% of the context with about 6% of the mass, which is the
token budget's choice, not a miss of the selection that a dense redo should fix. It reads one layer's
keys (not its values), 1/num_layers of the K cache, and takes a top-k over them.

It measures one step in ``check_every``, the step after which the host reads the coverage (a read makes
the host wait for the GPU): the measurement is a few percent of a decode step at long contexts
(docs/benchmarks.md), and sampling one step in 8 still notices a selection that keeps missing. In
fixed-shape decode the measured steps replay a CUDA graph of their own, and on a GPU the host reads the
coverage one step late (``missed(lagged=True)``, then ``pending_missed``): the copy to pinned memory waits
behind an event while the next step is queued, so the GPU does not idle while the host prepares and
launches that step; a miss then takes back two steps (the engine redoes the measured one).

When any sequence's coverage falls below ``threshold``, the engine rolls the step back (the transaction
that out-of-memory recovery uses) and runs it again attending densely, then attends densely for
``hold_steps`` more steps before the selection resumes, where the guard measures it again: a selection
that still misses triggers again. A batch attends densely while any of its sequences is held (one step
shape for the batch). Counters in ``stats``: steps checked, triggers, steps redone and dense steps.
``dense_start`` holds the first decode steps of a sequence dense the same way (they count as dense steps).

Threshold and hold were chosen on the suite's fit split (docs/accuracy.md), not on what they are
reported on.
"""

from __future__ import annotations

import torch

from ..config import GuardSettings
from ..retrieval.base import group_probabilities
from .host_ahead import PinnedCopy


class AccuracyGuard:
    """The guard's state for one compiled model: the last step's coverage, the dense hold, counters."""

    def __init__(self, settings: GuardSettings, layer: int):
        self.settings = settings
        self.layer = layer
        self.coverage: torch.Tensor | None = None  # [B]: lowest since the last check (None: not measured)
        self.buffer: torch.Tensor | None = None  # the fixed-shape steps' coverage buffer, while they run
        self.dense_left = 0
        self._since_check = 0
        self._pending: PinnedCopy | None = None  # a check's coverage, read one step late
        self.tensor_parallel = None  # a TensorParallel when the model is sharded (coverage summed over ranks)
        self.reset_stats()

    def reset_stats(self) -> None:
        self.checks = 0
        self.triggers = 0
        self.dense_steps = 0
        self.min_coverage = 1.0
        self.max_coverage = 0.0
        self.coverage_sum = 0.0

    def stats(self) -> dict:
        return {
            "guard_layer": self.layer,
            "guard_threshold": self.settings.threshold,
            "guard_checks": self.checks,
            "guard_triggers": self.triggers,
            "guard_dense_steps": self.dense_steps,
            "guard_mean_coverage": self.coverage_sum / self.checks if self.checks else None,
            "guard_min_coverage": self.min_coverage if self.checks else None,
            "guard_max_coverage": self.max_coverage if self.checks else None,
        }

    def new_sequence(self, dense_start: bool = True) -> None:
        """A sequence starts: its first ``settings.dense_start`` decode steps are held dense (unless
        ``dense_start`` is False: layers start offloaded)."""
        self.coverage = None
        self.buffer = None
        self.dense_left = self.settings.dense_start if dense_start else 0
        self._since_check = 0
        self._pending = None

    @property
    def holding(self) -> bool:
        """Whether the next step attends densely (a trigger's hold)."""
        return self.dense_left > 0

    def measure(self, q: torch.Tensor, keys: torch.Tensor, scale: float, positions: torch.Tensor,
                key_valid: torch.Tensor | None, counted: torch.Tensor | None = None, out: torch.Tensor | None = None):
        """Coverage of the guard layer's attention by ``positions`` [B, Hkv, N] (the selection and the new
        token): one minus the mass its top-N holds and they miss. q [B, Hq, 1, D] over ``keys`` [B, Hkv, T, D]
        (every stored token, the new one included); ``counted`` bool like positions (False: a padding
        entry); writes ``out`` [B] in place if given."""
        mass = group_probabilities(q[:, :, -1], keys, scale, key_valid)  # [B, Hkv, T]
        picked = mass.gather(2, positions)
        if counted is not None:
            picked = picked * counted
        # Against the best selection of the same size (the layer's own top-k): what a selection can cover
        # depends on how concentrated the attention is, which differs between models, layers and prompts.
        best = mass.topk(min(positions.shape[-1], mass.shape[-1]), dim=-1, sorted=False).values.sum(-1)
        groups = q.shape[1] // keys.shape[1]
        missed = ((best - picked.sum(-1)) / groups).clamp_min(0.0)  # per KV group, in attention mass
        if self.tensor_parallel is None:
            coverage = 1.0 - missed.mean(1)
        else:  # over every rank's KV heads: all ranks redo (or keep) the same steps, as one process would
            coverage = 1.0 - self.tensor_parallel.all_reduce(missed.sum(1)) / (missed.shape[1] * self.tensor_parallel.size)
        if out is None:  # eager steps: the lowest since the last check
            self.coverage = coverage if self.coverage is None else torch.minimum(self.coverage, coverage)
        else:  # fixed-shape steps: a buffer the captured step lowers in place, reset after each check
            torch.minimum(out, coverage, out=out)
            self.buffer = self.coverage = out

    @property
    def check_due(self) -> bool:
        """Whether the next step is measured and the host reads its coverage after it (every
        ``check_every`` steps)."""
        return self._since_check + 1 >= self.settings.check_every

    def missed(self, lagged: bool = False) -> bool:
        """After each step: on a check step, whether its coverage (the lowest over its measurements) fell
        below the threshold (reads it on the host); between checks, False without reading anything.

        ``lagged``: a check step's coverage is copied to pinned host memory behind an event instead, and
        False returned; :meth:`pending_missed` reads it, after the next step is queued."""
        self._since_check += 1
        # A replayed CUDA graph lowers the buffer without running this Python: read the buffer then.
        measured = self.coverage if self.coverage is not None else self.buffer
        if self._since_check < self.settings.check_every or measured is None:
            return False
        self._since_check = 0
        # To host memory, pinned behind an event on a GPU (the buffer is refilled after it, stream-ordered).
        self._pending = PinnedCopy()
        self._pending.start(measured, torch.float32)
        self.reset_coverage()
        return False if lagged else self.pending_missed()

    @property
    def read_pending(self) -> bool:
        """Whether a lagged check waits to be read (:meth:`pending_missed`)."""
        return self._pending is not None

    def pending_missed(self) -> bool:
        """Reads the lagged check (waits for the step it measured, not for the ones queued after it);
        False if none is pending."""
        if self._pending is None:
            return False
        coverage = self._pending.read()
        self._pending = None
        return self._judge(coverage)

    def _judge(self, coverage: torch.Tensor) -> bool:
        self.checks += 1
        lowest = float(coverage.min())
        self.min_coverage = min(self.min_coverage, lowest)
        self.max_coverage = max(self.max_coverage, float(coverage.max()))
        self.coverage_sum += float(coverage.mean())
        return lowest < self.settings.threshold

    def reset_coverage(self) -> None:
        """Forget the coverage measured so far (a fixed-shape step's buffer goes back to 1)."""
        if self.buffer is not None:
            self.buffer.fill_(1.0)
        self.coverage = None

    def trigger(self) -> None:
        """The step is redone densely, and ``hold_steps`` more after it."""
        self.triggers += 1
        self.buffer = self.coverage = None  # the fixed-shape decoder, if any, is gone
        self.dense_left = self.settings.hold_steps + 1

    def step_done(self, dense: bool) -> None:
        if dense and self.dense_left:
            self.dense_left -= 1
            self.dense_steps += 1


def guard_layer(preferred: int, resident: set[int]) -> int | None:
    """The layer the guard measures: of the ``resident`` full-attention layers, the one nearest
    ``preferred`` (:func:`guard_preference`), the deeper one on a tie; None if there is none."""
    if not resident:
        return None
    return min(resident, key=lambda layer: (abs(layer - preferred), -layer))


def guard_preference(settings: GuardSettings, head, num_layers: int) -> int:
    """The layer the guard would rather measure: ``settings.layer``, else the retrieval head's (deepest)
    scoring layer, else the deepest of the draft-free head's default layers."""
    from ..retrieval.target_layer_head import default_layers

    if settings.layer is not None:
        if settings.layer >= num_layers:
            raise ValueError(f"guard layer {settings.layer} but the model has layers 0..{num_layers - 1}")
        return settings.layer
    layers = getattr(head, "layers", None)
    return layers[-1] if layers else default_layers(num_layers)[-1]
