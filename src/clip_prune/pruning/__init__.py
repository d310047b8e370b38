"""Pruning algorithms on tensors (no Lightning): Fisher statistics, FLOP model, search, rearrangement,
layer-wise reconstruction (weight refit or scales), pruning steps, sensitivity rounds, and physical
slicing with save/load."""

from clip_prune.pruning.export import load_pruned, prune_model, read_masks, save_pruned
from clip_prune.pruning.fisher import FisherInformation, FisherStatistics, load_fisher, save_fisher
from clip_prune.pruning.flops import EncoderMacs, count_encoder_macs
from clip_prune.pruning.pipeline import PruningOptions, StepResult, prune_step
from clip_prune.pruning.rearrange import rearrange_mask
from clip_prune.pruning.reconstruct import Reconstruction, reconstruct
from clip_prune.pruning.refit import load_refit, refit_applied, save_refit, write_refit
from clip_prune.pruning.search import search_masks
from clip_prune.pruning.structural import count_vision_flops, plan_from_masks, slice_vision_tower

__all__ = [
    "EncoderMacs",
    "FisherInformation",
    "FisherStatistics",
    "PruningOptions",
    "Reconstruction",
    "StepResult",
    "count_encoder_macs",
    "count_vision_flops",
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
