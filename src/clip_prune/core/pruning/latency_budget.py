"""A latency budget held on the run's device: the table proposes widths, a timing of the candidate tower decides.

A latency table predicts a tower's latency from isolated layers; the real tower can run faster or slower than the
prediction (other kernels at other widths, caches, a table measured under other load). So after the search, the
candidate is timed against the dense tower and, while the measured ratio misses the budget by more than the
tolerance, the search is asked again with its budget corrected by what was measured: the table's error, taken as
a factor and averaged over the candidates timed, is divided out (docs/design.md, "Latency budget").
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Generic, Protocol, TypeVar

import torch

from clip_prune.core.pruning.search import BudgetTooSmall
from clip_prune.core.timing import Timing

Candidate = TypeVar("Candidate")


class Masked(Protocol):
    """A candidate `candidate_timer` can time: the masks of a search result."""

    head_mask: torch.Tensor
    neuron_mask: torch.Tensor


DEFAULT_TOLERANCE = 0.03
"""Largest accepted |measured ratio / budget − 1|."""


DEFAULT_ROUNDS = 4
"""Searches at most: the first, and three corrected ones."""


NOISE_MARGIN = 2.0
"""A miss is corrected only when it exceeds this many standard errors of the measured ratio."""


@dataclass(frozen=True)
class BudgetRound:
    """One search of the loop and the timing of its candidate."""

    budget: float
    """The constraint the search was given (a fraction of the table's dense latency)."""
    table_ratio: float
    """The table's latency of the candidate over its dense latency."""
    measured_ratio: float
    """The candidate's measured latency over the dense tower's, timed side by side."""
    measured_error: float
    """Relative standard error of `measured_ratio`."""
    timed_pairs: int
    """Pairs of dense and candidate tower timed."""


@dataclass(frozen=True)
class BudgetLoop(Generic[Candidate]):
    """The candidate kept, every round, and whether the budget was met."""

    candidate: Candidate
    rounds: list[BudgetRound]
    chosen: int
    """Index of the kept candidate's round."""
    constraint: float
    tolerance: float
    note: str | None
    """Why the kept candidate misses the budget by more than the tolerance; None when it does not."""

    @property
    def met(self) -> bool:
        return self.note is None

    @property
    def measured_ratio(self) -> float:
        """The kept candidate's measured latency over the dense tower's."""
        return self.rounds[self.chosen].measured_ratio

    def report(self) -> dict[str, object]:
        """JSON-ready: the rounds, the kept one and, when missed, by how much and why."""
        return {"constraint": self.constraint, "tolerance": self.tolerance,
                "rounds": [asdict(entry) for entry in self.rounds], "chosen_round": self.chosen,
                "measured_ratio": self.measured_ratio, "miss": self.measured_ratio / self.constraint - 1,
                "met": self.met, **({"note": self.note} if self.note else {})}


def within(measured: float, constraint: float, tolerance: float) -> bool:
    return abs(measured / constraint - 1) <= tolerance


def corrected_budget(constraint: float, rounds: list[BudgetRound]) -> float:
    """The budget whose candidate should measure `constraint`: the table's error (measured over predicted), taken as
    one factor for the whole tower and averaged (geometrically) over every candidate timed so far, divided out of the
    constraint; capped at the dense tower. Averaging keeps one noisy timing from throwing the next search off."""
    factor = math.exp(statistics.fmean(math.log(entry.measured_ratio / entry.table_ratio) for entry in rounds))
    return min(1.0, constraint / factor)


def meet_latency_budget(search: Callable[[float], Candidate], table_ratio: Callable[[Candidate], float],
                        time_ratio: Callable[[Candidate], Timing], constraint: float,
                        tolerance: float = DEFAULT_TOLERANCE, rounds: int = DEFAULT_ROUNDS) -> BudgetLoop[Candidate]:
    """Search within `constraint`, time the candidate, and search again with a corrected budget until the measured
    ratio is within `tolerance` of the constraint (or `rounds` searches were made).

    The loop also stops when a corrected budget finds a candidate already timed (the widths are discrete: the
    search cannot come closer), when it is below what any tower keeps, and when the miss is within
    `NOISE_MARGIN` standard errors of the timing (its correction would follow noise). The kept candidate is the
    first within the tolerance; failing that, the slowest one under the budget's upper edge, or else the fastest.

    Args:
        search: masks (or any candidate) for a budget, a fraction of the table's dense latency.
        table_ratio: the table's latency of a candidate over the dense one.
        time_ratio: the candidate's measured latency over the dense tower's.
        constraint: the requested fraction of the dense tower's latency.
        tolerance: largest accepted |measured / constraint − 1|.
        rounds: searches at most (1: no correction, only a measured report).
    """
    if rounds < 1:
        raise ValueError(f"--options.latency_rounds must be >= 1, got {rounds}")
    candidates: list[Candidate] = []
    history: list[BudgetRound] = []
    budget, stop = constraint, None
    while True:
        try:
            candidate = search(budget)
        except BudgetTooSmall:
            if not history:
                raise
            stop = "the corrected budget is below the least any pruned tower keeps"
            break
        predicted = table_ratio(candidate)
        if any(predicted == entry.table_ratio for entry in history):
            stop = "the nearest widths the search can choose were already timed"
            break
        timing = time_ratio(candidate)
        candidates.append(candidate)
        history.append(BudgetRound(budget, predicted, timing.ratio, timing.error, timing.pairs))
        miss = abs(timing.ratio / constraint - 1)
        if miss <= tolerance:
            break
        if timing.error * NOISE_MARGIN > miss:
            stop = (f"the miss is within the timing's noise (standard error {timing.error:.1%} of the measured ratio): "
                    "a correction would follow the noise; time on a quieter machine")
            break
        if len(history) == rounds:
            stop = f"{rounds} searches did not come within {tolerance:.0%}"
            break
        budget = corrected_budget(constraint, history)
    chosen = _choose(history, constraint, tolerance)
    note = None
    if not within(history[chosen].measured_ratio, constraint, tolerance):
        note = (f"measured {history[chosen].measured_ratio:.3f} of the dense latency against a budget of "
                f"{constraint:g} ({history[chosen].measured_ratio / constraint - 1:+.1%}): {stop}")
    return BudgetLoop(candidates[chosen], history, chosen, constraint, tolerance, note)


def _choose(history: list[BudgetRound], constraint: float, tolerance: float) -> int:
    """The first round within the tolerance; else the slowest under the budget's upper edge; else the fastest."""
    for index, entry in enumerate(history):
        if within(entry.measured_ratio, constraint, tolerance):
            return index
    under = [index for index, entry in enumerate(history) if entry.measured_ratio <= constraint * (1 + tolerance)]
    if under:
        return max(under, key=lambda index: history[index].measured_ratio)
    return min(range(len(history)), key=lambda index: history[index].measured_ratio)
