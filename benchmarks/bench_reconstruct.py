"""Time layer-wise reconstruction (weight refit and scales) against one dense forward pass, ViT-B/16 shapes.

docs/design.md, "Mask rescaling" and "Weight refit"; the settings are `clip-prune prune`'s defaults
(`PruningOptions`: the bias refit, the last layer's pooled token only). Target: the refit at most 3x one dense
forward pass over the same calibration images.
Run: python benchmarks/bench_reconstruct.py [--samples 64] [--batch-size 16] [--constraint 0.6] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from clip_prune.core.pruning.costs import mac_costs
from clip_prune.core.pruning.options import PruningOptions
from clip_prune.core.pruning.reconstruct import reconstruct
from clip_prune.core.pruning.search import search_masks

TARGET_RATIO = 3.0


def _parse_args(args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="calibration images N")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch")
    parser.add_argument("--constraint", type=float, default=0.6, help="fraction of the encoder MACs kept")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, images and scores")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--image-size", type=int, default=224, help="input size (smaller: a quick try)")
    parser.add_argument("--layers", type=int, default=12, help="encoder layers (ViT-B/16: 12; fewer: a quick try)")
    return parser.parse_args(args)


def _random_masks(config: CLIPVisionConfig, constraint: float, generator: torch.Generator):
    """Masks of a FLOP-constrained search on random scores: about `constraint` of each layer survives."""
    macs = mac_costs(config)
    # Scores scaled by the MAC ratio so heads and neurons compete evenly per MAC (a near-uniform mix).
    head_scores = torch.rand(macs.num_layers, macs.num_heads, generator=generator) * (
        macs.per_head / macs.per_neuron
    )
    neuron_scores = torch.rand(macs.num_layers, macs.num_neurons, generator=generator)
    result = search_masks(head_scores, neuron_scores, macs, constraint)
    return result.head_mask, result.neuron_mask, result.macs / macs.dense


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _time_forward(model: CLIPVisionModel, batches: list[torch.Tensor],
                  device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one dense forward pass over all calibration batches."""
    _synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    for pixels in batches:
        model(pixels)
    _synchronize(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


def main(args: list[str] | None = None) -> None:
    options = _parse_args(args)
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    device = torch.device(options.device)
    generator = torch.Generator().manual_seed(options.seed)
    torch.manual_seed(options.seed)
    config = CLIPVisionConfig(image_size=options.image_size, patch_size=16,  # ViT-B/16: L=12, H=12, F=3072, D=768
                              num_hidden_layers=options.layers)
    model = CLIPVisionModel(config).eval().to(device)
    head_mask, neuron_mask, kept = _random_masks(config, options.constraint, generator)
    sizes = [options.batch_size] * (options.samples // options.batch_size)
    if options.samples % options.batch_size:
        sizes.append(options.samples % options.batch_size)
    batches = [torch.randn(size, 3, options.image_size, options.image_size, generator=generator).to(device)
               for size in sizes]
    print(f"ViT-B/16 random weights on {device}, torch threads {torch.get_num_threads()}, "
          f"N = {options.samples} in batches of {options.batch_size}")
    print(f"masks: {int(head_mask.sum())} heads, {int(neuron_mask.sum())} neurons, {kept:.3f} of dense MACs")

    with torch.no_grad():
        model(batches[0][:1])  # warm-up
    defaults = PruningOptions()
    for method in ("weights", "scales"):
        # Other processes may share the CPU: time the dense forward before and after, use the mean.
        forward_before_s, forward_before_cpu_s = _time_forward(model, batches, device)
        start, start_cpu = time.perf_counter(), time.process_time()
        result = reconstruct(model, head_mask.to(device), neuron_mask.to(device), batches, method=method,
                             damping=defaults.damping, max_abs_scale=defaults.max_abs_scale,
                             fit_bias=defaults.fit_bias, last_layer_pooled_only=defaults.last_layer_pooled_only)
        _synchronize(device)
        method_s, method_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
        forward_after_s, forward_after_cpu_s = _time_forward(model, batches, device)
        forward_s = (forward_before_s + forward_after_s) / 2
        forward_cpu_s = (forward_before_cpu_s + forward_after_cpu_s) / 2
        reduction = 1 - result.errors["neurons_after"] / result.errors["neurons_before"]
        print(f"{method}: dense forward {forward_s:.2f} s (mean of {forward_before_s:.2f} s before, "
              f"{forward_after_s:.2f} s after), reconstruct {method_s:.2f} s")
        print(f"  ratio          {method_s / forward_s:8.2f} x (target <= {TARGET_RATIO:g} x)")
        if device.type == "cpu":  # CPU time is less disturbed by other processes on the same cores
            print(f"  CPU-time ratio {method_cpu_s / forward_cpu_s:8.2f} x ({method_cpu_s:.2f} s / "
                  f"{forward_cpu_s:.2f} s)")
        print(f"  layer-output error reduction per layer: {[round(float(value), 3) for value in reduction]}")
        print(f"  warnings: {len(result.warnings)}, raised damping: {len(result.notes)}")

if __name__ == "__main__":
    main()
