"""The arithmetic of the paper's workloads (``benchmarks/e2e_workloads.py``): no device, no model.

* A workload is ``[prompt, new tokens]``, named ``<prompt>_<new>`` with an optional ``k`` (x1024):
  ``2k_32k`` is a 2,048-token prompt and 32,768 new tokens.
* A long generation is integrated from step times: the decode step time is measured at a few context
  lengths spanning the workload and interpolated piecewise-linearly in the context length; the decode
  time is its sum over the generated positions (:func:`integrate_decode`).
* Best batches: :func:`search_best_batch` (HF: upwards until out of memory or no tok/s gain) and
  :func:`largest_admitted` (SpeContext: the largest batch a monotone admission test accepts).
* :class:`Deadline`: a call stops measuring before the device's per-command limit kills it, from the
  estimates of :class:`Costs`.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Callable

#: The paper's Table 3 workloads ([prompt, new tokens]).
PAPER_WORKLOADS = ("2k_16k", "2k_32k", "16k_2k", "32k_2k")
_WORKLOAD = re.compile(r"^(\d+)(k?)_(\d+)(k?)$")


@dataclass(frozen=True)
class Workload:
    name: str
    prompt: int
    new_tokens: int

    @property
    def end(self) -> int:
        """Tokens of a sequence once every new token is generated (what its KV must hold)."""
        return self.prompt + self.new_tokens


def parse_workload(text: str) -> Workload:
    """``"2k_32k"`` -> Workload(prompt=2048, new_tokens=32768); ``"96_40"`` -> (96, 40). Raises ValueError."""
    match = _WORKLOAD.match(text.strip().lower()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"workload {text!r} is not <prompt>_<new tokens> (counts, 'k' = x1024), e.g. 2k_32k or 96_40")
    prompt = int(match[1]) * (1024 if match[2] else 1)
    new = int(match[3]) * (1024 if match[4] else 1)
    if prompt < 1 or new < 2:
        raise ValueError(f"workload {text!r}: the prompt needs at least 1 token and the generation at least 2")
    return Workload(text.strip().lower(), prompt, new)


def measured_length_grid(workload: Workload, count: int, long_tokens: int) -> list[int]:
    """``count`` context lengths L from the prompt to the last one whose measurement (a generate of
    ``long_tokens`` tokens after L tokens) stays within the workload's end, evenly spaced, ascending."""
    if count < 2:
        raise ValueError(f"measure at least 2 context lengths; got {count}")
    last = workload.end - long_tokens
    if last <= workload.prompt:
        raise ValueError(f"workload {workload.name}: {workload.new_tokens} new tokens leave no room for "
                         f"{count} measurements of {long_tokens} tokens")
    count = min(count, last - workload.prompt + 1)
    return sorted({round(workload.prompt + (last - workload.prompt) * i / (count - 1)) for i in range(count)})


def step_midpoint(length: int, short_tokens: int, long_tokens: int) -> float:
    """The context length the difference of two generates after ``length`` tokens measures: after the
    first new token (from the prefill, or from a 1-token forward), step j makes the KV ``length + j``
    tokens long; the long generate's extra steps are j = short_tokens .. long_tokens - 1."""
    return length + (short_tokens + long_tokens - 1) / 2


def interpolate(lengths: list[float], values: list[float], at: float) -> float:
    """Piecewise-linear through (lengths, values), constant beyond the first and last point."""
    if len(lengths) != len(values) or not lengths:
        raise ValueError("interpolate needs as many values as lengths, and at least one")
    points = sorted(zip(lengths, values))
    if at <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if at <= x1:
            return y0 + (y1 - y0) * (at - x0) / (x1 - x0) if x1 > x0 else y1
    return points[-1][1]


def integrate_decode(lengths: list[float], step_seconds: list[float], workload: Workload) -> float:
    """Seconds of a workload's decode steps: the new tokens after the first (which the prefill's logits
    give) each take one step, the step that makes the KV c tokens long for c = prompt + 1 ..
    prompt + new - 1; each step's time is :func:`interpolate` d at c. Exact for a piecewise-linear step
    time (a sum over the positions, not a trapezoid over the range)."""
    points = sorted(zip(lengths, step_seconds))
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    total, first, last = 0.0, workload.prompt + 1, workload.end - 1
    # Segment by segment (the integers in (x_i, x_i+1], and before the first / after the last point), on
    # each of which the step time is linear: a linear function's sum over consecutive integers is their
    # count times its value at their mean.
    lows = [first] + [math.floor(x) + 1 for x in xs]
    highs = [math.floor(x) for x in xs] + [last]
    for low, high in zip(lows, highs):
        low, high = max(low, first), min(high, last)
        if high >= low:
            total += (high - low + 1) * interpolate(xs, ys, (low + high) / 2)
    return total


def tokens_per_second(batch: int, new_tokens: int, prefill_seconds: float, decode_seconds: float) -> float:
    """A workload's throughput: every sequence's new tokens over the prefill and all decode steps."""
    return batch * new_tokens / (prefill_seconds + decode_seconds)


# -- best batches -------------------------------------------------------------------------------------
@dataclass
class Trial:
    batch: int
    tokens_per_s: float | None  # None: out of memory (or otherwise not run)
    peak_bytes: int | None = None


