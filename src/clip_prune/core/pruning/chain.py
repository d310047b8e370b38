"""The loop of a pruning run: Fisher statistics → a step (search, rearrange, reconstruct) → Fisher statistics of the
model pruned so far → the next step, through the chain of constraints (`PruningOptions.step_constraints`).

The CLI (whose Fisher passes are the Lightning module's validation loop, on every device), `clip_prune.prune` (a
plain pass in one process) and the quality benchmark all run this loop; each provides its own Fisher pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from clip_prune.core.pruning.costs import mac_costs
from clip_prune.core.pruning.fisher import FisherStatistics
from clip_prune.core.pruning.options import PruningOptions
from clip_prune.core.pruning.search import WidthBudget, WidthSearchResult
from clip_prune.core.pruning.step import StepResult, prune_step
from clip_prune.core.timing import Timing
from clip_prune.towers import VisionInputs, tower_of

FisherPass = Callable[[StepResult], FisherStatistics]
"""The Fisher statistics of the model as a step left it: its masks hooked in, its refit columns in the weights for
the pass only (the dense weights stay the teacher of every step)."""


def prune_in_steps(
    model: nn.Module,
    statistics: FisherStatistics,
    chain: Sequence[float],
    options: PruningOptions,
    batches: Sequence[torch.Tensor | VisionInputs],
    fisher_pass: FisherPass,
    *,
    widths: WidthBudget | None = None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = False,
    latency_timer: Callable[[int], Callable[[WidthSearchResult], Timing] | None] | None = None,
) -> Iterator[StepResult]:
    """Each step's result, in order: step k keeps `chain[k]` of the dense encoder's MACs (or latency), searched
    among the units step k-1 kept, on the statistics of the model step k-1 left.

    Args:
        model: the dense model (left unchanged: every step reconstructs towards it).
        statistics: Fisher statistics of the dense model (the first step's).
        chain: the constraint of each step, largest first.
        options: stages and reconstruction settings.
        batches: calibration images for reconstruction (pixels or the tower's inputs), on the model's device.
        fisher_pass: the statistics of the model pruned so far, before each later step (timed into its `timings`).
        widths: per-layer widths within a latency table or at multiples (`WidthBudget`); None: free widths.
        all_reduce: sum across DDP ranks, for reconstruction (None: one process).
        progress: show progress bars.
        latency_timer: for step k, the timer that checks its candidate against a latency budget (None: trust the
            table).
    """
    macs = mac_costs(tower_of(model).config)
    previous: StepResult | None = None
    for index, constraint in enumerate(chain):
        fisher_s = 0.0
        if previous is not None:
            started = time.perf_counter()
            statistics = fisher_pass(previous)
            fisher_s = time.perf_counter() - started
        previous = prune_step(
            model, statistics, macs, constraint, options, batches,
            kept=None if previous is None else (previous.head_mask, previous.neuron_mask),
            all_reduce=all_reduce, progress=progress, widths=widths,
            time_ratio=None if latency_timer is None else latency_timer(index),
        )
        if fisher_s:
            previous.timings["fisher"] = fisher_s
        yield previous
