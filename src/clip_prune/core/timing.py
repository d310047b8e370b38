"""The one timer of clip-prune: time a stage, time models in turns, and the statistics of what was timed.

The search's latency table, the latency budget's check, the saved model's report and the ONNX export all time with
`interleaved_seconds`: the models take turns within every repeat, so a drift of a shared machine's speed touches
all of them alike, and medians (with robust standard errors) say how far a figure can be trusted.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import torch
from torch import nn

from clip_prune.towers import VisionInputs, as_inputs, tower_of

Result = TypeVar("Result")


def timed_call(run: Callable[[], Result], device: torch.device) -> tuple[float, Result]:
    """Seconds `run()` takes on `device` (synchronised before and after on a GPU), and what it returned."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def timed(timings: dict[str, float], stage: str, work: Callable[[], Any]) -> Any:
    """`work()`, its seconds added to `timings[stage]`."""
    start = time.perf_counter()
    result = work()
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
    return result


def interleaved_seconds(runs: list[Callable[[], object]], device: torch.device, warmup: int, repeats: int,
                        calls_per_timing: int = 1) -> list[list[float]]:
    """Seconds of one call of each of `runs`, `repeats` timings each: the runs take turns within every repeat (after
    `warmup` calls each), so drifts of the machine's speed touch all of them alike; a timing covers
    `calls_per_timing` calls (fast runs) and gives their mean."""
    for run in runs:
        for _ in range(warmup):
            run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, seconds in zip(runs, times, strict=True):
            elapsed = timed_call(lambda run=run: [run() for _ in range(calls_per_timing)], device)[0]
            seconds.append(elapsed / calls_per_timing)
    return times


def median_seconds(runs: list[Callable[[], object]], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Median seconds of each of `runs` (`interleaved_seconds`)."""
    return [statistics.median(seconds) for seconds in interleaved_seconds(runs, device, warmup, repeats)]


def load_average() -> float | None:
    """The 1-minute load average (None where the system has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


LARGEST_SPEEDUP_ERROR = 0.1
"""Relative standard error of a speedup above which it is not reported as measured: its two medians could be far
from where more timings would put them."""


SHORTEST_TIMING_S = 0.02
"""Least seconds one timing covers: passes faster than this (small models) are timed in runs of several, so that
the clock's resolution and the scheduler's jitter do not make up the figure."""


@torch.inference_mode()
def measure_latencies(models: list[nn.Module], inputs: torch.Tensor | VisionInputs,
                      repeats: int = 15) -> list[list[float]]:
    """Seconds of one vision-tower pass over `inputs` (pixels or the tower's inputs), `repeats` timings per model.

    The models take turns within each repeat (after a warm-up pass and a probe each), so drifts of the
    machine's speed touch all of them alike. Each timing is the mean of as many passes as fill
    `SHORTEST_TIMING_S` for the fastest model.
    """
    inputs = as_inputs(inputs)
    device = inputs["pixel_values"].device
    passes = [partial(tower_of(model).vision, **inputs) for model in models]
    for run in passes:
        run()
    fastest = min(timed_call(run, device)[0] for run in passes)
    runs_per_timing = max(1, math.ceil(SHORTEST_TIMING_S / max(fastest, 1e-9)))
    return interleaved_seconds(passes, device, warmup=0, repeats=repeats, calls_per_timing=runs_per_timing)


def relative_spread(times: list[float]) -> float:
    """Interquartile range of `times` over their median (0 for fewer than two)."""
    if len(times) < 2:
        return 0.0
    low, _, high = statistics.quantiles(times, n=4, method="inclusive")
    return (high - low) / statistics.median(times)


def median_error(times: list[float]) -> float:
    """Relative standard error of the median of `times`: 1.2533 σ / √n over the median, σ read robustly from the
    interquartile range (σ = IQR / 1.349 for normal scatter; one odd timing does not inflate it)."""
    return 1.2533 * relative_spread(times) / 1.349 / math.sqrt(len(times)) if len(times) > 1 else math.inf


@dataclass(frozen=True)
class LatencyComparison:
    """Median seconds of the dense and pruned models' timed passes (taken in turns), their spreads, and how far the
    speedup can be trusted: above `LARGEST_SPEEDUP_ERROR` it is not to be shown as one."""

    dense: float
    pruned: float
    repeats: int
    spread: dict[str, float]
    """Interquartile range / median of each model's passes, by "dense" and "pruned"."""
    speedup_error: float
    """Relative standard error of the speedup."""
    load_1min: float | None
    """The machine's 1-minute load average when timing started (None where unknown)."""
    cores: int
    batch: int
    device: str

    @property
    def speedup(self) -> float:
        return self.dense / self.pruned

    @property
    def reliable(self) -> bool:
        return self.speedup_error <= LARGEST_SPEEDUP_ERROR

    @property
    def unreliable(self) -> str | None:
        """Why the speedup is not to be trusted, or None where it is."""
        if self.reliable:
            return None
        load, cores = self.load_1min, self.cores
        busy = f", on a busy machine (1-minute load {load:.1f} on {cores} cores)" if load and load > cores else ""
        return (f"the timed passes vary by {max(self.spread.values()):.0%} (interquartile range / median){busy}, so "
                f"the speedup could be off by {self.speedup_error:.0%} or more; measure again on an idle machine or "
                "with more --latency_repeats")

    def to_json(self) -> dict[str, Any]:
        entry = {"dense": self.dense, "pruned": self.pruned, "speedup": self.speedup, "repeats": self.repeats,
                 "spread": self.spread, "load_1min": self.load_1min, "cores": self.cores,
                 "speedup_error": self.speedup_error, "reliable": self.reliable}
        if self.unreliable is not None:
            entry["unreliable"] = self.unreliable
        return entry | {"batch": self.batch, "device": self.device}


def summarise_latency(dense: list[float], pruned: list[float], load: float | None, cores: int, batch: int,
                      device: str) -> LatencyComparison:
    """Medians, spreads and the speedup's relative standard error of the timed passes.

    Args:
        dense: seconds of the dense model's timed passes.
        pruned: seconds of the pruned model's timed passes.
        load: the machine's 1-minute load average when timing started (None where unknown).
        cores: CPU cores this process may use.
        batch: images per timed pass.
        device: where the passes ran, in words.
    """
    return LatencyComparison(
        dense=statistics.median(dense), pruned=statistics.median(pruned), repeats=len(dense),
        spread={"dense": relative_spread(dense), "pruned": relative_spread(pruned)},
        speedup_error=math.hypot(median_error(dense), median_error(pruned)), load_1min=load, cores=cores,
        batch=batch, device=device)


@dataclass(frozen=True)
class Timing:
    """A measured latency ratio (pruned / dense median) and its relative standard error."""

    ratio: float
    error: float
    pairs: int = 0
    """Timed pairs of dense and pruned tower."""


def paired_ratio(dense_s: list[float], pruned_s: list[float]) -> Timing:
    """The median of pruned / dense over timings taken in turns, and its relative standard error: a pair shares the
    machine's state of the moment, so a drift of its speed cancels in the ratio instead of widening both spreads."""
    ratios = [pruned / dense for dense, pruned in zip(dense_s, pruned_s, strict=True)]
    return Timing(statistics.median(ratios), median_error(ratios), len(ratios))
