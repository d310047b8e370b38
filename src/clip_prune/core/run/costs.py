"""What a model costs: analytic and counted MACs, parameters and measured latency, dense against pruned."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import PreTrainedModel

from clip_prune.core.pruning.costs import mac_costs
from clip_prune.core.timing import LatencyComparison, load_average, measure_latencies, summarise_latency
from clip_prune.data.coco import available_cores
from clip_prune.towers import VisionInputs, as_inputs, tower_of


def counted_vision_macs(model: nn.Module, image_size: int | None = None) -> int:
    """MACs (FLOPs / 2) of the vision encoder layers of `model` for one image, counted by running it.

    Uses `torch.utils.flop_counter.FlopCounterMode` under the MATH SDPA backend, whose
    matmuls are counted (the fused CPU kernel is not; docs/design.md, "Facts about transformers
    5.x"). Only the encoder layers are returned, so the count compares with
    `mac_costs`: the patch embedding, layer norms, biases and softmax are left out.

    Args:
        model: a model of a supported family, dense or pruned, with or without text tower.
        image_size: side of the square input image in pixels; the config's image_size if None
            (another size interpolates the position embeddings). SigLIP2 takes none: it counts the config's
            `num_patches` patches.
    """
    tower = tower_of(model)
    vision, config = tower.vision, tower.config
    resize = {"interpolate_pos_encoding": True} if image_size not in (None, getattr(config, "image_size", None)) else {}
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter, torch.no_grad():
        vision(**tower.example_inputs(1, image_size), **resize)
    counts = counter.get_flop_counts()
    encoder = tower.encoder_name
    assert encoder in counts, f"FlopCounterMode saw no module {encoder}, only {sorted(counts)[:5]}..."
    flop_count = sum(counts[encoder].values())
    assert flop_count % 2 == 0, "matmul FLOPs are counted as 2 per multiply-accumulate"
    return flop_count // 2



def analytic_macs_per_image(model: PreTrainedModel) -> int:
    """Analytic encoder MACs of one image through `model`'s vision tower (dense, or with its pruned widths)."""
    config = tower_of(model).vision.config
    macs = mac_costs(config)
    if getattr(config, "heads_per_layer", None) is not None:  # a pruned model's config records its widths
        return macs.of_counts(sum(config.heads_per_layer), sum(config.neurons_per_layer))
    return macs.dense



def count_parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


@dataclass(frozen=True)
class DenseVsPruned:
    """One count of the dense model and of the pruned one."""

    dense: int
    pruned: int
    unit: str

    @property
    def ratio(self) -> float:
        return self.pruned / self.dense

    def to_json(self) -> dict[str, Any]:
        return {"dense": self.dense, "pruned": self.pruned, "ratio": self.ratio, "unit": self.unit}


@dataclass(frozen=True)
class ModelCosts:
    """What the pruned vision tower costs against the dense one: MACs by the formula and as counted, parameters and
    measured latency."""

    macs: DenseVsPruned
    macs_counted: DenseVsPruned
    parameters: DenseVsPruned
    latency: LatencyComparison

    def to_json(self) -> dict[str, Any]:
        return {"macs": self.macs.to_json(), "macs_counted": self.macs_counted.to_json(),
                "parameters": self.parameters.to_json(), "latency_s": self.latency.to_json()}


def measure_costs(dense: nn.Module, pruned: nn.Module, head_mask: torch.Tensor, neuron_mask: torch.Tensor,
                  pixels: torch.Tensor | VisionInputs, latency_repeats: int) -> ModelCosts:
    """Analytic and counted MACs, parameters and measured latency of the dense and pruned vision towers."""
    pixels = as_inputs(pixels)
    macs = mac_costs(tower_of(dense).config)
    load = load_average()
    dense_times, pruned_times = measure_latencies([dense, pruned], pixels, latency_repeats)
    return ModelCosts(
        macs=DenseVsPruned(macs.dense, macs.of_masks(head_mask, neuron_mask), "encoder MACs per image (analytic)"),
        macs_counted=DenseVsPruned(counted_vision_macs(dense), counted_vision_macs(pruned),
                                   "encoder MACs per image (torch.utils.flop_counter)"),
        parameters=DenseVsPruned(count_parameters(tower_of(dense).vision), count_parameters(tower_of(pruned).vision),
                                 "vision tower"),
        latency=summarise_latency(dense_times, pruned_times, load, available_cores(), len(pixels["pixel_values"]),
                                  str(pixels["pixel_values"].device)))
