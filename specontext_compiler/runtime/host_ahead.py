"""The decode loop's host stays ahead of the GPU: what it reads one step late, and the garbage collector.

Reading a flag the GPU computes makes the host wait for the step that computed it, and the GPU then idles
while Python prepares and launches the next step (at 32K, batch 1: ~1 ms of a ~5 ms step). Two reads are
lagged, both through a :class:`PinnedCopy`: whether every row has finished (:class:`LaggedStopCheck`), and
the accuracy guard's check of a measured step (``AccuracyGuard.missed(lagged=True)``), which is read after
the next step is queued; a
miss then takes back both steps and the loop returns to the :class:`LoopState` before the measured one
(``REDO_PREVIOUS``), where the step runs again densely, as an immediate check would have redone it.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass

import torch


class PinnedCopy:
    """A device tensor's value for the host, without waiting for it now: on a GPU it is copied into pinned
    host memory behind an event on the current stream, and :meth:`read` waits for that copy only, not for
    the work queued after it; on the CPU it is copied at once. The host buffer is reused while the shape
    and dtype stay the same."""

    def __init__(self):
        self.host: torch.Tensor | None = None
        self.event: torch.cuda.Event | None = None

    def start(self, value: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        """Copy ``value`` (converted to ``dtype``, default its own) to the host buffer."""
        dtype = value.dtype if dtype is None else dtype
        cuda = value.is_cuda
        if self.host is None or self.host.shape != value.shape or self.host.dtype != dtype:
            self.host = torch.empty(value.shape, dtype=dtype, pin_memory=cuda)
        self.host.copy_(value, non_blocking=cuda)
        if cuda:
            if self.event is None:
                self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(value.device))

    def read(self) -> torch.Tensor:
        """The copied value (waits for the copy on a GPU)."""
        if self.event is not None:
            self.event.synchronize()
        return self.host


class LaggedStopCheck:
    """Whether every row has finished; on a GPU read one step late, so that the host never waits for it.

    Reading ``unfinished.any()`` at once blocks the host until the step that produced it ends, leaving
    the GPU idle while Python prepares and launches the next step. On a GPU the flag is copied to pinned
    host memory behind an event instead (:class:`PinnedCopy`), and read at the next step, once that step's
    tokens are queued (the GPU is still busy with the decode step launched in between). A step whose rows
    had all finished before it produces only padding, and the loop stops before appending it: the same
    sequences as a check at once, for one extra decode step at the end of a sequence that stops on EOS
    (``stats`` count it). On the CPU, where nothing runs ahead of the host, the check is immediate.
    """

    def __init__(self, device: torch.device):
        self.lagged = device.type == "cuda"
        self.flag = PinnedCopy()
        self.pending = False

    def record(self, unfinished: torch.Tensor) -> None:
        self.flag.start(unfinished.any())
        self.pending = True

    def finished_now(self) -> bool:
        """Every row has finished, known without waiting (never, when lagged: see all_finished_before)."""
        return not self.lagged and self.pending and not bool(self.flag.read())

    def all_finished_before(self) -> bool:
        """When lagged: every row had finished at the previous step."""
        return self.lagged and self.pending and not bool(self.flag.read())


@dataclass
class LoopState:
    """The decode loop just before a step: what it returns to when the guard takes that step back."""

    index: int  # the loop's index when the step's input token was chosen
    steps: int  # decode steps before it
    sequences: torch.Tensor
    attention_mask: torch.Tensor
    position: torch.Tensor
    unfinished: torch.Tensor
    tokens: torch.Tensor  # the step's input tokens [B]
    scores: int  # entries of the kept scores and logits before it
    logits: int
    rng: torch.Tensor | None = None  # the sampling generator's state (None: greedy), so a redo draws again alike

    def restore_rng(self, device: torch.device) -> None:
        if self.rng is not None:
            (torch.cuda.set_rng_state(self.rng, device) if device.type == "cuda" else torch.set_rng_state(self.rng))


def rng_state(device: torch.device) -> torch.Tensor:
    """The default generator's state for sampling on ``device`` (host memory: no synchronisation)."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


# What a fixed-shape step returns when the step before it missed (a check read one step late).
REDO_PREVIOUS = object()


@contextlib.contextmanager
def cyclic_gc_paused():
    """Pause Python's cyclic garbage collector (reference counting still frees everything else).

    A decode step creates many short-lived Python objects; each full collection then walks the whole
    heap (torch, transformers, the graph) while the GPU idles. Cycles made meanwhile wait for the end.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
