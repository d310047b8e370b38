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
from typing import Any, Literal

import torch
from torch import nn

from clip_prune.core.pruning.costs import EncoderMacs
from clip_prune.core.pruning.fisher import FisherStatistics
from clip_prune.core.pruning.latency_budget import DEFAULT_ROUNDS, DEFAULT_TOLERANCE, BudgetLoop, meet_latency_budget
from clip_prune.core.pruning.rearrange import rearrange_mask
from clip_prune.core.pruning.reconstruct import Reconstruction, reconstruct
from clip_prune.core.pruning.refit import RefitWeights
from clip_prune.core.pruning.search import SearchResult, WidthBudget, WidthSearchResult, search_masks
from clip_prune.core.timing import Timing, timed
from clip_prune.towers import VisionInputs, tower_of

ALIGNED_WIDTH_MULTIPLES = (64, 8)
"""Default per-layer width multiples on a GPU and under a latency budget, the first that fits the model
(benchmarks/bench_latency.py): at multiples of 64, ViT-B/16 towers ran within 1 % of their latency budget on an H200
(bf16) and within 4.1 % on a 2-core CPU; with free widths up to 2 times over it on the H200 and 8 % on the CPU. 8 is
what tensor cores need, for head sizes that 64 does not divide (SigLIP so400m: 72)."""


