"""One batch's contribution to the Fisher information, and a whole pass over batches in one process.

The Lightning module's validation loop calls `accumulate_fisher` per batch (its ranks' sums are reduced by the
metric); `fisher_pass` is the same loop for one process, for `clip_prune.prune` on batches in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from typing import Any, Literal

import torch
from torch import nn

from clip_prune.core.pruning.fisher import FisherInformation, FisherStatistics
from clip_prune.core.pruning.losses import distill_loss, gather_across_ranks
from clip_prune.core.pruning.masks import VisionMasks, mask_shapes
from clip_prune.core.pruning.refit import refit_applied
from clip_prune.core.pruning.step import StepResult
from clip_prune.towers import inputs_to, tower_of

LossName = Literal["contrastive", "distill"]


def mask_loss(model: nn.Module, batch: Mapping[str, Any], loss: LossName, noise_seed: int,
              real: torch.Tensor | slice = slice(None),
              gather: Callable[[torch.Tensor], torch.Tensor] = gather_across_ranks) -> torch.Tensor:
    """The loss whose gradients w.r.t. the masks give the Fisher information.

    Args:
        model: the model with its masks hooked in.
        batch: the tower's inputs, with `input_ids` (and `attention_mask`) for `contrastive` and the sample ids
            `index` for `distill` (and its `distill_noise`, drawn on the host).
        loss: `contrastive`, the family's own image-text loss against the frozen text tower's caption embeddings,
            or `distill`, label-free on images only.
        noise_seed: seed of the `distill` loss's Gaussian samples.
        real: [B] False for DDP padding items, which the loss leaves out.
        gather: joins the embeddings of every DDP rank, so that each sample meets the negatives it would meet in
            one process (outside DDP, the embeddings themselves).
    """
    tower = tower_of(model)
    parameter = next(model.parameters())
    inputs = inputs_to(tower.vision_inputs(batch), parameter.device, parameter.dtype)  # uint8 pixels normalised here
    image_embeds = tower.image_embeds(inputs)[real]
    if loss == "contrastive":
        with torch.no_grad():
            text_embeds = tower.text_embeds(batch["input_ids"].to(parameter.device),
                                            None if batch.get("attention_mask") is None
                                            else batch["attention_mask"].to(parameter.device))[real]
        return tower.loss(gather(image_embeds.float()), gather(text_embeds.float()))
    return distill_loss(image_embeds, batch["index"][real], noise_seed,
                        None if "distill_noise" not in batch else batch["distill_noise"][real])


def accumulate_fisher(fisher: FisherInformation, masks: VisionMasks, model: nn.Module, batch: Mapping[str, Any],
                      loss: LossName, noise_seed: int, real: torch.Tensor | slice = slice(None)) -> None:
    """Add one batch's per-sample mask gradients (one backward pass) to `fisher`."""
    with torch.enable_grad(), masks.tracking_samples():
        head_grads, neuron_grads = masks.per_sample_grads(mask_loss(model, batch, loss, noise_seed, real))
    fisher.update(head_grads[real], neuron_grads[real])


def fisher_pass(model: nn.Module, batches: Iterable[Mapping[str, Any]], loss: LossName = "contrastive",
                noise_seed: int = 0, step: StepResult | None = None) -> FisherStatistics:
    """Fisher statistics of `model` as `step` left it (its masks hooked in, its refit columns in the weights for the
    pass; None: dense) over `batches`, in this process.

    A `distill` batch without sample ids `index` gets the running count of samples, so that the same images in the
    same order draw the same noise as the CLI's calibration pass.
    """
    tower = tower_of(model)
    head_shape, neuron_shape = mask_shapes(tower.config)
    device = next(model.parameters()).device
    fisher = FisherInformation(head_shape[0], head_shape[1], neuron_shape[1]).to(device)
    masks = VisionMasks(model, *(() if step is None else (step.head_mask.to(device), step.neuron_mask.to(device))))
    seen = 0
    try:
        with nullcontext() if step is None else refit_applied(model, step.head_mask, step.neuron_mask, step.refit):
            for batch in batches:
                count = len(batch[tower.input_names[0]])
                if loss == "distill" and "index" not in batch:
                    batch = {**batch, "index": torch.arange(seen, seen + count)}
                accumulate_fisher(fisher, masks, model, batch, loss, noise_seed)
                seen += count
    finally:
        masks.remove()
    return fisher.compute()
