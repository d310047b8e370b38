"""Iterative pruning's step constraints and the options' checks (docs/design.md, "Weight refit")."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from clip_prune.core.pruning.costs import mac_costs
from clip_prune.core.pruning.fisher import FisherStatistics
from clip_prune.core.pruning.options import PruningOptions
from clip_prune.core.pruning.step import prune_step


@pytest.mark.parametrize(("constraint", "steps"), [(1.0, 1), (0.75, 1), (0.6, 2), (0.5, 3), (0.2, 6), (0.1, 9)])
def test_automatic_steps_each_keep_at_least_step_keep(constraint: float, steps: int) -> None:
    constraints = PruningOptions().step_constraints(constraint)
    assert len(constraints) == steps
    assert constraints[-1] == constraint
    previous = 1.0
    for value in constraints:
        assert value / previous >= 0.75 - 1e-12
        previous = value


def test_fixed_steps_are_geometric() -> None:
    assert PruningOptions(steps=4).step_constraints(0.2) == pytest.approx([0.2 ** (k / 4) for k in range(1, 5)])
    assert PruningOptions(steps=1).step_constraints(0.2) == [0.2]


@pytest.mark.parametrize(("field", "value", "match"), [("steps", 0, "--options.steps"),
                                                         ("step_keep", 1.0, "--options.step_keep"),
                                                         ("damping", -1.0, "--options.damping"),
                                                         ("reconstruct_samples", 0, "--options.reconstruct_samples")])
def test_bad_options_name_the_flag(field: str, value: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PruningOptions(**{field: value})


def _random_statistics(generator: torch.Generator, layers: int, heads: int, neurons: int) -> FisherStatistics:
    head_grads = torch.randn(16, layers, heads, generator=generator, dtype=torch.float64)
    neuron_grads = torch.randn(16, layers, neurons, generator=generator, dtype=torch.float64)
    return FisherStatistics(head_grads.square().sum(0), neuron_grads.square().sum(0),
                            torch.einsum("nli,nlj->lij", head_grads, head_grads),
                            torch.einsum("nli,nlj->lij", neuron_grads, neuron_grads), 16)


def test_a_later_step_keeps_a_subset_of_the_earlier_steps_units() -> None:
    torch.manual_seed(0)
    config = CLIPVisionConfig(image_size=30, patch_size=6, hidden_size=32, num_hidden_layers=3,
                              num_attention_heads=4, intermediate_size=37)
    model = CLIPVisionModel(config).eval()
    macs = mac_costs(config)
    generator = torch.Generator().manual_seed(1)
    pixels = [torch.randn(4, 3, 30, 30, generator=generator)]
    options = PruningOptions()
    first = prune_step(model, _random_statistics(generator, 3, 4, 37), macs, 0.7, options, pixels)
    # Fresh statistics that favour the units the first step removed: the second step may not take them back.
    stats = _random_statistics(generator, 3, 4, 37)
    stats.head_fisher[first.head_mask == 0] += 1e6
    stats.neuron_fisher[first.neuron_mask == 0] += 1e6
    second = prune_step(model, stats, macs, 0.5, options, pixels, kept=(first.head_mask, first.neuron_mask))
    assert not ((second.head_mask != 0) & (first.head_mask == 0)).any()
    assert not ((second.neuron_mask != 0) & (first.neuron_mask == 0)).any()
    assert macs.of_masks(second.head_mask, second.neuron_mask) <= 0.5 * macs.dense
    assert second.refit and second.reconstruction.warnings == []


def test_the_teaching_assistant_is_refused_with_steps() -> None:
    with pytest.raises(ValueError, match="--options.steps 1"):
        PruningOptions(teacher="ta")
    assert PruningOptions(teacher="ta", steps=1).step_constraints(0.4) == [0.4]
