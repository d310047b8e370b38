"""Losses whose mask gradients give the Fisher information (docs/design.md, "Loss for the Fisher information").

The image-text loss itself is the family's (`VisionTower.loss`); here is what is the same for every family:
gathering embeddings across DDP ranks, and the label-free `distill` loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_across_ranks(local: torch.Tensor) -> torch.Tensor:
    """Every DDP rank's `local` [B_r, E], concatenated in rank order [Σ B_r, E] (B_r may differ, even be 0).

    Gradients flow only into this rank's own part: the other ranks' rows are constants here, and each
    rank differentiates the same global loss with respect to its own samples. Outside DDP, `local` itself.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    sizes = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(local)], device=local.device))
    largest = max(int(size) for size in sizes)
    padded = local.detach().new_zeros((largest, *local.shape[1:]))
    padded[: len(local)] = local.detach()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    parts = [part[: int(size)] for part, size in zip(parts, sizes, strict=True)]
    parts[dist.get_rank()] = local
    return torch.cat(parts)


def distill_noise(sample_ids: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """[B, dim] Gaussian samples ε_n, each drawn from (seed, sample id) alone, on the host."""
    return torch.stack([
        torch.randn(dim, generator=torch.Generator().manual_seed(seed * 1_000_003 + i)) for i in sample_ids.tolist()
    ])


def distill_loss(image_embeds: torch.Tensor, sample_ids: torch.Tensor, seed: int,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
    """Label-free loss whose per-sample gradients estimate the true Fisher of the image embedding.

    The normalised embedding e_n is pulled towards a Gaussian sample around its own value,
    e_n + ε_n; a plain masked-vs-dense distance would have zero gradient at the dense
    model. ε_n depends only on (seed, sample id), so the statistics do not depend on batch
    composition or on the number of processes. Summed (not averaged) over the batch.
    `noise` is `distill_noise(sample_ids, E, seed)` made before the batch went to the device:
    drawing it here from device-resident ids would wait for the device once per batch.
    """
    if len(sample_ids) == 0:  # a DDP rank whose share of the last global batch is a padding item
        return image_embeds.float().sum()
    embeds = F.normalize(image_embeds.float(), dim=-1)
    if noise is None:
        noise = distill_noise(sample_ids, embeds.shape[-1], seed)
    return 0.5 * (embeds - (embeds.detach() + noise.to(embeds.device))).square().sum()
