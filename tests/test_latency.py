"""Latency is reported as medians with their spread, and flagged when the timings or the machine say it is noise."""

from __future__ import annotations

import pytest
import torch

from clip_prune.core.finish import measure_latencies, relative_spread, summarise_latency
from clip_prune.core.summary import format_summary


def test_steady_timings_on_an_idle_machine_raise_no_warning() -> None:
    latency = summarise_latency([0.010, 0.011, 0.010, 0.0105, 0.010], [0.005, 0.005, 0.0052, 0.005, 0.0051],
                                load=0.5, cores=2)
    assert latency["dense"] == 0.010 and latency["pruned"] == 0.005
    assert latency["speedup"] == pytest.approx(2.0) and latency["repeats"] == 5
    assert latency["spread"]["dense"] == pytest.approx((0.0105 - 0.010) / 0.010)  # quartiles over the median
    assert "warning" not in latency


def test_scattered_timings_or_a_busy_machine_are_flagged_in_report_and_summary() -> None:
    noisy = summarise_latency([0.010, 0.030, 0.011, 0.060, 0.012], [0.009, 0.010, 0.009, 0.010, 0.009],
                              load=0.1, cores=4)
    assert noisy["spread"]["dense"] == pytest.approx((0.030 - 0.011) / 0.012)
    assert noisy["warning"].startswith("latency may be noise: the timed passes vary by 158%")
    busy = summarise_latency([0.010] * 5, [0.005] * 5, load=3.5, cores=2)
    assert "the machine was busy (1-minute load 3.5 on 2 cores)" in busy["warning"]
    text = format_summary({"latency_s": {**busy, "batch": 8}})
    assert "10.0 ±0%" in text and "2.00x" in text
    assert "  warning: latency may be noise: the machine was busy" in text


def test_each_model_is_timed_repeats_times() -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model = CLIPVisionModel(CLIPVisionConfig(image_size=30, patch_size=6, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=4, intermediate_size=37)).eval()
    timings = measure_latencies([model, model], torch.zeros(2, 3, 30, 30), repeats=7)
    assert [len(times) for times in timings] == [7, 7] and all(t > 0 for times in timings for t in times)
    assert relative_spread([1.0]) == 0.0
