"""Time search and rearrangement at ViT-B/16 shapes (docs/design.md, search and rearrangement; arXiv 2204.09656).

Run: python benchmarks/bench_search.py [--seed 0] [--samples 64] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import CLIPVisionConfig

from clip_prune.core.pruning.costs import mac_costs
from clip_prune.core.pruning.rearrange import pruned_damage, rearrange_mask
from clip_prune.core.pruning.search import search_masks

SEARCH_TARGET_S = 1.0
REARRANGE_TARGET_S = 10.0


def _parse_args(args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the random scores and grams")
    parser.add_argument("--samples", type=int, default=64, help="rows of X in each gram XᵀX")
    parser.add_argument(
        "--constraints", type=float, nargs="+", default=[0.4, 0.6, 0.75], help="FLOP constraints to time"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--layers", type=int, default=12, help="encoder layers (ViT-B/16: 12; fewer: a quick try)")
    return parser.parse_args(args)


def _random_gram(layers: int, units: int, samples: int, generator: torch.Generator) -> torch.Tensor:
    """[L, N, N] float64 positive semi-definite blocks XᵀX with X of shape [samples, N]."""
    gram = torch.empty(layers, units, units, dtype=torch.float64)
    for layer in range(layers):
        features = torch.randn(samples, units, generator=generator, dtype=torch.float64)
        torch.matmul(features.T, features, out=gram[layer])
    return gram


def _timed(function, *args):
    start = time.perf_counter()
    output = function(*args)
    return output, time.perf_counter() - start


def main(args: list[str] | None = None) -> None:
    options = _parse_args(args)
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    generator = torch.Generator().manual_seed(options.seed)
    macs = mac_costs(CLIPVisionConfig(image_size=224, patch_size=16, num_hidden_layers=options.layers))
    shape = (macs.num_layers, macs.num_heads, macs.num_neurons)
    print(f"ViT-B/16 L, H, F = {shape}, torch threads {torch.get_num_threads()}")
    head_gram = _random_gram(macs.num_layers, macs.num_heads, options.samples, generator)
    neuron_gram = _random_gram(macs.num_layers, macs.num_neurons, options.samples, generator)
    # Scale head scores by the MAC ratio: heads and neurons compete evenly per MAC, so the search keeps a mix.
    head_scores = torch.diagonal(head_gram, dim1=1, dim2=2) * (macs.per_head / macs.per_neuron)
    neuron_scores = torch.diagonal(neuron_gram, dim1=1, dim2=2).clone()

    for constraint in options.constraints:
        result, search_s = _timed(search_masks, head_scores, neuron_scores, macs, constraint)
        print(
            f"c={constraint:.2f} search_masks {search_s:.4f} s (target < {SEARCH_TARGET_S} s): "
            f"{result.num_heads} heads, {result.num_neurons} neurons, "
            f"{result.macs / macs.dense:.4f} of dense MACs"
        )
        for name, mask, scores, gram in [
            ("heads", result.head_mask, head_scores, head_gram),
            ("neurons", result.neuron_mask, neuron_scores, neuron_gram),
        ]:
            rearranged, rearrange_s = _timed(rearrange_mask, mask, scores, gram)
            before = float(pruned_damage(mask, gram).sum())
            after = float(pruned_damage(rearranged, gram).sum())
            print(
                f"c={constraint:.2f} rearrange_mask {name:7s} {rearrange_s:.4f} s "
                f"(target < {REARRANGE_TARGET_S} s): damage {before:.4g} -> {after:.4g}"
            )

    # Worst case for the greedy pass: one pruned neuron per layer leaves F - 1 candidates per layer.
    worst_mask = torch.ones(macs.num_layers, macs.num_neurons)
    worst_mask[:, 0] = 0.0
    _, worst_s = _timed(rearrange_mask, worst_mask, neuron_scores, neuron_gram)
    print(f"worst case rearrange_mask neurons (k=1) {worst_s:.4f} s (target < {REARRANGE_TARGET_S} s)")


if __name__ == "__main__":
    main()
