"""Tests of the mask searches: FLOP-constrained (global ranking) and per-layer widths under cost tables."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers import CLIPVisionConfig

from clip_prune.core.pruning.costs import MacCosts, mac_costs
from clip_prune.core.pruning.search import (
    BudgetTooSmall,
    WidthBudget,
    allowed_widths,
    check_reachable,
    search_layer_macs,
    search_layer_widths,
    search_masks,
)


def _macs(layers: int, heads: int, neurons: int, per_head: int, per_neuron: int) -> MacCosts:
    return MacCosts(
        num_layers=layers,
        num_heads=heads,
        num_neurons=neurons,
        tokens=1,
        per_head=per_head,
        per_neuron=per_neuron,
    )


def _brute_force_over_counts(head_scores, neuron_scores, macs, constraint):
    """Best objective over every (n_h, n_n) that fits, each keeping its top-scored units."""
    heads = head_scores.flatten().double().sort(descending=True).values
    neurons = neuron_scores.flatten().double().sort(descending=True).values
    best = -math.inf
    for num_heads in range(heads.numel() + 1):
        for num_neurons in range(neurons.numel() + 1):
            if macs.of_counts(num_heads, num_neurons) <= constraint * macs.dense:
                best = max(best, float(heads[:num_heads].sum() + neurons[:num_neurons].sum()))
    return best


def _brute_force_over_subsets(head_scores, neuron_scores, macs, constraint):
    """Best objective over every subset of heads and neurons that fits."""
    heads, neurons = head_scores.flatten().tolist(), neuron_scores.flatten().tolist()
    best = -math.inf
    for head_keep in itertools.product([0, 1], repeat=len(heads)):
        for neuron_keep in itertools.product([0, 1], repeat=len(neurons)):
            if macs.of_counts(sum(head_keep), sum(neuron_keep)) > constraint * macs.dense:
                continue
            value = sum(h for h, k in zip(heads, head_keep, strict=True) if k) + sum(
                n for n, k in zip(neurons, neuron_keep, strict=True) if k
            )
            best = max(best, value)
    return best


def test_search_matches_brute_force_over_subsets():
    generator = torch.Generator().manual_seed(0)
    macs = _macs(2, 2, 3, per_head=7, per_neuron=3)
    for constraint in [0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0]:
        head_scores = torch.rand(2, 2, generator=generator)
        neuron_scores = torch.rand(2, 3, generator=generator)
        result = search_masks(head_scores, neuron_scores, macs, constraint)
        expected = _brute_force_over_subsets(head_scores, neuron_scores, macs, constraint)
        assert result.objective == pytest.approx(expected, rel=1e-12)
        kept = float((head_scores * result.head_mask).sum() + (neuron_scores * result.neuron_mask).sum())
        assert kept == pytest.approx(expected, rel=1e-6)
        assert macs.of_masks(result.head_mask, result.neuron_mask) <= constraint * macs.dense


def test_search_matches_brute_force_over_counts():
    generator = torch.Generator().manual_seed(1)
    macs = _macs(3, 4, 10, per_head=23, per_neuron=2)
    for constraint in torch.linspace(0.05, 1.0, 20).tolist():
        head_scores = torch.rand(3, 4, generator=generator, dtype=torch.float64)
        neuron_scores = torch.rand(3, 10, generator=generator, dtype=torch.float64) * 0.2
        result = search_masks(head_scores, neuron_scores, macs, constraint)
        expected = _brute_force_over_counts(head_scores, neuron_scores, macs, constraint)
        assert result.objective == pytest.approx(expected, rel=1e-12)
        assert result.objective == result.objective_curve.max()
        assert int(result.head_mask.sum()) == result.num_heads
        assert int(result.neuron_mask.sum()) == result.num_neurons


@settings(max_examples=100, deadline=None)
@given(
    layers=st.integers(1, 4),
    heads=st.integers(1, 5),
    neurons=st.integers(1, 20),
    per_head=st.integers(1, 10_000),
    per_neuron=st.integers(1, 1_000),
    constraint=st.floats(min_value=1e-6, max_value=1.0, exclude_min=True),
    seed=st.integers(0, 2**31 - 1),
)
def test_search_never_exceeds_budget(layers, heads, neurons, per_head, per_neuron, constraint, seed):
    generator = torch.Generator().manual_seed(seed)
    macs = _macs(layers, heads, neurons, per_head, per_neuron)
    head_scores = torch.rand(layers, heads, generator=generator)
    neuron_scores = torch.rand(layers, neurons, generator=generator)
    result = search_masks(head_scores, neuron_scores, macs, constraint)
    kept_macs = macs.of_masks(result.head_mask, result.neuron_mask)
    assert kept_macs == result.macs
    assert kept_macs <= constraint * macs.dense
    assert kept_macs <= result.budget
    assert result.objective_curve.shape == (layers * heads + 1,)
    assert set(result.head_mask.unique().tolist()) <= {0.0, 1.0}
    assert set(result.neuron_mask.unique().tolist()) <= {0.0, 1.0}


def test_search_objective_curve_is_minus_inf_where_heads_alone_exceed_budget():
    macs = _macs(2, 3, 4, per_head=10, per_neuron=1)
    result = search_masks(torch.ones(2, 3), torch.ones(2, 4), macs, 0.5)
    budget = 0.5 * macs.dense
    for num_heads, value in enumerate(result.objective_curve.tolist()):
        assert (value == -math.inf) == (num_heads * macs.per_head > budget)


def test_search_constraint_one_keeps_everything():
    macs = mac_costs(
        CLIPVisionConfig(
            image_size=30,
            patch_size=2,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
        )
    )
    head_scores = torch.randn(2, 4, dtype=torch.float64)
    neuron_scores = torch.randn(2, 37, dtype=torch.float64)
    result = search_masks(head_scores, neuron_scores, macs, 1.0)
    assert torch.equal(result.head_mask, torch.ones(2, 4))
    assert torch.equal(result.neuron_mask, torch.ones(2, 37))
    assert result.head_mask.dtype == torch.float32
    assert result.macs == macs.dense


def test_search_keeps_top_scored_units_across_layers():
    macs = _macs(2, 2, 2, per_head=4, per_neuron=1)
    head_scores = torch.tensor([[0.9, 0.1], [0.8, 0.2]])
    neuron_scores = torch.tensor([[0.01, 0.02], [0.03, 0.04]])
    result = search_masks(head_scores, neuron_scores, macs, 0.5)  # budget 10: two heads + two neurons
    assert torch.equal(result.head_mask, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert torch.equal(result.neuron_mask, torch.tensor([[0.0, 0.0], [1.0, 1.0]]))


@pytest.mark.parametrize("constraint", [0.0, -0.5, 1.0001, 2.0, float("nan")])
def test_search_rejects_constraint_outside_unit_interval(constraint):
    macs = _macs(1, 2, 3, per_head=5, per_neuron=1)
    with pytest.raises(ValueError, match=r"--constraint must be in \(0, 1\]"):
        search_masks(torch.ones(1, 2), torch.ones(1, 3), macs, constraint)


def test_search_rejects_wrong_shapes():
    macs = _macs(2, 3, 4, per_head=5, per_neuron=1)
    with pytest.raises(ValueError, match=r"head_scores has shape \(3, 2\), expected \[L, H\] = \(2, 3\)"):
        search_masks(torch.ones(3, 2), torch.ones(2, 4), macs, 0.5)
    with pytest.raises(ValueError, match=r"neuron_scores has shape \(2, 5\), expected \[L, F\] = \(2, 4\)"):
        search_masks(torch.ones(2, 3), torch.ones(2, 5), macs, 0.5)


def test_search_rejects_non_finite_scores():
    macs = _macs(1, 2, 3, per_head=5, per_neuron=1)
    with pytest.raises(ValueError, match="neuron_scores has NaN"):
        search_masks(torch.ones(1, 2), torch.tensor([[1.0, float("nan"), 0.0]]), macs, 0.5)


def test_search_among_candidates_matches_brute_force_over_their_subsets():
    generator = torch.Generator().manual_seed(3)
    macs = _macs(2, 3, 4, per_head=7, per_neuron=3)
    for constraint in [0.2, 0.4, 0.6]:
        head_scores = torch.rand(2, 3, generator=generator)
        neuron_scores = torch.rand(2, 4, generator=generator)
        heads_allowed = torch.rand(2, 3, generator=generator) < 0.7
        neurons_allowed = torch.rand(2, 4, generator=generator) < 0.7
        result = search_masks(head_scores, neuron_scores, macs, constraint, (heads_allowed, neurons_allowed))
        assert not (result.head_mask.bool() & ~heads_allowed).any()
        assert not (result.neuron_mask.bool() & ~neurons_allowed).any()
        expected = _brute_force_over_subsets(head_scores[heads_allowed], neuron_scores[neurons_allowed], macs,
                                             constraint)
        assert result.objective == pytest.approx(expected, rel=1e-12)
        assert macs.of_masks(result.head_mask, result.neuron_mask) <= constraint * macs.dense


def test_search_refuses_candidates_of_another_shape():
    macs = _macs(2, 2, 3, per_head=7, per_neuron=3)
    with pytest.raises(ValueError, match="candidates have shapes"):
        search_masks(torch.rand(2, 2), torch.rand(2, 3), macs, 0.5, (torch.ones(2, 3), torch.ones(2, 3)))


def _brute_force_widths(head_scores, neuron_scores, head_costs, neuron_costs, budget, resolution, counts):
    """Best objective over every choice of per-layer counts whose costs, rounded up to budget/resolution
    steps as the search rounds them, fit in resolution - 1 steps."""
    step = budget / resolution
    layers = head_scores.shape[0]
    parts = [(head_scores, head_costs, counts[0]), (neuron_scores, neuron_costs, counts[1])]
    options = []  # per (part, layer): list of (steps, value)
    for scores, costs, allowed in parts:
        for layer in range(layers):
            top = scores[layer].double().sort(descending=True).values
            options.append([(math.ceil(float(costs[layer, k]) / step), float(top[:k].sum())) for k in allowed])
    best = -math.inf
    for choice in itertools.product(*options):
        if sum(steps for steps, _ in choice) <= resolution - 1:
            best = max(best, sum(value for _, value in choice))
    return best


@settings(max_examples=25, deadline=None)
@example(seed=0, fraction=1.0, multiple=2)
@given(seed=st.integers(0, 10_000), fraction=st.floats(0.05, 1.0), multiple=st.sampled_from([1, 2]))
def test_width_search_is_optimal_and_within_budget(seed: int, fraction: float, multiple: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    layers, heads, neurons, resolution = 2, 3, 4, 40
    head_scores, neuron_scores = torch.rand(layers, heads, generator=generator), torch.rand(layers, neurons,
                                                                                           generator=generator)
    # Per-layer, non-linear costs: a jump for the first unit, then uneven increments.
    head_costs = torch.rand(layers, heads + 1, generator=generator).double().cumsum(1)
    neuron_costs = torch.rand(layers, neurons + 1, generator=generator).double().cumsum(1)
    head_costs[:, 0] = neuron_costs[:, 0] = 0
    budget = fraction * float(head_costs[:, -1].sum() + neuron_costs[:, -1].sum())
    counts = (allowed_widths(heads, 1, multiple), allowed_widths(neurons, 1, multiple))
    result = search_layer_widths(head_scores, neuron_scores, head_costs, neuron_costs, budget, *counts,
                                 resolution=resolution)
    cost = (sum(float(head_costs[layer, h]) for layer, h in enumerate(result.heads_per_layer))
            + sum(float(neuron_costs[layer, n]) for layer, n in enumerate(result.neurons_per_layer)))
    assert cost <= budget * (1 + 1e-9) and result.cost == pytest.approx(cost)
    rounded_optimum = _brute_force_widths(head_scores, neuron_scores, head_costs, neuron_costs, budget, resolution,
                                          counts)
    dense_cost = float(head_costs[:, -1].sum() + neuron_costs[:, -1].sum())
    if dense_cost <= budget * (1 + 1e-9):  # the dense widths fit: all, though rounded costs leave a step short
        assert result.heads_per_layer == [heads] * layers and result.neurons_per_layer == [neurons] * layers
        assert result.objective == pytest.approx(float(head_scores.sum() + neuron_scores.sum()))
    else:
        assert result.objective == pytest.approx(rounded_optimum)
    assert result.head_mask.sum(1).tolist() == result.heads_per_layer
    # Each layer keeps its top-scored units.
    for layer, count in enumerate(result.neurons_per_layer):
        kept = neuron_scores[layer][result.neuron_mask[layer] == 1]
        dropped = neuron_scores[layer][result.neuron_mask[layer] == 0]
        assert count == len(kept) and (len(dropped) == 0 or len(kept) == 0 or kept.min() >= dropped.max())


def test_allowed_widths_are_multiples_or_dense() -> None:
    assert allowed_widths(37, 1, 8) == [0, 8, 16, 24, 32, 37]
    assert allowed_widths(4, 6, 4) == [0, 2, 4]  # heads of 6 columns: widths 0, 12, 24
    assert allowed_widths(12, 64, 64) == list(range(13))


@pytest.mark.parametrize("multiple_of", [8, 16])
def test_multiple_of_keeps_neuron_widths_at_multiples_within_the_flop_budget(multiple_of: int) -> None:
    config = CLIPVisionConfig(image_size=30, patch_size=6, hidden_size=32, num_hidden_layers=3,
                              num_attention_heads=4, intermediate_size=37)
    macs = mac_costs(config)
    generator = torch.Generator().manual_seed(3)
    head_scores, neuron_scores = torch.rand(3, 4, generator=generator), torch.rand(3, 37, generator=generator)
    for constraint in (0.3, 0.55, 0.8):
        result = search_layer_macs(head_scores, neuron_scores, macs, constraint, head_dim=8, multiple_of=multiple_of)
        assert all(n % multiple_of == 0 or n == 37 for n in result.neurons_per_layer)
        assert macs.of_masks(result.head_mask, result.neuron_mask) <= constraint * macs.dense
        free = search_masks(head_scores, neuron_scores, macs, constraint)
        assert result.objective <= free.objective + 1e-9  # the free global search is optimal for linear costs


def test_width_search_keeps_only_candidates() -> None:
    generator = torch.Generator().manual_seed(4)
    head_scores, neuron_scores = torch.rand(3, 4, generator=generator), torch.rand(3, 37, generator=generator)
    heads_allowed = torch.rand(3, 4, generator=generator) < 0.6
    neurons_allowed = torch.rand(3, 37, generator=generator) < 0.6
    head_costs = torch.arange(5).double().expand(3, -1) * 10
    neuron_costs = torch.arange(38).double().expand(3, -1)
    for fraction in (0.3, 0.7, 1.0):
        budget = fraction * float(head_costs[:, -1].sum() + neuron_costs[:, -1].sum())
        result = search_layer_widths(head_scores, neuron_scores, head_costs, neuron_costs, budget,
                                     candidates=(heads_allowed, neurons_allowed))
        assert not (result.head_mask.bool() & ~heads_allowed).any()
        assert not (result.neuron_mask.bool() & ~neurons_allowed).any()
        assert result.cost <= budget
    assert result.head_mask.bool().equal(heads_allowed) and result.neuron_mask.bool().equal(neurons_allowed)


# A tower whose pooled token learns of the image only through attention keeps a head ---------------------------------

def _heads_worthless(layers: int = 3, heads: int = 4, neurons: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores under which the best masks keep no head: heads score next to nothing, neurons much more."""
    head_scores = torch.full((layers, heads), 1e-6)
    head_scores[1, 2] = 2e-6  # the best head, in layer 1
    return head_scores, torch.rand(layers, neurons, generator=torch.Generator().manual_seed(0)) + 1.0