def predicted_max_batch(weights: int, trials: list[Trial], capacity: int, margin: float = 0.95) -> int | None:
    """The largest batch whose peak memory fits ``margin`` x ``capacity``, extrapolated linearly (peak =
    weights + batch x per-sequence bytes) from the largest batch measured with a peak; None if none."""
    measured = [t for t in trials if t.peak_bytes is not None and t.tokens_per_s is not None]
    if not measured:
        return None
    largest = max(measured, key=lambda t: t.batch)
    per_sequence = max(1, (largest.peak_bytes - weights)) / largest.batch
    return max(0, math.floor((margin * capacity - weights) / per_sequence))


def search_best_batch(measure: Callable[[int], Trial], start: int, min_gain: float = 0.03,
                      fits: Callable[[list[Trial], int], int | None] | None = None, limit: int = 4096) -> tuple[Trial | None, list[Trial]]:
    """The batch with the most tokens/s, searched upwards from ``start``: double while each doubling gains
    at least ``min_gain``; a batch that runs out of memory is followed by one try halfway between it and
    the last batch that ran. ``fits(trials, batch)``: the largest batch predicted to fit (None: no
    prediction); a doubling past it is cut to it, and the search ends when that is no larger than the
    last batch. ``measure(batch)`` returns a :class:`Trial` (tokens_per_s None: out of memory)."""
    trials: list[Trial] = []

    def run(batch: int) -> Trial:
        trial = measure(batch)
        trials.append(trial)
        return trial

    best = run(start)
    if best.tokens_per_s is None:
        return None, trials
    while best.batch < limit:
        candidate = min(2 * best.batch, limit)
        predicted = fits(trials, candidate) if fits is not None else None
        if predicted is not None and predicted < candidate:
            candidate = predicted
        if candidate <= best.batch:
            break
        trial = run(candidate)
        if trial.tokens_per_s is None:
            middle = (best.batch + candidate) // 2
            if middle > best.batch:
                trial = run(middle)
                if trial.tokens_per_s is not None and trial.tokens_per_s > best.tokens_per_s:
                    best = trial
            break
        gained = trial.tokens_per_s >= best.tokens_per_s * (1 + min_gain)
        if trial.tokens_per_s > best.tokens_per_s:
            best = trial
        if not gained:
            break
    return best, trials


def largest_admitted(admits: Callable[[int], bool], limit: int = 4096) -> int | None:
    """The largest batch in 1..``limit`` that ``admits`` (monotone: true up to some batch, then false),
    by doubling then bisection; None if batch 1 is not admitted.

    SpeContext's best batch comes from this with the memory planner as ``admits``
    (``e2e_spec.planner_admits``); kept apart so that a planner API that returns the largest admitted
    batch itself can replace it."""
    if not admits(1):
        return None
    low, high = 1, 2
    while high <= limit and admits(high):
        low, high = high, 2 * high
    high = min(high, limit + 1)  # admits(low); high is refused or past the limit
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if admits(middle) else (low, middle)
    return low


class Deadline:
    """Seconds left of a call's time limit (None: no limit) counted from ``started`` (default: now);
    ``allows(seconds)``: whether a unit of work estimated at ``seconds`` still fits, leaving ``reserve``
    seconds to write the results."""

    def __init__(self, limit: float | None, reserve: float = 20.0, clock: Callable[[], float] = time.monotonic,
                 started: float | None = None):
        if limit is not None and limit <= 0:
            raise ValueError(f"time limit must be positive seconds; got {limit}")
        self.clock = clock
        self.started = clock() if started is None else started
        self.limit = limit
        self.reserve = reserve
        self.skipped: list[str] = []

    def left(self) -> float:
        return math.inf if self.limit is None else self.limit - (self.clock() - self.started)

    def allows(self, seconds: float, what: str = "") -> bool:
        ok = self.left() - self.reserve >= seconds
        if not ok and what:
            self.skipped.append(f"{what} (estimated {seconds:.0f} s, {max(0.0, self.left()):.0f} s left)")
        return ok


class Costs:
    """Rough seconds of the next measurement, from what the run measured so far (defaults before that):
    prefill tokens per second per system kind, and seconds per decode step."""

    def __init__(self, weights: int):
        hf_rate = 3.2e14 / max(weights, 1)  # ~20K tokens/s for the 8B shape on an H200 (docs/benchmarks.md)
        self.rate = {"hf": hf_rate, "spec": 0.75 * hf_rate}
        self.step = {"hf": 0.06, "spec": 0.03}
        # First use: transformers' torch.compile of the decode step; SpeContext's export (~40 s for the 8B
        # shape, a guess) and Inductor compile (65-86 s per batch kind in a fresh process, docs/benchmarks.md).
        scale = min(1.0, weights / 16e9)
        self.compile = {"hf_static": 30 + 90 * scale, "spec": 30 + 100 * scale}

    def observe(self, kind: str, tokens: int, seconds: float, steps: int = 0, step_seconds: float = 0.0) -> None:
        if seconds > 0 and tokens:
            self.rate[kind] = tokens / seconds
        if steps:
            self.step[kind] = step_seconds / steps

    def profile(self, kind: str, batch: int, top: int, steps: int, compile_key: str | None = None) -> float:
        """A profile's seconds: prefilling ``batch`` x ``top`` tokens, ``steps`` decode steps, a first compile."""
        return batch * top / self.rate[kind] + steps * self.step[kind] + self.compile.get(compile_key, 0.0)