@dataclass(frozen=True)
class PruningOptions:
    """Which stages run after the Fisher pass, in how many steps, and how reconstruction is done."""

    rearrange: bool = True
    """Rearrange the searched masks with the per-layer Fisher blocks."""
    reconstruct: Literal["weights", "scales", "none"] = "weights"
    """Layer-wise reconstruction: `weights` refits the output columns of the kept heads and neurons
    (binary masks plus refit.safetensors), `scales` fits one scale per kept unit (the original tool's
    mask format), `none` keeps the searched weights."""
    steps: int | None = None
    """Reach the constraint in this many steps (c^(k/K)), each followed by reconstruction and a new
    Fisher pass on the pruned model; None: the fewest steps that each keep at least `step_keep` of the
    previous step's MACs."""
    step_keep: float = 0.75
    """With steps None: the smallest fraction of MACs one step may keep (0.75: 1 step at c = 0.75,
    3 at 0.5, 6 at 0.2)."""
    teacher: Literal["dense", "ta"] = "dense"
    """Reconstruction target: the dense model, or the 'teaching assistant' mask searched at √constraint."""
    damping: float = 1e-2
    """Pull of the solution towards the incoming weights, relative to the mean diagonal of the Gram matrix;
    raised tenfold (up to 10⁶ ×, from 1e-6 if 0) for a stage whose solution is not finite or out of bounds."""
    max_abs_scale: float = 10.0
    """Bound on solved scales |s| (`scales`) and on the growth ‖W‖/‖W₀‖ of a stage's refit columns (`weights`)."""
    fit_bias: bool = True
    """With `weights`, also refit out_proj's and fc2's bias (unpenalised); on the demo model this raised the
    cosine to dense at every constraint, most at low ones (benchmarks/bench_quality.py)."""
    reconstruct_samples: int = 512
    """Calibration images used for reconstruction (split across ranks)."""
    last_layer_pooled_only: bool = True
    """At the last layer, reconstruct only the tokens the tower's pooling reads (CLIP: the CLS token; SigLIP's
    attention-pooling head reads all tokens, so there it changes nothing)."""
    latency_tolerance: float = DEFAULT_TOLERANCE
    """Under a latency budget: the largest accepted |measured latency ratio / budget − 1| of the saved tower, timed
    against the dense one on the run's device; the search is corrected and repeated while it misses by more."""
    latency_rounds: int = DEFAULT_ROUNDS
    """Under a latency budget: searches at most per requested constraint (1: search once and report the timing)."""
    save: bool = True
    """Slice the weights and save the smaller model into OUTPUT_DIR/pruned."""
    multiple_of: int | None = None
    """Keep each layer's widths (heads x head size, neurons) at multiples of this, or dense; 1 leaves them free.
    None: 64 (or 8 where 64 does not divide the head size) on a GPU, where free widths ran slower than the dense
    tower in bf16 on an H200, and under a latency budget, which aligned widths met within 5 % on that GPU and on a
    CPU where free widths missed it (docs/usage.md, "Latency budget"); 1 for MAC budgets on a CPU and for small
    models."""

    def __post_init__(self) -> None:
        problems = []
        if self.multiple_of is not None and self.multiple_of < 1:
            problems.append(f"--options.multiple_of must be >= 1 (or null for the device's default), got "
                            f"{self.multiple_of}")
        if self.damping < 0:
            problems.append(f"--options.damping must be >= 0, got {self.damping}")
        if self.reconstruct_samples < 1:
            problems.append(f"--options.reconstruct_samples must be >= 1, got {self.reconstruct_samples}")
        if self.teacher == "ta" and self.steps != 1:
            problems.append("--options.teacher ta works in one step (each later step's assistant would be the last "
                            "step's mask): pass --options.steps 1 with it")
        if self.steps is not None and self.steps < 1:
            problems.append(f"--options.steps must be >= 1 (or null for automatic), got {self.steps}")
        if not 0 < self.latency_tolerance < 1:
            problems.append(f"--options.latency_tolerance must be in (0, 1), got {self.latency_tolerance}")
        if self.latency_rounds < 1:
            problems.append(f"--options.latency_rounds must be >= 1, got {self.latency_rounds}")
        if not 0 < self.step_keep < 1:
            problems.append(f"--options.step_keep must be in (0, 1), got {self.step_keep}")
        if problems:
            raise ValueError("; ".join(problems))

    def widths_multiple(self, device: torch.device, num_neurons: int, head_dim: int,
                        latency_budget: bool = False) -> int:
        """`multiple_of`, or when it is None the default on a GPU or under a latency budget: the first of 64 and 8
        that keeps every head count (it divides the head size d) and at least 16 neuron counts per layer; 1 for MAC
        budgets on a CPU, and where neither fits (a small model)."""
        if self.multiple_of is not None:
            return self.multiple_of
        if device.type != "cuda" and not latency_budget:
            return 1
        fitting = [m for m in ALIGNED_WIDTH_MULTIPLES if head_dim % m == 0 and num_neurons >= 16 * m]
        return fitting[0] if fitting else 1

    def step_constraints(self, constraint: float | Sequence[float]) -> list[float]:
        """The constraint of each step: for one constraint c, c^(k/K) for k = 1..K, the last exactly c; for several,
        one chain from the largest to the smallest that passes exactly through each, geometric between two of them
        with as few steps as keep `step_keep` each (the smallest one's run, plus a step where the rounding asks)."""
        points = sorted(set(constraint), reverse=True) if isinstance(constraint, Sequence) else [constraint]
        if len(points) > 1 and self.steps is not None:
            raise ValueError("--options.steps sets the steps to one constraint; with several, each stretch between "
                             "two of them takes as many as --options.step_keep asks: leave --options.steps null")
        chain, start = [], 1.0
        for point in points:
            steps = self.steps
            if steps is None:
                steps = max(1, math.ceil(math.log(point / start) / math.log(self.step_keep) - 1e-9))
            chain += [start * (point / start) ** (k / steps) for k in range(1, steps)] + [point]
            start = point
        return chain


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

    def report(self, constraint: float, macs: EncoderMacs) -> dict[str, Any]:
        """JSON-ready summary of the step."""
        entry: dict[str, Any] = {
            "constraint": constraint, "macs_ratio": macs.of_masks(self.head_mask, self.neuron_mask) / macs.dense,
            "kept_heads": int((self.head_mask != 0).sum()), "kept_neurons": int((self.neuron_mask != 0).sum()),
            "timings_s": self.timings,
        }
        if self.reconstruction is not None:
            entry["reconstruction"] = self.reconstruction.report()
        if self.budget_loop is not None:
            entry["latency_budget"] = self.budget_loop.report()
        return entry


def prune_step(
    model: nn.Module,
    stats: FisherStatistics,
    macs: EncoderMacs,
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
