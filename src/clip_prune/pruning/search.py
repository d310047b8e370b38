"""FLOP-constrained mask search (DESIGN.md, "FLOP-constrained search"; Kwon et al., arXiv 2204.09656).

Given importance scores for every head and every MLP neuron of the vision encoder, picks
how many heads and neurons to keep so that the encoder's MACs stay within a fraction of
the dense model's, and which ones: the top-scored units globally, across layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from clip_prune.pruning.flops import EncoderMacs


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
    """MACs per image of the encoder that the masks keep (prunable parts only, see `EncoderMacs`)."""
    budget: float
    """MACs per image allowed: constraint · dense MACs."""


def search_masks(
    head_scores: torch.Tensor,
    neuron_scores: torch.Tensor,
    macs: EncoderMacs,
    constraint: float,
    candidates: tuple[torch.Tensor, torch.Tensor] | None = None,
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

    Returns:
        The masks (float32, on the scores' device), the counts kept, the objective curve and the MACs.

    Raises:
        ValueError: if `constraint` is outside (0, 1], or the scores have the wrong shape or are not finite.
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
    head_scores: torch.Tensor, neuron_scores: torch.Tensor, macs: EncoderMacs, constraint: float
) -> None:
    """Raise one ValueError listing every problem with the inputs of `search_masks`."""
    problems = []
    if not 0 < constraint <= 1:
        problems.append(
            f"constraint must be in (0, 1] (the fraction of the dense encoder's FLOPs to keep), got "
            f"{constraint}; set --constraint to e.g. 0.6"
        )
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
