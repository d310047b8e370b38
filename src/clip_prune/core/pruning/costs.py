"""Analytic MAC model of a vision encoder (docs/design.md, "FLOP-constrained search"; FLOPs = 2 × MACs).

Counts multiply-accumulates of the prunable parts only: per head the q, k, v and output
projections plus the two attention products, per neuron fc1 and fc2. Patch embedding,
layer norms, biases and softmax are left out, as in Kwon et al. (arXiv 2204.09656).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from clip_prune.towers import tower_class


@dataclass(frozen=True)
class MacCosts:
    """Per-unit MAC costs of one vision encoder at its configured image size."""

    num_layers: int
    """L, encoder layers."""
    num_heads: int
    """H, attention heads per layer of the dense model."""
    num_neurons: int
    """F, MLP neurons per layer of the dense model."""
    tokens: int
    """T, the tokens each layer sees (CLIP: patches plus the CLS token; SigLIP: patches)."""
    per_head: int
    """MACs of one head for one image: 4·T·D·d + 2·T²·d."""
    per_neuron: int
    """MACs of one MLP neuron for one image: 2·T·D."""

    @property
    def dense(self) -> int:
        """MACs of the whole dense encoder for one image."""
        return self.num_layers * (self.num_heads * self.per_head + self.num_neurons * self.per_neuron)

    def of_counts(self, num_heads: int | torch.Tensor, num_neurons: int | torch.Tensor) -> int:
        """MACs of an encoder that keeps `num_heads` heads and `num_neurons` neurons in all."""
        return int(num_heads) * self.per_head + int(num_neurons) * self.per_neuron

    def of_masks(self, head_mask: torch.Tensor, neuron_mask: torch.Tensor) -> int:
        """MACs of the encoder that keeps the non-zero entries of `head_mask` [L, H] and `neuron_mask` [L, F]."""
        return self.of_counts(int((head_mask != 0).sum()), int((neuron_mask != 0).sum()))


def mac_costs(config: PretrainedConfig) -> MacCosts:
    """Per-head and per-neuron MACs of the vision encoder described by the vision `config`."""
    hidden = config.hidden_size
    head_dim = hidden // config.num_attention_heads
    tokens = tower_class(config).num_tokens(config)
    return MacCosts(
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_neurons=config.intermediate_size,
        tokens=tokens,
        per_head=4 * tokens * hidden * head_dim + 2 * tokens * tokens * head_dim,
        per_neuron=2 * tokens * hidden,
    )
