"""Device helpers of the workload benchmark (``benchmarks/e2e_workloads.py``): the same calls on a GPU
and on the CPU (where the tests run them with a tiny model).

Timing, the bandwidths the rooflines divide by (HBM: a device copy; PCIe: a pinned host-to-device copy),
per-step clocks inside ``generate`` (a logits processor: it is called once per new token), random
models of a given shape, what the GPU reports about itself (clocks, power, throttling), and the host's
available memory (what SpeContext's offloaded KV may take).
"""

from __future__ import annotations

import gc
import statistics
import subprocess
import time

import torch
from transformers import LogitsProcessor


def synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn):
    """``fn()`` and its wall seconds, the device synchronized before and after."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def free_memory(device: torch.device) -> None:
    """Give the device's cached blocks back (after the collector found what cycles still hold)."""
    if torch.device(device).type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if torch.device(device).type == "cuda" else None


def allocated_bytes(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if torch.device(device).type == "cuda" else None


def capacity_bytes(device: torch.device) -> int | None:
    """The device's memory (None on the CPU: no batch search limit from it)."""
    return torch.cuda.get_device_properties(device).total_memory if torch.device(device).type == "cuda" else None


def copy_bandwidth(device: torch.device, numel: int = 2**29, repeats: int = 12) -> float:
    """Bytes read + written per second of a device copy (median; the first two left out); 2 GiB on a GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        numel = min(numel, 2**24)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        _, seconds = timed(device, lambda: dst.copy_(src))
        times.append(seconds)
    return 2 * numel * 4 / statistics.median(times[2:])


def pcie_bandwidth(device: torch.device, numel: int = 2**28, repeats: int = 6) -> float | None:
    """Bytes per second of a copy from pinned host memory to the GPU (1 GiB, median); None on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    host = torch.empty(numel, dtype=torch.float32).pin_memory()
    dst = torch.empty(numel, dtype=torch.float32, device=device)
    times = []
    for _ in range(repeats):
        _, seconds = timed(device, lambda: dst.copy_(host, non_blocking=True))
        times.append(seconds)
    return numel * 4 / statistics.median(times[1:])


class StepClock(LogitsProcessor):
    """A logits processor that marks each call (once per new token, after the forward that gave the
    logits): the intervals between marks are the decode steps as the device ran them (CUDA events, so
    nothing waits) or as the host saw them (CPU). Scores pass through unchanged."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.marks: list = []

    def __call__(self, input_ids, scores):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
        return scores

    def step_ms(self) -> list[float]:
        """Milliseconds of each step between two marks (call after the device synchronized)."""
        if self.cuda:
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [1e3 * (b - a) for a, b in zip(self.marks, self.marks[1:])]


def bucketed(values: list[float], buckets: int = 16) -> list[float]:
    """Means of ``values`` over ``buckets`` consecutive, near-equal parts (a long run's step curve)."""
    if not values:
        return []
    buckets = min(buckets, len(values))
    edges = [round(len(values) * i / buckets) for i in range(buckets + 1)]
    return [statistics.fmean(values[a:b]) for a, b in zip(edges, edges[1:]) if b > a]


def random_llama(shape: dict, device: torch.device, dtype: torch.dtype):
    """A Llama of ``shape`` (LlamaConfig fields) with random weights of ``dtype``, built on ``device``
    (decode speed does not depend on the values)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**shape))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def random_prompts(batch: int, length: int, vocab: int, device: torch.device, seed: int) -> torch.Tensor:
    """Random token ids [batch, length] in [3, vocab) (no padding id 0, no usual BOS/EOS ids 1-2)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator).to(device)


def gpu_state(device: torch.device) -> dict:
    """What the GPU says about itself now: clocks, power, temperature, throttle reasons (nvidia-smi), and
    torch's view (name, SM clock); empty on the CPU. Whatever cannot be read is left out."""
    if torch.device(device).type != "cuda":
        return {}
    state: dict = {"name": torch.cuda.get_device_name(device)}
    for name in ("clock_rate", "power_draw", "temperature", "utilization"):
        try:
            state[f"torch_{name}"] = getattr(torch.cuda, name)(device)
        except Exception as error:  # pynvml missing, or not exposed by this torch
            state[f"torch_{name}"] = f"unavailable: {type(error).__name__}"
    fields = ("clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,power.draw,power.limit,temperature.gpu,"
              "pstate,clocks_throttle_reasons.active")
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout.strip().splitlines()
        index = torch.device(device).index or 0
        state["nvidia_smi"] = dict(zip(fields.split(","), (v.strip() for v in out[index].split(","))))
    except Exception as error:
        state["nvidia_smi"] = f"unavailable: {type(error).__name__}"
    return state


def host_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
