"""The printed summary shows what a run's typed results hold, and only that."""

from __future__ import annotations

import torch
from conftest import linear_latency_table, tiny_vision_config

from clip_prune.core.pruning.costs import mac_costs
from clip_prune.core.pruning.latency_budget import BudgetLoop, BudgetRound
from clip_prune.core.pruning.options import PruningOptions
from clip_prune.core.pruning.search import WidthBudget
from clip_prune.core.pruning.step import StepResult
from clip_prune.core.run.cascade import CascadeMacs, CascadeResult, CascadeSeconds
from clip_prune.core.run.costs import DenseVsPruned, ModelCosts
from clip_prune.core.run.evaluation import Agreement, Comparison
from clip_prune.core.run.finish import ExportResult
from clip_prune.core.run.report import PruningRecord, RunReport, SensitivityRecord, SensitivityRound, StatisticsRecord
from clip_prune.core.run.summary import format_metrics, format_summary
from clip_prune.core.timing import summarise_latency

CONFIG = tiny_vision_config()  # 3 layers, 4 heads, 37 neurons


def step(heads: list[int], neurons: list[int], budget_loop: BudgetLoop | None = None) -> StepResult:
    """A step whose masks keep the first `heads[i]` heads and `neurons[i]` neurons of layer i."""
    head_mask = (torch.arange(4) < torch.tensor(heads)[:, None]).float()
    neuron_mask = (torch.arange(37) < torch.tensor(neurons)[:, None]).float()
    return StepResult(head_mask, neuron_mask, {}, None, {}, None, budget_loop=budget_loop)


def pruning(*steps: StepResult, widths: WidthBudget | None = None) -> PruningRecord:
    return PruningRecord(list(steps), [0.7, 0.5][:len(steps)], PruningOptions(), mac_costs(CONFIG),
                         "latency" if widths else "macs", widths)


def test_summary_rows() -> None:
    latency = summarise_latency([0.2] * 5, [0.1] * 5, load=0.5, cores=2, batch=8, device="cpu")
    costs = ModelCosts(DenseVsPruned(2_000_000_000, 1_000_000_000, ""), DenseVsPruned(4, 2, ""),
                       DenseVsPruned(10_000_000, 6_000_000, ""), latency)
    metrics = Comparison({"retrieval": {"i2t_R@1": 50.0}}, {"retrieval": {"i2t_R@1": 45.5}}, Agreement(0.98, 0.9, 6))
    text = format_summary(RunReport("tiny", export=ExportResult({}, {}, costs), metrics=metrics,
                                    timings={"fisher": 3.0}))
    assert "2.0000" in text and "1.0000" in text and "0.500" in text and "10.000" in text and "0.600" in text
    assert "200.0 ±0%" in text and "2.00x ±0%" in text and "-4.5" in text and "fisher 3.0s, total 3.0s" in text
    assert "cosine 0.9800 on average, 0.9000 at worst (6 images)" in text
    dense_only = format_metrics(Comparison({"zero_shot": {"top1": 30.0}}))
    assert "nan" not in dense_only and "zero_shot top1" in dense_only and "time:" not in dense_only


def test_without_a_saved_model_the_summary_shows_the_macs_the_masks_keep() -> None:
    record = pruning(step([2, 2, 2], [37, 37, 37]))
    text = format_summary(RunReport("tiny", pruning=record))
    assert f"{record.macs.dense / 1e9:.4f}" in text and f"{record.macs_kept().ratio:.3f}" in text
    assert "kept 6 heads, 111 neurons" in text and "latency" not in text


def test_summary_lists_the_steps_of_iterative_pruning() -> None:
    steps = step([4, 3, 3], [30, 30, 30]), step([2, 2, 2], [20, 20, 20])
    record = pruning(*steps)
    text = format_summary(RunReport("tiny", pruning=record))
    first, second = (f"{record.macs_ratio(entry):.2f}" for entry in steps)
    assert f"2 steps, MACs kept: {first} (10 h, 90 n), {second} (6 h, 60 n)" in text
    assert "steps" not in format_summary(RunReport("tiny", pruning=pruning(steps[1])))


def test_cascade_rows() -> None:
    entry = CascadeResult(10, {"t2i_R@1": 44.0}, 500, 125, CascadeMacs(5_000_000_000, 3_250_000_000, 2500, 1200),
                          CascadeSeconds(2.0, 1.2, 0.4, "cpu", 8))
    text = format_metrics(Comparison({"retrieval": {"t2i_R@1": 46.0}}, {"retrieval": {"t2i_R@1": 45.0}},
                                     cascade=[entry]))
    assert "M=10 t2i_R@1 (%)" in text and "-2.0" in text and "0.250" in text and "0.650" in text
    assert "1.25x" in text and "first 1200 of 2500 queries" in text


def test_summary_shows_the_predicted_latency_of_a_latency_budget() -> None:
    table = linear_latency_table(CONFIG, 64)
    record = pruning(step([1, 1, 1], [10, 10, 10]), widths=WidthBudget(8, latency=table))
    predicted = table.latency_of([1, 1, 1], [10, 10, 10]) / table.dense_latency
    text = format_summary(RunReport("tiny", pruning=record))
    assert f"the table predicts {predicted:.3f} of the dense tower (batch 64, {table.key['device']})" in text
    assert record.to_json()["latency"]["predicted_ratio"] == predicted


def test_summary_shows_the_measured_latency_of_a_latency_budget_and_its_searches() -> None:
    table = linear_latency_table(CONFIG, 8)
    rounds = [BudgetRound(0.5, 0.5, 0.43, 0.01, 9), BudgetRound(0.58, 0.5791, 0.4962, 0.01, 9)]
    loop = BudgetLoop(None, rounds, chosen=1, constraint=0.5, tolerance=0.05, note=None)
    record = pruning(step([1, 1, 1], [10, 10, 10], loop), widths=WidthBudget(8, latency=table))
    predicted = table.latency_of([1, 1, 1], [10, 10, 10]) / table.dense_latency
    text = format_summary(RunReport("tiny", pruning=record))
    assert (f"measured 0.496 of the dense tower after 2 searches, the table predicts {predicted:.3f} "
            f"(batch 8, {table.key['device']})") in text


def test_summary_shows_where_the_time_before_the_first_batch_went() -> None:
    startup = {"imports": 4.04, "model_load": 0.61, "first_batch": 0.3, "total": 4.95}
    text = format_summary(RunReport("tiny", StatisticsRecord(64, startup_s=startup)))
    assert "Fisher statistics of 64 samples" in text
    assert "before the first batch: 5.0s (imports 4.0s, model load 0.6s, first batch 0.3s)" in text


def test_summary_lists_the_sensitivity_rounds_and_why_the_run_stopped() -> None:
    rounds = [SensitivityRound(0, 2, 1, 0.3, 0.9, metric=40.0), SensitivityRound(1, 0, 3, 0.2, 0.8, metric=30.0,
                                                                                  stopped="i2t_R@1 30.00 < 0.8 x 50")]
    record = SensitivityRecord("retrieval/i2t_R@1", 0.8, 50.0, rounds)
    text = format_summary(RunReport("tiny", sensitivity=record))
    assert "round  0: layer  2 keeps head  1, MACs 0.900, metric 40.00" in text
    assert text.endswith("clip-prune sensitivity: stopped after round 1: i2t_R@1 30.00 < 0.8 x 50")
    assert record.to_json()["rounds"][0] == {"round": 0, "layer": 2, "head": 1, "score": 0.3, "macs_ratio": 0.9,
                                             "metric": 40.0}
