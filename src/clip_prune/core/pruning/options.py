"""What a pruning run does after each Fisher pass, and the constraint of each of its steps."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from clip_prune.core.pruning.costs import mac_costs
from clip_prune.core.pruning.latency_budget import DEFAULT_ROUNDS, DEFAULT_TOLERANCE
from clip_prune.core.pruning.latency_table import LatencyTable
from clip_prune.core.pruning.search import (
    ConstraintType,
    WidthBudget,
    check_reachable,
    constraint_in_range,
    constraint_problem,
)
from clip_prune.towers import tower_of

ALIGNED_WIDTH_MULTIPLES = (64, 8)
"""Default per-layer width multiples on a GPU and under a latency budget, the first that fits the model: kernels keep
their speed on aligned widths, so aligned towers hold their latency budget where free widths can run slower than their
MACs say (docs/benchmarks.md, `bench_latency.py`). 8 is what tensor cores need, for head sizes that 64 does not divide
(SigLIP so400m: 72)."""


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
    """With `weights`, also refit the attention and MLP output projections' biases (unpenalised): the pruned
    embeddings stay closer to the dense ones, most at low constraints (docs/demo.md, "What each stage buys")."""
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
    None: 64 (or 8 where 64 does not divide the head size) on a GPU, where free widths can run slower than the dense
    tower, and under a latency budget, which aligned widths meet where free widths miss it (docs/usage.md, "Latency
    budget and hardware-friendly widths"); 1 for MAC budgets on a CPU and for small models."""

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



def requested_constraints(constraint: float | Sequence[float], constraint_type: ConstraintType = "macs") -> list[float]:
    """The requested constraints from the largest down, each refused outside (0, 1] before any work starts."""
    given = list(constraint) if isinstance(constraint, Sequence) else [constraint]
    if not given:
        raise ValueError("--constraint [] names no constraint: give one (0.6) or several ('[0.75, 0.5, 0.3]')")
    for value in given:
        if not constraint_in_range(value):
            raise ValueError(constraint_problem(value, constraint_type))
    return sorted(set(given), reverse=True)


def search_widths(options: PruningOptions, model: nn.Module, constraint: float, device: torch.device,
                  latency_table: Callable[[int], LatencyTable] | None = None) -> WidthBudget | None:
    """How the search keeps each layer's widths: within the latency table `latency_table(multiple_of)` gives (a
    latency budget), at multiples of `options.widths_multiple` (a GPU), or free (None); refuses, before any pass over
    the data, a `constraint` no masks reach."""
    tower = tower_of(model)
    config = tower.config
    multiple = options.widths_multiple(device, config.intermediate_size, tower.head_dim,
                                       latency_budget=latency_table is not None)
    widths = None
    if latency_table is not None or multiple > 1:
        widths = WidthBudget(tower.head_dim, multiple, None if latency_table is None else latency_table(multiple))
    check_reachable(constraint, mac_costs(config), tower.pooling_needs_attention(), widths)
    return widths