def test_global_search_keeps_the_best_head_only_when_asked() -> None:
    macs = _macs(3, 4, 16, per_head=10, per_neuron=1)  # dense 3 * (40 + 16) = 168
    head_scores, neuron_scores = _heads_worthless()
    assert search_masks(head_scores, neuron_scores, macs, 0.2).num_heads == 0
    kept = search_masks(head_scores, neuron_scores, macs, 0.2, keep_a_head=True)
    assert kept.num_heads == 1 and kept.head_mask[1, 2] == 1 and kept.macs <= 0.2 * macs.dense
    assert kept.num_neurons == (math.floor(0.2 * 168) - 10) // 1  # the rest of the budget still goes to neurons


def test_global_search_names_the_least_constraint_that_keeps_a_head() -> None:
    macs = _macs(3, 4, 16, per_head=10, per_neuron=1)
    with pytest.raises(BudgetTooSmall, match="--constraint 0.05 is below 0.0595.* at least 0.0602") as caught:
        search_masks(*_heads_worthless(), macs, 0.05, keep_a_head=True)
    assert caught.value.smallest == pytest.approx(10 / 168)
    assert search_masks(*_heads_worthless(), macs, 0.0602, keep_a_head=True).num_heads == 1


@pytest.mark.parametrize("multiple_of", [1, 8])
def test_width_search_keeps_the_best_head_only_when_asked(multiple_of: int) -> None:
    macs = _macs(3, 4, 16, per_head=10, per_neuron=1)
    head_scores, neuron_scores = _heads_worthless()
    budget = WidthBudget(head_dim=8, multiple_of=multiple_of)
    assert sum(budget.search(head_scores, neuron_scores, macs, 0.3).heads_per_layer) == 0
    kept = budget.search(head_scores, neuron_scores, macs, 0.3, keep_a_head=True)
    assert kept.heads_per_layer == [0, 1, 0] and kept.head_mask[1, 2] == 1
    assert kept.cost <= 0.3 * macs.dense
    assert all(count % multiple_of == 0 or count == 16 for count in kept.neurons_per_layer)
    with pytest.raises(BudgetTooSmall, match="one attention head") as caught:
        budget.search(head_scores, neuron_scores, macs, 0.05, keep_a_head=True)
    assert caught.value.smallest == pytest.approx(10 / 168)
    check_reachable(0.06, macs, True, budget)
    with pytest.raises(BudgetTooSmall):
        check_reachable(0.05, macs, True, budget)


def test_a_constraint_whose_budget_rounds_below_one_head_is_refused_not_answered_without_heads() -> None:
    macs = _macs(2, 4, 16, per_head=100, per_neuron=4)  # dense 928: 100 / 928 as a float rounds down to 99 MACs
    constraint = macs.per_head / macs.dense
    assert math.floor(Fraction(constraint) * macs.dense) < macs.per_head
    with pytest.raises(BudgetTooSmall):
        check_reachable(constraint, macs, keep_a_head=True)
    with pytest.raises(BudgetTooSmall):
        search_masks(torch.rand(2, 4), torch.rand(2, 16), macs, constraint, keep_a_head=True)
