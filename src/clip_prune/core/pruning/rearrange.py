"""Greedy mask rearrangement (docs/design.md, "Mask rearrangement"; Kwon et al., arXiv 2204.09656).

Within each layer, swaps pruned and kept units so that the pruned set P has a smaller
damage 1_Pᵀ G 1_P under the layer's Fisher block G, keeping the count per layer (and so
the MACs) unchanged. The same code serves heads (N = H) and MLP neurons (N = F).
"""

from __future__ import annotations

import torch


def pruned_damage(mask: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Damage 1_Pᵀ G_l 1_P of the pruned set P = {i : mask[l, i] == 0} of each layer.

    Args:
        mask: [L, N] mask; zero entries are pruned units.
        gram: [L, N, N] Fisher block of each layer (Σ_n g g^T).

    Returns:
        [L] float64 damage per layer.
    """
    _check_shapes(mask, None, gram)
    pruned = (mask == 0).to(torch.float64)
    return torch.stack(
        [pruned[layer] @ gram[layer].to(torch.float64) @ pruned[layer] for layer in range(len(mask))]
    )


def rearrange_mask(mask: torch.Tensor, scores: torch.Tensor, gram: torch.Tensor,
                   fixed: torch.Tensor | None = None) -> torch.Tensor:
    """Rearrange each layer's pruned units to lower the damage 1_Pᵀ G_l 1_P, keeping their count.

    Per layer with k pruned units (0 < k < N): start with P = the k lowest-scored units; then for
    each other unit j, in ascending order of score, find the unit i of P whose swap for j leaves the
    smallest damage of P ∪ {j} \\ {i}, and swap if that damage is strictly smaller. One pass. If the
    result does not strictly lower the damage of the input mask's pruned set, the layer keeps the
    input mask, so the damage never increases. Layers are processed together, one candidate each
    per step, with the row sums r = G 1_P updated incrementally: O(N) work per candidate.

    Args:
        mask: [L, N] mask; zero entries are pruned units, any other value counts as kept.
        scores: [L, N] diagonal importance of each unit (e.g. the diagonal of `gram`).
        gram: [L, N, N] symmetric Fisher block of each layer (Σ_n g g^T).
        fixed: [L, N] bool, units that stay pruned whatever their scores (those an earlier step of
            iterative pruning removed); they must be pruned in `mask`. Their rows and columns of `gram`
            are left out: the damage is that of pruning the other units from the model without them.

    Returns:
        [L, N] 0/1 mask in `mask`'s dtype and device, with as many zeros per layer as `mask`.

    Raises:
        ValueError: if the shapes do not agree.
    """
    _check_shapes(mask, scores, gram)
    input_pruned = mask == 0
    fixed = torch.zeros_like(input_pruned) if fixed is None else fixed.to(input_pruned.device).bool()
    if bool((fixed & ~input_pruned).any()):
        raise ValueError("a fixed (already pruned) unit is kept in the mask to rearrange")
    num_pruned = input_pruned.sum(dim=1)
    num_units = mask.shape[1]
    active = (num_pruned > 0) & (num_pruned < num_units)
    if not bool(active.any()):
        return (~input_pruned).to(mask.dtype)

    if bool(fixed.any()):
        # Masked units still get mask gradients (their activations exist), so their Gram entries are not
        # zero; they describe a model the fixed units are already gone from, so they must not count.
        free = (~fixed).to(device=gram.device, dtype=gram.dtype)
        gram = gram.detach() * free[:, :, None] * free[:, None, :]
    layers = torch.nonzero(active).flatten()
    pruned = _greedy_pruned_sets(
        scores[layers].detach().to(torch.float64), gram[layers].detach(), num_pruned[layers], fixed[layers]
    )
    result = input_pruned.clone()
    result[layers] = pruned.to(result.device)
    # Keep the greedy set only where it strictly lowers the damage of the input mask's set.
    worse = pruned_damage((~result).to(torch.float64), gram) >= pruned_damage(mask, gram)
    worse = worse.to(result.device) & active.to(result.device)
    result[worse] = input_pruned[worse]
    return (~result).to(mask.dtype)


def _greedy_pruned_sets(scores: torch.Tensor, gram: torch.Tensor, num_pruned: torch.Tensor,
                        fixed: torch.Tensor) -> torch.Tensor:
    """the greedy pass of docs/design.md for layers with 0 < k < N pruned units, all layers in lock-step.

    Args:
        scores: [M, N] float64 unit scores of the M layers to rearrange.
        gram: [M, N, N] their Fisher blocks (any float dtype; rows are read in float64).
        num_pruned: [M] k, pruned units per layer.
        fixed: [M, N] bool, units that start in P and never leave it (at most k per layer).

    Returns:
        [M, N] bool, True for the units in the final pruned set P.
    """
    num_layers, num_units = scores.shape
    device = gram.device
    fixed = fixed.to(device)
    scores, num_pruned = scores.to(device).masked_fill(fixed, -torch.inf), num_pruned.to(device)
    rows = torch.arange(num_layers, device=device)
    order = torch.argsort(scores, dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(num_units, device=device).expand(num_layers, -1).contiguous())
    pruned = rank < num_pruned[:, None]
    diagonal = torch.diagonal(gram, dim1=1, dim2=2).to(torch.float64)
    # r[l, i] = Σ_{p ∈ P} G_l[i, p], kept up to date after each swap.
    row_sums = torch.stack(
        [gram[m].to(torch.float64) @ pruned[m].to(torch.float64) for m in range(num_layers)]
    )

    for step in range(int((num_units - num_pruned).max())):
        position = num_pruned + step
        valid = position < num_units
        candidate = order[rows, position.clamp(max=num_units - 1)]
        candidate_row = gram[rows, candidate].to(torch.float64)
        # damage(P ∪ {j} \ {i}) - damage(P) = 2 r_j + G_jj - 2 r_i - 2 G_ij + G_ii for i ∈ P.
        gain_of_j = 2 * row_sums[rows, candidate] + diagonal[rows, candidate]
        change = gain_of_j[:, None] - 2 * row_sums - 2 * candidate_row + diagonal
        change = change.masked_fill(~pruned | fixed, torch.inf)
        best_change, removed = change.min(dim=1)
        swap = valid & (best_change < 0)
        if not bool(swap.any()):
            continue
        removed_row = gram[rows, removed].to(torch.float64)
        row_sums += swap[:, None] * (candidate_row - removed_row)
        swapped = rows[swap]
        pruned[swapped, candidate[swap]] = True
        pruned[swapped, removed[swap]] = False
    return pruned


def _check_shapes(mask: torch.Tensor, scores: torch.Tensor | None, gram: torch.Tensor) -> None:
    """Raise one ValueError listing every shape mismatch between mask [L, N], scores [L, N] and gram."""
    problems = []
    if mask.dim() != 2:
        problems.append(f"mask must be [L, N], got shape {tuple(mask.shape)}")
    if scores is not None and scores.shape != mask.shape:
        problems.append(f"scores has shape {tuple(scores.shape)}, expected the mask's {tuple(mask.shape)}")
    if mask.dim() == 2 and tuple(gram.shape) != (*mask.shape, mask.shape[1]):
        problems.append(
            f"gram has shape {tuple(gram.shape)}, expected [L, N, N] = {(*mask.shape, mask.shape[1])} "
            "from the mask; pass the per-layer Fisher block of the same units (heads or neurons)"
        )
    if problems:
        raise ValueError("; ".join(problems))
