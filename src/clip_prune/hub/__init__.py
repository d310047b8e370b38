"""Pruned CLIP config and model classes, in files that `save_pruned` copies verbatim into every saved
directory, so it loads with `trust_remote_code=True` where clip-prune is not installed.

Each file imports only torch, transformers and huggingface_hub (and its sibling, relatively):
never clip_prune.
"""

from clip_prune.hub.configuration_clip_pruned import PrunedCLIPConfig, PrunedCLIPVisionConfig
from clip_prune.hub.modeling_clip_pruned import (
    Bias,
    ConstantAttention,
    ConstantMLP,
    PrunedCLIPModel,
    PrunedCLIPVisionModel,
)

__all__ = [
    "Bias",
    "ConstantAttention",
    "ConstantMLP",
    "PrunedCLIPConfig",
    "PrunedCLIPModel",
    "PrunedCLIPVisionConfig",
    "PrunedCLIPVisionModel",
]
