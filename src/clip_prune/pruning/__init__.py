"""Pruning algorithms on tensors (no Lightning): Fisher statistics, FLOP model, search, rearrangement,
rescaling (least squares per layer), sensitivity rounds, and physical slicing with save/load."""

from clip_prune.pruning.export import load_pruned, prune_model, read_masks, save_pruned
from clip_prune.pruning.fisher import FisherInformation, FisherStatistics, load_fisher, save_fisher
from clip_prune.pruning.flops import EncoderMacs, count_encoder_macs
from clip_prune.pruning.rearrange import rearrange_mask
from clip_prune.pruning.reconstruct import Reconstruction, reconstruct
from clip_prune.pruning.search import search_masks
from clip_prune.pruning.structural import count_vision_flops, plan_from_masks, slice_vision_tower

__all__ = [
    "EncoderMacs",
    "FisherInformation",
    "FisherStatistics",
    "count_encoder_macs",
    "count_vision_flops",
    "load_fisher",
    "load_pruned",
    "plan_from_masks",
    "prune_model",
    "read_masks",
    "rearrange_mask",
    "Reconstruction",
    "reconstruct",
    "save_fisher",
    "save_pruned",
    "search_masks",
    "slice_vision_tower",
]
