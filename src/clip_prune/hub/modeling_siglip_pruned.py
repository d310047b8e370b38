"""SigLIP and SigLIP2 models whose vision encoder layers keep their own numbers of heads and neurons.

The layer surgery is shared by every family (`pruned_layers.py`); the attention-pooling head keeps its dense
sizes. Part of the remote code of a pruned directory (see `clip_prune/hub/__init__.py`): imports no clip_prune.
"""

from transformers import Siglip2Model, Siglip2VisionModel, SiglipModel, SiglipVisionModel

from .configuration_siglip_pruned import (
    PrunedSiglip2Config,
    PrunedSiglip2VisionConfig,
    PrunedSiglipConfig,
    PrunedSiglipVisionConfig,
)
from .pruned_layers import PrunedFullModel, PrunedVisionModel


class PrunedSiglipVisionModel(PrunedVisionModel, SiglipVisionModel):
    """A SiglipVisionModel whose layers have the widths of `config.heads_per_layer` and `neurons_per_layer`."""

    config: PrunedSiglipVisionConfig


class PrunedSiglip2VisionModel(PrunedVisionModel, Siglip2VisionModel):
    """A Siglip2VisionModel whose layers have the widths of `config.heads_per_layer` and `neurons_per_layer`."""

    config: PrunedSiglip2VisionConfig


class PrunedSiglipModel(PrunedFullModel, SiglipModel):
    """A SiglipModel whose vision tower is a `PrunedSiglipVisionModel`; the text tower is SigLIP's own."""

    config: PrunedSiglipConfig
    pruned_vision_class = PrunedSiglipVisionModel


class PrunedSiglip2Model(PrunedFullModel, Siglip2Model):
    """A Siglip2Model whose vision tower is a `PrunedSiglip2VisionModel`; the text tower is SigLIP2's own."""

    config: PrunedSiglip2Config
    pruned_vision_class = PrunedSiglip2VisionModel
