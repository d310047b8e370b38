"""Sensitivity-based head pruning, one layer per round (docs/design.md, "Sensitivity-based pruning").

Each round keeps only the most important head of one more layer: the layer whose best head
ranks highest among the heads of layers not yet reduced.
"""

from __future__ import annotations

import torch


def choose_head(head_scores: torch.Tensor, reduced_layers: set[int]) -> tuple[int, int]:
    """(layer, head) of the globally most important head in a layer not yet reduced.

    Args:
        head_scores: [L, H] Fisher scores under the current head mask.
        reduced_layers: layers already reduced to a single head.
    """
    layers, heads = head_scores.shape
    if len(reduced_layers) >= layers:
        raise ValueError(f"all {layers} layers are already reduced to one head")
    candidates = head_scores.detach().double().clone()
    for layer in reduced_layers:
        candidates[layer] = float("-inf")
    index = int(torch.argmax(candidates.flatten()))
    return index // heads, index % heads


def keep_single_head(head_mask: torch.Tensor, layer: int, head: int) -> torch.Tensor:
    """A copy of `head_mask` [L, H] in which `layer` keeps only `head` (the other H−1 heads zeroed)."""
    reduced = head_mask.clone()
    reduced[layer] = 0
    reduced[layer, head] = 1
    return reduced
