"""The latency budget's check: a candidate's masks cut into a real tower and timed against the dense one."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from clip_prune.core.deploy.saving import cut_pruned_model
from clip_prune.core.pruning.latency_budget import Masked
from clip_prune.core.pruning.masks import mask_shapes
from clip_prune.core.timing import Timing, measure_latencies, paired_ratio
from clip_prune.towers import VisionInputs, tower_of


def candidate_timer(model: PreTrainedModel, inputs: VisionInputs, repeats: int, target_error: float,
                    most_repeats: int) -> Callable[[Masked], Timing]:
    """A timer of candidate masks (anything with `head_mask` and `neuron_mask`): the physically pruned tower against
    the dense one over `inputs`, in pairs (`measure_latencies`), copies of `model` without its hooks. Timed `repeats`
    pairs at a time until the ratio's standard error is at most `target_error` or `most_repeats` pairs were timed:
    a noisy machine gets more timings, a quiet one no more than needed."""
    head_shape, neuron_shape = mask_shapes(tower_of(model).config)
    dense = cut_pruned_model(model, torch.ones(head_shape), torch.ones(neuron_shape)).eval()

    def time_ratio(candidate: Masked) -> Timing:
        pruned = cut_pruned_model(model, candidate.head_mask, candidate.neuron_mask).eval()
        dense_s: list[float] = []
        pruned_s: list[float] = []
        while True:
            more_dense, more_pruned = measure_latencies([dense, pruned], inputs, repeats)
            dense_s, pruned_s = dense_s + more_dense, pruned_s + more_pruned
            timing = paired_ratio(dense_s, pruned_s)
            if timing.error <= target_error or len(dense_s) + repeats > most_repeats:
                return timing

    return time_ratio
