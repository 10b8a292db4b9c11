"""Per-step events on the compute stream, for benchmarks (``GenerationEngine.time_steps``)."""

from __future__ import annotations

import torch


class StepTimer:
    """Events on the compute stream at each decode step's start (``GenerationEngine.time_steps``): the
    interval from a replayed fixed-shape step's start to the next step's is that step's time on the GPU's
    timeline, the host's share included where the GPU waited for it, without the once-per-call warm-ups and
    captures that a difference of two generates keeps some noise of. Nothing waits before the end."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.events: list[torch.cuda.Event] = []
        self.replayed: list[bool] = []

    def step_starts(self) -> None:
        if self.enabled:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)

    def kind(self, replayed: bool) -> None:
        if self.enabled:
            self.replayed.append(replayed)

    def stats(self) -> dict:
        """After the stream synchronized: ``replayed_step_ms`` (mean) and ``replayed_steps_timed``."""
        if not self.enabled:
            return {}
        intervals = [start.elapsed_time(end) for start, end, replayed
                     in zip(self.events, self.events[1:], self.replayed) if replayed]
        return {"replayed_steps_timed": len(intervals),
                "replayed_step_ms": sum(intervals) / len(intervals) if intervals else None}
