"""The printed summary shows what a report holds, and only that."""

from __future__ import annotations

from clip_prune.core.run.summary import format_summary


def test_summary_rows() -> None:
    report = {
        "macs": {"dense": 2e9, "pruned": 1e9, "ratio": 0.5},
        "latency_s": {"dense": 0.2, "pruned": 0.1, "speedup": 2.0, "batch": 8},
        "metrics": {"dense": {"retrieval": {"i2t_R@1": 50.0}}, "pruned": {"retrieval": {"i2t_R@1": 45.5}}},
        "timings_s": {"fisher": 3.0, "total": 3.0},
    }
    text = format_summary(report)
    assert "2.0000" in text and "1.0000" in text and "0.500" in text
    assert "2.00x" in text and "-4.5" in text and "fisher 3.0s" in text
    dense_only = format_summary({"metrics": {"dense": {"zero_shot": {"top1": 30.0}}}})
    assert "nan" not in dense_only and "zero_shot top1" in dense_only and "time:" not in dense_only


def test_summary_lists_the_steps_of_iterative_pruning() -> None:
    steps = [{"macs_ratio": 0.71, "kept_heads": 40, "kept_neurons": 900},
             {"macs_ratio": 0.5, "kept_heads": 30, "kept_neurons": 600}]
    text = format_summary({"kept": {"heads": 30, "neurons": 600}, "steps": steps})
    assert "2 steps, MACs kept: 0.71 (40 h, 900 n), 0.50 (30 h, 600 n)" in text
    assert "steps" not in format_summary({"kept": {"heads": 30, "neurons": 600}, "steps": steps[1:]})


def test_cascade_rows() -> None:
    entry = {"top_m": 10, "retrieval": {"t2i_R@1": 44.0}, "images": 500, "reranked_images": 125,
             "macs": {"dense": 5e9, "cascade": 3.25e9, "ratio": 0.65, "queries": 2500, "break_even_queries": 1200},
             "seconds": {"dense": 2.0, "cascade": 1.6, "speedup": 1.25, "device": "cpu"}}
    text = format_summary({"metrics": {"dense": {"retrieval": {"t2i_R@1": 46.0}}, "cascade": [entry]}})
    assert "M=10 t2i_R@1 (%)" in text and "-2.0" in text and "0.250" in text and "0.650" in text
    assert "1.25x" in text and "first 1200 of 2500 queries" in text


def test_summary_shows_the_predicted_latency_of_a_latency_budget() -> None:
    latency = {"predicted_ratio": 0.3993, "batch_size": 64, "device": "cpu"}
    text = format_summary({"kept": {"heads": 3, "neurons": 100}, "latency": latency})
    assert "the table predicts 0.399 of the dense tower (batch 64, cpu)" in text


def test_summary_shows_the_measured_latency_of_a_latency_budget_and_its_searches() -> None:
    rounds = [{"budget": 0.5}, {"budget": 0.58}]
    latency = {"predicted_ratio": 0.5791, "measured_ratio": 0.4962, "batch_size": 8, "device": "cpu",
               "budget_loop": {"rounds": rounds}}
    text = format_summary({"latency": latency})
    assert "measured 0.496 of the dense tower after 2 searches, the table predicts 0.579 (batch 8, cpu)" in text


def test_summary_shows_where_the_time_before_the_first_batch_went() -> None:
    text = format_summary({"startup_s": {"imports": 4.04, "model_load": 0.61, "first_batch": 0.3, "total": 4.95}})
    assert "before the first batch: 5.0s (imports 4.0s, model load 0.6s, first batch 0.3s)" in text
