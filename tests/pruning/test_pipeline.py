"""Iterative pruning's step constraints and the options' checks (DESIGN.md, "Weight refit")."""

from __future__ import annotations

import pytest

from clip_prune.pruning.pipeline import PruningOptions


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
