"""Mask search (docs/design.md, "FLOP-constrained search" and "Latency budget"; Kwon et al., arXiv 2204.09656).

Given importance scores for every head and every MLP neuron of the vision encoder, picks
how many heads and neurons to keep so that the encoder's MACs stay within a fraction of
the dense model's, and which ones: the top-scored units globally, across layers
(`search_masks`). Under per-layer costs that are not one price per unit (a measured latency
table) or with widths held to multiples of N, the count per layer is searched instead
(`search_layer_widths`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import torch

from clip_prune.core.pruning.costs import MacCosts
from clip_prune.core.pruning.latency_table import LatencyTable


@dataclass(frozen=True)
class SearchResult:
    """Masks chosen by `search_masks` and how they were chosen."""

    head_mask: torch.Tensor
    """[L, H] float32, 1 for kept heads and 0 for pruned ones."""
    neuron_mask: torch.Tensor
    """[L, F] float32, 1 for kept MLP neurons and 0 for pruned ones."""
    num_heads: int
    """Heads kept in all layers together."""
    num_neurons: int
    """MLP neurons kept in all layers together."""
    objective: float
    """Sum of the scores of the kept heads and neurons."""
    objective_curve: torch.Tensor
    """[number of candidate heads + 1] float64, best objective for each number of kept heads (0..L·H
    without candidates); -inf where the heads alone exceed the budget."""
    macs: int
    """MACs per image of the encoder that the masks keep (prunable parts only, see `MacCosts`)."""
    budget: float
    """MACs per image allowed: constraint · dense MACs."""


ConstraintType = Literal["macs", "latency"]
"""What a constraint is a fraction of: the encoder's analytic MACs, or the dense tower's latency on the device."""


def constraint_in_range(constraint: object) -> bool:
    """Whether `constraint` is a number in (0, 1]."""
    return isinstance(constraint, int | float) and not isinstance(constraint, bool) and 0 < constraint <= 1


def constraint_problem(constraint: object, constraint_type: ConstraintType) -> str:
    """What is wrong with a constraint outside (0, 1], and what to give instead."""
    whole = "the encoder's MACs" if constraint_type == "macs" else "the dense tower's latency"
    return f"--constraint must be in (0, 1] (the fraction of {whole} to keep, e.g. 0.75), got {constraint}"


def search_masks(
    head_scores: torch.Tensor,
    neuron_scores: torch.Tensor,
    macs: MacCosts,
    constraint: float,
    candidates: tuple[torch.Tensor, torch.Tensor] | None = None,
    keep_a_head: bool = False,
) -> SearchResult:
    """Keep the top-scored heads and neurons that fit in `constraint` times the dense encoder's MACs.

    For every number of kept heads n_h the neurons that fit are
    n_n = clip(floor((budget - n_h·MAC_head) / MAC_neuron), 0, L·F); the objective is the sum of
    the top n_h head scores and the top n_n neuron scores (sorted globally, across layers), and the
    best n_h wins. The budget comparison is done in integers so the result never exceeds it.

    Args:
        head_scores: [L, H] importance of each attention head (e.g. the diagonal Fisher information).
        neuron_scores: [L, F] importance of each MLP neuron.
        macs: per-unit MAC costs of the encoder, whose L, H and F must match the scores.
        constraint: fraction of the dense encoder's MACs to keep, in (0, 1]; 1 keeps every unit.
        candidates: ([L, H], [L, F]) masks of the units that may be kept (non-zero entries): those an
            earlier step of iterative pruning kept. None: every unit.
        keep_a_head: keep at least one head (`VisionTower.pooling_needs_attention`: without one the tower's
            output would not depend on its image).

    Returns:
        The masks (float32, on the scores' device), the counts kept, the objective curve and the MACs.

    Raises:
        ValueError: if `constraint` is outside (0, 1], or the scores have the wrong shape or are not finite.
        BudgetTooSmall: if `keep_a_head` and not even one head fits the budget.
    """
    _check_inputs(head_scores, neuron_scores, macs, constraint)
    if candidates is not None and (candidates[0].shape != head_scores.shape
                                   or candidates[1].shape != neuron_scores.shape):
        raise ValueError(f"candidates have shapes {[list(mask.shape) for mask in candidates]}, expected those of "
                         f"the scores {[list(head_scores.shape), list(neuron_scores.shape)]}")
    # Exact rational arithmetic: floor(c · dense) is never above the real budget, whatever the rounding.
    budget_macs = math.floor(Fraction(constraint) * macs.dense)

    head_candidates, neuron_candidates = (None, None) if candidates is None else candidates
    head_order, head_prefix = _sort_descending(head_scores, head_candidates)
    neuron_order, neuron_prefix = _sort_descending(neuron_scores, neuron_candidates)
    num_units_heads, num_units_neurons = len(head_order), len(neuron_order)

    kept_heads = torch.arange(num_units_heads + 1, dtype=torch.int64)
    left_for_neurons = budget_macs - kept_heads * macs.per_head
    fits = left_for_neurons >= 0
    kept_neurons = torch.div(left_for_neurons.clamp(min=0), macs.per_neuron, rounding_mode="floor")
    kept_neurons = kept_neurons.clamp(max=num_units_neurons)
    curve = head_prefix + neuron_prefix[kept_neurons]
    curve = torch.where(fits, curve, torch.full_like(curve, -math.inf))
    if keep_a_head:
        curve[0] = -math.inf
        if not bool(torch.isfinite(curve).any()):
            raise BudgetTooSmall(constraint, macs.per_head / macs.dense, _essentials(None, keep_a_head))

    # With c = 1 every unit fits; pick the dense model even if some scores are negative.
    num_heads = num_units_heads if constraint == 1 else int(torch.argmax(curve))
    num_neurons = int(kept_neurons[num_heads])
    result_macs = macs.of_counts(num_heads, num_neurons)
    assert result_macs <= budget_macs, f"search kept {result_macs} MACs over the budget {budget_macs}"

    return SearchResult(
        head_mask=_top_mask(head_order, num_heads, head_scores),
        neuron_mask=_top_mask(neuron_order, num_neurons, neuron_scores),
        num_heads=num_heads,
        num_neurons=num_neurons,
        objective=float(curve[num_heads]),
        objective_curve=curve,
        macs=result_macs,
        budget=constraint * macs.dense,
    )


def _check_inputs(
    head_scores: torch.Tensor, neuron_scores: torch.Tensor, macs: MacCosts, constraint: float
) -> None:
    """Raise one ValueError listing every problem with the inputs of `search_masks`."""
    problems = [] if constraint_in_range(constraint) else [constraint_problem(constraint, "macs")]
    expected = {
        "head_scores": (head_scores, (macs.num_layers, macs.num_heads), "[L, H]"),
        "neuron_scores": (neuron_scores, (macs.num_layers, macs.num_neurons), "[L, F]"),
    }
    for name, (scores, shape, letters) in expected.items():
        if tuple(scores.shape) != shape:
            problems.append(
                f"{name} has shape {tuple(scores.shape)}, expected {letters} = {shape} from the encoder's "
                "config; were the scores computed for another model?"
            )
        elif not bool(torch.isfinite(scores).all()):
            problems.append(f"{name} has NaN or infinite entries; check the Fisher statistics")
    if problems:
        raise ValueError("; ".join(problems))


def _sort_descending(scores: torch.Tensor, allowed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Global order of the `allowed` (non-zero; None: all) entries of `scores` [L, N], best first, and
    float64 prefix sums of the sorted scores on the CPU."""
    flat = scores.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    indices = torch.arange(flat.numel()) if allowed is None else allowed.detach().reshape(-1).cpu().nonzero().flatten()
    order = indices[torch.argsort(flat[indices], descending=True, stable=True)]
    prefix = torch.cat([flat.new_zeros(1), torch.cumsum(flat[order], dim=0)])
    return order, prefix


def _top_mask(order: torch.Tensor, count: int, scores: torch.Tensor) -> torch.Tensor:
    """Float32 0/1 mask shaped like `scores` with ones at the first `count` indices of `order`."""
    mask = torch.zeros(scores.numel(), dtype=torch.float32)
    mask[order[:count]] = 1.0
    return mask.reshape(scores.shape).to(scores.device)


FLOAT_SLACK = 1e-9
"""Relative slack of a width budget check: a budget of c × the dense cost, summed in another order, may fall an
ulp short of the dense widths' own sum at c = 1."""


@dataclass(frozen=True)
class WidthSearchResult:
    """Masks chosen by `search_layer_widths` and what they cost by the search's own cost table."""

    head_mask: torch.Tensor
    """[L, H] float32, 1 for kept heads and 0 for pruned ones."""
    neuron_mask: torch.Tensor
    """[L, F] float32, 1 for kept MLP neurons and 0 for pruned ones."""
    heads_per_layer: list[int]
    """Heads kept by each layer."""
    neurons_per_layer: list[int]
    """Neurons kept by each layer."""
    objective: float
    """Sum of the scores of the kept heads and neurons."""
    cost: float
    """Sum of the kept widths' costs by the tables (e.g. seconds)."""
    budget: float
    """The cost allowed; `cost` never exceeds it."""


def allowed_widths(units: int, unit_width: int, multiple_of: int) -> list[int]:
    """Unit counts 0..`units` whose width (count · `unit_width` columns) is a multiple of `multiple_of`.

    The dense count stays allowed, so a layer can always keep everything.
    """
    return [count for count in range(units + 1) if count * unit_width % multiple_of == 0 or count == units]


def search_layer_widths(
    head_scores: torch.Tensor,
    neuron_scores: torch.Tensor,
    head_costs: torch.Tensor,
    neuron_costs: torch.Tensor,
    budget: float,
    head_counts: list[int] | None = None,
    neuron_counts: list[int] | None = None,
    candidates: tuple[torch.Tensor, torch.Tensor] | None = None,
    resolution: int = 8192,
    keep_a_head: bool = False,
) -> WidthSearchResult:
    """Keep, per layer, the number of heads and neurons that maximises the sum of kept scores within `budget`.

    Costs are per layer and need not be linear (e.g. a fitted latency curve: docs/design.md, "Latency
    budget"), so one global ranking does not solve it. Each layer keeps its top-scored units; the
    count per layer is chosen by dynamic programming over the 2·L parts (a multiple-choice knapsack)
    with the budget cut into `resolution` steps and every cost rounded up to a whole step, so the
    result is optimal up to that rounding and never exceeds the budget by the tables.

    Args:
        head_scores: [L, H] importance of each attention head.
        neuron_scores: [L, F] importance of each MLP neuron.
        head_costs: [L, H + 1] cost of layer l's attention keeping 0..H heads.
        neuron_costs: [L, F + 1] cost of layer l's MLP keeping 0..F neurons.
        budget: total cost allowed for all layers' attention and MLP.
        head_counts: head counts a layer may keep (e.g. `allowed_widths`); all of 0..H if None.
        neuron_counts: neuron counts a layer may keep; all of 0..F if None.
        candidates: ([L, H], [L, F]) masks of the units that may be kept (non-zero): those an earlier
            step of iterative pruning kept. None: every unit.
        resolution: steps the budget is cut into.
        keep_a_head: keep at least one head: if the best choice keeps none, the layer holding the best-scored
            head keeps its narrowest attention and the rest is searched again.

    Raises:
        NoWidthsFit: if no choice (keeping a head, with `keep_a_head`) fits the budget.
    """
    layers, heads = head_scores.shape
    neurons = neuron_scores.shape[1]
    _check_width_inputs(head_scores, neuron_scores, head_costs, neuron_costs, budget)
    head_counts = list(range(heads + 1)) if head_counts is None else head_counts
    neuron_counts = list(range(neurons + 1)) if neuron_counts is None else neuron_counts
    allowed = (None, None) if candidates is None else candidates
    parts = [(head_scores, head_costs, head_counts, allowed[0]), (neuron_scores, neuron_costs, neuron_counts,
                                                                   allowed[1])]
    groups = []  # (layer, part, order, counts, values, steps) for every layer's attention, then every layer's MLP
    step = budget / resolution
    for part, (scores, costs, counts, units) in enumerate(parts):
        for layer in range(layers):
            row = scores[layer].detach().cpu().double()
            indices = torch.arange(len(row)) if units is None else units[layer].cpu().nonzero().flatten()
            order = indices[torch.argsort(row[indices], descending=True, stable=True)]
            prefix = torch.cat([row.new_zeros(1), row[order].cumsum(0)])
            index = torch.tensor([count for count in counts if count <= len(order)])
            steps = torch.ceil(costs[layer, index].double().cpu() / step).long()
            groups.append((layer, part, order, index, prefix[index], steps))
    widest = [int(counts.max()) for *_, counts, _values, _steps in groups]
    scores_non_negative = bool((head_scores >= 0).all() and (neuron_scores >= 0).all())
    if scores_non_negative and _cost(widest, layers, head_costs, neuron_costs) <= budget * (1 + FLOAT_SLACK):
        kept = widest  # dominates every other choice; the knapsack's rounded costs could miss it (a constraint of 1)
    else:
        kept = _knapsack(groups, resolution, step)
        if keep_a_head and sum(kept[:layers]) == 0:
            kept = _knapsack(_with_a_head(groups, layers), resolution, step)
    masks = [torch.zeros_like(head_scores, dtype=torch.float32, device="cpu"),
             torch.zeros_like(neuron_scores, dtype=torch.float32, device="cpu")]
    for (layer, part, order, *_), count in zip(groups, kept, strict=True):
        masks[part][layer, order[:count]] = 1.0
    heads_per_layer, neurons_per_layer = kept[:layers], kept[layers:]
    cost = _cost(kept, layers, head_costs, neuron_costs)
    assert cost <= budget * (1 + FLOAT_SLACK), f"width search kept a cost of {cost} over the budget {budget}"
    objective = float((head_scores.double().cpu() * masks[0]).sum() + (neuron_scores.double().cpu() * masks[1]).sum())
    return WidthSearchResult(head_mask=masks[0].to(head_scores.device), neuron_mask=masks[1].to(neuron_scores.device),
                             heads_per_layer=heads_per_layer, neurons_per_layer=neurons_per_layer,
                             objective=objective, cost=cost, budget=budget)


def _cost(kept: list[int], layers: int, head_costs: torch.Tensor, neuron_costs: torch.Tensor) -> float:
    """The table cost of keeping `kept` (L head counts, then L neuron counts)."""
    return float(sum(head_costs[layer, count] for layer, count in enumerate(kept[:layers]))
                 + sum(neuron_costs[layer, count] for layer, count in enumerate(kept[layers:])))


def _with_a_head(groups: list[tuple], layers: int) -> list[tuple]:
    """`groups` with the attention of the layer holding the best-scored head made to keep at least one head."""
    heads = [group for group in groups[:layers] if len(group[3]) > 1]
    if not heads:
        raise NoWidthsFit(math.inf)
    best = max(heads, key=lambda group: float(group[4][1] - group[4][0]))  # the value of its smallest head count
    positive = best[3] > 0
    return [(*group[:3], group[3][positive], group[4][positive], group[5][positive]) if group is best else group
            for group in groups]


class NoWidthsFit(ValueError):
    """No per-layer widths fit a width search's budget; `needed` is what the cheapest choice costs (in steps of
    the budget)."""

    def __init__(self, needed: float) -> None:
        super().__init__(f"no widths fit the budget: the cheapest choice costs {needed:.4g} budget steps")
        self.needed = needed


class BudgetTooSmall(ValueError):
    """The constraint is below `smallest`, the least that keeps what the tower needs (a fraction of its dense
    MACs or latency)."""

    def __init__(self, constraint: float, smallest: float, what: str) -> None:
        self.smallest = smallest
        super().__init__(f"--constraint {constraint:g} is below {smallest:.3g}, the least any pruned tower keeps here "
                         f"({what}); raise --constraint to at least {suggested_constraint(smallest):g}")


def suggested_constraint(smallest: float) -> float:
    """A constraint safely above `smallest`: 1 % more (the searches round costs up to their budget steps),
    rounded up at the third significant digit."""
    if smallest <= 0:
        return 0.001
    digits = 2 - math.floor(math.log10(smallest * 1.01))
    return min(1.0, math.ceil(smallest * 1.01 * 10 ** digits) / 10 ** digits)


def _knapsack(groups: list[tuple], resolution: int, step: float) -> list[int]:
    """The count each group keeps that maximises the summed values within `resolution` budget steps."""
    # One step kept in reserve: rounding of float sums can then never push the real cost over the budget.
    capacity = resolution - 1
    best = torch.zeros(capacity + 1, dtype=torch.float64)
    choices = []
    for *_, values, steps in groups:
        best, choice = _add_group(best, values, steps)
        choices.append(choice)
    if not bool(torch.isfinite(best[capacity])):
        raise NoWidthsFit(sum(float(group[5].min()) for group in groups))
    remaining, kept = capacity, []
    for (*_, counts, _values, steps), choice in zip(reversed(groups), reversed(choices), strict=True):
        option = int(choice[remaining])
        kept.append(int(counts[option]))
        remaining -= int(steps[option])
    kept.reverse()
    return kept


def _add_group(best: torch.Tensor, values: torch.Tensor, steps: torch.Tensor,
               chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Knapsack step: best[b] over one more group whose options have `values` and `steps`; and the option taken."""
    capacity = len(best) - 1
    budget_steps = torch.arange(capacity + 1)
    new = torch.full_like(best, -math.inf)
    choice = torch.zeros(capacity + 1, dtype=torch.int64)
    for start in range(0, len(values), chunk):
        block_values, block_steps = values[start:start + chunk], steps[start:start + chunk]
        source = budget_steps[None, :] - block_steps[:, None]  # [K, capacity + 1]
        candidate = torch.where(source >= 0, best[source.clamp(min=0)] + block_values[:, None],
                                torch.tensor(-math.inf, dtype=torch.float64))
        block_best, block_choice = candidate.max(dim=0)
        better = block_best > new
        new = torch.where(better, block_best, new)
        choice = torch.where(better, block_choice + start, choice)
    return new, choice


def _check_width_inputs(head_scores: torch.Tensor, neuron_scores: torch.Tensor, head_costs: torch.Tensor,
                        neuron_costs: torch.Tensor, budget: float) -> None:
    """Raise one ValueError listing every problem with the inputs of `search_layer_widths`."""
    problems = []
    layers, heads = head_scores.shape
    neurons = neuron_scores.shape[1]
    for name, costs, shape in (("head_costs", head_costs, (layers, heads + 1)),
                               ("neuron_costs", neuron_costs, (layers, neurons + 1))):
        if tuple(costs.shape) != shape:
            problems.append(f"{name} has shape {tuple(costs.shape)}, expected {shape} (one cost per layer and count)")
        elif not bool(torch.isfinite(costs).all()) or bool((costs < 0).any()):
            problems.append(f"{name} must be finite and >= 0")
    for name, scores in (("head_scores", head_scores), ("neuron_scores", neuron_scores)):
        if not bool(torch.isfinite(scores).all()):
            problems.append(f"{name} has NaN or infinite entries; check the Fisher statistics")
    if neuron_scores.shape[0] != layers:
        problems.append(f"head_scores has {layers} layers but neuron_scores has {neuron_scores.shape[0]}")
    if not budget > 0:
        problems.append(f"the budget must be > 0, got {budget}")
    if problems:
        raise ValueError("; ".join(problems))


def search_layer_macs(head_scores: torch.Tensor, neuron_scores: torch.Tensor, macs: MacCosts, constraint: float,
                      head_dim: int, multiple_of: int = 1,
                      candidates: tuple[torch.Tensor, torch.Tensor] | None = None,
                      keep_a_head: bool = False) -> WidthSearchResult:
    """`search_masks`'s FLOP budget, searched per layer so that widths can be held to multiples of `multiple_of`.

    Args:
        head_scores: [L, H] importance of each attention head.
        neuron_scores: [L, F] importance of each MLP neuron.
        macs: per-unit MAC costs of the encoder.
        constraint: fraction of the dense encoder's MACs to keep, in (0, 1].
        head_dim: d, columns per head (a head count's width is count · d).
        multiple_of: per-layer widths (heads · d, neurons) are multiples of it, or the dense width.
        candidates: ([L, H], [L, F]) masks of the units that may be kept; None: every unit.
        keep_a_head: keep at least one head (see `search_layer_widths`).
    """
    _check_inputs(head_scores, neuron_scores, macs, constraint)
    return WidthBudget(head_dim, multiple_of).search(head_scores, neuron_scores, macs, constraint, candidates,
                                                     keep_a_head)


def search_layer_latency(head_scores: torch.Tensor, neuron_scores: torch.Tensor, table: LatencyTable,
                         constraint: float, head_dim: int, multiple_of: int = 1,
                         candidates: tuple[torch.Tensor, torch.Tensor] | None = None,
                         keep_a_head: bool = False) -> WidthSearchResult:
    """Keep the most important heads and neurons within `constraint` times the dense tower's latency by `table`.

    The budget left to the layers is c · (table's dense latency) minus the parts no width changes
    (the empty tower's time); each layer pays its own fitted cost for the widths it keeps.

    Args:
        head_scores: [L, H] importance of each attention head.
        neuron_scores: [L, F] importance of each MLP neuron.
        table: measured and fitted latencies of the encoder's parts on the run's device.
        constraint: fraction of the dense tower's latency to keep, in (0, 1].
        head_dim: d, columns per head.
        multiple_of: per-layer widths (heads · d, neurons) are multiples of it, or the dense width.
        candidates: ([L, H], [L, F]) masks of the units that may be kept; None: every unit.
        keep_a_head: keep at least one head (see `search_layer_widths`).
    """
    if not constraint_in_range(constraint):
        raise ValueError(constraint_problem(constraint, "latency"))
    macs = MacCosts(table.num_layers, table.num_heads, table.num_neurons, tokens=0, per_head=0, per_neuron=0)
    return WidthBudget(head_dim, multiple_of, table).search(head_scores, neuron_scores, macs, constraint, candidates,
                                                            keep_a_head)


@dataclass(frozen=True)
class WidthBudget:
    """How the per-layer search is asked: within a latency table (None: MACs), widths at multiples of N."""

    head_dim: int
    """d, columns per head."""
    multiple_of: int = 1
    """Per-layer widths are multiples of it, or dense."""
    latency: LatencyTable | None = None
    """The run's latency table: the constraint is a fraction of its dense latency; None: of the MACs."""

    def costs(self, macs: MacCosts) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """Per layer the cost of keeping 0..H heads [L, H + 1] and 0..F neurons [L, F + 1], the cost no width changes
        and the dense tower's, in the budget's unit (MACs, or seconds by the latency table)."""
        if self.latency is not None:
            table = self.latency
            return table.head_costs(), table.neuron_costs(), table.fixed_s, table.dense_latency
        layers = macs.num_layers
        head_costs = (torch.arange(macs.num_heads + 1, dtype=torch.float64) * macs.per_head).expand(layers, -1)
        neuron_costs = (torch.arange(macs.num_neurons + 1, dtype=torch.float64) * macs.per_neuron).expand(layers, -1)
        return head_costs, neuron_costs, 0.0, float(macs.dense)

    def counts(self, macs: MacCosts) -> tuple[list[int], list[int]]:
        """The head and neuron counts a layer may keep."""
        return (allowed_widths(macs.num_heads, self.head_dim, self.multiple_of),
                allowed_widths(macs.num_neurons, 1, self.multiple_of))

    def smallest_constraint(self, macs: MacCosts, keep_a_head: bool) -> float:
        """The least constraint any widths meet: the fixed cost, the narrowest choice of every layer and, with
        `keep_a_head`, one layer's narrowest attention."""
        head_costs, neuron_costs, fixed, dense = self.costs(macs)
        head_counts, neuron_counts = self.counts(macs)
        narrowest = head_costs[:, head_counts].min(dim=1).values
        cheapest = fixed + float(narrowest.sum() + neuron_costs[:, neuron_counts].min(dim=1).values.sum())
        if keep_a_head:
            positive = [count for count in head_counts if count > 0]
            cheapest += float((head_costs[:, positive].min(dim=1).values - narrowest).min())
        return cheapest / dense

    def search(self, head_scores: torch.Tensor, neuron_scores: torch.Tensor, macs: MacCosts, constraint: float,
               candidates: tuple[torch.Tensor, torch.Tensor] | None = None,
               keep_a_head: bool = False) -> WidthSearchResult:
        """The per-layer search (`search_layer_widths`) of `constraint` times the dense cost, with these settings.

        Raises:
            BudgetTooSmall: if nothing (that keeps a head, with `keep_a_head`) fits; it names the least constraint.
        """
        head_costs, neuron_costs, fixed, dense = self.costs(macs)
        head_counts, neuron_counts = self.counts(macs)
        budget = constraint * dense - fixed
        if self.latency is None:  # exact rational arithmetic, as in `search_masks`
            budget = math.floor(Fraction(constraint) * macs.dense)
        if budget <= 0:
            smallest = self.smallest_constraint(macs, keep_a_head)
            raise BudgetTooSmall(constraint, smallest, _essentials(self, keep_a_head))
        try:
            return search_layer_widths(head_scores, neuron_scores, head_costs, neuron_costs, budget, head_counts,
                                       neuron_counts, candidates, keep_a_head=keep_a_head)
        except NoWidthsFit as error:
            smallest = self.smallest_constraint(macs, keep_a_head)
            raise BudgetTooSmall(constraint, max(smallest, constraint), _essentials(self, keep_a_head)) from error


def check_reachable(constraint: float, macs: MacCosts, keep_a_head: bool, widths: WidthBudget | None = None) -> None:
    """Refuse, before any statistics are gathered, a constraint below the least that any masks meet: the parts no
    pruning removes (latency), the narrowest allowed widths and, with `keep_a_head`, one head.

    Raises:
        BudgetTooSmall: naming the least constraint.
    """
    smallest = (macs.per_head / macs.dense if keep_a_head else 0.0) if widths is None \
        else widths.smallest_constraint(macs, keep_a_head)
    if widths is None or widths.latency is None:  # in whole MACs, as the searches round the budget
        reachable = math.floor(Fraction(constraint) * macs.dense) >= round(smallest * macs.dense)
    else:
        reachable = constraint * widths.latency.dense_latency - widths.latency.fixed_s > 0 and constraint >= smallest
    if not reachable or constraint <= 0:
        raise BudgetTooSmall(constraint, smallest, _essentials(widths, keep_a_head))


def _essentials(widths: WidthBudget | None, keep_a_head: bool) -> str:
    """What every pruned tower keeps under these settings, in words."""
    parts = []
    if widths is not None and widths.latency is not None:
        parts.append("the parts no pruning removes, such as embeddings and layer norms")
    if widths is not None and widths.multiple_of > 1:
        parts.append(f"widths at multiples of {widths.multiple_of}")
    if keep_a_head:
        parts.append("one attention head, without which the embedding would ignore the image")
    return "; ".join(parts) or "the narrowest widths"
