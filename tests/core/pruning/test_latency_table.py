"""Latency table: piecewise-linear fit, measurement and cache, and the search within its own budget."""

from pathlib import Path

import pytest
import torch
from conftest import linear_latency_table
from transformers import CLIPVisionConfig

from clip_prune.core.pruning import latency_table as latency
from clip_prune.core.pruning.latency_table import (
    LatencyTable,
    PiecewiseLinear,
    cached_latency_table,
    fit_piecewise_linear,
    neuron_grid,
    read_table,
    write_table,
)
from clip_prune.core.pruning.options import ALIGNED_WIDTH_MULTIPLES, PruningOptions
from clip_prune.core.pruning.search import BudgetTooSmall, search_layer_latency


def tiny_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(image_size=30, patch_size=6, hidden_size=32, num_hidden_layers=3,
                            num_attention_heads=4, intermediate_size=37)


def test_fit_recovers_a_flat_then_linear_curve() -> None:
    counts = [0, 1, 4, 8, 12, 16, 20, 24]
    truth = PiecewiseLinear(zero=0.01, intercept=2.0, slope=0.5, threshold=8)
    fitted = fit_piecewise_linear(counts, truth(torch.tensor(counts)).tolist())
    assert fitted.zero == pytest.approx(0.01)
    assert (fitted.intercept, fitted.slope, fitted.threshold) == pytest.approx((2.0, 0.5, 8))
    # A falling measurement is fitted flat: the fitted latency never drops as units are added.
    assert fit_piecewise_linear([1, 2, 3], [3.0, 2.0, 1.0]).slope == 0


def fake_table(layers: int = 3, heads: int = 4, neurons: int = 37, fixed: float = 0.5) -> LatencyTable:
    """Flat attention below 2 heads, then linear; linear MLP with a jump for its first neuron."""
    head_counts, neuron_counts = list(range(heads + 1)), [0, 1, 10, 19, 28, 37]
    attention = [0.0] + [1.0 + 0.5 * max(0, h - 2) for h in head_counts[1:]]
    mlp = [0.0] + [0.4 + 0.05 * n for n in neuron_counts[1:]]
    dense = fixed + layers * (attention[-1] + mlp[-1])
    return LatencyTable(key={"device": "test"}, num_layers=layers, head_counts=head_counts, attention_s=attention,
                        neuron_counts=neuron_counts, mlp_s=mlp, dense_s=dense, empty_s=fixed)


@pytest.mark.parametrize("multiple_of", [1, 8])
@pytest.mark.parametrize("constraint", [0.2, 0.35, 0.5, 0.75, 0.9])
def test_latency_search_never_exceeds_its_own_budget(constraint: float, multiple_of: int) -> None:
    table = fake_table()
    assert table.fixed_s == pytest.approx(0.5) and table.scale == pytest.approx(1)
    assert table.dense_latency == pytest.approx(table.dense_s)
    generator = torch.Generator().manual_seed(int(constraint * 100))
    head_scores, neuron_scores = torch.rand(3, 4, generator=generator), torch.rand(3, 37, generator=generator)
    result = search_layer_latency(head_scores, neuron_scores, table, constraint, head_dim=8, multiple_of=multiple_of)
    latency = table.latency_of(result.heads_per_layer, result.neurons_per_layer)
    assert latency <= constraint * table.dense_latency
    assert latency >= (constraint - 0.1) * table.dense_latency  # the budget is used, not wasted
    assert all(n % multiple_of == 0 or n == 37 for n in result.neurons_per_layer)
    assert result.head_mask.sum(1).tolist() == result.heads_per_layer


def test_latency_search_refuses_a_budget_below_the_fixed_parts_and_names_the_least() -> None:
    table = fake_table(fixed=5.0)
    with pytest.raises(BudgetTooSmall, match="parts no pruning removes.* raise --constraint to at least") as caught:
        search_layer_latency(torch.rand(3, 4), torch.rand(3, 37), table, 0.2, head_dim=8)
    assert caught.value.smallest == pytest.approx(table.fixed_s / table.dense_latency)
    with pytest.raises(BudgetTooSmall, match="one attention head") as caught:
        search_layer_latency(torch.rand(3, 4), torch.rand(3, 37), table, 0.2, head_dim=8, keep_a_head=True)
    one_head = float(table.head_costs()[0, 1])
    assert caught.value.smallest == pytest.approx((table.fixed_s + one_head) / table.dense_latency)


