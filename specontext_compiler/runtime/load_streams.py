"""Fork and join of a step's per-layer loads: a side stream beside the compute stream, one event per layer.

A step's loads may start once its selection exists: the *fork* records a ``ready`` event on the compute
stream. Each layer's loads then run on the device's side stream and end with that layer's event; right
before a layer's attention the compute stream waits for that event only (the *join*), so the side stream
keeps loading later layers while earlier ones compute. The eager prefetcher (:mod:`.prefetcher`) and the
fixed-shape decode step (:mod:`.cuda_graph_decode`, whose fork and joins a CUDA graph captures) both load
through here. On a CPU nothing forks: a load runs inline, synchronously.
"""

from __future__ import annotations

from typing import Callable

import torch


_STREAMS: dict[tuple[str, torch.device], torch.cuda.Stream] = {}


def dedicated_stream(role: str, device: torch.device) -> torch.cuda.Stream:
    """The process's one stream for ``role`` on ``device`` ("loads": the side stream; "capture": the one decode
    steps are captured on), made on first use. ``torch.cuda.Stream`` hands out PyTorch's 32 pooled streams in
    turn, so streams made again and again (per model, per capture) would come round to one another, and
    loads queued on the capture stream itself would no longer overlap compute."""
    stream = _STREAMS.get((role, device))
    if stream is None:
        stream = _STREAMS[role, device] = torch.cuda.Stream(device)
    return stream


class LoadStreams:
    """One runtime's ``ready`` events and per-layer load events on the process's side streams (see the module
    docstring; the memory manager's moves to host memory use the side stream too).

    Args:
        captured: the joins run inside a captured CUDA graph, so their timing events are graph nodes
            (external), one pair per layer that each replay records again: :meth:`wait_ms` is the last
            step's. Otherwise each timed join makes a new pair, summed until :meth:`reset_timing`.
    """

    def __init__(self, captured: bool = False):
        self.captured = captured
        self._ready: dict[torch.device, torch.cuda.Event] = {}
        self._events: dict[int, torch.cuda.Event] = {}  # by layer, recorded again each step
        self._compute: torch.cuda.Stream | None = None  # the stream the last fork left from
        self._timed: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._layer_timing: dict[int, tuple[torch.cuda.Event, torch.cuda.Event]] = {}

    @staticmethod
    def side_stream(device: torch.device) -> torch.cuda.Stream:
        """The device's side stream (the process's, made on first use)."""
        return dedicated_stream("loads", device)

    def fork(self, device: torch.device, reads: tuple[torch.Tensor, ...] = ()) -> None:
        """Start a step's loads on ``device``: they may begin once the compute stream gets here (the step's
        indices exist, the previous step's reads of the slots are queued). ``reads``: tensors made on the
        compute stream that the loads read. Nothing on a CPU."""
        if device.type != "cuda":
            return
        # The compute stream, looked up once per step (per-layer lookups cost measurable CPU time).
        self._compute = torch.cuda.current_stream(device)
        self._ready.setdefault(device, torch.cuda.Event()).record(self._compute)
        if reads:
            stream = self.side_stream(device)
            for tensor in reads:  # keep their memory from reuse by the compute stream before the loads ran
                tensor.record_stream(stream)

    def load(self, layer: int, device: torch.device, run: Callable[[], None]) -> None:
        """Run ``run`` (layer ``layer``'s loads on ``device``): on a GPU on the side stream after the fork,
        then the layer's event; on a CPU right away."""
        if device.type != "cuda":
            run()
            return
        stream = self.side_stream(device)
        stream.wait_event(self._ready[device])
        # set_stream rather than the stream context manager: no current-stream lookups per layer.
        torch.cuda.set_stream(stream)
        try:
            run()
            self._events.setdefault(layer, torch.cuda.Event()).record(stream)
        finally:
            torch.cuda.set_stream(self._compute)

    def join(self, layer: int, timed: bool = False) -> None:
        """Make the compute stream wait for layer ``layer``'s loads (and only those); ``timed``: bracket the
        wait with timing events (:meth:`wait_ms`)."""
        event = self._events.get(layer)
        if event is None:  # no load ran on a side stream (CPU: it ran inline)
            return
        stream = self._compute
        if not timed:
            stream.wait_event(event)
            return
        if self.captured:
            timing = self._layer_timing.setdefault(layer, tuple(
                torch.cuda.Event(enable_timing=True, external=True) for _ in range(2)))
        else:
            timing = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._timed.append(timing)
        timing[0].record(stream)
        stream.wait_event(event)
        timing[1].record(stream)

    def join_all(self, device: torch.device) -> None:
        """The current stream waits for everything queued on ``device``'s side stream so far (after a step
        that failed part-way: a capture cannot end with forked work not joined back). Nothing on a CPU."""
        if device.type != "cuda":
            return
        loaded = torch.cuda.Event()
        loaded.record(self.side_stream(device))
        torch.cuda.current_stream(device).wait_event(loaded)

    def wait_ms(self, device: torch.device | None = None) -> float | None:
        """The compute stream's stall in the timed joins (ms, summed; None: none timed), once ``device``
        (None: the current one) has synchronized."""
        timings = list(self._layer_timing.values()) if self.captured else self._timed
        if not timings:
            return None
        torch.cuda.synchronize(device)
        return sum(start.elapsed_time(end) for start, end in timings)

    def reset_timing(self) -> None:
        """Forget the timed joins so far (not the captured ones: the graph records those)."""
        self._timed = []
