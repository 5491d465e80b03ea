"""What every timed or memory-measured run shares: device-synchronised timers with warm-up and round-robin
repeats, and peak-memory readings (accelerator or host), so stages, the efficiency measurement
(:mod:`layerfold.evaluation.efficiency`) and the benchmarks time and measure alike."""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from layerfold.models.devices import host_peak_rss_mib

Clock = Callable[[], float]

# ------------------------------------------------------------------------------------------------
# timing primitive (benchmarks/common.py re-exports it, so scripts and the pipeline time alike)


@dataclass
class Timing:
    """Seconds of the timed runs after warm-up: the median and the spread."""

    runs: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def min(self) -> float:
        return min(self.runs)

    @property
    def max(self) -> float:
        return max(self.runs)

    def summary(self) -> tuple[float, float, float]:
        """``(median, min, max)`` seconds."""
        return self.median, self.min, self.max

    def as_dict(self) -> dict[str, Any]:
        return {"median_s": round(self.median, 4), "min_s": round(self.min, 4), "max_s": round(self.max, 4),
                "repeats": len(self.runs), "runs_s": [round(r, 4) for r in self.runs]}


@dataclass(frozen=True)
class Workload:
    """One timed run is ``run(prepare())`` with only ``run`` inside the timer (e.g. prepare = the
    prefill that fills a KV cache, run = the decode steps that use it)."""

    run: Callable[[Any], Any]
    prepare: Callable[[], Any] = lambda: None


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the device's queued work, so a wall-clock timer measures the work and not its launch."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _as_workload(variant: Callable[[], Any] | Workload) -> Workload:
    return variant if isinstance(variant, Workload) else Workload(run=lambda _state, fn=variant: fn())


def alternate(variants: Mapping[Hashable, Callable[[], Any] | Workload], device: torch.device | str | None = None,
              warmup: int = 3, repeats: int = 10, min_warmup_s: float = 0.0, clock: Clock = time.perf_counter,
              ) -> dict[Hashable, Timing]:
    """Time several variants round-robin in this process, so drift (clocks, caches, a noisy neighbour)
    hits all of them alike.

    Warm-up rounds run every variant ``warmup`` times, and keep going until ``min_warmup_s`` seconds
    have passed (an accelerator's clocks take a while to ramp up). Each timed round starts at the
    next variant (A B C, B C A, C A B, ...), so no variant always runs first. The device is
    synchronised before the timer starts and before it stops.
    """
    if warmup < 0:
        raise ValueError(f"warmup={warmup} is below 0: the number of untimed rounds must be >= 0 (3 or more on an accelerator).")
    if repeats < 1:
        raise ValueError(f"repeats={repeats} is below 1: at least one timed run per variant is needed (10 or more on an accelerator).")
    workloads = {name: _as_workload(v) for name, v in variants.items()}
    names = list(workloads)
    started = clock()
    for done in itertools.count():
        if done >= warmup and clock() - started >= min_warmup_s:
            break
        for name in names:
            workloads[name].run(workloads[name].prepare())
    runs: dict[Hashable, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            state = workloads[name].prepare()
            synchronize(device)
            start = clock()
            workloads[name].run(state)
            synchronize(device)
            runs[name].append(clock() - start)
            del state  # e.g. a KV cache: freed before the next variant prepares its own
    return {name: Timing(values) for name, values in runs.items()}


def timed(fn: Callable[[], Any] | Workload, device: torch.device | str | None = None, warmup: int = 3, repeats: int = 10,
          min_warmup_s: float = 0.0, clock: Clock = time.perf_counter) -> Timing:
    """Wall seconds of ``fn()`` (device-synchronised), after warm-up; see :func:`alternate`."""
    return alternate({"_": fn}, device, warmup, repeats, min_warmup_s, clock)["_"]


# ------------------------------------------------------------------------------------------------
# memory


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float:
    """Peak accelerator memory since the last reset, or the process's max RSS on CPU.

    ru_maxrss is the process high-water mark: it includes everything loaded so far and cannot be
    reset, so on CPU it bounds the step from above rather than isolating it.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return host_peak_rss_mib()


def peak_memory_kind(device: torch.device) -> str:
    return "cuda max_memory_allocated" if device.type == "cuda" else "process max RSS"


def weights_mib(model: torch.nn.Module) -> float:
    """Bytes of the model's parameters (a tied head counted once), in MiB."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() * p.element_size() for p in unique) / 2**20

