"""Pruning algorithms on tensors (no Lightning): Fisher statistics, FLOP model, search, rearrangement,
layer-wise reconstruction (weight refit or scales), pruning steps, sensitivity rounds, and physical
slicing with save/load."""

from clip_prune.core.fisher import FisherInformation, FisherStatistics, load_fisher, save_fisher
from clip_prune.core.macs import EncoderMacs, count_encoder_macs
from clip_prune.core.pipeline import PruningOptions, StepResult, prune_step
from clip_prune.core.rearrange import rearrange_mask
from clip_prune.core.reconstruct import Reconstruction, reconstruct
from clip_prune.core.refit import load_refit, refit_applied, save_refit, write_refit
from clip_prune.core.saving import load_pruned, prune_model, read_masks, save_pruned
from clip_prune.core.search import search_masks
from clip_prune.core.slicing import count_vision_macs, plan_from_masks, slice_vision_tower

__all__ = [
    "EncoderMacs",
    "FisherInformation",
    "FisherStatistics",
    "PruningOptions",
    "Reconstruction",
    "StepResult",
    "count_encoder_macs",
    "count_vision_macs",
    "load_fisher",
    "load_pruned",
    "load_refit",
    "plan_from_masks",
    "prune_model",
    "prune_step",
    "read_masks",
    "rearrange_mask",
    "reconstruct",
    "refit_applied",
    "save_fisher",
    "save_pruned",
    "save_refit",
    "search_masks",
    "slice_vision_tower",
    "write_refit",
]
