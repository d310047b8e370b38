"""Latency is reported as medians with their spread; timings that scatter are not shown as a speedup."""

from __future__ import annotations

import math

import pytest
import torch

from clip_prune.core.run.costs import DenseVsPruned, ModelCosts
from clip_prune.core.run.finish import ExportResult
from clip_prune.core.run.report import RunReport
from clip_prune.core.run.summary import format_summary
from clip_prune.core.timing import SHORTEST_TIMING_S, measure_latencies, relative_spread, summarise_latency


def summary_of(latency) -> str:
    """The printed summary of a saved model whose timing gave `latency`."""
    counts = DenseVsPruned(2, 1, "")
    return format_summary(RunReport("tiny", export=ExportResult({}, {}, ModelCosts(counts, counts, counts, latency))))


def test_steady_timings_are_reported_as_a_speedup_even_on_a_busy_machine() -> None:
    latency = summarise_latency([0.010, 0.011, 0.010, 0.0105, 0.010], [0.005, 0.005, 0.0052, 0.005, 0.0051],
                                load=3.5, cores=2, batch=8, device="cpu")
    assert latency.dense == 0.010 and latency.pruned == 0.005
    assert latency.speedup == pytest.approx(2.0) and latency.repeats == 5
    assert latency.spread["dense"] == pytest.approx((0.0105 - 0.010) / 0.010)  # quartiles over the median
    assert latency.reliable and latency.unreliable is None and "unreliable" not in latency.to_json()
    # the median's standard error, 1.2533 (IQR / 1.349) / sqrt(n), of the two medians together
    one = 1.2533 * 0.05 / 1.349 / 5 ** 0.5
    two = 1.2533 * ((0.0051 - 0.005) / 0.005) / 1.349 / 5 ** 0.5
    assert latency.speedup_error == pytest.approx((one ** 2 + two ** 2) ** 0.5)
    text = summary_of(latency)
    assert "10.0 ±5%" in text and "2.00x ±2%" in text and "warning" not in text and "reliably" not in text


def test_a_wide_scatter_over_many_timings_still_gives_a_speedup() -> None:
    """Passes that scatter by a fifth still pin their median down when there are enough of them (a 2-core CPU)."""
    dense = [0.010 * (1 + 0.2 * ((i * 7) % 15 - 7) / 7) for i in range(15)]
    pruned = [0.005 * (1 + 0.2 * ((i * 4) % 15 - 7) / 7) for i in range(15)]
    latency = summarise_latency(dense, pruned, load=1.0, cores=2, batch=8, device="cpu")
    assert latency.spread["dense"] > 0.15 and latency.reliable and latency.speedup_error < 0.1


def test_scattered_timings_are_not_shown_as_a_speedup() -> None:
    noisy = summarise_latency([0.010, 0.030, 0.011, 0.060, 0.012], [0.009, 0.010, 0.009, 0.010, 0.009],
                              load=3.5, cores=2, batch=8, device="cpu")
    assert noisy.spread["dense"] == pytest.approx((0.030 - 0.011) / 0.012)
    assert not noisy.reliable and noisy.to_json()["unreliable"] == noisy.unreliable
    assert noisy.unreliable.startswith("the timed passes vary by 158% (interquartile range / median), on a busy "
                                          "machine (1-minute load 3.5 on 2 cores), so the speedup could be off by")
    text = summary_of(noisy)
    assert "unreliable" in text and "x\n" not in text and "1.20x" not in text
    assert "  latency not measured reliably: the timed passes vary by 158%" in text


def test_each_model_is_timed_repeats_times(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    import clip_prune.core.timing

    model = CLIPVisionModel(CLIPVisionConfig(image_size=30, patch_size=6, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=4, intermediate_size=37)).eval()
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    # The probe pass "takes" 4 ms: each timing then covers ceil(SHORTEST_TIMING_S / 4 ms) passes. Deterministic,
    # whatever the machine's load; the timings themselves stay real.
    def probe(run, device):
        return 0.004, run()

    monkeypatch.setattr(clip_prune.core.timing, "timed_call", probe)
    runs_per_timing = math.ceil(SHORTEST_TIMING_S / 0.004)
    timings = measure_latencies([model, model], torch.zeros(2, 3, 30, 30), repeats=7)
    assert [len(times) for times in timings] == [7, 7] and all(t > 0 for times in timings for t in times)
    assert runs_per_timing > 1 and len(calls) == 4 + 14 * runs_per_timing  # a warm-up pass and a probe per model
    assert relative_spread([1.0]) == 0.0