def test_measured_table_is_cached_per_device_and_shape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    measure = {"warmup": 1, "repeats": 2, "mlp_points": 5}
    table, source = cached_latency_table(tiny_config(), 2, cache_dir=tmp_path, **measure)
    assert source.how == "measured" and table.head_counts == [0, 1, 2, 3, 4] and table.neuron_counts[0] == 0
    assert table.neuron_counts[-1] == 37 and len(table.mlp_s) == len(table.neuron_counts)
    assert table.key["tokens"] == 26 and table.key["batch_size"] == 2
    for costs in (table.head_costs(), table.neuron_costs()):
        assert costs.shape[0] == 3 and bool((costs[:, 2:] >= costs[:, 1:-1]).all())  # non-decreasing from 1
    # The cached table's check times the dense tower again (tests/core/test_latency_budget.py): here it agrees.
    monkeypatch.setattr(latency, "dense_tower_seconds", lambda *args, **kwargs: table.dense_s)
    again, source = cached_latency_table(tiny_config(), 2, cache_dir=tmp_path, **measure)
    assert source.how == "cached" and again.to_json() == table.to_json()
    # One real measurement is enough: the cache keys below are checked on tables that are not timed.
    monkeypatch.setattr(latency, "measure_latency_table", linear_latency_table)
    other, source = cached_latency_table(tiny_config(), 3, cache_dir=tmp_path, **measure)  # another batch size
    assert source.how == "measured" and len(list(tmp_path.glob("*.json"))) == 2
    aligned, source = cached_latency_table(tiny_config(), 2, cache_dir=tmp_path, **measure, multiple_of=8)
    assert source.how == "measured" and aligned.key["multiple_of"] == 8 and table.key["multiple_of"] == 1
    assert all(count % 8 == 0 or count == 37 for count in aligned.neuron_counts)
    write_table(table, tmp_path / "run" / "latency_table.json")
    assert read_table(tmp_path / "run" / "latency_table.json").to_json() == table.to_json()


def test_layer_costs_are_scaled_to_the_measured_tower() -> None:
    """Layers timed in isolation at twice their cost in the tower: the table keeps their shape, the tower's total."""
    base = fake_table()
    table = LatencyTable(key={}, num_layers=3, head_counts=base.head_counts,
                         attention_s=[2 * s for s in base.attention_s], neuron_counts=base.neuron_counts,
                         mlp_s=[2 * s for s in base.mlp_s], dense_s=base.dense_s, empty_s=base.empty_s)
    assert table.scale == pytest.approx(0.5)
    assert table.latency_of([4] * 3, [37] * 3) == pytest.approx(base.dense_s)
    assert table.latency_of([0] * 3, [0] * 3) == pytest.approx(base.empty_s)
    torch.testing.assert_close(table.head_costs(), base.head_costs())
    with pytest.raises(ValueError, match="too busy for a latency table"):
        LatencyTable(key={}, num_layers=3, head_counts=base.head_counts, attention_s=base.attention_s,
                     neuron_counts=base.neuron_counts, mlp_s=base.mlp_s, dense_s=1.0, empty_s=1.0)


def test_an_aligned_grid_times_only_widths_the_search_can_choose() -> None:
    assert neuron_grid(37, 16) == sorted({0, *torch.linspace(1, 37, 16).round().long().tolist()})
    grid = neuron_grid(3072, 16, multiple_of=64)
    assert grid[0] == 0 and grid[-1] == 3072 and len(grid) == 17
    assert all(count % 64 == 0 for count in grid)
    assert neuron_grid(100, 4, multiple_of=64) == [0, 64, 100]  # F itself is always a choice
    assert neuron_grid(37, 16, multiple_of=64) == [0, 37]  # never wider than the layer


def test_width_multiple_defaults_to_64_on_a_gpu_and_under_a_latency_budget() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert PruningOptions().widths_multiple(cuda, 3072, 64) == ALIGNED_WIDTH_MULTIPLES[0] == 64  # ViT-B/16
    assert PruningOptions().widths_multiple(cpu, 3072, 64, latency_budget=True) == 64
    assert PruningOptions().widths_multiple(cpu, 3072, 64) == 1  # MACs on a CPU: free widths
    assert PruningOptions().widths_multiple(cuda, 4304, 72) == 8  # SigLIP so400m: 64 would leave 0, 8, 16 heads
    assert PruningOptions().widths_multiple(cuda, 37, 8, latency_budget=True) == 1  # a small model keeps its choices
    assert PruningOptions(multiple_of=8).widths_multiple(cuda, 3072, 64) == 8
    assert PruningOptions(multiple_of=1).widths_multiple(cpu, 3072, 64, latency_budget=True) == 1
    with pytest.raises(ValueError, match="multiple_of must be >= 1"):
        PruningOptions(multiple_of=0)
