"""One pruning step on Fisher statistics: search → rearrange → reconstruct (docs/design.md; arXiv 2204.09656),
and the constraints of iterative pruning (docs/design.md, "Weight refit": step k of K keeps c^(k/K)).

No Lightning here: the callback gathers the statistics (again after each step, on the model pruned so
far) and calls `prune_step`; a benchmark can do the same with a plain loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from clip_prune.core.pruning.costs import MacCosts
from clip_prune.core.pruning.fisher import FisherStatistics
from clip_prune.core.pruning.latency_budget import BudgetLoop, meet_latency_budget
from clip_prune.core.pruning.options import PruningOptions
from clip_prune.core.pruning.rearrange import rearrange_mask
from clip_prune.core.pruning.reconstruct import Reconstruction, reconstruct
from clip_prune.core.pruning.refit import RefitWeights
from clip_prune.core.pruning.search import SearchResult, WidthBudget, WidthSearchResult, search_masks
from clip_prune.core.timing import Timing, timed
from clip_prune.towers import VisionInputs, tower_of


@dataclass
class StepResult:
    """The masks and refit columns after one step, and what each stage did."""

    head_mask: torch.Tensor
    """[L, H] float32 after reconstruction (binary, or the scales with `scales`)."""
    neuron_mask: torch.Tensor
    """[L, F] float32, same convention."""
    refit: RefitWeights
    """Refit columns of the kept units (empty unless `weights`)."""
    search: SearchResult | WidthSearchResult
    stage_masks: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """Masks after `search`, `rearrange` and `reconstruct` (those that ran), for plots."""
    reconstruction: Reconstruction | None
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage."""
    budget_loop: BudgetLoop | None = None
    """Under a latency budget with a timer: each search's table and measured ratio, and the one kept."""

    @property
    def warnings(self) -> list[str]:
        missed = [] if self.budget_loop is None or self.budget_loop.met else [
            f"latency budget missed: {self.budget_loop.note}"]
        return missed + ([] if self.reconstruction is None else self.reconstruction.warnings)


def prune_step(
    model: nn.Module,
    stats: FisherStatistics,
    macs: MacCosts,
    constraint: float,
    options: PruningOptions,
    batches: Sequence[torch.Tensor | VisionInputs],
    *,
    kept: tuple[torch.Tensor, torch.Tensor] | None = None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = False,
    widths: WidthBudget | None = None,
    time_ratio: Callable[[WidthSearchResult], Timing] | None = None,
) -> StepResult:
    """Search the masks for `constraint` among the `kept` units, rearrange and reconstruct them.

    Args:
        model: the dense model (reconstruction reads its weights and leaves them unchanged).
        stats: Fisher statistics of the model pruned so far (search and rearrangement leave units outside `kept`
            out, Gram entries included).
        macs: per-unit MAC costs of the encoder.
        constraint: fraction of the dense encoder's MACs this step keeps.
        options: stages and reconstruction settings.
        batches: calibration images for reconstruction (pixels or the tower's inputs), on the model's device.
        kept: ([L, H], [L, F]) units the previous step kept (non-zero); None: all.
        all_reduce: sum across DDP ranks, for reconstruction (None: one process).
        progress: show progress bars.
        widths: search each layer's widths within a latency table or at multiples (`WidthBudget`);
            None: the global FLOP-constrained ranking (`search_masks`).
        time_ratio: under a latency table, the measured latency ratio of a candidate to the dense tower: the search
            is corrected by it until the candidate measures within `options.latency_tolerance` of the constraint
            (`meet_latency_budget`); None trusts the table.
    """
    timings: dict[str, float] = {}
    candidates = None if kept is None else (kept[0] != 0, kept[1] != 0)
    searcher = partial(search_masks if widths is None else widths.search,
                       keep_a_head=tower_of(model).pooling_needs_attention())
    def search_within(budget: float) -> SearchResult | WidthSearchResult:
        return timed(timings, "search", lambda: searcher(stats.head_fisher, stats.neuron_fisher, macs, budget,
                                                          candidates))

    loop = None
    if time_ratio is not None and widths is not None and widths.latency is not None:
        table = widths.latency
        loop = meet_latency_budget(
            search_within, lambda found: table.ratio_of(found.heads_per_layer, found.neurons_per_layer),
            lambda found: timed(timings, "latency_check", lambda: time_ratio(found)),
            constraint, options.latency_tolerance, options.latency_rounds)
        search = loop.candidate
    else:
        search = search_within(constraint)
    head_mask, neuron_mask = search.head_mask, search.neuron_mask
    stage_masks = {"search": (head_mask, neuron_mask)}
    if options.rearrange:
        fixed = (None, None) if candidates is None else (~candidates[0], ~candidates[1])
        head_mask, neuron_mask = timed(timings, "rearrange", lambda: (
            rearrange_mask(head_mask, stats.head_fisher, stats.head_gram, fixed[0]),
            rearrange_mask(neuron_mask, stats.neuron_fisher, stats.neuron_gram, fixed[1]),
        ))
        stage_masks["rearrange"] = (head_mask, neuron_mask)
    if options.reconstruct == "none":
        return StepResult(head_mask, neuron_mask, {}, search, stage_masks, None, timings, loop)
    teacher: dict[str, torch.Tensor] = {}
    if options.teacher == "ta":
        if kept is not None:
            # Among the kept units, √c_k ≥ c_(k-1) keeps them all: the assistant would be the last step's mask.
            raise ValueError("--options.teacher ta works in one step; pass --options.steps 1 or use the dense teacher")
        assistant = searcher(stats.head_fisher, stats.neuron_fisher, macs, math.sqrt(constraint), candidates)
        teacher = {"teacher_head_mask": assistant.head_mask, "teacher_neuron_mask": assistant.neuron_mask}
    device = next(model.parameters()).device
    result = timed(timings, "reconstruct", lambda: reconstruct(
        model, head_mask.to(device), neuron_mask.to(device), batches, method=options.reconstruct,
        damping=options.damping, max_abs_scale=options.max_abs_scale, fit_bias=options.fit_bias,
        last_layer_pooled_only=options.last_layer_pooled_only, all_reduce=all_reduce, progress=progress, **teacher,
    ))
    stage_masks["reconstruct"] = (result.head_mask, result.neuron_mask)
    return StepResult(result.head_mask.cpu(), result.neuron_mask.cpu(), result.refit, search, stage_masks, result,
                      timings, loop)
