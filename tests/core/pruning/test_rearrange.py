"""Tests of the greedy mask rearrangement (docs/design.md, "Mask rearrangement")."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clip_prune.core.pruning.rearrange import pruned_damage, rearrange_mask


def _random_gram(layers: int, units: int, samples: int, generator: torch.Generator) -> torch.Tensor:
    """[L, N, N] positive semi-definite Fisher-like blocks XᵀX."""
    features = torch.randn(layers, samples, units, generator=generator, dtype=torch.float64)
    return features.transpose(1, 2) @ features


def _random_mask(layers: int, units: int, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(layers, units, generator=generator) > 0.5).float()


def _damage(pruned: set[int], gram: torch.Tensor) -> float:
    indices = sorted(pruned)
    return float(gram[indices][:, indices].sum())


def _reference_greedy_layer(mask: torch.Tensor, scores: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """The greedy of docs/design.md written directly, recomputing 1ᵀG1 of every candidate set."""
    num_pruned = int((mask == 0).sum())
    if num_pruned in (0, mask.numel()):
        return mask.clone()
    order = sorted(range(mask.numel()), key=lambda unit: (float(scores[unit]), unit))
    pruned = set(order[:num_pruned])
    for candidate in order[num_pruned:]:
        damage, removed = min(
            (_damage((pruned | {candidate}) - {unit}, gram), unit) for unit in sorted(pruned)
        )
        if damage < _damage(pruned, gram):
            pruned = (pruned | {candidate}) - {removed}
    if _damage(pruned, gram) >= _damage({int(i) for i in torch.nonzero(mask == 0)}, gram):
        return mask.clone()
    return torch.tensor([0.0 if unit in pruned else 1.0 for unit in range(mask.numel())])


def test_rearrange_finds_better_pair_than_lowest_scores():
    # Units 0 and 1 have the lowest scores but are strongly positively correlated; units 2 and 3
    # are negatively correlated, so pruning them together costs much less.
    gram = torch.tensor(
        [
            [1.0, 0.9, 0.0, 0.0],
            [0.9, 1.1, 0.0, 0.0],
            [0.0, 0.0, 1.2, -1.0],
            [0.0, 0.0, -1.0, 1.3],
        ],
        dtype=torch.float64,
    )[None]
    scores = torch.diagonal(gram, dim1=1, dim2=2)
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    result = rearrange_mask(mask, scores, gram)
    assert torch.equal(result, torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    best = min(_damage(set(pair), gram[0]) for pair in itertools.combinations(range(4), 2))
    assert float(pruned_damage(result, gram)[0]) == pytest.approx(best)
    assert float(pruned_damage(mask, gram)[0]) == pytest.approx(3.9)


def test_rearrange_matches_reference_greedy():
    generator = torch.Generator().manual_seed(0)
    for units in [2, 3, 5, 12]:
        gram = _random_gram(6, units, samples=4, generator=generator)
        mask = _random_mask(6, units, generator)
        scores = torch.diagonal(gram, dim1=1, dim2=2)
        result = rearrange_mask(mask, scores, gram)
        for layer in range(6):
            expected = _reference_greedy_layer(mask[layer], scores[layer], gram[layer])
            assert torch.equal(result[layer], expected), (units, layer)


@settings(max_examples=100, deadline=None)
@given(
    layers=st.integers(1, 4),
    units=st.integers(1, 16),
    samples=st.integers(1, 8),
    random_scores=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_rearrange_never_increases_damage_and_keeps_counts(layers, units, samples, random_scores, seed):
    generator = torch.Generator().manual_seed(seed)
    gram = _random_gram(layers, units, samples, generator).float()
    mask = _random_mask(layers, units, generator)
    scores = torch.rand(layers, units, generator=generator) if random_scores else torch.diagonal(gram, dim1=1, dim2=2)
    result = rearrange_mask(mask, scores, gram)
    assert result.dtype == mask.dtype
    assert torch.equal((result == 0).sum(dim=1), (mask == 0).sum(dim=1))
    assert set(result.unique().tolist()) <= {0.0, 1.0}
    assert (pruned_damage(result, gram) <= pruned_damage(mask, gram)).all()


def test_rearrange_leaves_full_and_empty_layers_unchanged():
    generator = torch.Generator().manual_seed(2)
    gram = _random_gram(3, 5, samples=3, generator=generator)
    mask = torch.stack([torch.ones(5), torch.zeros(5), torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])])
    result = rearrange_mask(mask, torch.diagonal(gram, dim1=1, dim2=2), gram)
    assert torch.equal(result[:2], mask[:2])
    assert int((result[2] == 0).sum()) == 2


def test_rearrange_treats_rescaled_values_as_kept():
    gram = torch.eye(3, dtype=torch.float64)[None]
    mask = torch.tensor([[0.0, 1.7, 0.4]])
    result = rearrange_mask(mask, torch.tensor([[1.0, 2.0, 3.0]]), gram)
    assert torch.equal(result, torch.tensor([[0.0, 1.0, 1.0]]))


def test_pruned_damage_is_sum_over_pruned_pairs():
    generator = torch.Generator().manual_seed(3)
    gram = _random_gram(2, 6, samples=5, generator=generator)
    mask = torch.tensor([[0.0, 1, 0, 1, 1, 0], [1.0, 1, 1, 1, 1, 1]])
    damage = pruned_damage(mask, gram)
    assert damage.dtype == torch.float64
    assert float(damage[0]) == pytest.approx(_damage({0, 2, 5}, gram[0]))
    assert float(damage[1]) == 0.0


def test_rearrange_rejects_wrong_shapes():
    with pytest.raises(ValueError, match=r"gram has shape \(2, 4, 3\), expected \[L, N, N\] = \(2, 4, 4\)"):
        rearrange_mask(torch.ones(2, 4), torch.ones(2, 4), torch.ones(2, 4, 3))
    with pytest.raises(ValueError, match=r"scores has shape \(2, 3\), expected the mask's \(2, 4\)"):
        rearrange_mask(torch.ones(2, 4), torch.ones(2, 3), torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match=r"mask must be \[L, N\]"):
        pruned_damage(torch.ones(4), torch.ones(1, 4, 4))


def test_fixed_units_stay_pruned_and_the_rest_is_rearranged_as_without_them():
    generator = torch.Generator().manual_seed(5)
    gram = _random_gram(3, 9, 20, generator)
    scores = torch.diagonal(gram, dim1=1, dim2=2).clone()
    fixed = torch.zeros(3, 9, dtype=torch.bool)
    fixed[:, :3] = True  # pruned by an earlier step
    mask = torch.ones(3, 9)
    mask[:, :5] = 0.0
    result = rearrange_mask(mask, scores, gram, fixed)
    assert (result[fixed] == 0).all()
    assert torch.equal((result == 0).sum(1), (mask == 0).sum(1))
    assert (pruned_damage(result, gram) <= pruned_damage(mask, gram) + 1e-9).all()
    # Without the fixed units, some layer would bring one of them back: the constraint is what holds them.
    free = rearrange_mask(mask, scores.masked_fill(fixed, 1e9), gram)
    assert (free[fixed] != 0).any()
    # The fixed units' Gram entries do not matter: the result is that of the model without them.
    noisy = gram.clone()
    noise = _random_gram(3, 9, 20, torch.Generator().manual_seed(6))
    noisy[fixed[:, :, None] | fixed[:, None, :]] = noise[fixed[:, :, None] | fixed[:, None, :]]
    assert torch.equal(rearrange_mask(mask, scores, noisy, fixed), result)
    with pytest.raises(ValueError, match="fixed"):
        rearrange_mask(torch.ones(3, 9), scores, gram, fixed)
