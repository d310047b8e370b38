"""The closed loop of a latency budget (fake timers: the loop's logic, not this machine's speed) and the check of a
cached latency table."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model, linear_latency_table, tiny_vision_inputs
from test_latency_table import fake_table, tiny_config

from clip_prune.core.pruning import latency_table as latency
from clip_prune.core.pruning.costs import mac_costs
from clip_prune.core.pruning.fisher import FisherStatistics
from clip_prune.core.pruning.latency_budget import meet_latency_budget
from clip_prune.core.pruning.latency_table import STALE_TOLERANCE, cached_latency_table, read_table
from clip_prune.core.pruning.options import PruningOptions
from clip_prune.core.pruning.search import BudgetTooSmall, WidthBudget
from clip_prune.core.pruning.step import prune_step
from clip_prune.core.run.latency_check import candidate_timer
from clip_prune.core.run.report import step_section
from clip_prune.core.timing import Timing, paired_ratio


def grid_search(budget: float) -> float:
    """A stand-in search whose candidates are table ratios on a 1 % grid, never above the budget."""
    if budget < 0.05:
        raise BudgetTooSmall(budget, 0.05, "a test floor")
    return math.floor(budget * 100 + 1e-9) / 100


def scaled_timer(*factors: float, error: float = 0.005):
    """A fake timer: the k-th candidate measures factors[k] (the last repeated) times its table ratio."""
    calls: list[float] = []

    def time_ratio(candidate: float) -> Timing:
        calls.append(candidate)
        return Timing(factors[min(len(calls), len(factors)) - 1] * candidate, error)

    return time_ratio, calls


def test_a_table_that_overestimates_is_corrected_until_the_tower_measures_the_budget() -> None:
    time_ratio, calls = scaled_timer(0.85)  # the real tower runs 15 % faster than the table says
    loop = meet_latency_budget(grid_search, lambda ratio: ratio, time_ratio, 0.5)
    assert loop.met and loop.note is None and len(loop.rounds) == 2
    first, second = loop.rounds
    assert first.budget == 0.5 and first.measured_ratio == pytest.approx(0.425)
    assert second.budget == pytest.approx(0.5 * 0.5 / 0.425)  # the table's error divided out
    assert abs(second.measured_ratio / 0.5 - 1) <= 0.03 and loop.candidate == calls[-1] == 0.58
    assert loop.chosen == 1


def test_a_table_that_underestimates_is_corrected_downwards() -> None:
    time_ratio, _ = scaled_timer(1.3)
    loop = meet_latency_budget(grid_search, lambda ratio: ratio, time_ratio, 0.75, tolerance=0.02)
    assert loop.met and loop.rounds[-1].measured_ratio <= 0.75 * 1.02 and loop.rounds[-1].budget < 0.75


def test_within_the_tolerance_at_once_takes_one_search() -> None:
    time_ratio, calls = scaled_timer(1.02)
    loop = meet_latency_budget(grid_search, lambda ratio: ratio, time_ratio, 0.5)
    assert loop.met and len(loop.rounds) == 1 and calls == [0.5]


def test_the_loop_stops_after_its_round_limit_and_says_by_how_much_it_missed() -> None:
    time_ratio, calls = scaled_timer(0.7, 1.3, 0.75)  # a tower whose speed swings: never within 3 %
    loop = meet_latency_budget(grid_search, lambda ratio: ratio, time_ratio, 0.5, rounds=3)
    assert not loop.met and len(loop.rounds) == 3 == len(calls)
    assert "3 searches did not come within 3%" in loop.note
    # Nothing within: the slowest candidate still under the budget's upper edge is kept.
    under = [entry.measured_ratio for entry in loop.rounds if entry.measured_ratio <= 0.5 * 1.03]
    assert loop.rounds[loop.chosen].measured_ratio == max(under)
    assert f"{loop.rounds[loop.chosen].measured_ratio:.3f}" in loop.note


def test_every_candidate_over_the_budget_keeps_the_fastest() -> None:
    time_ratio, _ = scaled_timer(1.5, 1.45)
    loop = meet_latency_budget(grid_search, lambda ratio: ratio, time_ratio, 0.5, rounds=2)
    assert not loop.met
    assert loop.chosen == min(range(2), key=lambda index: loop.rounds[index].measured_ratio)


def test_noisy_timings_stop_the_loop_instead_of_chasing_the_noise() -> None:
    time_ratio, calls = scaled_timer(0.8, error=0.2)
    loop = meet_latency_budget(grid_search, lambda ratio: ratio, time_ratio, 0.5)
    assert not loop.met and len(calls) == 1 and "within the timing's noise" in loop.note
    assert "quieter machine" in loop.note


def test_a_miss_well_beyond_the_timing_noise_is_corrected_even_when_the_noise_exceeds_the_tolerance() -> None:
    time_ratio, calls = scaled_timer(0.85, error=0.04)  # a 15 % miss, 4 % standard error
    loop = meet_latency_budget(grid_search, lambda ratio: ratio, time_ratio, 0.5)
    assert len(calls) == 2 and loop.met


def test_timings_in_pairs_cancel_the_machine_s_drift() -> None:
    dense, pruned = [1.0, 2.0, 1.1, 1.9, 1.0], [0.5, 1.0, 0.55, 0.95, 0.5]  # the machine halves its speed, twice
    timing = paired_ratio(dense, pruned)
    assert timing.ratio == pytest.approx(0.5) and timing.error == pytest.approx(0.0) and timing.pairs == 5


def test_a_correction_that_finds_the_same_widths_stops() -> None:
    coarse = lambda budget: 0.4 if budget < 0.6 else 0.6  # noqa: E731 - two choices only
    time_ratio, calls = scaled_timer(0.9)
    loop = meet_latency_budget(coarse, lambda ratio: ratio, time_ratio, 0.5)
    assert len(calls) == 1 and "already timed" in loop.note and loop.candidate == 0.4


def test_a_correction_below_the_least_budget_stops_and_the_first_refusal_is_raised() -> None:
    time_ratio, _ = scaled_timer(10.0)
    loop = meet_latency_budget(grid_search, lambda ratio: ratio, time_ratio, 0.1)
    assert not loop.met and "below the least" in loop.note and len(loop.rounds) == 1
    with pytest.raises(BudgetTooSmall):
        meet_latency_budget(grid_search, lambda ratio: ratio, time_ratio, 0.01)


def test_the_loop_report_lists_every_round() -> None:
    time_ratio, _ = scaled_timer(0.85)
    report = json.loads(json.dumps(meet_latency_budget(grid_search, lambda r: r, time_ratio, 0.5).report()))
    assert [entry["budget"] for entry in report["rounds"]] == pytest.approx([0.5, 0.5 * 0.5 / 0.425])
    assert set(report["rounds"][0]) == {"budget", "table_ratio", "measured_ratio", "measured_error", "timed_pairs"}
    assert report["met"] and report["chosen_round"] == 1 and abs(report["miss"]) <= 0.03


def test_a_pruning_step_under_a_latency_budget_keeps_the_candidate_that_measures_within_it() -> None:
    table = fake_table()
    macs = mac_costs(tiny_config())
    generator = torch.Generator().manual_seed(0)
    stats = FisherStatistics(torch.rand(3, 4, generator=generator), torch.rand(3, 37, generator=generator),
                             None, None, num_samples=8)
    timed: list[float] = []

    def time_ratio(found) -> Timing:  # the tower measures 80 % of what the table predicts
        timed.append(table.latency_of(found.heads_per_layer, found.neurons_per_layer) / table.dense_latency)
        return Timing(0.8 * timed[-1], 0.01)

    step = prune_step(build_tiny_model("clip"), stats, macs, 0.6, PruningOptions(reconstruct="none", rearrange=False),
                      [], widths=WidthBudget(8, 1, table), time_ratio=time_ratio)
    loop = step.budget_loop
    assert loop is not None and loop.met and len(timed) >= 2
    kept = table.latency_of((step.head_mask != 0).sum(1).tolist(), (step.neuron_mask != 0).sum(1).tolist())
    assert 0.8 * kept / table.dense_latency == pytest.approx(loop.rounds[loop.chosen].measured_ratio)
    assert abs(loop.rounds[loop.chosen].measured_ratio / 0.6 - 1) <= 0.03
    assert step_section(step, 0.6, macs)["latency_budget"]["rounds"][0]["budget"] == 0.6
    assert "latency_check" in step.timings and not step.warnings


def test_the_candidate_timer_times_the_pruned_tower_against_the_dense_one() -> None:
    model = build_tiny_model("clip").eval()
    config = model.config.vision_config
    inputs = tiny_vision_inputs(model)
    time_ratio = candidate_timer(model, inputs, repeats=3, target_error=0.0, most_repeats=6)  # 0: as many as allowed
    head_mask = torch.ones(config.num_hidden_layers, config.num_attention_heads)
    neuron_mask = torch.zeros(config.num_hidden_layers, config.intermediate_size)
    neuron_mask[:, :2] = 1

    class Found:
        pass

    found = Found()
    found.head_mask, found.neuron_mask = head_mask, neuron_mask
    timing = time_ratio(found)
    assert timing.ratio > 0 and math.isfinite(timing.ratio) and timing.error >= 0 and timing.pairs == 6
    assert model.vision_model.encoder.layers[0].mlp.fc1.out_features == config.intermediate_size  # left unchanged


def cached_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dense_now: float):
    """Cache a stand-in table, then read it back on a machine whose dense tower takes `dense_now` seconds."""
    monkeypatch.setattr(latency, "measure_latency_table", linear_latency_table)
    table, source = cached_latency_table(tiny_config(), 2, cache_dir=tmp_path)
    assert source.how == "measured"
    monkeypatch.setattr(latency, "dense_tower_seconds", lambda *args, **kwargs: dense_now * table.dense_s)
    return table


def test_a_cached_table_whose_dense_tower_still_times_alike_is_used(tmp_path, monkeypatch) -> None:
    table = cached_table(tmp_path, monkeypatch, dense_now=1 + STALE_TOLERANCE / 2)
    again, source = cached_latency_table(tiny_config(), 2, cache_dir=tmp_path)
    assert source.how == "cached" and source.drift == pytest.approx(STALE_TOLERANCE / 2)
    assert again.to_json() == table.to_json()
    assert source.report()["dense_s_cached"] == table.dense_s


def test_a_stale_cached_table_is_measured_again(tmp_path, monkeypatch) -> None:
    cached_table(tmp_path, monkeypatch, dense_now=1.0)
    path = next(tmp_path.glob("*.json"))
    stale = json.loads(path.read_text())
    for name in ("attention_s", "mlp_s"):
        stale[name] = [1.5 * seconds for seconds in stale[name]]
    stale["dense_s"], stale["empty_s"] = 1.5 * stale["dense_s"], 1.5 * stale["empty_s"]
    path.write_text(json.dumps(stale))  # a table measured while the machine ran 1.5 times slower
    remeasured = []
    monkeypatch.setattr(latency, "measure_latency_table",
                        lambda *args, **kwargs: remeasured.append(1) or linear_latency_table(*args, **kwargs))
    table, source = cached_latency_table(tiny_config(), 2, cache_dir=tmp_path)
    assert source.how == "re-measured" and remeasured == [1]
    assert source.drift == pytest.approx(1 / 1.5 - 1)
    assert "measured again" in source.describe() and "-33.3%" in source.describe()
    assert read_table(path).dense_s == pytest.approx(table.dense_s)  # the cache now holds the new table


def test_a_measured_table_records_under_what_it_was_measured() -> None:
    table = latency.measure_latency_table(tiny_config(), 2, warmup=0, repeats=1, mlp_points=3)
    conditions = table.conditions
    assert {"torch", "transformers", "python", "threads", "load_1min", "load_1min_before", "measured_at"} \
        <= set(conditions)
    assert conditions["torch"] == torch.__version__ and table.key["batch_size"] == 2
    assert table.key["device"].startswith("cpu") and table.key["dtype"] == "torch.float32"


def test_the_correction_averages_the_table_error_over_every_timed_candidate() -> None:
    time_ratio, calls = scaled_timer(1.1, 0.95, 1.0)  # noisy timings of a table that is about right
    loop = meet_latency_budget(grid_search, lambda ratio: ratio, time_ratio, 0.75)
    first, second = loop.rounds[:2]
    assert second.budget == pytest.approx(0.75 / 1.1)
    # The third budget divides out the mean error of both rounds, not the last round's alone.
    factor = math.sqrt(first.measured_ratio / first.table_ratio * second.measured_ratio / second.table_ratio)
    assert loop.rounds[2].budget == pytest.approx(0.75 / factor) and loop.met
