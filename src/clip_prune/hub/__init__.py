"""Pruned config and model classes of every family, in files that `save_pruned` copies verbatim into every saved
directory, so it loads with `trust_remote_code=True` where clip-prune is not installed.

CLIP has a configuration and a modeling file, SigLIP and SigLIP2 share theirs; all use `pruned_layers.py`
(per-layer widths, narrower layers, constant modules for empty layers), which travels with them. Each file
imports only torch, transformers and huggingface_hub (and its siblings, relatively): never clip_prune.
"""

from clip_prune.hub.configuration_clip_pruned import PrunedCLIPConfig, PrunedCLIPVisionConfig
from clip_prune.hub.configuration_siglip_pruned import (
    PrunedSiglip2Config,
    PrunedSiglip2VisionConfig,
    PrunedSiglipConfig,
    PrunedSiglipVisionConfig,
)
from clip_prune.hub.modeling_clip_pruned import PrunedCLIPModel, PrunedCLIPVisionModel
from clip_prune.hub.modeling_siglip_pruned import (
    PrunedSiglip2Model,
    PrunedSiglip2VisionModel,
    PrunedSiglipModel,
    PrunedSiglipVisionModel,
)
from clip_prune.hub.pruned_layers import Bias, ConstantAttention, ConstantMLP, PrunedWidths

__all__ = [
    "Bias",
    "ConstantAttention",
    "ConstantMLP",
    "PrunedCLIPConfig",
    "PrunedCLIPModel",
    "PrunedCLIPVisionConfig",
    "PrunedCLIPVisionModel",
    "PrunedSiglip2Config",
    "PrunedSiglip2Model",
    "PrunedSiglip2VisionConfig",
    "PrunedSiglip2VisionModel",
    "PrunedSiglipConfig",
    "PrunedSiglipModel",
    "PrunedSiglipVisionConfig",
    "PrunedSiglipVisionModel",
    "PrunedWidths",
]
